"""Neural Cleanse (Wang et al., S&P 2019), all classes optimised together.

For every class k we look for the smallest mask m_k (one value per pixel, in [0, 1]) and pattern
p_k (data range) such that stamping ``x' = (1 - m_k) x + m_k p_k`` sends clean inputs to k. A
backdoor target needs a far smaller mask than the other classes, so the L1 norms are compared with
a robust z-score: the anomaly index ``(median - norm) / (1.4826 * MAD)``; classes above 2 on the
small side are flagged.

The K problems are solved in one batched optimisation: parameters ``mask_logit`` (K, *mask) and
``pattern_logit`` (K, *sample); each step stamps the K candidate triggers on one mini-batch of
clean samples (a K*B forward/backward pass), with a per-class adaptive weight on the mask norm
(raised while the class's attack succeeds, lowered when it fails) and per-class early stopping
once the smallest successful mask stops shrinking.

A second search, run the same batched way, looks for every class's smallest *universal additive
perturbation* ``x' = clip(x + delta_k)`` (L2 norm, in units of the data range). Neural Cleanse's
L1 mask cost is built for small opaque patches: a full-image low-amplitude trigger (a blended
pattern) needs a mask covering every pixel at its blend weight, which costs more than a natural
class's shortcut, so the target does not stand out. The same trigger is a small L2 perturbation,
far below the natural classes'. Each statistic flags its own outliers (anomaly index above the
threshold and a norm at most a given share of the median); once a class is flagged, the target
is the class with the largest sum of the two anomaly indices among those above the threshold in
either search, so that when one search sees two candidates (a natural shortcut and a backdoor),
the other decides between them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from poisonguard.audit.model import AuditModel, to_data_tensor, value_range
from poisonguard.data.labeled import LabeledData
from poisonguard.errors import ConfigError
from poisonguard.types import ClassFinding

MAD_SCALE = 1.4826


@dataclass(frozen=True)
class CleanseConfig:
    """Hyper-parameters of the batched reverse-engineering.

    ``batch_size`` clean samples per step (each stamped with all K candidate triggers);
    ``max_steps`` the step budget; ``success`` the attack-success rate a mask must reach to count;
    ``patience`` steps without a 1% smaller successful mask before a class stops; ``threshold``
    the anomaly index above which a class is flagged; ``max_ratio`` a second guard: a flagged
    mask must also be at most this share of the median norm (the index alone flags a clean class
    whenever the natural classes' norms happen to cluster tightly).

    ``additive`` runs the second search (smallest universal additive perturbation per class,
    L2 norm in units of the data range) with its own learning rate, initial norm weight and
    ratio guard ``additive_max_ratio`` (the L2 norms of natural classes spread less than the
    L1 mask norms, so a perturbation is flagged up to a larger share of the median).
    """

    batch_size: int = 16
    max_steps: int = 160
    min_steps: int = 40
    lr: float = 0.15
    init_cost: float = 0.02
    cost_up: float = 1.3
    cost_down: float = 1.5
    success: float = 0.99
    patience: int = 25
    threshold: float = 2.0
    max_ratio: float = 0.33
    eval_samples: int = 300
    seed: int = 0
    additive: bool = True
    additive_lr: float = 0.02
    additive_init_cost: float = 0.05
    additive_max_ratio: float = 0.4

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_steps < 1:
            raise ConfigError("batch_size and max_steps must be >= 1")
        if not 0 < self.success <= 1:
            raise ConfigError(f"success must be in (0, 1], got {self.success}")

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


@dataclass
class CleanseResult:
    """Per-class reversed triggers and their outlier statistics."""

    masks: np.ndarray            # (K, *mask_shape) in [0, 1]
    patterns: np.ndarray         # (K, *sample_shape) in the data range
    norms: np.ndarray            # (K,) L1 norm of each mask (pixels)
    anomaly: np.ndarray          # (K,) anomaly index, positive = smaller than the median
    reversed_asr: np.ndarray     # (K,) attack success of each reversed trigger on clean data
    reached: np.ndarray          # (K,) whether the success rate was reached during the search
    steps: np.ndarray            # (K,) steps each class ran
    flagged: list[int]
    runtime_s: float
    config: CleanseConfig
    value_range: tuple[float, float] = (0.0, 1.0)
    extras: dict[str, Any] = field(default_factory=dict)
    # the additive search (None when it did not run): per-class perturbations in data units,
    # their L2 norms in units of the data range, anomaly indices and reversed ASR
    deltas: np.ndarray | None = None
    add_norms: np.ndarray | None = None
    add_anomaly: np.ndarray | None = None
    add_asr: np.ndarray | None = None
    mask_flagged: list[int] = field(default_factory=list)
    add_flagged: list[int] = field(default_factory=list)

    @property
    def n_classes(self) -> int:
        return len(self.norms)

    @property
    def score(self) -> np.ndarray:
        """Per-class evidence: the mask anomaly index plus the additive one when it ran."""
        if self.add_anomaly is None:
            return np.asarray(self.anomaly, dtype=np.float64)
        return np.asarray(self.anomaly, dtype=np.float64) + self.add_anomaly

    def most_anomalous(self) -> int:
        return int(np.argmax(self.score))

    def findings(self, clean_y: np.ndarray) -> tuple[ClassFinding, ...]:
        counts = np.bincount(clean_y, minlength=self.n_classes)
        score = self.score
        out = []
        for k in range(self.n_classes):
            ev: dict[str, Any] = {"mask_l1": round(float(self.norms[k]), 3),
                                  "anomaly_index": round(float(self.anomaly[k]), 3),
                                  "score": round(float(score[k]), 3),
                                  "reversed_asr": round(float(self.reversed_asr[k]), 4),
                                  "reached_success": bool(self.reached[k]),
                                  "steps": int(self.steps[k])}
            if self.add_norms is not None and self.add_anomaly is not None:
                ev["additive_l2"] = round(float(self.add_norms[k]), 4)
                ev["additive_anomaly_index"] = round(float(self.add_anomaly[k]), 3)
                if self.add_asr is not None:
                    ev["additive_asr"] = round(float(self.add_asr[k]), 4)
            out.append(ClassFinding(label=k, suspicious=k in self.flagged,
                                    n_samples=int(counts[k]), n_flagged=0, evidence=ev))
        return tuple(out)

    def stamp(self, x: np.ndarray, k: int) -> torch.Tensor:
        """Clean samples ``x`` with class k's reversed trigger, as a float data-space tensor."""
        return self.stamp_tensor(to_data_tensor(x), k)

    def stamp_additive(self, x: np.ndarray, k: int) -> torch.Tensor:
        """Clean samples ``x`` plus class k's additive perturbation, clipped to the range."""
        return self.stamp_tensor(to_data_tensor(x), k, "additive")

    def stamp_tensor(self, xd: torch.Tensor, k: int, kind: str = "mask",
                     strength: float = 1.0) -> torch.Tensor:
        """Data-space batch ``xd`` with class k's reversed trigger of ``kind``: the mask and
        pattern (``"mask"``), or the additive perturbation scaled by ``strength`` and clipped to
        the data range (``"additive"``)."""
        if kind == "additive":
            if self.deltas is None:
                raise ConfigError("the additive search did not run (config.additive=False)")
            lo, hi = self.value_range
            d = torch.from_numpy(np.asarray(self.deltas[k])).float()
            return (xd + strength * d).clamp(lo, hi)
        m = torch.from_numpy(np.asarray(self.masks[k])).float()
        p = torch.from_numpy(np.asarray(self.patterns[k])).float()
        return (1 - m) * xd + m * p

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "flagged": self.flagged, "mask_flagged": self.mask_flagged,
            "threshold": self.config.threshold, "max_ratio": self.config.max_ratio,
            "median_mask_l1": round(float(np.median(self.norms)), 3),
            "mask_l1": [round(float(v), 3) for v in self.norms],
            "anomaly_index": [round(float(v), 3) for v in self.anomaly],
            "reversed_asr": [round(float(v), 4) for v in self.reversed_asr],
            "reached_success": [bool(v) for v in self.reached],
            "steps": [int(v) for v in self.steps], "runtime_s": round(self.runtime_s, 3),
            "value_range": list(self.value_range), "config": self.config.to_dict()}
        if self.add_norms is not None and self.add_anomaly is not None:
            out["additive"] = {
                "flagged": self.add_flagged, "max_ratio": self.config.additive_max_ratio,
                "median_l2": round(float(np.median(self.add_norms)), 4),
                "l2": [round(float(v), 4) for v in self.add_norms],
                "anomaly_index": [round(float(v), 3) for v in self.add_anomaly],
                "reversed_asr": ([round(float(v), 4) for v in self.add_asr]
                                 if self.add_asr is not None else None)}
            out["score"] = [round(float(v), 3) for v in self.score]
        return out


