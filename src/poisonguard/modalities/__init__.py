"""Modalities as plug-ins: one small protocol per kind of data (see :mod:`.base`)."""

from poisonguard.modalities import image, text  # noqa: F401  (registers image, vector, text)
from poisonguard.modalities.base import Modality, for_path, get_modality, names, register

__all__ = ["Modality", "for_path", "get_modality", "names", "register"]
