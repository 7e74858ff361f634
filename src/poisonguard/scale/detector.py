"""The mergeable representation detector: spectral signature and 2-means split per class.

It is the repository's two in-memory representation detectors (``detect.spectral`` and
``detect.activation_clustering``) rebuilt on statistics that merge across chunks, joined by the
cross-reference's class rule (a class is poisoned when both call it suspicious; in a poisoned
class a sample is flagged when either flags it). Four passes over the rows:

1. **moments**: per-class count, mean and scatter; per class the top ``n_components``
   principal directions of the merged covariance (signs fixed: largest entry positive).
2. **sample**: a hash-keyed uniform sample (``sample_rows`` per class) of the rows' coordinates
   in that reduced space. On it: the 1-D split of the top principal direction (spectral
   signature) or of the fourth-moment tail direction, whichever separates more, and
   k-means 2-split in the leading ``search_components`` and all reduced dimensions
   (activation clustering; the split whose centroids stand furthest apart is kept), the
   silhouette, and the histogram ranges.
3. **stats**: per class and group, counts and moments of the two projections (sizes and
   separations measured on every row) and histograms of the clean group's projections (median
   and MAD: the robust scale).
4. **score**: robust z of each row from the clean group's median; flags.

Thresholds are the in-memory detectors' (separation >= 4 pooled SDs, poison group 0.5%-67% of
its class, silhouette >= 0.25, spectral z > 3, cluster tail z > 4): nothing uses a poison rate.
The 2-means half also passes without the silhouette when its poison cluster and the spectral
poison side are mostly the same rows (Jaccard >= ``min_agreement``, counted on every row in
pass 3): in 10 whitened dimensions a cluster separated along one direction has a low
silhouette though both halves find it.
The poison group is the smaller one (no losses or trusted samples here). Not carried over: the
cross-reference's extra 0.99-quantile class tail, and activation clustering's dataset-wide rule
(which only applies when losses choose the larger group).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from poisonguard.scale.moments import Moments, merge_by_key
from poisonguard.scale.sketch import HashSample, Histogram
from poisonguard.scale.sources import Batch

MAD_TO_SIGMA = 1.4826  # as poisonguard.detect.common (not imported: workers skip sklearn)


@dataclass(frozen=True)
class ScaleConfig:
    n_components: int = 10
    search_components: tuple[int, ...] = (2,)
    sample_rows: int = 50_000
    sample_budget: int = 2_000_000
    bins: int = 4096
    ss_k: float = 3.0
    ss_min_separation: float = 4.0
    ac_min_separation: float = 4.0
    min_silhouette: float = 0.25
    min_agreement: float = 0.5
    min_size: float = 0.005
    max_size: float = 0.67
    tail_z: float = 4.0
    silhouette_samples: int = 2000
    seed: int = 0

    def rule(self) -> dict[str, Any]:
        return {"rule": "per class: spectral signature (1-D split of the top principal "
                        "or the fourth-moment direction, the more separated) and 2-means in "
                        "the reduced space; the class is poisoned when both call it "
                        "suspicious (separation >= min separation, poison group between "
                        "min_size and max_size of the class, and for 2-means silhouette >= "
                        "min_silhouette or Jaccard >= min_agreement between its poison "
                        "cluster and the spectral poison side); flagged: the 2-means poison "
                        "cluster, cluster z > tail_z, or spectral z > ss_k; robust z from "
                        "the clean group's histogram median and MAD",
                **{k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(self).items()}}


@dataclass(frozen=True)
class ClassModel:
    """What is known of one class after each pass (later fields filled by later passes)."""

    label: int
    n: int
    mean: np.ndarray
    comps: np.ndarray  # (k, d)
    var: np.ndarray  # (k,) variances along comps
    ss_dir: np.ndarray | None = None  # (k,) spectral direction in the whitened space
    ss_kurtosis: float = 0.0
    ss_source: str = ""  # which direction: top principal or fourth-moment
    ss_cut: float = 0.0
    ss_poison_right: bool = True
    ac_white: bool = False
    ac_m: int = 0
    ac_centroids: np.ndarray | None = None  # (2, m)
    ac_poison: int = 1
    ac_dir: np.ndarray | None = None  # (k,)
    silhouette: float = 0.0
    ss_range: tuple[float, float] = (0.0, 1.0)
    ac_range: tuple[float, float] = (0.0, 1.0)
    ss_med: float = 0.0
    ss_scale: float = 1.0
    ac_med: float = 0.0
    ac_scale: float = 1.0
    ss_suspicious: bool = False
    ac_suspicious: bool = False

    @property
    def poisoned(self) -> bool:
        return self.ss_suspicious and self.ac_suspicious

    def project(self, x: np.ndarray) -> np.ndarray:
        """Whitened coordinates in the reduced space: unit variance along each direction."""
        return ((x - self.mean) @ self.comps.T) / np.sqrt(self.var)

    def ac_space(self, w: np.ndarray) -> np.ndarray:
        """The 2-means split's space: whitened, or the plain principal coordinates."""
        return w if self.ac_white else w * np.sqrt(self.var)

    def assign(self, z: np.ndarray) -> np.ndarray:
        """Index of the nearer 2-means centroid (``z`` in the split's space; its leading
        ``ac_m`` dims)."""
        assert self.ac_centroids is not None
        d = ((z[:, :self.ac_m, None] - self.ac_centroids.T[None]) ** 2).sum(axis=1)
        return np.argmin(d, axis=1)

    def ss_groups(self, p: np.ndarray) -> np.ndarray:
        """1 where the row is on the spectral poison side of the cut."""
        right = p > self.ss_cut
        return (right if self.ss_poison_right else ~right).astype(np.int64)


