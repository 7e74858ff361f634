"""Mergeable moments: count, mean and scatter (sum of centred outer products) of row vectors.

Two partial states merge exactly (Chan et al.'s pairwise update), so the result does not depend
on how the rows were split into chunks, up to floating-point summation order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

T = TypeVar("T")


@dataclass(frozen=True)
class Moments:
    """``n`` rows, their ``mean`` (d,) and ``scatter`` (d, d) = sum of (x - mean)(x - mean)^T."""

    n: int
    mean: np.ndarray
    scatter: np.ndarray

    @classmethod
    def of(cls, x: np.ndarray) -> Moments:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim == 1:
            x = x[:, None]
        if not len(x):
            d = x.shape[1]
            return cls(0, np.zeros(d), np.zeros((d, d)))
        mean = x.mean(axis=0)
        xc = x - mean
        return cls(len(x), mean, xc.T @ xc)

    def merge(self, other: Moments) -> Moments:
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        scatter = self.scatter + other.scatter + np.outer(delta, delta) * (self.n * other.n / n)
        return Moments(n, mean, scatter)

    @property
    def variance(self) -> np.ndarray:
        """Population variance per dimension (divides by n, as ``np.var``)."""
        return np.diag(self.scatter) / max(self.n, 1)

    @property
    def covariance(self) -> np.ndarray:
        """Sample covariance (divides by n - 1)."""
        return self.scatter / max(self.n - 1, 1)


def merge_by_key(a: dict[int, T], b: dict[int, T], merge: Callable[[T, T], T]) -> dict[int, T]:
    """Merge two per-class dicts of partial states (keys present in one are copied)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if k in out else v
    return out
