"""Provenance layer: pin every item of a dataset (files, npz samples, URLs) into a manifest,
optionally sign it (Ed25519), and verify before training that nothing was modified, removed or
added, catching split-view and frontrunning changes (Carlini et al., IEEE S&P 2024).
"""

from __future__ import annotations

from poisonguard.provenance.errors import ManifestError, SignatureError
from poisonguard.provenance.fetch import Fetcher, FetchOptions, FetchResult
from poisonguard.provenance.manifest import ItemBatch, ManifestReader, read_manifest
from poisonguard.provenance.pin import PinOptions, PinResult, pin
from poisonguard.provenance.sign import generate_keypair, load_public_key, signature_path
from poisonguard.provenance.verify import (
    Modified,
    Unverifiable,
    VerifyOptions,
    VerifyResult,
    verify,
)

__all__ = [
    "FetchOptions", "FetchResult", "Fetcher", "ItemBatch", "ManifestError", "ManifestReader",
    "Modified", "PinOptions", "PinResult", "SignatureError", "Unverifiable", "VerifyOptions",
    "VerifyResult", "generate_keypair", "load_public_key", "pin", "read_manifest",
    "signature_path", "verify",
]