Model = dict[int, ClassModel]


def _by_class(batch: Batch) -> list[tuple[int, np.ndarray, np.ndarray]]:
    rows, x, y = batch
    order = np.argsort(y, kind="stable")
    ys = y[order]
    cuts = np.flatnonzero(np.diff(ys)) + 1
    return [(int(y[s[0]]), rows[s], x[s]) for s in np.split(order, cuts) if len(s)]


# ----- pass 1: moments -------------------------------------------------------------------------

def moments_partial(batches: list[Batch] | Any, _model: Any = None,
                    _config: ScaleConfig | None = None) -> dict[int, Moments]:
    out: dict[int, Moments] = {}
    for batch in batches:
        part = {c: Moments.of(xc) for c, _, xc in _by_class(batch)}
        out = merge_by_key(out, part, Moments.merge)
    return out


def merge_moments(a: dict[int, Moments], b: dict[int, Moments]) -> dict[int, Moments]:
    return merge_by_key(a, b, Moments.merge)


def fit_projection(moments: dict[int, Moments], config: ScaleConfig
                   ) -> tuple[Model, dict[int, str]]:
    """Per class: mean, top principal directions and their variances; classes with < 4 rows
    or no variance are returned as skipped (label -> reason)."""
    model, skipped = {}, {}
    for c in sorted(moments):
        m = moments[c]
        if m.n < 4 or not np.any(m.scatter):
            skipped[c] = "too few or constant samples"
            continue
        k = max(1, min(config.n_components, len(m.mean), m.n - 1))
        w, v = np.linalg.eigh(m.covariance)
        order = np.argsort(w)[::-1][:k]
        comps = v[:, order].T
        signs = np.sign(comps[np.arange(k), np.argmax(np.abs(comps), axis=1)])
        var = np.maximum(w[order], 1e-12 * max(float(w.max()), 1e-300))
        model[c] = ClassModel(c, m.n, m.mean, comps * signs[:, None], var=var)
    return model, skipped


