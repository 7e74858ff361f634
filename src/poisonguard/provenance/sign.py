"""Ed25519 signatures over a manifest's digest, kept in a sidecar ``MANIFEST.sig`` (JSON).

The signed message is ``b"poisonguard-manifest-signature-v1\\n" + manifest digest (hex)``; the
manifest digest covers the canonical header, which carries the item count and the digest of
every item, so a signature pins the whole manifest. Keys are PEM files: the private key as
unencrypted PKCS#8 (written with mode 0600), the public key as SubjectPublicKeyInfo.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from poisonguard.errors import ConfigError
from poisonguard.io import atomic_write_bytes, atomic_write_json
from poisonguard.provenance.errors import SignatureError

SIG_FORMAT = "poisonguard-manifest-signature"
SIG_VERSION = 1
_DOMAIN = b"poisonguard-manifest-signature-v1\n"


def signature_path(manifest: str | Path) -> Path:
    """The sidecar signature file of ``manifest``: ``MANIFEST.sig``."""
    manifest = Path(manifest)
    return manifest.with_name(manifest.name + ".sig")


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    """SHA-256 (hex) of the raw 32-byte public key: names a key in reports and signatures."""
    return hashlib.sha256(_raw_public(key)).hexdigest()


def generate_keypair(private_path: str | Path) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair: ``PATH`` (private, mode 0600) and ``PATH.pub``."""
    private_path = Path(private_path)
    public_path = private_path.with_name(private_path.name + ".pub")
    for p in (private_path, public_path):
        if p.exists():
            raise ConfigError(f"{p}: already exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    atomic_write_bytes(private_path, pem)
    os.chmod(private_path, 0o600)
    atomic_write_bytes(public_path, key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    os.chmod(public_path, 0o644)
    return private_path, public_path


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """Load an unencrypted PEM Ed25519 private key; ConfigError when it is not one."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read private key ({exc.strerror})") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(f"{path}: the private key is encrypted; use an unencrypted PEM "
                          "key (poisonguard keygen)") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: not a PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 private key ({type(key).__name__})")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """Load a PEM Ed25519 public key; ConfigError when it is not one."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read public key ({exc.strerror})") from None
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ConfigError(f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path}: not an Ed25519 public key ({type(key).__name__})")
    return key


def sign_digest(digest: str, key: Ed25519PrivateKey, out: str | Path) -> dict[str, Any]:
    """Sign a manifest digest and write the signature file ``out``; return its content."""
    sig = key.sign(_DOMAIN + digest.encode("ascii"))
    doc = {"format": SIG_FORMAT, "version": SIG_VERSION, "algorithm": "ed25519",
           "manifest_digest": digest, "public_key_sha256": key_id(key.public_key()),
           "signature": base64.b64encode(sig).decode("ascii")}
    atomic_write_json(out, doc)
    os.chmod(out, 0o644)
    return doc


def verify_digest(digest: str, sig_path: str | Path, key: Ed25519PublicKey) -> dict[str, Any]:
    """Check the signature file ``sig_path`` over ``digest`` with ``key``.

    Raises :class:`SignatureError` when the file is missing or malformed, was made with another
    key, or does not sign this digest (the manifest was changed after signing).
    """
    sig_path = Path(sig_path)
    try:
        doc = json.loads(sig_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SignatureError(f"{sig_path}: no signature file, but a public key was given; "
                             "the manifest is unsigned and is not trusted") from None
    except (OSError, ValueError) as exc:
        raise SignatureError(f"{sig_path}: unreadable signature file ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != SIG_FORMAT \
            or doc.get("version") != SIG_VERSION or doc.get("algorithm") != "ed25519" \
            or not isinstance(doc.get("signature"), str):
        raise SignatureError(f"{sig_path}: not a poisonguard ed25519 signature file")
    try:
        sig = base64.b64decode(doc["signature"], validate=True)
    except ValueError:
        raise SignatureError(f"{sig_path}: signature is not valid base64") from None
    kid = key_id(key)
    if doc.get("public_key_sha256") not in (None, kid):
        raise SignatureError(f"{sig_path}: signed with another key (key "
                             f"{doc.get('public_key_sha256')}, expected {kid})")
    try:
        key.verify(sig, _DOMAIN + digest.encode("ascii"))
    except InvalidSignature:
        if doc.get("manifest_digest") != digest:
            raise SignatureError(f"{sig_path}: the signature is for manifest digest "
                                 f"{doc.get('manifest_digest')}, but the manifest's digest is "
                                 f"{digest}: the manifest was changed after signing") from None
        raise SignatureError(f"{sig_path}: bad signature: it was not made by key {kid} over "
                             "this manifest") from None
    return {"checked": True, "valid": True, "algorithm": "ed25519", "public_key_sha256": kid,
            "signature_file": str(sig_path)}
