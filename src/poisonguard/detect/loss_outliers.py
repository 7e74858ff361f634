"""Per-sample loss outliers: samples whose loss under the sacrificial model is far above the rest
of their class (mislabelled or label-flipped samples). Score: robust z of log-loss within the
class. Flag: z > ``k`` and the model gives the label less than ``max_prob`` probability. A class
is suspicious when its flagged fraction is an outlier across classes (robust z > ``k``) and at
least ``min_fraction`` of the class."""

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
class LossOutliers:
    k: float = 3.5
    max_prob: float = 0.1
    min_fraction: float = 0.05
    name: str = "loss_outliers"

    def detect(self, losses: np.ndarray, labels: np.ndarray) -> DetectorResult:
        check_inputs(None, labels, self.name, need_features=False)
        losses = np.asarray(losses, dtype=np.float64)
        if losses.shape != labels.shape:
            raise DataError(f"{self.name}: {losses.shape} losses for {labels.shape} labels")
        if not np.isfinite(losses).all() or (losses < 0).any():
            raise DataError(f"{self.name}: losses must be finite and non-negative")
        t0 = time.perf_counter()
        log_loss = np.log(losses + 1e-8)
        scores = np.zeros(len(labels))
        flags = np.zeros(len(labels), dtype=bool)
        min_loss = -np.log(self.max_prob)
        for _c, idx in per_class(labels):
            z = robust_z(log_loss[idx])
            scores[idx] = z
            flags[idx] = (z > self.k) & (losses[idx] > min_loss)
        findings = class_fraction_findings(flags, labels, self.k, self.min_fraction)
        rule = {"rule": "within-class robust z of log-loss > k and p(label) < max_prob",
                "k": self.k, "max_prob": self.max_prob}
        return DetectorResult(self.name, scores, flags, self.k, rule, findings,
                              time.perf_counter() - t0)