def anomaly_index(norms: np.ndarray, log: bool = True) -> np.ndarray:
    """Robust z-score of each norm, positive on the small side: (median - x) / (1.4826 MAD).

    With ``log`` (the default) it is computed on log norms: mask sizes are ratios (a trigger is
    "10x smaller"), and the natural classes' norms are right-skewed, which inflates the MAD of
    the raw norms."""
    norms = np.asarray(norms, dtype=np.float64)
    if log:
        norms = np.log(np.maximum(norms, 1e-3))
    med = np.median(norms)
    mad = MAD_SCALE * np.median(np.abs(norms - med))
    mad = max(mad, 1e-6 * max(abs(med), 1.0))
    return (med - norms) / mad


def mask_shape(sample_shape: tuple[int, ...]) -> tuple[int, ...]:
    """One mask value per pixel: (H, W) for grey, (H, W, 1) for NHWC colour, (D,) for vectors."""
    if len(sample_shape) == 3:
        return (sample_shape[0], sample_shape[1], 1)
    return tuple(sample_shape)


def _search(model: AuditModel, x_all: torch.Tensor, y_all: torch.Tensor, k_all: int,
            params: list[torch.Tensor], build: Any, penalty: Any, lr: float,
            init_cost: float, cfg: CleanseConfig, gen: torch.Generator
            ) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """The batched per-class search shared by both objectives. ``build(act, xb)`` returns, for
    the active classes ``act``, the stamped batches (A, B, *sample), the norms (A,) and the
    tensors to keep when a norm is the smallest successful one; ``penalty(norms)`` is the norm
    term of the loss, before its per-class weight. The weight starts at 0,
    becomes ``init_cost`` once a class succeeds, then is raised while the attack succeeds and
    lowered when it fails; a class stops once its smallest successful norm stops shrinking.
    Returns the best norms (inf where never successful), the kept tensors and the steps run."""
    sample = tuple(x_all.shape[1:])
    opt = torch.optim.Adam(params, lr=lr, betas=(0.5, 0.9))
    cost = torch.zeros(k_all)          # 0 until a class first succeeds, then init_cost
    best_norm = np.full(k_all, np.inf)
    best: list[np.ndarray] = []
    since_best = np.zeros(k_all, dtype=int)
    steps = np.zeros(k_all, dtype=int)
    up_count = np.zeros(k_all, dtype=int)
    down_count = np.zeros(k_all, dtype=int)
    active = np.ones(k_all, dtype=bool)
    targets_all = torch.arange(k_all)
    n = len(x_all)
    bsz = min(cfg.batch_size, n)
    for step in range(cfg.max_steps):
        act = np.flatnonzero(active)
        if len(act) == 0:
            break
        idx = torch.randperm(n, generator=gen)[:bsz]
        xb, yb = x_all[idx], y_all[idx]
        act_t = torch.from_numpy(act)
        stamped, norms, keep = build(act_t, xb)
        if not best:
            best = [np.zeros((k_all, *t.shape[1:]), dtype=np.float32) for t in keep]
        logits = model.logits(stamped.reshape(len(act) * bsz, *sample))
        tgt = targets_all[act_t].repeat_interleave(bsz)
        ce = F.cross_entropy(logits, tgt, reduction="none").view(len(act), bsz)
        loss = (ce.mean(1) + cost[act_t] * penalty(norms)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            hit = (logits.argmax(1) == tgt).view(len(act), bsz)
            other = (yb[None, :] != targets_all[act_t][:, None])
            succ = ((hit & other).sum(1).float() / other.sum(1).clamp_min(1)).numpy()
            norms_np = norms.detach().numpy()
        for j, k in enumerate(act):
            steps[k] += 1
            ok = succ[j] >= cfg.success
            if ok and norms_np[j] < best_norm[k] * 0.99:
                best_norm[k] = norms_np[j]
                for b, t in zip(best, keep):
                    b[k] = t[j].detach().numpy()
                since_best[k] = 0
            else:
                since_best[k] += 1
            if ok and cost[k] == 0:
                cost[k] = init_cost
                since_best[k] = 0
            elif ok:
                up_count[k] += 1
                down_count[k] = 0
            else:
                down_count[k] += 1
                up_count[k] = 0
            if up_count[k] >= 3:
                cost[k] *= cfg.cost_up
                up_count[k] = 0
            elif down_count[k] >= 3 and cost[k] > 0:
                cost[k] /= cfg.cost_down
                down_count[k] = 0
            if (step + 1 >= cfg.min_steps and np.isfinite(best_norm[k])
                    and since_best[k] >= cfg.patience):
                active[k] = False
    return best_norm, best, steps


def _flag(norms: np.ndarray, anomaly: np.ndarray, asr: np.ndarray, threshold: float,
          max_ratio: float) -> list[int]:
    """Classes above the anomaly threshold, at most ``max_ratio`` of the median norm, whose
    reversed trigger sends at least half of the clean samples to them."""
    med = float(np.median(norms))
    return [int(k) for k in np.argsort(-anomaly)
            if anomaly[k] > threshold and norms[k] <= max_ratio * med and asr[k] >= 0.5]


def neural_cleanse(model: AuditModel, clean: LabeledData, n_classes: int,
                   config: CleanseConfig | None = None) -> CleanseResult:
    """Reverse-engineer a minimal trigger for every class at once (a mask and pattern, and with
    ``config.additive`` a universal additive perturbation); flag small-norm outliers."""
    cfg = config or CleanseConfig()
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)
    k_all = n_classes
    lo, hi = value_range(clean.x)
    x_all = to_data_tensor(clean.x)
    y_all = torch.from_numpy(clean.y)
    sample = tuple(x_all.shape[1:])
    mshape = mask_shape(sample)
    module = model.module
    module.eval()
    req = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)

    mask_logit = torch.full((k_all, *mshape), -1.0)
    mask_logit += 0.1 * torch.randn(mask_logit.shape, generator=gen)
    pattern_logit = 0.5 * torch.randn((k_all, *sample), generator=gen)
    mask_logit.requires_grad_(True)
    pattern_logit.requires_grad_(True)
    n_pix = float(np.prod(mshape))

    def build_mask(act_t: torch.Tensor, xb: torch.Tensor) -> tuple[Any, Any, Any]:
        m = torch.sigmoid(mask_logit[act_t])                       # (A, *mshape)
        p = lo + (hi - lo) * torch.sigmoid(pattern_logit[act_t])   # (A, *sample)
        stamped = (1 - m[:, None]) * xb[None] + (m * p)[:, None]   # (A, B, *sample)
        return stamped, m.reshape(len(act_t), -1).sum(1), (m, p)

    # its own generator: the mask search sees the same batches with or without it
    gen_add = torch.Generator().manual_seed(cfg.seed + 1)
    delta = (1e-3 * torch.randn((k_all, *sample), generator=gen_add)).requires_grad_(True)

    def build_add(act_t: torch.Tensor, xb: torch.Tensor) -> tuple[Any, Any, Any]:
        d = delta[act_t]                                            # range units
        stamped = (xb[None] + (hi - lo) * d[:, None]).clamp(lo, hi)
        return stamped, d.reshape(len(act_t), -1).norm(dim=1), ((hi - lo) * d,)

    add_norms = add_deltas = None
    try:
        best_norm, (best_mask, best_pattern), steps = _search(
            model, x_all, y_all, k_all, [mask_logit, pattern_logit], build_mask,
            lambda v: v / n_pix * 100.0, cfg.lr, cfg.init_cost, cfg, gen)
        if cfg.additive:
            add_norms, (add_deltas,), _ = _search(
                model, x_all, y_all, k_all, [delta], build_add, lambda v: v, cfg.additive_lr,
                cfg.additive_init_cost, cfg, gen_add)
    finally:
        for p_, r in zip(module.parameters(), req):
            p_.requires_grad_(r)
    reached = np.isfinite(best_norm)
    with torch.no_grad():
        m_last = torch.sigmoid(mask_logit).numpy()
        p_last = (lo + (hi - lo) * torch.sigmoid(pattern_logit)).numpy()
    for k in np.flatnonzero(~reached):
        best_mask[k], best_pattern[k] = m_last[k], p_last[k]
    norms_final = best_mask.reshape(k_all, -1).sum(1).astype(np.float64)
    anomaly = anomaly_index(norms_final)
    result = CleanseResult(masks=best_mask, patterns=best_pattern, norms=norms_final,
                           anomaly=anomaly, reversed_asr=np.zeros(k_all), reached=reached,
                           steps=steps, flagged=[], runtime_s=0.0, config=cfg,
                           value_range=(lo, hi))
    result.reversed_asr = reversed_asr(model, result, clean, cfg.eval_samples, cfg.seed)
    result.mask_flagged = _flag(norms_final, anomaly, result.reversed_asr, cfg.threshold,
                                cfg.max_ratio)
    if add_norms is not None and add_deltas is not None:
        with torch.no_grad():
            d_last = ((hi - lo) * delta).numpy()
        unreached = ~np.isfinite(add_norms)
        add_deltas[unreached] = d_last[unreached]
        add_norms = np.linalg.norm(add_deltas.reshape(k_all, -1).astype(np.float64)
                                   / (hi - lo), axis=1)
        result.deltas = add_deltas
        result.add_norms = add_norms
        result.add_anomaly = anomaly_index(add_norms)
        result.add_asr = reversed_asr(model, result, clean, cfg.eval_samples, cfg.seed,
                                      additive=True)
        result.add_flagged = _flag(add_norms, result.add_anomaly, result.add_asr,
                                   cfg.threshold, cfg.additive_max_ratio)
    result.flagged = combine_flags(result)
    result.runtime_s = time.perf_counter() - t0
    return result


