"""Cross-referencing: combine detector results into one flag set, a per-sample confidence and a
per-class verdict.

Per class, the verdict is ``poisoned`` when at least ``min_class_votes`` detectors call the class
suspicious, ``suspect`` when one does, else ``clean``. A sample is flagged when at least
``min_sample_votes`` detectors flag it, or when one does and its class is ``poisoned`` (class-level
agreement backs a single detector's sample-level call). In a poisoned class, samples scoring
above the ``class_tail`` quantile of the class's unflagged samples on a cluster detector
(``tail_detectors``) are flagged too: poisons the representation only half-separates sit in that
tail, and the price is at most about 1 - class_tail of one class's clean samples per detector.
Every detector's class call is one vote, confusion training's included: its held-out trusted
samples are a few dozen a class, and a class the data stream memorises more than its held-out
samples (MNIST 5k class 6: 14.7% of it fitted against 4% held out) or whose easiest samples fit
far better than the rest (MNIST 1s) is called on clean data; a second detector or input-space
stage has to agree. Confidence = share of detectors flagging the sample (higher = more
suspicious).
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
    class_tail: float | None = 0.99
    tail_detectors: tuple[str, ...] = ("activation_clustering", "spectral_signatures")
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
        sample_flags = _gap_filler_flags(results, labels, need_class)
        votes = np.sum([sample_flags[r.name] for r in results], axis=0)
        flags = votes >= need_sample
        attributed = {name: f.copy() for name, f in sample_flags.items()}
        findings = []
        for c in np.unique(labels):
            idx = labels == c
            voters = [r.name for r in results if c in r.suspicious_classes]
            verdict = ("poisoned" if len(voters) >= need_class
                       else "suspect" if voters else "clean")
            if verdict == "poisoned":
                unflagged = idx & (votes == 0)
                flags[idx] |= votes[idx] >= 1
                if self.class_tail is not None and unflagged.sum() >= 20:
                    for r in results:
                        if r.name in self.tail_detectors:
                            cut = np.quantile(r.scores[unflagged], self.class_tail)
                            hit = idx & (r.scores > cut)
                            flags |= hit
                            attributed[r.name] |= hit
            findings.append(ClassFinding(int(c), verdict == "poisoned", int(idx.sum()),
                                         int(flags[idx].sum()),
                                         {"verdict": verdict, "detectors": voters}))
        rule = {"rule": "flag if >= min_sample_votes detectors flag, or >= 1 in a class that "
                        ">= min_class_votes detectors call suspicious; in such a class also "
                        "scores above the class_tail quantile of its unflagged samples",
                "min_class_votes": need_class, "min_sample_votes": need_sample,
                "class_tail": self.class_tail, "tail_detectors": list(self.tail_detectors),
                "detectors": [r.name for r in results]}
        votes = np.sum(list(attributed.values()), axis=0)
        return DetectorResult(self.name, votes / len(results), flags, None, rule,
                              tuple(findings), time.perf_counter() - t0,
                              extras={"votes": votes, "detector_flags": attributed})


def _gap_filler_flags(results: list[DetectorResult], labels: np.ndarray, need_class: int
                      ) -> dict[str, np.ndarray]:
    """Each detector's sample flags, except that a gap filler's (``extras["gap_filler"]``:
    confusion training without a trusted set) are dropped in classes at least ``need_class``
    other detectors call: there it adds no verdict, only the clean samples its within-class
    z picks when the poisons are most of the class (MNIST 5k blended 10%: 17% of poisons and
    39 clean samples)."""
    called_by_others = {
        c: sum(c in r.suspicious_classes for r in results if not r.extras.get("gap_filler"))
        for c in np.unique(labels)}
    covered = [c for c, n in called_by_others.items() if n >= need_class]
    return {r.name: (r.flags & ~np.isin(labels, covered)) if r.extras.get("gap_filler")
            else r.flags for r in results}


def cross_reference(results: list[DetectorResult], labels: np.ndarray,
                    **kwargs: object) -> DetectorResult:
    return CrossReference(**kwargs).combine(results, labels)
