"""Core result types shared by every layer. Score convention: higher = more suspicious."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ClassFinding:
    """A detector's (or the cross-reference's) judgement of one class."""

    label: int
    suspicious: bool
    n_samples: int
    n_flagged: int
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": int(self.label),
            "suspicious": bool(self.suspicious),
            "n_samples": int(self.n_samples),
            "n_flagged": int(self.n_flagged),
            "evidence": _jsonable(self.evidence),
        }


@dataclass(frozen=True)
class DetectorResult:
    """The one result type every detector returns.

    ``scores`` has one value per sample (higher = more suspicious); ``flags`` marks the samples the
    detector calls poisoned under ``threshold_rule`` (recorded with its parameters, never derived
    from the true poison rate); ``findings`` holds the per-class judgement.
    """

    name: str
    scores: np.ndarray
    flags: np.ndarray
    threshold: float | None
    threshold_rule: dict[str, Any]
    findings: tuple[ClassFinding, ...]
    runtime_s: float
    params: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scores.shape != self.flags.shape or self.scores.ndim != 1:
            raise ValueError(
                f"{self.name}: scores {self.scores.shape} and flags {self.flags.shape} "
                "must be 1-D and the same length"
            )

    @property
    def suspicious_classes(self) -> list[int]:
        return [f.label for f in self.findings if f.suspicious]

    def summary(self) -> dict[str, Any]:
        """JSON-ready form without the per-sample arrays."""
        return {
            "name": self.name,
            "n_flagged": int(self.flags.sum()),
            "threshold": None if self.threshold is None else float(self.threshold),
            "threshold_rule": _jsonable(self.threshold_rule),
            "params": _jsonable(self.params),
            "runtime_s": round(float(self.runtime_s), 4),
            "suspicious_classes": self.suspicious_classes,
            "findings": [f.to_dict() for f in self.findings],
        }


def _jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays (recursively) into JSON-serialisable Python objects."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "biu":   # ints and bools convert as they are
            return obj.tolist()
        if obj.dtype.kind == "f" and np.isfinite(obj).all():
            return obj.astype(float).tolist()
        return _jsonable(obj.tolist())
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if np.isfinite(v) else None
    return obj


jsonable = _jsonable