def combine_flags(nc: CleanseResult) -> list[int]:
    """The classes flagged by either search, ordered by score (summed anomaly indices). Once
    a class is flagged, the class with the highest score among those above the threshold in
    either search is flagged too (it leads the list): which class is the target is decided by
    both searches together, not by the guard of one (a natural shortcut can pass the mask
    search's guards while the backdoor target just misses them, and the additive search sees
    the backdoor far more clearly)."""
    flagged = set(nc.mask_flagged) | set(nc.add_flagged)
    if not flagged:
        return []
    score = nc.score
    above = nc.anomaly > nc.config.threshold
    if nc.add_anomaly is not None:
        above = above | (nc.add_anomaly > nc.config.threshold)
    cand = np.flatnonzero(above)
    if len(cand):
        flagged.add(int(cand[np.argmax(score[cand])]))
    return sorted(flagged, key=lambda k: -score[k])


def reversed_asr(model: AuditModel, result: CleanseResult, clean: LabeledData,
                 max_samples: int = 300, seed: int = 0, additive: bool = False) -> np.ndarray:
    """Share of clean samples (not of class k) that class k's reversed trigger (with
    ``additive``, its additive perturbation) sends to k."""
    rng = np.random.default_rng(seed)
    idx = np.arange(len(clean))
    if len(idx) > max_samples:
        idx = np.sort(rng.choice(idx, max_samples, replace=False))
    x, y = clean.x[idx], clean.y[idx]
    out = np.zeros(result.n_classes)
    for k in range(result.n_classes):
        keep = y != k
        if not keep.any():
            continue
        stamped = (result.stamp_additive(x[keep], k) if additive
                   else result.stamp(x[keep], k))
        pred = model.predict_data(stamped)
        out[k] = float(np.mean(pred == k))
    return out


