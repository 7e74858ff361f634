"""Mergeable sketches: a hash-keyed uniform sample and a bounded-range histogram.

``HashSample`` keeps the rows whose key (a bijective 64-bit mix of the global row index and a
seed) is smallest: a uniform random sample that depends only on which rows exist, never on how
they were chunked or in which order chunks arrived. ``Histogram`` counts values in fixed bins
over a range fixed in advance (with under/overflow counts), so it merges by addition; its
median and MAD are read off the piecewise-linear CDF.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def row_keys(rows: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of (row index + seed offset): distinct rows get distinct uint64 keys."""
    with np.errstate(over="ignore"):
        z = np.asarray(rows, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15) * np.uint64(
            seed + 1)
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


@dataclass(frozen=True)
class HashSample:
    """At most ``size`` rows: their global ``rows`` indices, ``keys`` and ``values`` (m, k),
    sorted by key."""

    size: int
    rows: np.ndarray
    keys: np.ndarray
    values: np.ndarray

    @classmethod
    def of(cls, rows: np.ndarray, values: np.ndarray, size: int, seed: int) -> HashSample:
        return cls._keep(size, np.asarray(rows, dtype=np.int64), row_keys(rows, seed),
                         np.asarray(values, dtype=np.float64))

    @classmethod
    def _keep(cls, size: int, rows: np.ndarray, keys: np.ndarray,
              values: np.ndarray) -> HashSample:
        order = np.argsort(keys, kind="stable")[:size]
        return cls(size, rows[order], keys[order], values[order])

    def merge(self, other: HashSample) -> HashSample:
        return self._keep(self.size, np.concatenate([self.rows, other.rows]),
                          np.concatenate([self.keys, other.keys]),
                          np.concatenate([self.values, other.values]))


@dataclass(frozen=True)
class Histogram:
    """Counts of values in ``len(counts)`` equal bins over [lo, hi], plus ``under``/``over``."""

    lo: float
    hi: float
    counts: np.ndarray
    under: int
    over: int

    @classmethod
    def of(cls, values: np.ndarray, lo: float, hi: float, bins: int) -> Histogram:
        values = np.asarray(values, dtype=np.float64)
        counts, _ = np.histogram(values[(values >= lo) & (values <= hi)], bins=bins,
                                 range=(lo, hi))
        return cls(lo, hi, counts.astype(np.int64), int((values < lo).sum()),
                   int((values > hi).sum()))

    def merge(self, other: Histogram) -> Histogram:
        return Histogram(self.lo, self.hi, self.counts + other.counts,
                         self.under + other.under, self.over + other.over)

    @property
    def n(self) -> int:
        return int(self.counts.sum()) + self.under + self.over

    def _edges_cdf(self) -> tuple[np.ndarray, np.ndarray]:
        edges = np.linspace(self.lo, self.hi, len(self.counts) + 1)
        cdf = self.under + np.concatenate([[0], np.cumsum(self.counts)]).astype(np.float64)
        return edges, cdf

    def cdf(self, x: np.ndarray | float) -> np.ndarray:
        """Rows <= x (interpolated within bins; under/overflow rows sit beyond the range)."""
        edges, cdf = self._edges_cdf()
        return np.interp(x, edges, cdf, left=0.0, right=float(self.n))

    def median(self) -> float:
        edges, cdf = self._edges_cdf()
        half = 0.5 * self.n
        j = int(np.searchsorted(cdf, half, side="left"))
        if j == 0:
            return float(edges[0])
        if j >= len(cdf):
            return float(edges[-1])
        lo_c, hi_c = cdf[j - 1], cdf[j]
        frac = 0.0 if hi_c <= lo_c else (half - lo_c) / (hi_c - lo_c)
        return float(edges[j - 1] + frac * (edges[j] - edges[j - 1]))

    def mad(self, center: float) -> float:
        """Median absolute deviation from ``center``, by bisection on the interpolated CDF."""
        half = 0.5 * self.n
        lo, hi = 0.0, float(self.hi - self.lo)
        for _ in range(60):
            t = 0.5 * (lo + hi)
            if float(self.cdf(center + t) - self.cdf(center - t)) >= half:
                hi = t
            else:
                lo = t
        return hi
