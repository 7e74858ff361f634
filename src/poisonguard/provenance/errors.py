"""Provenance-specific errors (all map to exit code 2 through ``PoisonguardError``)."""

from __future__ import annotations

from poisonguard.errors import DataError, IntegrityError


class ManifestError(DataError):
    """A manifest is unreadable or malformed: bad header, truncated file, duplicate keys."""


class SignatureError(IntegrityError):
    """A manifest signature is missing, malformed, made with another key, or does not match."""
