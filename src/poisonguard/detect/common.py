"""Shared helpers for detectors: input checks, robust statistics, per-class iteration."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from poisonguard.errors import DataError
from poisonguard.types import ClassFinding

MAD_TO_SIGMA = 1.4826


def check_inputs(features: np.ndarray | None, labels: np.ndarray, name: str,
                 need_features: bool = True, losses: np.ndarray | None = None) -> None:
    """Raise DataError naming the problem: shapes, lengths, NaN/inf."""
    labels = np.asarray(labels)
    if losses is not None and np.shape(losses) != labels.shape:
        raise DataError(f"{name}: {np.shape(losses)} losses for {labels.shape} labels")
    if labels.ndim != 1 or len(labels) == 0:
        raise DataError(f"{name}: labels must be a non-empty 1-D array, got shape {labels.shape}")
    if need_features:
        if features is None:
            raise DataError(f"{name}: needs per-sample features")
        if features.ndim != 2:
            raise DataError(f"{name}: features must be 2-D (samples, dims), got "
                            f"{features.shape}")
        if len(features) != len(labels):
            raise DataError(f"{name}: {len(features)} feature rows but {len(labels)} labels")
        if not np.isfinite(features).all():
            raise DataError(f"{name}: features contain NaN or inf")


def check_trusted_features(features: np.ndarray, trusted_features: np.ndarray | None,
                           trusted_labels: np.ndarray | None, name: str) -> None:
    """Trusted features and labels come together, 2-D, finite, with the features' dimension."""
    if trusted_features is None and trusted_labels is None:
        return
    if trusted_features is None or trusted_labels is None:
        raise DataError(f"{name}: trusted_features and trusted_labels must be given together")
    check_inputs(np.asarray(trusted_features), np.asarray(trusted_labels), f"{name} (trusted)")
    if np.shape(trusted_features)[1] != features.shape[1]:
        raise DataError(f"{name}: trusted features have {np.shape(trusted_features)[1]} dims, "
                        f"the features {features.shape[1]}; extract both from the same layer")


def robust_location_scale(values: np.ndarray, center: float | None = None,
                          floor: float = 0.0) -> tuple[float, float]:
    """Median (or ``center``) and 1.4826 MAD around it, the scale floored (at ``floor`` too) so
    constant data gives z = 0 rather than a division by zero."""
    med = float(np.median(values)) if center is None else center
    mad = float(np.median(np.abs(values - med))) * MAD_TO_SIGMA
    return med, max(mad, 1e-12, 1e-6 * float(np.std(values)), floor)


def robust_z(values: np.ndarray, center: float | None = None,
             floor: float = 0.0) -> np.ndarray:
    """(v - median) / (1.4826 MAD), with a floor on the scale so constant data gives 0."""
    med, scale = robust_location_scale(values, center, floor)
    return (values - med) / scale


def per_class(labels: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    for c in np.unique(labels):
        yield int(c), np.flatnonzero(labels == c)


def per_class_centred(features: np.ndarray, labels: np.ndarray, findings: list[ClassFinding]
                      ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield (class, indices, centred float64 features) per class; classes too small or constant
    to analyse get a non-suspicious finding appended to ``findings`` instead."""
    for c, idx in per_class(labels):
        xc = np.asarray(features[idx], dtype=np.float64)
        xc = xc - xc.mean(axis=0)
        if len(idx) < 4 or not np.any(xc):
            findings.append(ClassFinding(c, False, len(idx), 0,
                                         {"reason": "too few or constant samples"}))
            continue
        yield c, idx, xc


def top_principal(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k principal directions (k, D) and their variances of centred ``x`` (via D x D eigh)."""
    d = x.shape[1]
    if len(x) < d:
        _, s, vt = np.linalg.svd(x, full_matrices=False)
        return vt[:k], (s[:k] ** 2) / max(len(x) - 1, 1)
    cov = (x.T @ x) / max(len(x) - 1, 1)
    w, v = np.linalg.eigh(cov)
    order = np.argsort(w)[::-1][:k]
    return v[:, order].T, w[order]


def choose_poison_group(groups: list[np.ndarray], losses: np.ndarray | None
                        ) -> tuple[int, dict]:
    """Which of two groups (index arrays into ``losses``) is the poison.

    Backdoor poisons are learned faster and more confidently than clean samples of their label
    (the premise of ABL, Li et al. 2021), so the group with the lower median log-loss under the
    sacrificial model is the poison. Relative size cannot decide: at 10% all-to-one poisoning the
    poisons are half of the target class. Without losses, the smaller group is taken."""
    sizes = [len(g) for g in groups]
    if losses is None or min(sizes) == 0:
        return int(np.argmin(sizes)), {"poison_group_rule": "smaller group"}
    med = [float(np.median(np.log10(losses[g] + 1e-30))) for g in groups]
    return int(np.argmin(med)), {"poison_group_rule": "lower median log-loss",
                                 "median_log10_loss": [round(m, 2) for m in med]}


def split_1d(values: np.ndarray) -> tuple[float, float]:
    """Best two-group split of 1-D values (Otsu / 1-D 2-means): (threshold, separation), where
    separation = gap between group means over their pooled standard deviation."""
    v = np.sort(values)
    n = len(v)
    if n < 4:
        return float(v[-1]), 0.0
    csum = np.cumsum(v)
    csq = np.cumsum(v * v)
    k = np.arange(1, n)
    left_mean = csum[:-1] / k
    right_mean = (csum[-1] - csum[:-1]) / (n - k)
    left_ss = csq[:-1] - k * left_mean**2
    right_ss = (csq[-1] - csq[:-1]) - (n - k) * right_mean**2
    within = left_ss + right_ss
    best = int(np.argmin(within))
    kk = best + 1
    pooled = np.sqrt(0.5 * (left_ss[best] / kk + right_ss[best] / (n - kk))) + 1e-12
    sep = float((right_mean[best] - left_mean[best]) / pooled)
    return float(0.5 * (v[best] + v[best + 1])), sep


def class_fraction_findings(flags: np.ndarray, labels: np.ndarray, k: float,
                            min_fraction: float) -> tuple[ClassFinding, ...]:
    """Per class: suspicious when the share of flagged samples is an outlier across classes
    (robust z > ``k``) and at least ``min_fraction``."""
    classes = np.unique(labels)
    frac = np.array([flags[labels == c].mean() for c in classes])
    fz = robust_z(frac) if len(frac) > 2 else np.zeros_like(frac)
    return tuple(
        ClassFinding(int(c), bool(z > k and f >= min_fraction), int((labels == c).sum()),
                     int(flags[labels == c].sum()),
                     {"flagged_fraction": round(float(f), 4), "fraction_z": round(float(z), 2)})
        for c, f, z in zip(classes, frac, fz))
