"""Datasets: the LabeledData container, loaders, built-ins and validation."""

from poisonguard.data.labeled import LabeledData, check_scannable, check_trusted
from poisonguard.data.loaders import (
    load_builtin_digits,
    load_dataset,
    load_image_folder,
    load_npz,
    load_shared,
)

__all__ = [
    "LabeledData",
    "check_scannable",
    "check_trusted",
    "load_builtin_digits",
    "load_dataset",
    "load_image_folder",
    "load_npz",
    "load_shared",
]
