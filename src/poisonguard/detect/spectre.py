"""SPECTRE (Hayase et al., ICML 2021): robust whitening and QUantum Entropy (QUE) scores, with
thresholds that need no poison rate. Attack-agnostic: the premise is that poisons add variance
in some direction of a class's representations once the clean bulk is whitened.

Per class: centre, project on the class's top ``k`` principal directions (at most
``n_class / min_per_dim``: a covariance estimated from few samples per dimension inflates the
whitened variance of every clean class), estimate a robust mean
and covariance (deterministic trimmed estimator: start from the coordinate-wise median and MAD,
then concentration steps keeping the ``h = (n + k + 1) / 2`` samples of smallest Mahalanobis
distance until the subset is stable, then one reweighting step keeping distances below the
chi^2_k 0.975 quantile after a consistency rescale; the clean bulk is the majority in this
estimator, so a poison majority is whitened as if clean), whiten ``w_i = Sigma^-1/2 (x_i - mu)``
and score ``tau_i = w_i^T Q w_i / tr(Q)`` with ``Q = exp(alpha (Sigma_w - I) / (||Sigma_w||_2 -
1))``, ``Sigma_w`` the whitened samples' second moment (a clean sample scores about 1).

Class suspicious when both: the scores split with a separated upper group (:func:`split_1d` on
``log tau``, separation >= ``min_separation``; clean Gaussian classes give about 2.5-3) and the
class's QUE statistic ``T = mean tau = tr(Q Sigma_w) / tr(Q)`` is a robust outlier across classes
(robust z > ``class_z``). Flag cut in a suspicious class: the split threshold, or, with trusted
samples of the class, the ``trusted_quantile`` quantile of their scores (whitened with the same
estimates). Samples above the cut in suspicious classes are flagged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from scipy.stats import chi2

from poisonguard.detect.common import (
    MAD_TO_SIGMA,
    check_inputs,
    check_trusted_features,
    per_class_centred,
    robust_z,
    split_1d,
    top_principal,
)
from poisonguard.errors import ConfigError
from poisonguard.types import ClassFinding, DetectorResult


def trimmed_mean_cov(x: np.ndarray, max_steps: int = 30, ridge: float = 1e-6
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic robust mean and covariance (MCD-like concentration from a median start,
    then a chi^2 0.975 reweighting step)."""
    n, k = x.shape
    h = min(n, (n + k + 2) // 2)
    med = np.median(x, axis=0)
    mad = MAD_TO_SIGMA * np.median(np.abs(x - med), axis=0) + 1e-12
    d2 = (((x - med) / mad) ** 2).sum(1)
    keep = np.argsort(d2)[:h]

    def fit(sel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m = x[sel].mean(0)
        c = np.cov(x[sel], rowvar=False).reshape(k, k)
        return m, c + ridge * max(float(np.trace(c)) / k, 1e-12) * np.eye(k)

    def mahal(m: np.ndarray, c: np.ndarray) -> np.ndarray:
        r = np.linalg.solve(np.linalg.cholesky(c), (x - m).T)
        return (r**2).sum(0)

    for _ in range(max_steps):
        m, c = fit(keep)
        new = np.sort(np.argsort(mahal(m, c))[:h])
        if np.array_equal(new, np.sort(keep)):
            break
        keep = new
    m, c = fit(keep)
    d2 = mahal(m, c)
    c = c * np.median(d2) / chi2.ppf(0.5, k)  # consistency: the median distance of a Gaussian
    inlier = np.flatnonzero(mahal(m, c) <= chi2.ppf(0.975, k))
    if len(inlier) > k + 1:
        m, c = fit(inlier)
        c = c * np.median(mahal(m, c)) / chi2.ppf(0.5, k)
    return m, c


def que_scores(w: np.ndarray, alpha: float, tw: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray | None, float, float]:
    """QUE scores of whitened samples ``w`` (and of ``tw`` under the same Q), the class
    statistic tr(Q Sigma_w)/tr(Q) and ||Sigma_w||_2."""
    sig = (w.T @ w) / len(w)
    lam, v = np.linalg.eigh(sig)
    top = float(lam[-1])
    expo = alpha * (lam - 1.0) / max(top - 1.0, 1e-3)
    q_eig = np.exp(expo - expo.max())  # Q up to a positive factor, which tau ignores
    tr = float(q_eig.sum())
    proj = w @ v
    tau = (proj**2 @ q_eig) / tr
    ttau = None if tw is None else ((tw @ v) ** 2 @ q_eig) / tr
    return tau, ttau, float(tau.mean()), top


@dataclass(frozen=True)
class Spectre:
    k: int = 32
    min_per_dim: int = 20
    alpha: float = 4.0
    min_separation: float = 4.0
    class_z: float = 3.5
    trusted_quantile: float = 0.995
    name: str = "spectre"

    def __post_init__(self) -> None:
        if self.k < 1 or self.alpha <= 0:
            raise ConfigError(f"k must be >= 1 and alpha > 0, got k={self.k}, "
                              f"alpha={self.alpha}")
        if not 0 < self.trusted_quantile < 1:
            raise ConfigError(f"trusted_quantile must be in (0, 1), got {self.trusted_quantile}")

    def detect(self, features: np.ndarray, labels: np.ndarray,
               losses: np.ndarray | None = None, trusted_features: np.ndarray | None = None,
               trusted_labels: np.ndarray | None = None) -> DetectorResult:
        check_inputs(features, labels, self.name, losses=losses)
        check_trusted_features(features, trusted_features, trusted_labels, self.name)
        t0 = time.perf_counter()
        labels = np.asarray(labels)
        trusted = trusted_features is not None
        n = len(labels)
        scores = np.zeros(n)
        flags = np.zeros(n, dtype=bool)
        findings: list[ClassFinding] = []
        per: dict[int, dict] = {}
        for c, idx, xc in per_class_centred(features, labels, findings):
            kk = max(1, min(self.k, xc.shape[1], len(idx) // self.min_per_dim))
            comps, _ = top_principal(xc, kk)
            p = xc @ comps.T
            mu, cov = trimmed_mean_cov(p)
            lam, v = np.linalg.eigh(cov)
            white = v / np.sqrt(np.maximum(lam, 1e-12 * lam.max()))  # p @ white whitens
            w = (p - mu) @ white
            tw = None
            if trusted:
                tsel = np.asarray(trusted_labels) == c
                if tsel.sum() > 0:
                    tx = np.asarray(trusted_features, dtype=np.float64)[tsel]
                    tw = ((tx - np.asarray(features[idx], dtype=np.float64).mean(0))
                          @ comps.T - mu) @ white
            tau, ttau, stat, top = que_scores(w, self.alpha, tw)
            cut, sep = split_1d(np.log(tau + 1e-12))
            per[c] = {"idx": idx, "tau": tau, "ttau": ttau, "stat": stat, "top": top,
                      "cut": float(np.exp(cut)), "sep": sep, "k": kk}
        classes = list(per)
        stats = np.array([per[c]["stat"] for c in classes])
        zs = robust_z(stats) if len(stats) > 2 else np.zeros_like(stats)
        for c, z in zip(classes, zs):
            info = per[c]
            idx, tau = info["idx"], info["tau"]
            scores[idx] = tau
            suspicious = bool(info["sep"] >= self.min_separation and z > self.class_z)
            if info["ttau"] is not None:
                cut = float(np.quantile(info["ttau"], self.trusted_quantile))
                cut_rule = (f"{self.trusted_quantile:.3g} quantile of {len(info['ttau'])} "
                            "trusted samples' scores")
            else:
                cut, cut_rule = info["cut"], "split_1d threshold of log scores"
            class_flags = (tau > cut) if suspicious else np.zeros(len(idx), dtype=bool)
            flags[idx] = class_flags
            verdict = "suspicious" if suspicious else "not suspicious"
            reason = (f"QUE statistic T={info['stat']:.3f}, {z:.2f} robust SDs above the "
                      f"classes' median (threshold {self.class_z}); log-score split separation "
                      f"{info['sep']:.2f} (threshold {self.min_separation}); {verdict}; "
                      f"flag cut tau > {cut:.3g} ({cut_rule})")
            findings.append(ClassFinding(c, suspicious, len(idx), int(class_flags.sum()), {
                "reason": reason, "que_statistic": round(info["stat"], 4),
                "que_statistic_z": round(float(z), 3), "separation": round(info["sep"], 3),
                "whitened_top_eigenvalue": round(info["top"], 4), "cut": round(cut, 4),
                "cut_rule": cut_rule, "k": info["k"]}))
        findings.sort(key=lambda f: f.label)
        rule = {"rule": "per class: robust (trimmed) whitening in the top-k PCA space, QUE "
                        "scores; suspicious if split_1d separation of log scores >= "
                        "min_separation and robust z of mean score across classes > class_z; "
                        "flag scores above the split threshold, or above trusted_quantile of "
                        "the trusted samples' scores when the class has trusted samples",
                "min_separation": self.min_separation, "class_z": self.class_z,
                "trusted_quantile": self.trusted_quantile, "alpha": self.alpha}
        return DetectorResult(self.name, scores, flags, None, rule, tuple(findings),
                              time.perf_counter() - t0,
                              params={"k": self.k, "alpha": self.alpha,
                                      "losses": losses is not None, "trusted": trusted})
