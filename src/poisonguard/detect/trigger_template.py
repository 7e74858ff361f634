"""Trigger template: a second-stage, input-space detector for classes already judged poisoned.

Among the samples the representation detectors flagged in a poisoned class, find the input
values (pixels x channels) on which at least ``min_agreement`` of the flagged set agree (within a
tolerance around their median) and which differ from the class's unflagged samples: a stamped
trigger (a BadNets patch) leaves exactly that, and the agreement rule tolerates clean samples
flagged by mistake. Every sample
of the class matching the template on all those values is flagged, including poisons the
sacrificial model never learned (they carry the trigger but sit with the clean samples in
representation space). A template that also matches more than ``max_other_match`` of the other
classes' samples is a natural feature, not a trigger, and is discarded. ``extras["templates"]``
maps each class given a template to its (flat mask, values in the data's units). Blended
triggers leave no constant values, so no template is formed and nothing is added.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from poisonguard.detect.common import MAD_TO_SIGMA
from poisonguard.errors import DataError
from poisonguard.types import ClassFinding, DetectorResult


@dataclass(frozen=True)
class TriggerTemplate:
    max_spread: float = 0.05
    min_agreement: float = 0.8
    min_shift: float = 0.2
    tolerance_sd: float = 3.0
    min_tolerance: float = 0.5 / 255
    max_other_match: float = 0.01
    min_flagged: int = 10
    name: str = "trigger_template"

    def detect(self, x: np.ndarray, labels: np.ndarray, flags: np.ndarray,
               classes: list[int]) -> DetectorResult:
        """``flags``: first-stage flags; ``classes``: the classes judged poisoned."""
        if len(x) != len(labels) or flags.shape != labels.shape:
            raise DataError(f"{self.name}: x, labels and flags must have the same length")
        t0 = time.perf_counter()
        scale = 1.0 / 255.0 if np.issubdtype(x.dtype, np.integer) else 1.0
        flat = x.reshape(len(x), -1)
        scores = np.zeros(len(labels))
        out = np.zeros(len(labels), dtype=bool)
        findings = []
        templates: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for c in classes:
            idx = np.flatnonzero(labels == c)
            f = flags[idx]
            if f.sum() < self.min_flagged or (~f).sum() < self.min_flagged:
                findings.append(ClassFinding(c, False, len(idx), 0,
                                             {"template": None, "reason": "too few samples"}))
                continue
            xc = flat[idx].astype(np.float32) * scale
            center = np.median(xc[f], axis=0)
            spread = MAD_TO_SIGMA * np.median(np.abs(xc[f] - center), axis=0)
            tol_all = np.maximum(self.tolerance_sd * spread, self.min_tolerance)
            agree = (np.abs(xc[f] - center) <= tol_all).mean(0)
            shift = np.abs(center - np.median(xc[~f], axis=0))
            mask = ((agree >= self.min_agreement) & (spread < self.max_spread)
                    & (shift > self.min_shift))
            if not mask.any():
                findings.append(ClassFinding(c, False, len(idx), 0, {"template": None,
                                             "reason": "no values shared by the flagged set"}))
                continue
            mf = center
            tol = tol_all[mask]
            match = (np.abs(xc[:, mask] - mf[mask]) <= tol).mean(1)
            others = np.flatnonzero(labels != c)
            sample = others[:: max(1, len(others) // 5000)]
            other = (np.abs(flat[sample][:, mask].astype(np.float32) * scale - mf[mask])
                     <= tol).all(1).mean()
            evidence = {"template_size": int(mask.sum()), "other_class_match": float(other),
                        "template_positions": np.flatnonzero(mask)[:64].tolist()}
            scores[idx] = match
            if other > self.max_other_match:
                evidence["reason"] = "template matches other classes: a natural feature"
                findings.append(ClassFinding(c, False, len(idx), 0, evidence))
                continue
            hit = match >= 1.0
            out[idx] = hit
            templates[c] = (mask, (mf[mask] / scale).astype(np.float32))
            findings.append(ClassFinding(c, True, len(idx), int(hit.sum()), evidence))
        rule = {"rule": "values on which >= min_agreement of the flagged set agree (robust sd < "
                        "max_spread) and that are shifted from the class (> min_shift); flag "
                        "samples matching all of them within max(tolerance_sd * sd, "
                        "min_tolerance)",
                "max_spread": self.max_spread, "min_agreement": self.min_agreement,
                "min_shift": self.min_shift,
                "tolerance_sd": self.tolerance_sd, "max_other_match": self.max_other_match}
        return DetectorResult(self.name, scores, out, 1.0, rule, tuple(findings),
                              time.perf_counter() - t0, extras={"templates": templates})
