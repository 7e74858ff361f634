"""Errors a user can act on. Every message says what was expected, what was found, what to do."""

from __future__ import annotations


class PoisonguardError(Exception):
    """Base class: bad input or usage. The CLI maps it to exit code 2."""


class DataError(PoisonguardError):
    """The dataset is malformed: shape, dtype, NaN/inf, lengths, labels, empty file, keys."""


class ModelError(PoisonguardError):
    """The model cannot be used: unknown layer, unsafe file, output shape mismatch."""


class UnsafeModelFileError(ModelError):
    """A model file would need unpickling arbitrary objects; it is refused, never loaded."""


class ConfigError(PoisonguardError):
    """An option has an invalid value or name."""


class IntegrityError(DataError):
    """A file's content hash does not match the pinned one."""
