"""All metrics in one place: detection quality against ground truth, model quality, timing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from poisonguard.errors import DataError


def detection_metrics(flags: np.ndarray, truth: np.ndarray,
                      scores: np.ndarray | None = None) -> dict[str, float | int | None]:
    """Precision, recall, F1, false-positive rate (share of clean samples flagged) and, given
    scores, AUROC, of ``flags`` against the ground-truth poison mask ``truth``."""
    flags = np.asarray(flags, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if flags.shape != truth.shape:
        raise DataError(f"flags {flags.shape} and ground truth {truth.shape} differ in shape")
    tp = int((flags & truth).sum())
    fp = int((flags & ~truth).sum())
    fn = int((~flags & truth).sum())
    n_clean = int((~truth).sum())
    precision = tp / (tp + fp) if tp + fp else (1.0 if not truth.any() else 0.0)
    recall = tp / (tp + fn) if tp + fn else None
    f1 = (2 * precision * recall / (precision + recall)
          if recall is not None and precision + recall > 0 else (0.0 if recall is not None
                                                                   else None))
    out: dict[str, float | int | None] = {
        "tp": tp, "fp": fp, "fn": fn, "n_flagged": int(flags.sum()),
        "precision": precision, "recall": recall, "f1": f1,
        "fpr": fp / n_clean if n_clean else None,
        "flagged_fraction": float(flags.mean()) if len(flags) else 0.0,
    }
    if scores is not None:
        out["auroc"] = auroc(np.asarray(scores, dtype=np.float64), truth)
    return out


def auroc(scores: np.ndarray, truth: np.ndarray) -> float | None:
    """Area under the ROC curve (ties count half); None when one class is absent."""
    truth = np.asarray(truth, dtype=bool)
    n_pos, n_neg = int(truth.sum()), int((~truth).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    return float((ranks[truth].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    pred, y = np.asarray(pred), np.asarray(y)
    if len(y) == 0:
        raise DataError("accuracy of an empty set is undefined")
    return float((pred == y).mean())


def attack_success_rate(pred_triggered: np.ndarray, attacker_labels: np.ndarray) -> float:
    """Share of triggered inputs (not of the target class) classified as the attacker wanted."""
    return accuracy(pred_triggered, attacker_labels)


@contextmanager
def timer(store: dict[str, float], key: str) -> Iterator[None]:
    """Record the wall time of a block in ``store[key]`` (seconds)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        store[key] = round(time.perf_counter() - t0, 4)