def refine_trigger(model: AuditModel, xd: torch.Tensor, y: np.ndarray, k: int,
                   mask: np.ndarray, pattern: np.ndarray, value_range: tuple[float, float],
                   steps: int = 30, batch_size: int = 32, lr: float = 0.1, cost: float = 0.02,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
    """Re-optimise class k's trigger against the model as it is now, starting from ``mask`` /
    ``pattern`` (used between unlearning epochs: once the first trigger is unlearned, the
    search finds what is left of the shortcut). Returns mask, pattern and the batch success."""
    lo, hi = value_range
    gen = torch.Generator().manual_seed(seed)
    eps = 1e-4
    m0 = torch.from_numpy(np.clip(mask, eps, 1 - eps)).float()
    p0 = torch.from_numpy(np.clip((pattern - lo) / max(hi - lo, 1e-9), eps, 1 - eps)).float()
    mask_logit = torch.logit(m0).clamp(-6, 6).requires_grad_(True)
    pattern_logit = torch.logit(p0).clamp(-6, 6).requires_grad_(True)
    opt = torch.optim.Adam([mask_logit, pattern_logit], lr=lr, betas=(0.5, 0.9))
    pool = np.flatnonzero(y != k)
    module = model.module
    was_training = module.training
    module.eval()
    req = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    n_pix = float(mask_logit.numel())
    succ = 0.0
    try:
        for _ in range(steps):
            idx = torch.from_numpy(pool[torch.randint(0, len(pool), (min(batch_size, len(pool)),),
                                                      generator=gen).numpy()])
            m = torch.sigmoid(mask_logit)
            p = lo + (hi - lo) * torch.sigmoid(pattern_logit)
            logits = model.logits((1 - m) * xd[idx] + m * p)
            tgt = torch.full((len(idx),), k, dtype=torch.long)
            loss = F.cross_entropy(logits, tgt) + cost * m.sum() / n_pix * 100.0
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            succ = float((logits.argmax(1) == tgt).float().mean())
    finally:
        for p_, r in zip(module.parameters(), req):
            p_.requires_grad_(r)
        module.train(was_training)
    with torch.no_grad():
        m = torch.sigmoid(mask_logit).numpy()
        p = (lo + (hi - lo) * torch.sigmoid(pattern_logit)).numpy()
    return m, p, succ
