"""Spectral signatures (Tran et al. 2018), thresholded without the poison rate.

Per class: centre the representations and project them on the top singular vector (the
direction a poison sub-population stretches). The projection is split in two (1-D 2-means); the
class is suspicious when the split separates by >= ``min_separation`` pooled standard deviations
and the poison side holds >= ``min_size`` of the class. The poison side is chosen by
:func:`choose_poison_group` (lower loss) when losses are given, else the smaller side.
Score: the squared projection in
robust units, measured from the clean side's median (so scores compare across classes); in a
suspicious class, samples on the poison side with score > ``k**2`` are flagged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from poisonguard.detect.common import (
    MAD_TO_SIGMA,
    check_inputs,
    choose_poison_group,
    per_class_centred,
    split_1d,
    top_principal,
)
from poisonguard.types import ClassFinding, DetectorResult


@dataclass(frozen=True)
class SpectralSignatures:
    k: float = 3.0
    min_separation: float = 4.0
    min_size: float = 0.005
    max_size: float = 0.67
    name: str = "spectral_signatures"

    def detect(self, features: np.ndarray, labels: np.ndarray,
               losses: np.ndarray | None = None) -> DetectorResult:
        check_inputs(features, labels, self.name, losses=losses)
        t0 = time.perf_counter()
        scores = np.zeros(len(labels))
        flags = np.zeros(len(labels), dtype=bool)
        findings = []
        for c, idx, xc in per_class_centred(features, labels, findings):
            v, _ = top_principal(xc, 1)
            p = xc @ v[0]
            cut, sep = split_1d(p)
            groups = [np.flatnonzero(p <= cut), np.flatnonzero(p > cut)]
            poison, evidence = choose_poison_group([idx[g] for g in groups], losses)
            clean_side = p[groups[1 - poison]]
            med = float(np.median(clean_side))
            scale = max(MAD_TO_SIGMA * float(np.median(np.abs(clean_side - med))), 1e-12)
            z = (p - med) / scale
            if poison == 0:
                z = -z
            scores[idx] = np.sign(z) * z**2
            rel = len(groups[poison]) / len(idx)
            suspicious = (sep >= self.min_separation
                          and self.min_size <= rel <= self.max_size)
            class_flags = (z > self.k) if suspicious else np.zeros(len(idx), dtype=bool)
            flags[idx] = class_flags
            findings.append(ClassFinding(c, suspicious, len(idx), int(class_flags.sum()), {
                "separation": round(sep, 3), "poison_side_size": round(rel, 4), **evidence}))
        rule = {"rule": "top singular vector; 1-D split; suspicious if separation >= "
                        "min_separation and poison side >= min_size; flag robust z > k on the "
                        "poison side", "k": self.k, "min_separation": self.min_separation,
                "min_size": self.min_size, "max_size": self.max_size}
        return DetectorResult(self.name, scores, flags, self.k**2, rule, tuple(findings),
                              time.perf_counter() - t0,
                              params={"losses": losses is not None})
