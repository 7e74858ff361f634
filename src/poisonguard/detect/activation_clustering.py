"""Activation clustering (Chen et al. 2018), with thresholds that need no poison rate.

Per class: centre the representations, reduce them (PCA or ICA), split them in two with k-means,
in the full reduced space and in its leading ``search_components`` dimensions (a small poison
cluster is often missed by k-means in 10 dimensions but found in 2); the split whose clusters stand
furthest apart in the full reduced space is kept.
The class is poisoned when the two clusters stand apart: silhouette >= ``min_silhouette`` and
centroid separation >= ``min_separation`` pooled standard deviations along the line joining the
centroids (a clean class split in two gives about 2.7). Relative size alone cannot decide: at 10%
all-to-one poisoning the poisons are half of the target class. Which cluster is the poison is
decided by :func:`choose_poison_group` (lower loss) when losses are given, else the smaller
one; a "poison" cluster above ``max_size`` of the class means the bulk of the class was picked,
and the class is then not called poisoned (flagging a class wholesale is never right).
Per-sample score: robust z of the position along the centroid line, measured from
the clean cluster towards the poison one. In a poisoned class the poison cluster and every sample
with z > ``tail_z`` are flagged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score

from poisonguard.detect.common import (
    MAD_TO_SIGMA,
    check_inputs,
    check_trusted_features,
    choose_poison_group,
    per_class_centred,
    top_principal,
)
from poisonguard.errors import ConfigError
from poisonguard.types import ClassFinding, DetectorResult


@dataclass(frozen=True)
class ActivationClustering:
    n_components: int = 10
    search_components: tuple[int, ...] = (2,)
    reduce: str = "pca"
    min_silhouette: float = 0.25
    min_separation: float = 4.0
    min_size: float = 0.005
    max_size: float = 0.67
    tail_z: float = 4.0
    silhouette_samples: int = 2000
    dataset_wide_share: float = 0.5
    seed: int = 0
    name: str = "activation_clustering"

    def __post_init__(self) -> None:
        if self.reduce not in ("pca", "ica"):
            raise ConfigError(f"reduce must be 'pca' or 'ica', got {self.reduce!r}")
        if self.n_components < 1:
            raise ConfigError(f"n_components must be >= 1, got {self.n_components}")

    def _reduce(self, xc: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The reduced class and, for PCA, its components (to project other samples)."""
        k = max(1, min(self.n_components, xc.shape[1], len(xc) - 1))
        if self.reduce == "ica":
            from sklearn.decomposition import FastICA

            return FastICA(n_components=k, random_state=self.seed, max_iter=400,
                           whiten="unit-variance").fit_transform(xc), None
        comps, _ = top_principal(xc, k)
        return xc @ comps.T, comps

    def _dataset_wide(self, findings: list[ClassFinding], bulk_picked: list[tuple],
                      scores: np.ndarray, flags: np.ndarray) -> list[ClassFinding]:
        """All-to-all poisoning spreads the poisons over every class: most classes then split
        in two clearly separated groups (a clean class split gives about 2.7 SDs), and in each
        the poisons are the minority. When ``dataset_wide_share`` of the classes split so, a
        split whose chosen group was the bulk of its class takes the smaller group instead."""
        findings = list(findings)
        for c, idx, pg, cg, proj, pos in bulk_picked:
            med = float(np.median(proj[pg]))
            mad = max(MAD_TO_SIGMA * float(np.median(np.abs(proj[pg] - med))), 1e-12)
            zscore = -(proj - med) / mad
            class_flags = np.zeros(len(idx), dtype=bool)
            class_flags[cg] = True
            scores[idx] = zscore
            flags[idx] = class_flags
            old = findings[pos]
            rel = len(cg) / len(idx)
            findings[pos] = ClassFinding(c, True, len(idx), int(class_flags.sum()), {
                **old.evidence, "poison_cluster_size": round(rel, 4),
                "poison_group_rule": "smaller group (dataset-wide split)",
                "reason": f"most classes split in two separated groups, as all-to-all "
                          f"poisoning makes them; here the smaller group ({rel:.0%}) is taken "
                          f"(silhouette {old.evidence['silhouette']:.2f}, separation "
                          f"{old.evidence['separation']:.1f} SDs)"})
        return findings

    @staticmethod
    def _trusted_projection(c: int, idx: np.ndarray, features: np.ndarray,
                            comps: np.ndarray | None,
                            trusted: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray | None:
        """Class ``c``'s trusted samples in the class's reduced space, when there are >= 3 and
        the reduction is PCA (an ICA unmixing is not applied to other samples)."""
        if trusted is None or comps is None:
            return None
        tx = trusted[0][trusted[1] == c]
        if len(tx) < 3:
            return None
        mean = np.asarray(features[idx], dtype=np.float64).mean(axis=0)
        return (np.asarray(tx, dtype=np.float64) - mean) @ comps.T

    @staticmethod
    def _trusted_choice(z: np.ndarray, tz: np.ndarray | None, groups: list[np.ndarray]
                        ) -> tuple[int, dict] | None:
        """With trusted samples of the class (``tz``), the poison group is the one whose
        centroid lies farther from theirs (in pooled SDs along the line joining the two
        centroids)."""
        if tz is None:
            return None
        d = z[groups[1]].mean(0) - z[groups[0]].mean(0)
        d /= np.linalg.norm(d) + 1e-12
        proj, tproj = z @ d, tz @ d
        pooled = np.sqrt(0.5 * sum(proj[g].var() for g in groups)) + 1e-12
        dist = [abs(float(np.median(tproj)) - float(proj[g].mean())) / pooled for g in groups]
        return int(np.argmax(dist)), {"poison_group_rule": "farther from the trusted samples",
                                      "trusted_distance_sd": [round(float(v), 2) for v in dist],
                                      "n_trusted": int(len(tz))}

    def detect(self, features: np.ndarray, labels: np.ndarray,
               losses: np.ndarray | None = None, trusted_features: np.ndarray | None = None,
               trusted_labels: np.ndarray | None = None) -> DetectorResult:
        """Per-class split; with trusted features and labels, the trusted samples of a class
        tell which group is clean, and the poison group may then be most of its class (clean-
        label poisons are)."""
        check_inputs(features, labels, self.name, losses=losses)
        check_trusted_features(features, trusted_features, trusted_labels, self.name)
        trusted = (None if trusted_features is None
                   else (trusted_features, np.asarray(trusted_labels)))
        t0 = time.perf_counter()
        scores = np.zeros(len(labels))
        flags = np.zeros(len(labels), dtype=bool)
        findings: list[ClassFinding] = []
        bulk_picked: list[tuple] = []
        for c, idx, xc in per_class_centred(features, labels, findings):
            z, comps = self._reduce(xc)
            tz = self._trusted_projection(c, idx, features, comps, trusted)
            best = None
            for m in sorted({min(k, z.shape[1]) for k in self.search_components}
                            | {z.shape[1]}):
                assign = KMeans(n_clusters=2, n_init=3,
                                random_state=self.seed).fit(z[:, :m]).labels_
                groups = [np.flatnonzero(assign == g) for g in (0, 1)]
                if min(len(g) for g in groups) < 2:
                    continue
                chosen = self._trusted_choice(z, tz, groups)
                poison, evidence = chosen or choose_poison_group([idx[g] for g in groups],
                                                                 losses)
                pg, cg = groups[poison], groups[1 - poison]
                direction = z[pg].mean(0) - z[cg].mean(0)
                proj = z @ (direction / (np.linalg.norm(direction) + 1e-12))
                pooled = np.sqrt(0.5 * (proj[pg].var() + proj[cg].var())) + 1e-12
                sep = float((proj[pg].mean() - proj[cg].mean()) / pooled)
                if best is None or sep > best[0]:
                    best = (sep, assign, pg, cg, proj, {**evidence, "split_components": m})
            if best is None:
                findings.append(ClassFinding(c, False, len(idx), 0, {"reason": "one cluster"}))
                continue
            sep, assign, pg, cg, proj, evidence = best
            sil = 0.0
            rng = np.random.default_rng(self.seed)
            sample = (rng.choice(len(z), self.silhouette_samples, replace=False)
                      if len(z) > self.silhouette_samples else np.arange(len(z)))
            if len(np.unique(assign[sample])) == 2:
                sil = float(silhouette_score(z[sample], assign[sample]))
            med = float(np.median(proj[cg]))
            zscore = (proj - med) / max(
                MAD_TO_SIGMA * float(np.median(np.abs(proj[cg] - med))), 1e-12)
            scores[idx] = zscore
            rel = len(pg) / len(idx)
            cap = 1.0 if evidence.get("n_trusted") else self.max_size
            suspicious = (sil >= self.min_silhouette and sep >= self.min_separation
                          and self.min_size <= rel <= cap)
            reason = (f"two clusters: silhouette {sil:.2f} (>= {self.min_silhouette}), "
                      f"separation {sep:.1f} SDs (>= {self.min_separation}), the poison group "
                      f"({evidence['poison_group_rule']}) is {rel:.0%} of the class "
                      f"(allowed {self.min_size:.1%}-{cap:.0%})")
            if (not suspicious and sil >= self.min_silhouette and sep >= self.min_separation
                    and rel > cap):
                bulk_picked.append((c, idx, pg, cg, proj, len(findings)))
            class_flags = np.zeros(len(idx), dtype=bool)
            if suspicious:
                class_flags[pg] = True
                class_flags |= zscore > self.tail_z
            flags[idx] = class_flags
            findings.append(ClassFinding(c, suspicious, len(idx), int(class_flags.sum()), {
                "poison_cluster_size": round(rel, 4), "silhouette": round(sil, 4),
                "separation": round(sep, 3), "reason": reason, **evidence}))
        n_split = sum(1 for f in findings if f.suspicious) + len(bulk_picked)
        n_classes = len(findings)
        dataset_wide = n_classes >= 3 and n_split >= self.dataset_wide_share * n_classes
        if dataset_wide:
            findings = self._dataset_wide(findings, bulk_picked, scores, flags)
        rule = {"rule": "per-class 2-means; poisoned if silhouette >= min_silhouette and "
                        "separation >= min_separation and poison cluster >= min_size of the "
                        "class; flag the poison cluster and robust z > tail_z",
                "min_silhouette": self.min_silhouette, "min_separation": self.min_separation,
                "min_size": self.min_size, "max_size": self.max_size, "tail_z": self.tail_z,
                "dataset_wide_share": self.dataset_wide_share}
        return DetectorResult(self.name, scores, flags, self.tail_z, rule, tuple(findings),
                              time.perf_counter() - t0,
                              extras={"classes_split": n_split, "dataset_wide": dataset_wide},
                              params={"n_components": self.n_components,
                                      "search_components": list(self.search_components),
                                      "reduce": self.reduce,
                                      "seed": self.seed, "losses": losses is not None})
