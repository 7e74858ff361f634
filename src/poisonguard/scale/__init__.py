"""Streamed, mergeable representation detectors (``poisonguard scan-features``).

Every statistic the detector needs is a partial state computed on one chunk of rows and merged
with others (counts, means and scatter matrices; a hash-keyed uniform sample; bounded-range
histograms), so the same code runs over one in-memory chunk, over Parquet row groups one at a
time, or over chunks spread across Dask workers, and gives the same flags. See docs/scale.md.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ScaleConfig", "detect_in_memory", "scan_features"]


def __getattr__(name: str) -> Any:
    """Import on first use (the CLI's parser imports this package's ``cli`` only)."""
    if name == "ScaleConfig":
        from poisonguard.scale.detector import ScaleConfig

        return ScaleConfig
    if name in ("detect_in_memory", "scan_features"):
        from poisonguard.scale import run

        return getattr(run, name)
    raise AttributeError(f"module 'poisonguard.scale' has no attribute {name!r}")
