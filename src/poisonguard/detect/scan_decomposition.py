"""SCAn, statistical contamination analysis (Tang et al., USENIX Security 2021, "Demon in the
variant"), attack-agnostic: its premise is that a poisoned class mixes two identities, not any
trigger shape.

Features are first reduced by PCA (``n_components``, fit on all data). Global decomposition: each
sample is ``r = mu_class + eps`` with class identities ``mu ~ N(0, S_u)`` and a variation
``eps ~ N(0, S_e)`` shared by all classes; ``S_u`` and ``S_e`` are estimated by the paper's EM-like
iteration (E: posterior class identity ``S_u (n_k S_u + S_e)^-1 sum_k r``; M: covariances of
identities and of residuals), on the trusted set when one is given, else on all data.
Local model, per class: two identities with the shared ``S_e`` fitted by alternating assignment
(under the Mahalanobis metric of ``S_e`` this is 2-means in the ``S_e``-whitened space), and the
log-likelihood ratio of two identities against one, per sample,
``J = mean_i (|r_i - mu|^2 - |r_i - mu_{z_i}|^2)`` in that metric. The single identity ``mu`` is
the class's sample mean (its maximum-likelihood value): the paper's posterior mean
``S_u (n S_u + S_e)^-1 sum r`` adds a term for how atypical the class mean is under ``S_u``,
which, with ``S_u`` of rank L-1 estimated from L class means, is noise rather than a split.
The anomaly index is the one-sided robust z (median / 1.4826 MAD) of ``J`` across classes; a
class is suspicious when it exceeds ``e^2`` (the paper's threshold); it also needs ``J``
above the clean Gaussian null (below).

All-classes case: when every class is split, the cross-class z cannot fire. Each class's ``J`` is
therefore also divided by ``J0(n, d)``, the same split's ``J`` on ``n`` standard Gaussian samples
in ``d`` dimensions (the whitened model's null; measured here by simulation with a fixed seed,
mean of ``null_reps``), and ``extras["all_classes_split"]`` is the fraction of classes whose ratio
exceeds ``reference_margin`` times the reference: 1 without trusted data, or the largest ratio
among the trusted samples' own classes (clean classes of real features are not Gaussian) when a
trusted set is given.

Which subgroup is the poison: with trusted samples of the class, the one whose identity lies
farther (``S_e``-Mahalanobis) from the trusted class mean; otherwise the lower median loss
(:func:`choose_poison_group`) when losses are given, else the smaller one. Per-sample score:
half the log-likelihood ratio of the poison vs the clean subgroup identity (higher = more
suspicious); in a suspicious class the poison subgroup (score > 0) is flagged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from sklearn.covariance import ledoit_wolf_shrinkage

from poisonguard.detect.common import (
    check_inputs,
    check_trusted_features,
    choose_poison_group,
    robust_z,
    split_1d,
    top_principal,
)
from poisonguard.errors import ConfigError
from poisonguard.types import ClassFinding, DetectorResult


def _two_means(w: np.ndarray, max_iter: int) -> tuple[np.ndarray, float]:
    """Alternating assignment of two identities (2-means in the whitened space), started from
    two splits of the top principal projection (Otsu cut and mean cut); returns the assignment
    (bool) with the smaller within-group scatter and that scatter per sample."""
    xc = w - w.mean(0)
    v, _ = top_principal(xc, 1)
    p = xc @ v[0]
    best: tuple[np.ndarray, float] | None = None
    for cut in (split_1d(p)[0], 0.0):
        z = p > cut
        for _ in range(max_iter):
            if z.all() or not z.any():
                break
            m1, m0 = w[z].mean(0), w[~z].mean(0)
            # |w - m1|^2 < |w - m0|^2  <=>  2 w.(m1 - m0) > |m1|^2 - |m0|^2
            new = 2 * (w @ (m1 - m0)) > (m1 @ m1 - m0 @ m0)
            if np.array_equal(new, z):
                break
            z = new
        if z.all() or not z.any():
            continue
        within = float(((w[z] - w[z].mean(0)) ** 2).sum()
                       + ((w[~z] - w[~z].mean(0)) ** 2).sum()) / len(w)
        if best is None or within < best[1]:
            best = (z, within)
    if best is None:
        return np.zeros(len(w), dtype=bool), float((xc**2).sum()) / len(w)
    return best


def _llr(w: np.ndarray, z: np.ndarray, mu: np.ndarray) -> float:
    """J: mean over samples of |w - mu|^2 - |w - mu_{z}|^2 (two identities vs one)."""
    one = ((w - mu) ** 2).sum(1)
    m = np.where(z[:, None], w[z].mean(0) if z.any() else mu,
                 w[~z].mean(0) if (~z).any() else mu)
    return float(np.mean(one - ((w - m) ** 2).sum(1)))


@dataclass(frozen=True)
class SCAn:
    n_components: int = 64
    threshold: float = float(np.exp(2))
    em_iters: int = 100
    em_tol: float = 1e-6
    split_iters: int = 50
    ridge: float = 1e-3
    reference_margin: float = 1.5
    null_reps: int = 3
    seed: int = 0
    name: str = "scan_decomposition"

    def __post_init__(self) -> None:
        if self.n_components < 1:
            raise ConfigError(f"n_components must be >= 1, got {self.n_components}")
        if self.reference_margin <= 0 or self.null_reps < 1:
            raise ConfigError("reference_margin must be > 0 and null_reps >= 1")

    # -- global decomposition -------------------------------------------------------------
    def _global(self, z: np.ndarray, y: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, int, float]:
        """EM-like estimate of (S_u, S_e) on centred reduced features ``z``."""
        _, inv, counts = np.unique(y, return_inverse=True, return_counts=True)
        n, d = z.shape
        onehot = np.zeros((len(counts), n))
        onehot[inv, np.arange(n)] = 1.0
        sums = onehot @ z
        sxx = z.T @ z
        total = z.sum(0)
        denom = max(n - 1, 1)

        def moments(um: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            wu = um.T * counts
            mean_u = wu.sum(1) / n
            su = (wu @ um - n * np.outer(mean_u, mean_u)) / denom
            sum_e = total - wu.sum(1)
            see = sxx - sums.T @ um - um.T @ sums + wu @ um
            se = (see - np.outer(sum_e, sum_e) / n) / denom
            return 0.5 * (su + su.T), 0.5 * (se + se.T)

        su, se = moments(sums / counts[:, None])
        iters = 0
        for step in range(1, self.em_iters + 1):
            iters = step
            se_r = self._regularise(se)
            um = np.stack([su @ np.linalg.solve(k * su + se_r, s) for k, s in zip(counts, sums)])
            su_new, se_new = moments(um)
            change = (np.linalg.norm(su_new - su) + np.linalg.norm(se_new - se)) / (
                np.linalg.norm(se) + 1e-12)
            su, se = su_new, se_new
            if change < self.em_tol:
                break
        # Ledoit-Wolf shrinkage of S_e towards a scaled identity: a small trusted set estimates
        # S_e poorly, and its smallest eigenvalues (inverted by the whitening) most of all.
        um = np.stack([su @ np.linalg.solve(k * su + self._regularise(se), s)
                       for k, s in zip(counts, sums)])
        delta = float(ledoit_wolf_shrinkage(z - um[inv], assume_centered=False))
        se = (1 - delta) * se + delta * float(np.trace(se)) / d * np.eye(d)
        return su, self._regularise(se), iters, delta

    def _regularise(self, se: np.ndarray) -> np.ndarray:
        d = len(se)
        return se + self.ridge * max(float(np.trace(se)) / d, 1e-12) * np.eye(d)

    def _null_j(self, n: int, d: int, cache: dict[int, float]) -> float:
        """Mean J of the split on ``n`` standard Gaussian samples in ``d`` dims (fixed seed)."""
        if n not in cache:
            rng = np.random.default_rng(self.seed + 7919 * n)
            js = []
            for _ in range(self.null_reps):
                g = rng.standard_normal((n, d))
                zz, _ = _two_means(g, self.split_iters)
                js.append(_llr(g, zz, g.mean(0)))
            cache[n] = float(np.mean(js))
        return cache[n]

    def detect(self, features: np.ndarray, labels: np.ndarray,
               losses: np.ndarray | None = None, trusted_features: np.ndarray | None = None,
               trusted_labels: np.ndarray | None = None) -> DetectorResult:
        check_inputs(features, labels, self.name, losses=losses)
        check_trusted_features(features, trusted_features, trusted_labels, self.name)
        t0 = time.perf_counter()
        labels = np.asarray(labels)
        trusted = trusted_features is not None
        n = len(labels)
        x = np.asarray(features, dtype=np.float64)
        centre = x.mean(0)
        k = max(1, min(self.n_components, x.shape[1], n - 1))
        comps, _ = top_principal(x - centre, k)
        z = (x - centre) @ comps.T
        if trusted:
            tl = np.asarray(trusted_labels)
            tz = (np.asarray(trusted_features, dtype=np.float64) - centre) @ comps.T
            tmean = tz.mean(0)
            su, se, iters, shrink = self._global(tz - tmean, tl)
            tz = tz - tmean
            z = z - tmean
        else:
            su, se, iters, shrink = self._global(z, labels)
        chol = np.linalg.cholesky(se)
        whiten = np.linalg.inv(chol)  # w = L^-1 r: S_e-Mahalanobis -> Euclidean
        w_all = z @ whiten.T
        tw_all = tz @ whiten.T if trusted else None
        d = w_all.shape[1]

        classes = np.unique(labels)
        null_cache: dict[int, float] = {}
        per: dict[int, dict] = {}
        for c in classes:
            idx = np.flatnonzero(labels == c)
            if len(idx) < 4:
                per[int(c)] = {"idx": idx, "J": np.nan}
                continue
            w = w_all[idx]
            zz, _ = _two_means(w, self.split_iters)
            j = _llr(w, zz, w.mean(0))
            per[int(c)] = {"idx": idx, "J": j, "assign": zz,
                           "ratio": j / self._null_j(len(idx), d, null_cache)}

        # clean reference from the trusted samples of each class (size-matched null ratio)
        trusted_ratios: dict[int, float] = {}
        if trusted:
            for c in np.unique(tl):
                tw = tw_all[tl == c]
                if len(tw) < 4:
                    continue
                tzz, _ = _two_means(tw, self.split_iters)
                trusted_ratios[int(c)] = _llr(tw, tzz, tw.mean(0)) / self._null_j(
                    len(tw), d, null_cache)
        reference = max([1.0, *trusted_ratios.values()])

        valid = [c for c in per if np.isfinite(per[c]["J"])]
        jvals = np.array([per[c]["J"] for c in valid])
        ai = robust_z(jvals) if len(jvals) > 2 else np.zeros_like(jvals)
        ai_of = dict(zip(valid, ai))

        scores = np.zeros(n)
        flags = np.zeros(n, dtype=bool)
        findings = []
        for c in classes:
            c = int(c)
            info = per[c]
            idx = info["idx"]
            if not np.isfinite(info["J"]):
                findings.append(ClassFinding(c, False, len(idx), 0,
                                             {"reason": "too few samples to split"}))
                continue
            w, zz = w_all[idx], info["assign"]
            groups = [np.flatnonzero(~zz), np.flatnonzero(zz)]
            if min(len(g) for g in groups) == 0:
                findings.append(ClassFinding(c, False, len(idx), 0,
                                             {"reason": "the split left one group empty",
                                              "J": round(info["J"], 4)}))
                continue
            means = [w[g].mean(0) for g in groups]
            tw = tw_all[tl == c] if trusted else np.empty((0, d))
            if len(tw) > 0:
                tm = tw.mean(0)
                dist = [float(((m - tm) ** 2).sum()) for m in means]
                poison = int(np.argmax(dist))
                evidence = {"poison_group_rule": "farther (S_e-Mahalanobis) from the trusted "
                                                 "class mean",
                            "trusted_mahalanobis_sq": [round(v, 3) for v in dist]}
            else:
                poison, evidence = choose_poison_group([idx[g] for g in groups], losses)
            pm, cm = means[poison], means[1 - poison]
            s = 0.5 * (((w - cm) ** 2).sum(1) - ((w - pm) ** 2).sum(1))
            scores[idx] = s
            j, a, ratio = info["J"], float(ai_of[c]), info["ratio"]
            suspicious = bool(a > self.threshold and ratio > 1.0)
            class_flags = (s > 0) if suspicious else np.zeros(len(idx), dtype=bool)
            flags[idx] = class_flags
            n_p = len(groups[poison])
            verdict = "suspicious" if suspicious else "not suspicious"
            reason = (f"likelihood ratio J={j:.3f}, anomaly index {a:.2f} robust SDs above the "
                      f"classes' median (threshold e^2={self.threshold:.3f}); J is "
                      f"{ratio:.2f}x the clean Gaussian null J0={j / ratio:.3f} "
                      f"(needs > 1); {verdict}; poison subgroup {n_p} of {len(idx)} samples "
                      f"by rule: {evidence['poison_group_rule']}")
            findings.append(ClassFinding(c, suspicious, len(idx), int(class_flags.sum()), {
                "reason": reason, "J": round(j, 4), "anomaly_index": round(a, 3),
                "null_ratio": round(ratio, 3),
                "exceeds_reference": bool(ratio > self.reference_margin * reference),
                "poison_subgroup_size": round(n_p / len(idx), 4), **evidence}))

        split = [per[c]["ratio"] > self.reference_margin * reference for c in valid]
        all_split = float(np.mean(split)) if split else 0.0
        rule = {"rule": "per-class two-identity likelihood ratio J under the global S_u/S_e "
                        "decomposition; suspicious if robust z of J across classes > threshold "
                        "and J > the clean Gaussian null J0(n, d); flag the poison subgroup",
                "threshold": self.threshold,
                "all_classes_split_rule": "fraction of classes with J/J0 > reference_margin * "
                                          "reference (reference = max(1, largest J/J0 of the "
                                          "trusted classes))",
                "reference_margin": self.reference_margin, "reference": round(reference, 4)}
        return DetectorResult(
            self.name, scores, flags, self.threshold, rule, tuple(findings),
            time.perf_counter() - t0,
            params={"n_components": k, "em_iters": self.em_iters, "ridge": self.ridge,
                    "null_reps": self.null_reps, "seed": self.seed,
                    "losses": losses is not None, "trusted": trusted},
            extras={"all_classes_split": all_split, "em_iterations": iters,
                    "se_shrinkage": round(shrink, 4),
                    "global_estimate": "trusted set" if trusted else "all data",
                    "trusted_null_ratios": {c: round(v, 3) for c, v in trusted_ratios.items()}})
