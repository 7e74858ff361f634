"""Modalities as plug-ins: one small protocol per kind of data (see :mod:`.base`)."""

from poisonguard.modalities import audio, image, tabular, text  # noqa: F401  (registers them)
from poisonguard.modalities.base import Modality, for_path, get_modality, names, register

__all__ = ["Modality", "for_path", "get_modality", "names", "register"]
