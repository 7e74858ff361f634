"""Client updates at the server boundary: validate them and lay them out as one matrix.

An update is either a state-dict-like mapping ``name -> array`` (numpy arrays, torch tensors or
nested lists of numbers; the model delta ``local - global``) or one flat vector. Every client in
a round must send the same form; the first round fixes the layout (:class:`UpdateLayout`) and
later rounds are checked against it. Every problem is one :class:`~poisonguard.errors.DataError`
naming the client and what is wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from poisonguard.errors import DataError

Update = Mapping[str, Any] | np.ndarray | Any


def _as_array(value: Any, where: str) -> np.ndarray:
    """A float64 numpy copy of ``value`` (numpy, torch or nested lists), checked finite."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: not an array of numbers ({exc})") from None
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number)
                                   or arr.dtype == np.bool_):
        raise DataError(f"{where}: has dtype {arr.dtype}; expected numbers")
    if np.iscomplexobj(arr):
        raise DataError(f"{where}: holds complex numbers; expected real numbers")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise DataError(f"{where}: holds {bad} NaN or inf value(s); the client's update is "
                        "corrupt, drop it or ask the client to resend")
    return arr


@dataclass(frozen=True)
class UpdateLayout:
    """The form of a round's updates: ``keys`` with their ``shapes`` (a state dict), or
    ``keys=None`` and one shape ``(d,)`` (flat vectors)."""

    keys: tuple[str, ...] | None
    shapes: tuple[tuple[int, ...], ...]

    @property
    def size(self) -> int:
        return int(sum(int(np.prod(s)) for s in self.shapes))

    @property
    def is_dict(self) -> bool:
        return self.keys is not None

    @classmethod
    def of(cls, client: str, update: Update) -> UpdateLayout:
        """The layout ``update`` (from ``client``) has."""
        if isinstance(update, Mapping):
            if not update:
                raise DataError(f"client {client!r}: the update is an empty mapping")
            keys = tuple(str(k) for k in update)
            shapes = tuple(_as_array(update[k], f"client {client!r}: update {k!r}").shape
                           for k in update)
            return cls(keys=keys, shapes=shapes)
        arr = _as_array(update, f"client {client!r}: update")
        if arr.ndim != 1 or arr.size == 0:
            raise DataError(f"client {client!r}: a flat update must be a non-empty 1-D vector, "
                            f"got shape {arr.shape}; send a state dict or flatten it")
        return cls(keys=None, shapes=(arr.shape,))

    def flatten(self, client: str, update: Update) -> np.ndarray:
        """``update`` as one float64 vector in this layout's order; DataError on a mismatch."""
        if self.keys is None:
            if isinstance(update, Mapping):
                raise DataError(f"client {client!r}: sent a state dict but this server takes "
                                "flat vectors (the first update it saw was one)")
            arr = _as_array(update, f"client {client!r}: update")
            if arr.shape != self.shapes[0]:
                raise DataError(f"client {client!r}: update has shape {arr.shape}, expected "
                                f"{self.shapes[0]}")
            return arr
        if not isinstance(update, Mapping):
            raise DataError(f"client {client!r}: sent a flat vector but this server takes "
                            "state dicts (the first update it saw was one)")
        names = {str(k): k for k in update}
        missing = [k for k in self.keys if k not in names]
        if missing:
            raise DataError(f"client {client!r}: update is missing {len(missing)} key(s), "
                            f"first {missing[0]!r}")
        extra = sorted(set(names) - set(self.keys))
        if extra:
            raise DataError(f"client {client!r}: update has {len(extra)} unexpected key(s), "
                            f"first {extra[0]!r}")
        parts = []
        for key, shape in zip(self.keys, self.shapes):
            arr = _as_array(update[names[key]], f"client {client!r}: update {key!r}")
            if arr.shape != shape:
                raise DataError(f"client {client!r}: update {key!r} has shape {arr.shape}, "
                                f"expected {shape}")
            parts.append(arr.ravel())
        return np.concatenate(parts)

    def unflatten(self, vector: np.ndarray) -> dict[str, np.ndarray] | np.ndarray:
        """A flat vector back in this layout (a dict of float32 arrays, or the vector)."""
        if self.keys is None:
            return np.asarray(vector, dtype=np.float32)
        out, start = {}, 0
        for key, shape in zip(self.keys, self.shapes):
            n = int(np.prod(shape))
            out[key] = np.asarray(vector[start:start + n], dtype=np.float32).reshape(shape)
            start += n
        return out


def stack_updates(updates: Mapping[Any, Update], layout: UpdateLayout | None = None
                  ) -> tuple[list[str], np.ndarray, UpdateLayout]:
    """Validate a round's ``updates`` (client id -> update) and stack them: the client ids (as
    strings, in the given order), an (n_clients, d) float64 matrix and the layout."""
    if not isinstance(updates, Mapping):
        raise DataError(f"updates must be a mapping client id -> update, got "
                        f"{type(updates).__name__}")
    if not updates:
        raise DataError("no client updates this round; at least one is needed")
    ids = [str(c) for c in updates]
    if len(set(ids)) != len(ids):
        raise DataError("two clients have the same id once written as text; ids must be unique")
    items = list(updates.values())
    if layout is None:
        layout = UpdateLayout.of(ids[0], items[0])
    rows = [layout.flatten(cid, upd) for cid, upd in zip(ids, items)]
    return ids, np.stack(rows), layout


def check_weights(ids: list[str], weights: Mapping[Any, float] | None) -> np.ndarray:
    """Per-client aggregation weights (e.g. sample counts) in ``ids`` order, normalised to sum
    to 1; equal weights when ``weights`` is None."""
    if weights is None:
        return np.full(len(ids), 1.0 / len(ids))
    named = {str(k): v for k, v in weights.items()}
    missing = [c for c in ids if c not in named]
    if missing:
        raise DataError(f"weights: no weight for client {missing[0]!r}")
    w = np.array([float(named[c]) for c in ids])
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise DataError("weights must be finite, >= 0 and not all 0 (e.g. sample counts)")
    return w / w.sum()
