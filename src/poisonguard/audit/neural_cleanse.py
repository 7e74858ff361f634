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

    @property
    def n_classes(self) -> int:
        return len(self.norms)

    def most_anomalous(self) -> int:
        return int(np.argmax(self.anomaly))

    def findings(self, clean_y: np.ndarray) -> tuple[ClassFinding, ...]:
        counts = np.bincount(clean_y, minlength=self.n_classes)
        return tuple(ClassFinding(
            label=k, suspicious=k in self.flagged, n_samples=int(counts[k]), n_flagged=0,
            evidence={"mask_l1": round(float(self.norms[k]), 3),
                      "anomaly_index": round(float(self.anomaly[k]), 3),
                      "score": round(float(self.anomaly[k]), 3),
                      "reversed_asr": round(float(self.reversed_asr[k]), 4),
                      "reached_success": bool(self.reached[k]), "steps": int(self.steps[k])})
            for k in range(self.n_classes))

    def stamp(self, x: np.ndarray, k: int) -> torch.Tensor:
        """Clean samples ``x`` with class k's reversed trigger, as a float data-space tensor."""
        xd = to_data_tensor(x)
        m = torch.from_numpy(self.masks[k]).float()
        p = torch.from_numpy(self.patterns[k]).float()
        return (1 - m) * xd + m * p

    def summary(self) -> dict[str, Any]:
        return {"flagged": self.flagged, "threshold": self.config.threshold,
                "max_ratio": self.config.max_ratio,
                "median_mask_l1": round(float(np.median(self.norms)), 3),
                "mask_l1": [round(float(v), 3) for v in self.norms],
                "anomaly_index": [round(float(v), 3) for v in self.anomaly],
                "reversed_asr": [round(float(v), 4) for v in self.reversed_asr],
                "reached_success": [bool(v) for v in self.reached],
                "steps": [int(v) for v in self.steps], "runtime_s": round(self.runtime_s, 3),
                "value_range": list(self.value_range), "config": self.config.to_dict()}


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


def neural_cleanse(model: AuditModel, clean: LabeledData, n_classes: int,
                   config: CleanseConfig | None = None) -> CleanseResult:
    """Reverse-engineer a minimal trigger for every class at once; flag small-norm outliers."""
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
    opt = torch.optim.Adam([mask_logit, pattern_logit], lr=cfg.lr, betas=(0.5, 0.9))
    cost = torch.zeros(k_all)          # 0 until a class first succeeds, then init_cost
    best_norm = np.full(k_all, np.inf)
    best_mask = np.zeros((k_all, *mshape), dtype=np.float32)
    best_pattern = np.zeros((k_all, *sample), dtype=np.float32)
    since_best = np.zeros(k_all, dtype=int)
    steps = np.zeros(k_all, dtype=int)
    up_count = np.zeros(k_all, dtype=int)
    down_count = np.zeros(k_all, dtype=int)
    active = np.ones(k_all, dtype=bool)
    n_pix = float(np.prod(mshape))
    targets_all = torch.arange(k_all)
    n = len(x_all)
    bsz = min(cfg.batch_size, n)
    try:
        for step in range(cfg.max_steps):
            act = np.flatnonzero(active)
            if len(act) == 0:
                break
            idx = torch.randperm(n, generator=gen)[:bsz]
            xb, yb = x_all[idx], y_all[idx]
            act_t = torch.from_numpy(act)
            m = torch.sigmoid(mask_logit[act_t])                       # (A, *mshape)
            p = lo + (hi - lo) * torch.sigmoid(pattern_logit[act_t])   # (A, *sample)
            stamped = (1 - m[:, None]) * xb[None] + (m * p)[:, None]   # (A, B, *sample)
            logits = model.logits(stamped.reshape(len(act) * bsz, *sample))
            tgt = targets_all[act_t].repeat_interleave(bsz)
            ce = F.cross_entropy(logits, tgt, reduction="none").view(len(act), bsz)
            norms = m.reshape(len(act), -1).sum(1)
            loss = (ce.mean(1) + cost[act_t] * norms / n_pix * 100.0).sum()
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
                    best_mask[k] = m[j].detach().numpy()
                    best_pattern[k] = p[j].detach().numpy()
                    since_best[k] = 0
                else:
                    since_best[k] += 1
                if ok and cost[k] == 0:
                    cost[k] = cfg.init_cost
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
    med = float(np.median(norms_final))
    result.flagged = [int(k) for k in np.argsort(-anomaly)
                      if anomaly[k] > cfg.threshold and norms_final[k] <= cfg.max_ratio * med
                      and result.reversed_asr[k] >= 0.5]
    result.runtime_s = time.perf_counter() - t0
    return result


def reversed_asr(model: AuditModel, result: CleanseResult, clean: LabeledData,
                 max_samples: int = 300, seed: int = 0) -> np.ndarray:
    """Share of clean samples (not of class k) that class k's reversed trigger sends to k."""
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
        pred = model.predict_data(result.stamp(x[keep], k))
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
