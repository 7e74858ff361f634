"""Per-sample gradient-norm monitoring as a data-side detector.

During training, the L2 norm of every sample's loss gradient (w.r.t. the last layers, batched
with ``torch.func``) is recorded after each epoch. Score: the within-class robust z-score of the
sample's mean log gradient norm across epochs, two-sided (|z|: a poison can stand out by being
learned unusually fast or by resisting); flags: |z| > ``k``. A class is suspicious when its
flagged share is an outlier across classes and at least ``min_fraction``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from poisonguard.detect.common import (
    check_inputs,
    class_fraction_findings,
    per_class,
    robust_z,
)
from poisonguard.errors import DataError
from poisonguard.types import DetectorResult


@dataclass(frozen=True)
class GradientNormMonitor:
    k: float = 3.5
    min_fraction: float = 0.02
    name: str = "gradient_norms"

    def detect(self, history: np.ndarray, labels: np.ndarray) -> DetectorResult:
        """``history``: (epochs, samples) per-sample gradient norms."""
        check_inputs(None, labels, self.name, need_features=False)
        history = np.asarray(history, dtype=np.float64)
        if history.ndim != 2 or history.shape[1] != len(labels):
            raise DataError(f"{self.name}: history must be (epochs, {len(labels)}), got "
                            f"{history.shape}")
        if not np.isfinite(history).all():
            raise DataError(f"{self.name}: gradient norms contain NaN or inf")
        t0 = time.perf_counter()
        mean_log = np.log(history + 1e-12).mean(axis=0)
        scores = np.zeros(len(labels))
        for _c, idx in per_class(labels):
            scores[idx] = np.abs(robust_z(mean_log[idx]))
        flags = scores > self.k
        findings = class_fraction_findings(flags, labels, self.k, self.min_fraction)
        rule = {"rule": "|within-class robust z of mean log gradient norm| > k", "k": self.k,
                "min_fraction": self.min_fraction}
        return DetectorResult(self.name, scores, flags, self.k, rule, findings,
                              time.perf_counter() - t0, params={"epochs": history.shape[0]})