def sized_for(config: ScaleConfig, n_classes: int) -> ScaleConfig:
    """Per-class sample size for ``n_classes``: at most ``sample_budget`` rows over all
    classes (the client holds them), at least 5,000 per class, at most ``sample_rows``."""
    per_class = min(config.sample_rows, max(5000, config.sample_budget // max(n_classes, 1)))
    return replace(config, sample_rows=per_class)


# ----- pass 2: hash sample and fourth moments in the reduced space ----------------------------

@dataclass(frozen=True)
class ClassSample:
    """A class's hash sample of reduced coordinates, and the sum over all its rows of
    |w|^2 w w^T for the whitened coordinates w (the fourth-moment matrix)."""

    sample: HashSample
    n: int
    m4: np.ndarray

    def merge(self, o: ClassSample) -> ClassSample:
        return ClassSample(self.sample.merge(o.sample), self.n + o.n, self.m4 + o.m4)


def sample_partial(batches: Any, model: Model, config: ScaleConfig) -> dict[int, ClassSample]:
    out: dict[int, ClassSample] = {}
    for batch in batches:
        part = {}
        for c, rows, xc in _by_class(batch):
            if c not in model:
                continue
            w = model[c].project(xc)
            m4 = (w * (w * w).sum(axis=1, keepdims=True)).T @ w
            part[c] = ClassSample(HashSample.of(rows, w, config.sample_rows, config.seed),
                                  len(w), m4)
        out = merge_by_key(out, part, ClassSample.merge)
    return out


def merge_samples(a: dict[int, ClassSample], b: dict[int, ClassSample]
                  ) -> dict[int, ClassSample]:
    return merge_by_key(a, b, ClassSample.merge)


def _padded(v: np.ndarray) -> tuple[float, float]:
    lo, hi = (float(v.min()), float(v.max())) if len(v) else (0.0, 1.0)
    pad = 0.25 * max(hi - lo, 1e-9)
    return lo - pad, hi + pad


def tail_direction(cs: ClassSample) -> tuple[np.ndarray, float]:
    """The whitened direction along which the class departs most from a Gaussian: the
    eigenvector of E[|w|^2 w w^T] furthest from its
    Gaussian value k + 2. A small far cluster makes a heavy tail (above), a large one a
    bimodal, light-tailed direction (below). Returns (direction, eigenvalue deviation)."""
    k = len(cs.m4)
    ev, vec = np.linalg.eigh(cs.m4 / max(cs.n, 1))
    j = int(np.argmax(np.abs(ev - (k + 2))))
    u = vec[:, j] * np.sign(vec[np.argmax(np.abs(vec[:, j])), j])
    return u, float(ev[j] - (k + 2))


def _two_medians_1d(v: np.ndarray, cut: float, iters: int = 200) -> float | None:
    """1-D 2-medians from ``cut`` (the cut moves to the midpoint of the two sides' medians,
    which a few bulk rows crossing it do not drag as they drag means); None when a side
    empties."""
    for _ in range(iters):
        right = v > cut
        if right.all() or not right.any():
            return None
        new = 0.5 * (float(np.median(v[right])) + float(np.median(v[~right])))
        if new == cut:
            break
        cut = new
    return cut


def _sep_at(v: np.ndarray, cut: float) -> float:
    right = v > cut
    if right.sum() < 2 or (~right).sum() < 2:
        return 0.0
    pooled = np.sqrt(0.5 * (v[right].var() + v[~right].var())) + 1e-12
    return float((v[right].mean() - v[~right].mean()) / pooled)


def split_tail(v: np.ndarray, tail_z: float) -> float:
    """The 1-D two-group cut: Otsu's (best split overall), or 2-medians started at robust z
    ``tail_z`` on either side (a small far group, which Otsu's split passes over for a
    cut through the bulk), whichever separates its groups more."""
    from poisonguard.detect.common import split_1d

    cut, _ = split_1d(v)
    best = (_sep_at(v, cut), cut)
    med = float(np.median(v))
    scale = max(MAD_TO_SIGMA * float(np.median(np.abs(v - med))), 1e-12)
    z = (v - med) / scale
    for side in (1.0, -1.0):
        if int((side * z > tail_z).sum()) >= 2:
            start = _two_medians_1d(v, med + side * tail_z * scale)
            if start is not None and _sep_at(v, start) > best[0]:
                best = (_sep_at(v, start), start)
    return best[1]


def spectral_split(cs: ClassSample, config: ScaleConfig
                   ) -> tuple[np.ndarray, float, np.ndarray, float, str]:
    """The spectral half's direction and 1-D cut on a class's sample: the top principal
    direction (Tran et al.'s spectral signature: a large poison group stretches it) or the
    fourth-moment tail direction (a small far group, which need not be the top direction),
    whichever splits its projection into more separated groups. Returns (direction in the
    whitened space, its fourth-moment deviation, the sample's projections, cut, which)."""
    w = cs.sample.values
    tail_dir, kurt = tail_direction(cs)
    best = None
    for name, u in (("top principal direction", np.eye(w.shape[1])[0]),
                    ("fourth-moment direction", tail_dir)):
        p = w @ u
        cut = split_tail(p, config.tail_z)
        sep = abs(_sep_at(p, cut))
        if best is None or sep > best[0]:
            best = (sep, u, p, cut, name)
    assert best is not None
    _, u, p, cut, name = best
    return u, kurt, p, cut, name


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|a & b| / |a | b| of two boolean masks (0 when both are empty)."""
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 0.0


def _split_candidate(cm: ClassModel, z: np.ndarray, white: bool, m: int, cents: np.ndarray,
                     config: ScaleConfig) -> dict | None:
    """A 2-means split of the sample ``z`` (in its space) by its centroids: the smaller
    cluster is the poison; separation along the centroid line; silhouette on the first
    ``silhouette_samples`` rows, computed only when the separation could make the class
    suspicious (0 otherwise)."""
    from sklearn.metrics import silhouette_score

    trial = replace(cm, ac_white=white, ac_m=m, ac_centroids=cents)
    assign = trial.assign(z)
    groups = [np.flatnonzero(assign == g) for g in (0, 1)]
    if min(len(g) for g in groups) < 2:
        return None
    poison = int(np.argmin([len(g) for g in groups]))
    pg, cg = groups[poison], groups[1 - poison]
    direction = z[pg].mean(0) - z[cg].mean(0)
    direction /= np.linalg.norm(direction) + 1e-12
    proj = z @ direction
    pooled = np.sqrt(0.5 * (proj[pg].var() + proj[cg].var())) + 1e-12
    sep = float((proj[pg].mean() - proj[cg].mean()) / pooled)
    s = min(config.silhouette_samples, len(z))
    sil = (float(silhouette_score(z[:s], assign[:s]))
           if sep >= config.ac_min_separation and len(np.unique(assign[:s])) == 2 else 0.0)
    return {"sep": sep, "sil": sil, "white": white, "m": m, "cents": cents, "poison": poison,
            "direction": direction, "clean_proj": proj[cg], "assign": assign}


def fit_splits(model: Model, samples: dict[int, ClassSample], config: ScaleConfig) -> Model:
    """On each class's sample: the 1-D cut along the tail direction, and 2-means splits in the
    plain and the whitened principal coordinates (k-means++ in the leading
    ``search_components`` and all reduced dims, and k-means started from the tail cut's two
    groups). The split kept is the most separated among those with silhouette >=
    ``min_silhouette`` or sample Jaccard >= ``min_agreement`` with the spectral poison side
    (else the most separated): whitening brings out a small far cluster,
    the plain coordinates a large one."""
    from sklearn.cluster import KMeans

    out = {}
    for c, cm in model.items():
        w = samples[c].sample.values
        ss_dir, kurt, p, cut, ss_source = spectral_split(samples[c], config)
        right = p > cut
        poison_right = bool(right.sum() <= (~right).sum())
        ss_clean = p[~right] if poison_right else p[right]
        candidates = []
        for white in (False, True):
            z = replace(cm, ac_white=white).ac_space(w)
            for m in sorted({min(k, z.shape[1]) for k in config.search_components}
                            | {z.shape[1]}):
                km = KMeans(n_clusters=2, n_init=3, random_state=config.seed).fit(z[:, :m])
                candidates.append(_split_candidate(cm, z, white, m, km.cluster_centers_,
                                                   config))
            if right.any() and (~right).any():
                init = np.stack([z[~right].mean(0), z[right].mean(0)])
                km = KMeans(n_clusters=2, init=init, n_init=1).fit(z)
                candidates.append(_split_candidate(cm, z, white, z.shape[1],
                                                   km.cluster_centers_, config))
        candidates = [cand for cand in candidates if cand is not None]
        ss_poison = right if poison_right else ~right
        for cand in candidates:
            cand["agree"] = jaccard(ss_poison, cand["assign"] == cand["poison"])
        if candidates:
            best = max(candidates, key=lambda d: (d["sil"] >= config.min_silhouette
                                                  or d["agree"] >= config.min_agreement,
                                                  d["sep"]))
        else:  # one cluster: a degenerate split that is never suspicious
            best = {"sil": 0.0, "white": True, "m": w.shape[1],
                    "cents": np.stack([w.mean(0), w.mean(0) + 1e-9]), "poison": 1,
                    "direction": np.eye(w.shape[1])[0], "clean_proj": w[:, 0]}
        out[c] = replace(cm, ss_dir=ss_dir, ss_kurtosis=kurt, ss_source=ss_source,
                         ss_cut=float(cut),
                         ss_poison_right=poison_right, ac_white=best["white"], ac_m=best["m"],
                         ac_centroids=best["cents"], ac_poison=best["poison"],
                         ac_dir=best["direction"], silhouette=best["sil"],
                         ss_range=_padded(ss_clean), ac_range=_padded(best["clean_proj"]))
    return out


# ----- pass 3: group sizes, separations and clean-group histograms -----------------------------

@dataclass(frozen=True)
class ClassStats:
    ss: tuple[Moments, Moments]  # clean side, poison side (projection on the top direction)
    ac: tuple[Moments, Moments]  # cluster 0, cluster 1 (projection on the centroid line)
    ss_hist: Histogram
    ac_hist: Histogram
    both: int = 0  # rows in the spectral poison side and the 2-means poison cluster

    def merge(self, o: ClassStats) -> ClassStats:
        return ClassStats((self.ss[0].merge(o.ss[0]), self.ss[1].merge(o.ss[1])),
                          (self.ac[0].merge(o.ac[0]), self.ac[1].merge(o.ac[1])),
                          self.ss_hist.merge(o.ss_hist), self.ac_hist.merge(o.ac_hist),
                          self.both + o.both)


def _class_scores(cm: ClassModel, xc: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(spectral projection, spectral group, cluster projection, cluster) of a class's rows."""
    assert cm.ac_dir is not None
    assert cm.ss_dir is not None
    w = cm.project(xc)
    p = w @ cm.ss_dir
    z = cm.ac_space(w)
    return p, cm.ss_groups(p), z @ cm.ac_dir, cm.assign(z)


def stats_partial(batches: Any, model: Model, config: ScaleConfig) -> dict[int, ClassStats]:
    out: dict[int, ClassStats] = {}
    for batch in batches:
        part = {}
        for c, _, xc in _by_class(batch):
            if c not in model:
                continue
            cm = model[c]
            p, sg, q, ag = _class_scores(cm, xc)
            clean_ac = 1 - cm.ac_poison
            part[c] = ClassStats(
                (Moments.of(p[sg == 0]), Moments.of(p[sg == 1])),
                (Moments.of(q[ag == 0]), Moments.of(q[ag == 1])),
                Histogram.of(p[sg == 0], *cm.ss_range, config.bins),
                Histogram.of(q[ag == clean_ac], *cm.ac_range, config.bins),
                int(((sg == 1) & (ag == cm.ac_poison)).sum()))
        out = merge_by_key(out, part, ClassStats.merge)
    return out


def merge_stats(a: dict[int, ClassStats], b: dict[int, ClassStats]) -> dict[int, ClassStats]:
    return merge_by_key(a, b, ClassStats.merge)


def _sep(poison: Moments, clean: Moments) -> float:
    if poison.n == 0 or clean.n == 0:
        return 0.0
    pooled = np.sqrt(0.5 * (poison.variance[0] + clean.variance[0])) + 1e-12
    return float((poison.mean[0] - clean.mean[0]) / pooled)


def fit_thresholds(model: Model, stats: dict[int, ClassStats], config: ScaleConfig
                   ) -> tuple[Model, dict[int, dict[str, Any]]]:
    """Robust location/scale of each clean group and the per-class verdicts."""
    out, evidence = {}, {}
    for c, cm in model.items():
        st = stats[c]
        ss_med = st.ss_hist.median()
        ss_scale = max(MAD_TO_SIGMA * st.ss_hist.mad(ss_med), 1e-12)
        ac_med = st.ac_hist.median()
        ac_scale = max(MAD_TO_SIGMA * st.ac_hist.mad(ac_med), 1e-12)
        ss_poison, ss_clean = st.ss[1], st.ss[0]
        ss_sep = abs(_sep(ss_poison, ss_clean))
        ss_rel = ss_poison.n / cm.n
        ac_poison, ac_clean = st.ac[cm.ac_poison], st.ac[1 - cm.ac_poison]
        ac_sep = _sep(ac_poison, ac_clean)
        ac_rel = ac_poison.n / cm.n
        union = ss_poison.n + ac_poison.n - st.both
        agree = st.both / union if union else 0.0
        ss_susp = ss_sep >= config.ss_min_separation and config.min_size <= ss_rel <= \
            config.max_size
        ac_susp = ((cm.silhouette >= config.min_silhouette or agree >= config.min_agreement)
                   and ac_sep >= config.ac_min_separation
                   and config.min_size <= ac_rel <= config.max_size)
        out[c] = replace(cm, ss_med=ss_med, ss_scale=ss_scale, ac_med=ac_med, ac_scale=ac_scale,
                         ss_suspicious=bool(ss_susp), ac_suspicious=bool(ac_susp))
        evidence[c] = {"n": cm.n, "spectral": {"suspicious": bool(ss_susp),
                                               "separation": round(ss_sep, 3),
                                               "poison_side_size": round(ss_rel, 4),
                                               "direction": cm.ss_source},
                       "clustering": {"suspicious": bool(ac_susp),
                                      "silhouette": round(cm.silhouette, 4),
                                      "agreement_with_spectral": round(agree, 4),
                                      "separation": round(ac_sep, 3),
                                      "poison_cluster_size": round(ac_rel, 4),
                                      "split_components": cm.ac_m,
                                      "whitened": cm.ac_white}}
    return out, evidence


# ----- pass 4: score and flag ------------------------------------------------------------------

FIELDS = ("rows", "labels", "ss_score", "ac_z", "ss_flag", "ac_flag", "flags")


@dataclass(frozen=True)
class Scored:
    """Rows of one chunk: indices, labels, spectral score (signed z^2), cluster z, each
    detector's flag and the combined flag. Only flagged rows unless the pass was asked for all."""

    rows: np.ndarray
    labels: np.ndarray
    ss_score: np.ndarray
    ac_z: np.ndarray
    ss_flag: np.ndarray
    ac_flag: np.ndarray
    flags: np.ndarray

    @property
    def votes(self) -> np.ndarray:
        return self.ss_flag.astype(np.int64) + self.ac_flag

    def take(self, idx: np.ndarray) -> Scored:
        return Scored(*(getattr(self, f)[idx] for f in FIELDS))

    @classmethod
    def concat(cls, parts: list[Scored]) -> Scored:
        if not parts:
            e, b = np.zeros(0), np.zeros(0, dtype=bool)
            return cls(e.astype(np.int64), e.astype(np.int64), e, e, b, b, b)
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in FIELDS))


def score_partial(batches: Any, model: Model, config: ScaleConfig,
                  keep_all: bool = False) -> Scored:
    parts = []
    for batch in batches:
        for c, rows, xc in _by_class(batch):
            n = len(rows)
            if c not in model:
                z0, f0 = np.zeros(n), np.zeros(n, dtype=bool)
                parts.append(Scored(rows, np.full(n, c), z0, z0, f0, f0, f0))
                continue
            cm = model[c]
            p, _, q, ag = _class_scores(cm, xc)
            ssz = (p - cm.ss_med) / cm.ss_scale
            if not cm.ss_poison_right:
                ssz = -ssz
            acz = (q - cm.ac_med) / cm.ac_scale
            ss_flag = (ssz > config.ss_k) & cm.ss_suspicious
            ac_flag = ((ag == cm.ac_poison) | (acz > config.tail_z)) & cm.ac_suspicious
            flags = (ss_flag | ac_flag) & cm.poisoned
            parts.append(Scored(rows, np.full(n, c), np.sign(ssz) * ssz**2, acz, ss_flag,
                                ac_flag, flags))
    out = Scored.concat(parts)
    if not keep_all:
        out = out.take(out.flags)
    return out.take(np.argsort(out.rows, kind="stable"))
