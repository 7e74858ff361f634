"""Cross-referencing: combine detector results into one flag set, a per-sample confidence and a
per-class verdict.

Per class, the verdict is ``poisoned`` when at least ``min_class_votes`` detectors call the class
suspicious, ``suspect`` when one does, else ``clean``. A sample is flagged when at least
``min_sample_votes`` detectors flag it, or when one does and its class is ``poisoned`` (class-level
agreement backs a single detector's sample-level call). Confidence = share of detectors flagging
the sample (higher = more suspicious).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from poisonguard.errors import ConfigError
from poisonguard.types import ClassFinding, DetectorResult


@dataclass(frozen=True)
class CrossReference:
    min_class_votes: int = 2
    min_sample_votes: int = 2
    name: str = "cross_reference"

    def combine(self, results: list[DetectorResult], labels: np.ndarray) -> DetectorResult:
        if not results:
            raise ConfigError("cross-referencing needs at least one detector result")
        n = len(labels)
        for r in results:
            if len(r.flags) != n:
                raise ConfigError(f"{r.name} scored {len(r.flags)} samples, expected {n}")
        t0 = time.perf_counter()
        need_class = min(self.min_class_votes, len(results))
        need_sample = min(self.min_sample_votes, len(results))
        votes = np.sum([r.flags for r in results], axis=0)
        confidence = votes / len(results)
        flags = votes >= need_sample
        findings = []
        for c in np.unique(labels):
            idx = labels == c
            voters = [r.name for r in results if c in r.suspicious_classes]
            verdict = ("poisoned" if len(voters) >= need_class
                       else "suspect" if voters else "clean")
            if verdict == "poisoned":
                flags[idx] |= votes[idx] >= 1
            findings.append(ClassFinding(int(c), verdict == "poisoned", int(idx.sum()),
                                         int(flags[idx].sum()),
                                         {"verdict": verdict, "detectors": voters}))
        rule = {"rule": "flag if >= min_sample_votes detectors flag, or >= 1 in a class that "
                        ">= min_class_votes detectors call suspicious",
                "min_class_votes": need_class, "min_sample_votes": need_sample,
                "detectors": [r.name for r in results]}
        return DetectorResult(self.name, confidence, flags, None, rule, tuple(findings),
                              time.perf_counter() - t0,
                              extras={"votes": votes,
                                      "detector_flags": {r.name: r.flags for r in results}})


def cross_reference(results: list[DetectorResult], labels: np.ndarray,
                    **kwargs: int) -> DetectorResult:
    return CrossReference(**kwargs).combine(results, labels)
