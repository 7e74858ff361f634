"""Blend template: a second-stage, input-space detector for additive (blended) triggers.

A blended trigger adds the same pattern at a fixed opacity to every poisoned image, so it leaves
no constant values for :class:`~poisonguard.detect.trigger_template.TriggerTemplate` to find.
It does leave a shared additive component. Natural images carry little fine detail in common, so
after a high-pass filter (each pixel minus its 3x3 neighbourhood mean) the difference between the
mean of a poisoned class's flagged samples and the mean of the rest is mostly the pattern's fine
detail. Each sample of the class is scored by its high-passed image's projection onto that
template, as a robust z-score against the unflagged samples; samples far above the unflagged
bulk (z > ``min_z``) are flagged, including poisons the first stage missed.

Two guards keep a natural sub-style of a class from passing as a trigger: the flagged set itself
must score far above the unflagged bulk (median z > ``min_z``), and at most ``max_other_match``
of the other classes' samples may score that high. Only images (N, H, W) or (N, H, W, C) are
scored; for feature vectors the detector abstains.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import uniform_filter

from poisonguard.detect.common import robust_location_scale
from poisonguard.errors import DataError
from poisonguard.types import ClassFinding, DetectorResult


def high_pass(x: np.ndarray) -> np.ndarray:
    """Images as float32 in [0, 1] (integers are scaled by 1/255) minus their 3x3 local mean,
    flattened to (N, D). Channels last (N, H, W, C with C <= 4) or first (N, C, H, W) or none."""
    xf = x.astype(np.float32) * (1.0 / 255.0 if np.issubdtype(x.dtype, np.integer) else 1.0)
    if xf.ndim == 3:
        size: tuple[int, ...] = (1, 3, 3)
    elif xf.ndim == 4 and xf.shape[-1] <= 4:
        size = (1, 3, 3, 1)
    elif xf.ndim == 4:
        size = (1, 1, 3, 3)
    else:
        raise DataError(f"high_pass: expected images (N, H, W[, C]), got shape {x.shape}")
    return (xf - uniform_filter(xf, size=size, mode="nearest")).reshape(len(xf), -1)


@dataclass(frozen=True)
class BlendTemplate:
    min_z: float = 6.0
    max_other_match: float = 0.01
    min_flagged: int = 10
    max_other_samples: int = 5000
    name: str = "blend_template"

    def detect(self, x: np.ndarray, labels: np.ndarray, flags: np.ndarray,
               classes: list[int]) -> DetectorResult:
        """``flags``: first-stage flags; ``classes``: the classes judged poisoned."""
        if len(x) != len(labels) or flags.shape != labels.shape:
            raise DataError(f"{self.name}: x, labels and flags must have the same length")
        t0 = time.perf_counter()
        scores = np.zeros(len(labels))
        out = np.zeros(len(labels), dtype=bool)
        findings = []
        image = x.ndim in (3, 4)
        for c in classes:
            idx = np.flatnonzero(labels == c)
            f = flags[idx]
            if not image:
                findings.append(ClassFinding(c, False, len(idx), 0,
                                             {"template": None, "reason": "not images"}))
                continue
            if f.sum() < self.min_flagged or (~f).sum() < self.min_flagged:
                findings.append(ClassFinding(c, False, len(idx), 0,
                                             {"template": None, "reason": "too few samples"}))
                continue
            hp = high_pass(x[idx])
            template = hp[f].mean(0) - hp[~f].mean(0)
            proj = hp @ template
            center, scale = robust_location_scale(proj[~f])  # z against the unflagged
            z = (proj - center) / scale
            others = np.flatnonzero(labels != c)
            sample = others[:: max(1, len(others) // self.max_other_samples)]
            z_other = (high_pass(x[sample]) @ template - center) / scale
            other = float((z_other > self.min_z).mean())
            flagged_median = float(np.median(z[f]))
            evidence = {"flagged_median_z": round(flagged_median, 3),
                        "other_class_match": other, "min_z": self.min_z}
            scores[idx] = z
            if flagged_median <= self.min_z:
                evidence["reason"] = "the flagged set does not share an additive pattern"
                findings.append(ClassFinding(c, False, len(idx), 0, evidence))
                continue
            if other > self.max_other_match:
                evidence["reason"] = "template matches other classes: a natural feature"
                findings.append(ClassFinding(c, False, len(idx), 0, evidence))
                continue
            hit = z > self.min_z
            out[idx] = hit
            findings.append(ClassFinding(c, True, len(idx), int(hit.sum()), evidence))
        rule = {"rule": "high-passed images projected on the flagged-minus-unflagged mean; flag "
                        "robust z (against the unflagged samples) > min_z, when the flagged "
                        "set's median z exceeds min_z and at most max_other_match of other "
                        "classes do",
                "min_z": self.min_z, "max_other_match": self.max_other_match}
        return DetectorResult(self.name, scores, out, self.min_z, rule, tuple(findings),
                              time.perf_counter() - t0)

