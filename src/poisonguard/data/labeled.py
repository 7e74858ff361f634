"""LabeledData: samples, integer labels and stable ids, validated at construction."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from poisonguard.errors import DataError

MIN_PER_CLASS = 5


@dataclass(frozen=True)
class LabeledData:
    """Samples ``x`` (N, ...), labels ``y`` (N,) int64 and unique stable ``ids`` (N,).

    Images are uint8 NHW (grey) or NHWC (C in 1, 3, 4), or float in [0, 1]; vectors are float
    (N, D). Construction validates everything and raises :class:`DataError` naming the problem.
    """

    x: np.ndarray
    y: np.ndarray
    ids: np.ndarray

    @classmethod
    def create(
        cls, x: np.ndarray, y: np.ndarray, ids: np.ndarray | None = None, name: str = "data"
    ) -> LabeledData:
        x = np.asarray(x)
        y = _validate_labels(np.asarray(y), name)
        _validate_x(x, name)
        if len(x) != len(y):
            raise DataError(
                f"{name}: x has {len(x)} samples but y has {len(y)} labels; they must match"
            )
        if ids is None:
            ids = np.arange(len(x), dtype=np.int64)
        ids = np.asarray(ids)
        if ids.shape != (len(x),):
            raise DataError(f"{name}: ids must have shape ({len(x)},), got {ids.shape}")
        if len(np.unique(ids)) != len(ids):
            raise DataError(f"{name}: ids must be unique; found duplicates")
        return cls(x=x, y=y, ids=ids)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def n_classes(self) -> int:
        return int(self.y.max()) + 1

    @property
    def is_image(self) -> bool:
        return self.x.ndim in (3, 4)

    def subset(self, index: np.ndarray) -> LabeledData:
        index = np.asarray(index)
        return LabeledData(x=self.x[index], y=self.y[index], ids=self.ids[index])

    def fingerprint(self) -> str:
        """sha256 over shape, dtype and bytes of x and y: identifies the exact dataset."""
        h = hashlib.sha256()
        for arr in (self.x, self.y):
            a = np.ascontiguousarray(arr)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
        return h.hexdigest()

    def class_counts(self) -> dict[int, int]:
        labels, counts = np.unique(self.y, return_counts=True)
        return {int(k): int(v) for k, v in zip(labels, counts)}


def _validate_x(x: np.ndarray, name: str) -> None:
    if x.size == 0 or len(x) == 0:
        raise DataError(f"{name}: x is empty; expected at least one sample")
    if x.dtype == object or not (
        np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)
        or x.dtype == bool
    ):
        raise DataError(f"{name}: x has dtype {x.dtype}; expected uint8 images or float arrays")
    if x.ndim not in (2, 3, 4):
        raise DataError(
            f"{name}: x has shape {x.shape}; expected (N, D) vectors, (N, H, W) grey images "
            "or (N, H, W, C) colour images"
        )
    if x.ndim == 4 and x.shape[-1] not in (1, 3, 4):
        raise DataError(
            f"{name}: x has shape {x.shape}; 4-D images must be NHWC with C in (1, 3, 4)"
        )
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).reshape(len(x), -1).any(axis=1).sum())
        raise DataError(f"{name}: x contains NaN or inf in {bad} sample(s); clean or drop them")
    if np.issubdtype(x.dtype, np.integer) and x.dtype != np.uint8 and x.ndim in (3, 4):
        if x.min() < 0 or x.max() > 255:
            raise DataError(f"{name}: integer images must lie in [0, 255], got "
                            f"[{x.min()}, {x.max()}]")


def _validate_labels(y: np.ndarray, name: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{name}: y has shape {y.shape}; expected (N,) integer class labels")
    if len(y) == 0:
        raise DataError(f"{name}: y is empty; expected at least one label")
    if np.issubdtype(y.dtype, np.floating):
        if not np.isfinite(y).all() or not np.all(y == np.round(y)):
            raise DataError(f"{name}: y holds non-integer or NaN values; expected class indices")
    elif not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{name}: y has dtype {y.dtype}; expected integer class labels")
    if y.min() < 0:
        raise DataError(f"{name}: y has negative labels (min {y.min()}); expected 0..K-1")
    return y.astype(np.int64)


def check_label_range(data: LabeledData) -> None:
    """Refuse labels that are not (mostly) 0..K-1, e.g. {0, 10, ..., 90}, which would silently
    become a 91-class model: at least half of 0..max must be present."""
    present = np.unique(data.y)
    k = int(present.max()) + 1
    if k > 2 and len(present) < k / 2:
        shown = ", ".join(str(int(v)) for v in present[:8]) + (", …" if len(present) > 8 else "")
        raise DataError(f"labels {{{shown}}} are {len(present)} classes spread "
                        f"over 0..{k - 1}; remap them to 0..{len(present) - 1} (e.g. "
                        "np.unique(y, return_inverse=True)[1])")


def check_scannable(data: LabeledData, min_per_class: int = MIN_PER_CLASS) -> None:
    """Raise DataError unless there are >= 2 classes with >= ``min_per_class`` samples each and
    the labels are 0..K-1 (:func:`check_label_range`)."""
    check_label_range(data)
    counts = data.class_counts()
    if len(counts) < 2:
        raise DataError(
            f"only one class ({next(iter(counts))}) present; a poisoning scan compares samples "
            "within and across classes and needs at least two"
        )
    small = {k: v for k, v in counts.items() if v < min_per_class}
    if small:
        raise DataError(
            f"class(es) with fewer than {min_per_class} samples: {small}; add samples or drop "
            "those classes"
        )


def check_trusted(data: LabeledData, trusted: LabeledData) -> None:
    """Raise DataError unless ``trusted`` (a small set the user vouches for) can be compared with
    ``data``: non-empty, the same sample shape and dtype family, the same value range, and no
    class the data lacks."""
    if len(trusted) == 0:
        raise DataError("the trusted set is empty; give at least a few samples per class")
    if trusted.x.shape[1:] != data.x.shape[1:]:
        raise DataError(f"trusted samples have shape {trusted.x.shape[1:]} but the data's are "
                        f"{data.x.shape[1:]}; they must match")
    int_t, int_d = (np.issubdtype(a.x.dtype, np.integer) for a in (trusted, data))
    if int_t != int_d:
        raise DataError(f"trusted samples are {trusted.x.dtype} but the data's are "
                        f"{data.x.dtype}; give both as uint8 or both as float")
    if not int_d:
        lo, hi = float(data.x.min()), float(data.x.max())
        tlo, thi = float(trusted.x.min()), float(trusted.x.max())
        span = max(hi - lo, 1e-12)
        if tlo < lo - 0.5 * span or thi > hi + 0.5 * span:
            raise DataError(f"trusted values span [{tlo:.3g}, {thi:.3g}] but the data's span "
                            f"[{lo:.3g}, {hi:.3g}]; scale both the same way")
    extra = sorted(set(np.unique(trusted.y).tolist()) - set(np.unique(data.y).tolist()))
    if extra:
        raise DataError(f"the trusted set has classes {extra} that the data lacks; the class "
                        "sets must match")
