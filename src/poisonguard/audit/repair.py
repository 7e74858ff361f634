"""Repairs of a backdoored model with a small trusted clean set.

* Fine-pruning (Liu et al., RAID 2018): channels of the last convolutional layer are pruned in
  order of increasing mean clean activation while the clean accuracy stays within a budget, then
  the model is fine-tuned on the clean set with the pruned channels held at zero. When a reversed
  trigger is known, the channels it excites most (relative to clean inputs) are pruned first and
  the fine-tuning also stamps it (as unlearning does): plain fine-pruning leaves most BadNets
  backdoors of small networks in place.
* Unlearning (Neural Cleanse's mitigation): fine-tune with the reversed trigger stamped on part
  of the clean inputs under their true labels, so the shortcut is unlearned; the stamped inputs
  of other classes are also pushed away from the flagged class (``RepairConfig.suppress``).

Both use the reversed trigger of whichever search flagged the class (:func:`trigger_kinds`):
the mask and pattern of the mask search, the universal additive perturbation of the additive
search (stamped at random strengths), or both (each stamped sample gets one of them).

Both fine-tune in the data space through :class:`AuditModel`, with batch-norm statistics frozen
(a few hundred samples would corrupt them), and keep the epoch with the best held-out result.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from poisonguard.audit.model import AuditModel, to_data_tensor
from poisonguard.audit.neural_cleanse import CleanseResult, refine_trigger
from poisonguard.data.labeled import LabeledData
from poisonguard.detect.common import robust_z
from poisonguard.errors import ConfigError, ModelError


@dataclass(frozen=True)
class RepairConfig:
    """``prune_budget``: clean-accuracy drop allowed while pruning (before fine-tuning), after
    adding ``prune_z`` standard errors of the paired difference on the trusted set;
    ``epochs``/``lr``/``batch_size``: fine-tuning; ``stamp_fraction``: share of each batch given
    the reversed trigger when unlearning; ``val_fraction``: clean share held out to pick the
    epoch; ``max_drop``: the largest held-out accuracy loss an accepted epoch may show;
    ``distill``: weight of a KL term that keeps the outputs on unstamped clean inputs close to
    the original model's (preserves clean accuracy with few samples); ``shift``: random
    translation (pixels) of each batch, so the unlearned shortcut generalises beyond the exact
    reversed trigger; ``rereverse_steps``: after each epoch the trigger is re-optimised against
    the current model for this many steps and, if it still works, added to the stamped
    variants (0: off); ``adv_steps``: half of the stamped samples instead get the worst
    pattern inside the trigger's region (grown by 2 pixels), found with this many
    signed-gradient steps (0, the default: off; it did not lower the ASR further in our
    tests); ``optimizer``: ``"sgd"`` (momentum 0.9) or ``"adam"``; ``drop_z``: standard
    errors of the paired held-out accuracy difference granted before an epoch counts as over
    budget; ``tune``: ``"linear"`` fine-tunes only the fully connected layers (the convolutional
    features stay; far less clean accuracy lost with a few hundred samples; all layers when the
    classifier is the only linear layer) or ``"all"``;
    ``trigger_stop``/``trigger_patience``/``max_trigger_units``: fine-pruning stops pruning the
    reversed trigger's units once its worst variant's success is at most ``trigger_stop``, or
    has not dropped by a point in ``trigger_patience`` steps (after falling below 50%; those
    steps are kept), or
    this share of the units is gone; ``prune_stamp``: when pruning used that whole share with
    the reversed trigger still working, fine-pruning's fine-tuning also stamps it under the
    true labels (a short unlearning after the prune; otherwise, or off: plain fine-tuning,
    which is what the built-in zoo's fine-pruning figures were measured with). On foreign
    MNIST models whose trigger is spread over many units (global pooling after batch-norm
    convolutions, a blended trigger) pruning stopped at ``max_trigger_units`` with 6-23% ASR
    left and plain fine-tuning ended at 7-27%; ``add_strengths``: a class flagged by the
    additive search is stamped as ``clip(x + s * delta)`` with ``s`` drawn uniformly from this range
    (the reversed perturbation is the smallest that works; the real trigger is usually
    stronger, so the network must unlearn the direction, not one amplitude); ``suppress``: weight
    of a term ``-log(1 - p_k)`` on stamped samples of other classes, which pushes the flagged
    class k's probability down wherever its trigger appears (the true label alone left
    2-6% ASR on small CIFAR-10 and Fashion-MNIST models); ``soup``: unlearning runs (seeds
    ``seed``, ``seed + 1``, ...) whose weights are averaged."""

    prune_budget: float = 0.005
    prune_step: int = 0          # channels per pruning step (0: about 1/32 of the layer)
    prune_z: float = 1.0
    epochs: int = 15
    lr: float = 1e-3
    trigger_lr: float = 1e-2
    anchor: float = 0.0
    cosine: bool = True
    batch_size: int = 32
    stamp_fraction: float = 0.5
    val_fraction: float = 0.2
    max_drop: float = 0.01
    drop_z: float = 0.5
    tune: str = "linear"
    distill: float = 1.0
    rereverse_steps: int = 0
    clip: float = 10.0
    jitter: int = 2
    adv_steps: int = 0
    optimizer: str = "sgd"
    shift: int = 2
    trigger_stop: float = 0.0
    trigger_patience: int = 4
    prune_stamp: bool = True
    max_trigger_units: float = 0.25
    add_strengths: tuple[float, float] = (1.0, 2.0)
    suppress: float = 3.0
    soup: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.prune_budget < 1:
            raise ConfigError(f"prune_budget must be in [0, 1), got {self.prune_budget}")
        if not 0 < self.stamp_fraction < 1:
            raise ConfigError(f"stamp_fraction must be in (0, 1), got {self.stamp_fraction}")
        if self.epochs < 0:
            raise ConfigError(f"epochs must be >= 0, got {self.epochs}")
        if not 0 < self.add_strengths[0] <= self.add_strengths[1]:
            raise ConfigError(f"add_strengths must be 0 < low <= high, got {self.add_strengths}")
        if not self.prune_z >= 0:
            raise ConfigError(f"prune_z must be >= 0, got {self.prune_z}")
        if self.soup < 1:
            raise ConfigError(f"soup must be >= 1, got {self.soup}")
        if not self.suppress >= 0:
            raise ConfigError(f"suppress must be >= 0, got {self.suppress}")
        if self.tune not in ("all", "linear"):
            raise ConfigError(f"tune must be 'all' or 'linear', got {self.tune!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is(mod: nn.Module, name: str) -> bool:
    return type(mod).__name__ == name or getattr(mod, "original_name", None) == name


def _freeze_bn(module: nn.Module) -> None:
    module.train()
    for m in module.modules():
        if _is(m, "BatchNorm2d") or _is(m, "BatchNorm1d"):
            m.eval()


def _accuracy(model: AuditModel, xd: torch.Tensor, y: np.ndarray) -> float:
    return float(np.mean(model.predict_data(xd) == y)) if len(y) else 0.0


def _split(clean: LabeledData, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    val, train = [], []
    for c in np.unique(clean.y):
        idx = rng.permutation(np.flatnonzero(clean.y == c))
        n_val = int(round(frac * len(idx))) if len(idx) > 1 else 0
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def trigger_kinds(nc: CleanseResult, k: int) -> tuple[str, ...]:
    """Which reversed trigger(s) of class k the repairs stamp: ``"mask"`` when the mask search
    flagged k, ``"additive"`` when the additive search did, both when both did; a class that
    neither flagged on its own (the target chosen by the summed score, or one asked for by
    hand) gets the trigger of the search that ranks it higher."""
    has_add = nc.deltas is not None
    kinds = [kind for kind, hit in (("mask", k in nc.mask_flagged),
                                    ("additive", has_add and k in nc.add_flagged)) if hit]
    if not kinds:
        add_ai = (float(nc.add_anomaly[k]) if has_add and nc.add_anomaly is not None
                  else -np.inf)
        kinds = ["additive" if add_ai > float(nc.anomaly[k]) else "mask"]
    return tuple(kinds)


class _Stamper:
    """A pool of trigger variants per class. Mask triggers (the mask search flagged the class):
    the reversed (mask, pattern), the same mask hardened, grown by one pixel and box-filled,
    and triggers re-reversed between epochs. Additive triggers (the additive search flagged
    it): the perturbation ``x + s * delta`` (clipped) at a random strength ``s`` in
    ``strengths``, so the network unlearns the trigger's direction rather than one exact
    amplitude. When both kinds exist, each stamped sample gets one of them at random (half
    each)."""

    def __init__(self, nc: CleanseResult, classes: list[int],
                 strengths: tuple[float, float] = (1.0, 2.0)) -> None:
        self.nc, self.classes = nc, classes
        self.strengths = strengths
        self.masks: list[torch.Tensor] = []
        self.patterns: list[torch.Tensor] = []
        self.regions: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.owners: list[int] = []
        self.deltas: list[torch.Tensor] = []
        self.delta_owners: list[int] = []
        for k in classes:
            kinds = trigger_kinds(nc, k)
            if "additive" in kinds:
                self.deltas.append(torch.from_numpy(np.asarray(nc.deltas[k])).float())
                self.delta_owners.append(k)
            if "mask" not in kinds:
                continue
            self.add(nc.masks[k], nc.patterns[k], k)
            m = torch.from_numpy(np.asarray(nc.masks[k])).float()
            if m.ndim >= 2:  # the region around the trigger: its hard mask grown by 2 pixels
                hard = (m >= m.max() / 3).float().reshape(1, 1, m.shape[0], m.shape[1])
                region = F.max_pool2d(hard, 5, stride=1, padding=2).reshape(m.shape)
                self.regions.append((k, region, torch.from_numpy(nc.patterns[k]).float()))

    def adversarial(self, model: AuditModel, xb: torch.Tensor, gen: torch.Generator,
                    steps: int) -> torch.Tensor:
        """The worst pattern inside the trigger's region (a few signed-gradient steps towards
        the target class, shared by the batch): unlearning it removes whatever variant of the
        trigger, the real one included, the region holds."""
        j = int(torch.randint(0, len(self.regions), (1,), generator=gen))
        k, region, p0 = self.regions[j]
        lo, hi = self.nc.value_range
        step = (hi - lo) / 4
        p = p0.clone().requires_grad_(True)
        tgt = torch.full((len(xb),), k, dtype=torch.long)
        for _ in range(steps):
            loss = F.cross_entropy(model.logits((1 - region) * xb + region * p), tgt)
            (g,) = torch.autograd.grad(loss, p)
            p = (p - step * g.sign()).clamp(lo, hi).detach().requires_grad_(True)
        return ((1 - region) * xb + region * p).detach()

    def add(self, mask: np.ndarray, pattern: np.ndarray, owner: int = -1) -> None:
        m = torch.from_numpy(np.asarray(mask)).float()
        p = torch.from_numpy(np.asarray(pattern)).float()
        n0 = len(self.masks)
        self.masks.append(m)
        self.patterns.append(p)
        if m.ndim >= 2:  # images: the mask hardened (full strength where it is at least a third
            # of its peak) and grown by one pixel, to cover the real trigger's full patch
            hard = (m >= m.max() / 3).float()
            m4 = hard.reshape(1, 1, m.shape[0], m.shape[1])
            self.masks.append(F.max_pool2d(m4, 3, stride=1, padding=1).reshape(m.shape))
            self.patterns.append(p)
            self.masks.append(hard)
            self.patterns.append(p)
            # a compact trigger's bounding box filled with its mean colour: backdoors learnt
            # from a solid patch respond to the whole region, not only the reversed pixels
            rows = torch.nonzero(hard.reshape(hard.shape[0], hard.shape[1]).sum(1)).flatten()
            cols = torch.nonzero(hard.reshape(hard.shape[0], hard.shape[1]).sum(0)).flatten()
            if len(rows) and len(cols):
                r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
                if (r1 - r0) * (c1 - c0) <= 4 * float(hard.sum()):
                    box = torch.zeros_like(hard)
                    box[r0:r1, c0:c1] = 1
                    w = hard if p.ndim == hard.ndim else hard
                    colour = (p * w).flatten(0, 1).sum(0) / w.sum()
                    self.masks.append(box)
                    self.patterns.append(torch.ones_like(p) * colour)
        self.owners += [owner] * (len(self.masks) - n0)

    def worst_asr(self, model: AuditModel, xd: torch.Tensor, y: np.ndarray) -> float | None:
        """The highest share of samples (not of the class) that any variant sends to its
        class: a stricter test than the reversed trigger alone, whose mask is often only part
        of the real trigger (additive triggers at strength 1)."""
        rates = []
        variants = [((lambda x, m=m, p=p: (1 - m) * x + m * p), k)
                    for m, p, k in zip(self.masks, self.patterns, self.owners)]
        variants += [((lambda x, k=k: self.nc.stamp_tensor(x, k, "additive")), k)
                     for k in self.delta_owners]
        for fn, k in variants:
            keep = torch.from_numpy(y != k)
            if k >= 0 and bool(keep.any()):
                rates.append(float(np.mean(model.predict_data(fn(xd[keep])) == k)))
        return max(rates) if rates else None

    def __call__(self, xb: torch.Tensor, gen: torch.Generator, jitter: int = 0
                 ) -> torch.Tensor:
        out = xb.clone()
        add = torch.zeros(len(xb), dtype=torch.bool)
        if self.deltas:
            add = (torch.rand(len(xb), generator=gen) < 0.5 if self.masks
                   else torch.ones(len(xb), dtype=torch.bool))
        if bool(add.any()):
            n = int(add.sum())
            which = torch.randint(0, len(self.deltas), (n,), generator=gen)
            lo_s, hi_s = self.strengths
            s = lo_s + (hi_s - lo_s) * torch.rand(n, generator=gen)
            d = torch.stack(self.deltas)[which] * s.reshape(-1, *([1] * (xb.ndim - 1)))
            lo, hi = self.nc.value_range
            out[add] = (xb[add] + d).clamp(lo, hi)
        rest = ~add
        if bool(rest.any()) and self.masks:
            which = torch.randint(0, len(self.masks), (int(rest.sum()),), generator=gen)
            m = torch.stack(self.masks)[which]
            p = torch.stack(self.patterns)[which]
            if jitter > 0 and m.ndim >= 3:  # move the trigger a little relative to the image
                dy, dx = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,),
                                                        generator=gen))
                m = torch.roll(m, shifts=(dy, dx), dims=(1, 2))
                p = torch.roll(p, shifts=(dy, dx), dims=(1, 2))
            out[rest] = (1 - m) * xb[rest] + m * p
        return out


def _trigger_asr(model: AuditModel, nc: CleanseResult | None, classes: list[int],
                 xd: torch.Tensor, y: np.ndarray) -> float | None:
    """Share of held-out clean samples (not of the class) the reversed trigger still flips
    (per class the worse of its stamped kinds, then the mean over classes)."""
    if nc is None or not classes:
        return None
    rates = []
    for k in classes:
        keep = torch.from_numpy(y != k)
        if not bool(keep.any()):
            continue
        rates.append(max(float(np.mean(model.predict_data(nc.stamp_tensor(xd[keep], k, kind))
                                       == k)) for kind in trigger_kinds(nc, k)))
    return float(np.mean(rates)) if rates else None


def finetune(model: AuditModel, clean: LabeledData, config: RepairConfig,
             stamp_classes: list[int] | None = None, nc: CleanseResult | None = None,
             after_step: Callable[[], None] | None = None,
             ref_pred: np.ndarray | None = None) -> dict[str, Any]:
    """Fine-tune ``model`` in place on ``clean`` (BN statistics frozen), optionally stamping the
    reversed trigger(s) of ``stamp_classes`` on a share of each batch under the true labels.
    Keeps the epoch with the lowest held-out reversed-trigger ASR (then the best accuracy) among
    those whose held-out accuracy is not significantly more than ``2 * max_drop`` below the
    reference's (``ref_pred``: the reference model's held-out predictions, default the starting
    model's): the drop minus ``drop_z`` standard errors of the paired difference (from the
    samples whose correctness changed) must stay within it. A hundred held-out samples cannot
    tell a 2-point drop from noise; a plain threshold then rejects every epoch whenever the
    starting model happens to score high on them.

    With a trigger the first run uses ``trigger_lr`` (a high rate: unlearning a partial reversed
    trigger at ``lr`` leaves most of the real backdoor); when no epoch of a run stays within the
    accuracy budget (very small models or clean sets), the weights are reset and the run is
    repeated at a third of the rate, down to ``lr``."""
    lrs = [config.trigger_lr if (nc is not None and stamp_classes) else config.lr]
    while lrs[-1] / 3 >= config.lr * 0.999:
        lrs.append(lrs[-1] / 3)
    if lrs[-1] > config.lr:
        lrs.append(config.lr)
    runs = []
    for lr in lrs:
        out = _finetune_once(model, clean, config, lr, stamp_classes, nc, after_step, ref_pred)
        runs.append({"lr": lr, "chosen_epoch": out["chosen_epoch"]})
        if out["chosen_epoch"] > 0 or config.epochs == 0:
            break
    out["lr_runs"] = runs
    out["lr"] = runs[-1]["lr"]
    return out


def _finetune_once(model: AuditModel, clean: LabeledData, config: RepairConfig, lr: float,
                   stamp_classes: list[int] | None, nc: CleanseResult | None,
                   after_step: Callable[[], None] | None, ref_pred: np.ndarray | None
                   ) -> dict[str, Any]:
    classes = list(stamp_classes or [])
    stamp = (_Stamper(nc, classes, config.add_strengths) if nc is not None and classes
             else None)
    tr, va = _split(clean, config.val_fraction, config.seed)
    x_all = to_data_tensor(clean.x)
    y_all = torch.from_numpy(clean.y)
    xv, yv = x_all[va], clean.y[va]
    module = model.module
    params = [p for p in module.parameters() if p.requires_grad]
    linears = [m for m in module.modules() if _is(m, "Linear")]
    if config.tune == "linear" and len(linears) > 1:
        # only the fully connected layers (features stay as they are); a model whose only
        # linear layer is its classifier (global pooling, then one layer) keeps its backdoor
        # in the convolutions, so there everything is tuned
        lin = [p for m in linears for p in m.parameters() if p.requires_grad]
        params = lin or params
    if not params:
        raise ModelError("the model has no trainable parameters to fine-tune")
    opt = (torch.optim.Adam(params, lr=lr) if config.optimizer == "adam"
           else torch.optim.SGD(params, lr=lr, momentum=0.9))
    anchors = [p.detach().clone() for p in params] if config.anchor > 0 else None
    n_steps = max(1, config.epochs * -(-len(tr) // config.batch_size))
    step_i = 0
    gen = torch.Generator().manual_seed(config.seed)
    teacher = copy.deepcopy(module).eval() if config.distill > 0 else None
    image = x_all.ndim in (3, 4)

    def score() -> tuple[float, float | None]:
        module.eval()
        nonlocal correct
        correct = model.predict_data(xv) == yv if len(yv) else np.zeros(0, dtype=bool)
        acc = float(np.mean(correct)) if len(yv) else 0.0
        return acc, _trigger_asr(model, nc, classes, xv, yv)

    correct = np.zeros(0, dtype=bool)
    acc0, asr0 = score()
    ref_correct = correct if ref_pred is None else (np.asarray(ref_pred) == yv)
    best_state = copy.deepcopy(module.state_dict())

    def key(acc: float, asr: float | None) -> tuple[bool, float, float]:
        """Epochs whose accuracy drop is significantly above 2x max_drop are last; then the
        lowest reversed-trigger ASR (in steps of 5%); then the best accuracy."""
        n = max(len(yv), 1)
        drop = float(np.mean(ref_correct)) - acc if len(yv) else 0.0
        se = float(np.sqrt(np.sum(ref_correct != correct))) / n
        bad = drop - config.drop_z * se > 2 * config.max_drop + 1e-9
        return (bad, 0.0 if asr is None or bad else round(asr / 0.05), -acc)

    best_key = key(acc0, asr0)
    history = [{"epoch": 0, "val_acc": acc0, "val_trigger_asr": asr0}]
    best_epoch = 0
    for epoch in range(1, config.epochs + 1):
        _freeze_bn(module)
        order = tr[torch.randperm(len(tr), generator=gen).numpy()]
        for s in range(0, len(order), config.batch_size):
            idx = torch.from_numpy(order[s:s + config.batch_size])
            if len(idx) < 2:
                continue
            xb, yb = x_all[idx], y_all[idx]
            x_clean = xb
            pick = torch.zeros(len(idx), dtype=torch.bool)
            if stamp is not None:
                pick = torch.rand(len(idx), generator=gen) < config.stamp_fraction
                if bool(pick.any()):
                    xb = xb.clone()
                    xb[pick] = stamp(xb[pick], gen, config.jitter)
                    if config.adv_steps > 0 and stamp.regions:
                        adv = pick & (torch.rand(len(idx), generator=gen) < 0.5)
                        if bool(adv.any()):
                            xb[adv] = stamp.adversarial(model, x_clean[adv], gen,
                                                        config.adv_steps)
            if image and config.shift > 0:
                dy, dx = (int(v) for v in torch.randint(-config.shift, config.shift + 1, (2,),
                                                        generator=gen))
                xb = torch.roll(xb, shifts=(dy, dx), dims=(1, 2))
                x_clean = torch.roll(x_clean, shifts=(dy, dx), dims=(1, 2))
            logits = model.logits(xb)
            loss = F.cross_entropy(logits, yb)
            if config.suppress > 0 and stamp is not None:
                # stamped samples of other classes: push the flagged classes' probability
                # down (-log(1 - p_k)), so the trigger's features come to speak against them
                sel = pick & ~torch.isin(yb, torch.tensor(classes))
                if bool(sel.any()):
                    p_k = F.softmax(logits[sel], dim=1)[:, classes].clamp(max=1 - 1e-6)
                    loss = loss + config.suppress * (-torch.log1p(-p_k)).sum(1).mean()
            if teacher is not None:
                # every output, stamped or not, should match the original model's output on
                # the *unstamped* input: keeps clean behaviour, removes the trigger's effect
                with torch.no_grad():
                    t_logp = F.log_softmax(teacher(model.to_input(x_clean)), dim=1)
                loss = loss + config.distill * F.kl_div(F.log_softmax(logits, dim=1), t_logp,
                                                        log_target=True, reduction="batchmean")
            if anchors is not None:  # L2 pull towards the original weights
                loss = loss + config.anchor * sum(((p - a) ** 2).sum()
                                                  for p, a in zip(params, anchors))
            if config.cosine:
                for g in opt.param_groups:
                    g["lr"] = lr * 0.5 * (1 + float(np.cos(np.pi * min(step_i, n_steps)
                                                            / n_steps)))
            step_i += 1
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.clip)
            opt.step()
            if after_step is not None:
                after_step()
        acc, asr = score()
        entry: dict[str, Any] = {"epoch": epoch, "val_acc": acc, "val_trigger_asr": asr}
        if stamp is not None and config.rereverse_steps > 0 and epoch < config.epochs:
            found = []
            for k in classes:
                m, p, succ = refine_trigger(model, x_all[tr], clean.y[tr], k, nc.masks[k],
                                            nc.patterns[k], nc.value_range,
                                            steps=config.rereverse_steps, cost=0.005,
                                            lr=0.2, seed=config.seed + epoch)
                if succ >= 0.5:
                    stamp.add(m, p, k)
                found.append(round(succ, 3))
            entry["rereversed_success"] = found
        history.append(entry)
        k_ep = key(acc, asr)
        # ties: with a trigger the later epoch (lower learning rate); without, the earlier
        if k_ep < best_key or (k_ep == best_key and stamp is not None):
            best_key, best_state, best_epoch = k_ep, copy.deepcopy(module.state_dict()), epoch
    module.load_state_dict(best_state)
    module.eval()
    return {"history": history, "chosen_epoch": best_epoch, "n_train": int(len(tr)),
            "n_val": int(len(va))}


# ----------------------------------------------------------------------------- fine-pruning
def last_conv(module: nn.Module) -> tuple[str, nn.Module, str | None, nn.Module | None]:
    """The last Conv2d of the model and the batch-norm that directly follows it (if any)."""
    mods = list(module.named_modules())
    conv_i = None
    for i, (_n, m) in enumerate(mods):
        if _is(m, "Conv2d"):
            conv_i = i
    if conv_i is None:
        raise ModelError("fine-pruning needs a convolutional layer; this model has none "
                         "(use --method unlearn)")
    name, conv = mods[conv_i]
    bn_name, bn = None, None
    for n, m in mods[conv_i + 1:]:
        if _is(m, "BatchNorm2d"):
            bn_name, bn = n, m
            break
        if _is(m, "Conv2d") or _is(m, "Linear"):
            break
    return name, conv, bn_name, bn


def _spatial_head(module: nn.Module, conv: nn.Module) -> tuple[str, nn.Module] | None:
    """The first linear layer after the last conv when it reads the conv's map flattened over
    S > 1 spatial cells (``in_features == channels * S``): its input columns are then the last
    conv layer's units as the classifier sees them (a channel at one position)."""
    mods = list(module.named_modules())
    idx = next((i for i, (_n, m) in enumerate(mods) if m is conv), None)
    if idx is None:
        return None
    n_ch = int(conv.weight.shape[0])
    for n, m in mods[idx + 1:]:
        if _is(m, "Conv2d"):
            return None
        if _is(m, "Linear"):
            f = int(m.weight.shape[1])
            return (n, m) if f > n_ch and f % n_ch == 0 else None
    return None


def _linears(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in module.named_modules() if _is(m, "Linear")]


def _reader_of(module: nn.Module, conv: nn.Module) -> tuple[str, nn.Module] | None:
    """The first linear layer after ``conv`` in module order (what reads its pooled map)."""
    mods = list(module.named_modules())
    idx = next((i for i, (_n, m) in enumerate(mods) if m is conv), None)
    if idx is None:
        return None
    return next(((n, m) for n, m in mods[idx + 1:] if _is(m, "Linear")), None)


class _Units:
    """The prunable units of one layer: the last conv layer's channels (zeroed in the conv and
    its batch-norm), or the inputs of a linear layer (zeroed as weight columns): the (channel,
    cell) inputs of a linear layer that reads the last conv map position by position, the
    pooled channels as the classifier reads them in a TorchScript model (whose conv outputs
    no hook can observe), or the hidden units of a network with no convolution. ``layer``
    names a linear layer to use instead of that default."""

    def __init__(self, module: nn.Module, layer: str | None = None) -> None:
        self.conv_name: str | None = None
        self.bn_name: str | None = None
        self.conv: nn.Module | None = None
        self.bn: nn.Module | None = None
        linears = dict(_linears(module))
        spatial = False
        if layer is not None:
            self.head: tuple[str, nn.Module] | None = (layer, linears[layer])
        elif not any(_is(m, "Conv2d") for m in module.modules()):
            if not linears:
                raise ModelError("fine-pruning needs a convolutional or linear layer; this "
                                 "model has neither (use --method unlearn)")
            self.head = list(linears.items())[-1]   # the classifier reads the last hidden layer
        else:
            conv_name, conv, bn_name, bn = last_conv(module)
            self.head = _spatial_head(module, conv)
            spatial = self.head is not None
            if self.head is None and isinstance(module, torch.jit.ScriptModule):
                self.head = _reader_of(module, conv)
            self.conv_name, self.conv, self.bn_name, self.bn = conv_name, conv, bn_name, bn
        self.layer = self.head[0] if self.head else self.conv_name
        self.n = (int(self.head[1].weight.shape[1]) if self.head
                  else int(self.conv.weight.shape[0]))
        self.kind = ("channel x cell (inputs of the first linear layer)" if spatial
                     else "inputs of a linear layer" if self.head else "channel")
        self.fill: np.ndarray | None = None   # mean clean activation, folded into the bias

    def activation(self, model: AuditModel, xd: torch.Tensor, batch: int = 256) -> np.ndarray:
        """Mean ReLU activation per unit over ``xd``. Through forward hooks where the model
        has them; a TorchScript model has none, so a linear layer's inputs are read off its
        weight gradient instead (RuntimeError when neither works)."""
        sums: list[torch.Tensor] = []
        try:
            if self.head is not None:
                def pre(_m: nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
                    sums.append(inp[0].detach().clamp_min(0).sum(0))
                handle = self.head[1].register_forward_pre_hook(pre)
            else:
                def hook(_m: nn.Module, _i: object, o: torch.Tensor) -> None:
                    sums.append(o.detach().clamp_min(0).mean(dim=(2, 3)).sum(0))
                handle = (self.bn if self.bn is not None else self.conv
                          ).register_forward_hook(hook)
        except RuntimeError:
            if self.head is None:
                raise
            return linear_inputs(model, self.head[1], xd).clamp_min(0).mean(0).numpy()
        try:
            model.run_batches(xd, batch)
        finally:
            handle.remove()
        return (torch.stack(sums).sum(0) / max(len(xd), 1)).numpy()

    def ablation(self, model: AuditModel, xd: torch.Tensor) -> np.ndarray:
        """For models without forward hooks (TorchScript): a unit's importance as the mean
        change of the logits when it is zeroed."""
        with torch.no_grad():
            base = model.logits(xd)
            out = np.zeros(self.n)
            for c in range(self.n):
                saved = self.zero([c])
                out[c] = float((model.logits(xd) - base).abs().mean())
                _restore(saved)
        return out

    def zero(self, units: list[int], fold: bool = True
             ) -> list[tuple[torch.Tensor, tuple[Any, ...], torch.Tensor]]:
        """Zero ``units`` (``fold``: their mean clean activation moves into the next layer's
        bias, once; not when re-zeroing during fine-tuning); returns what ``_restore``
        needs, in the order to undo."""
        saved = []
        idx = torch.as_tensor(units, dtype=torch.long)
        with torch.no_grad():
            if self.head is not None:
                lin = self.head[1]
                w = lin.weight
                if fold and self.fill is not None and lin.bias is not None:
                    # the pruned inputs are replaced by their mean clean value (folded into
                    # the bias): the next layer keeps seeing what it expects on clean data
                    fill = torch.from_numpy(self.fill[units]).float()
                    saved.append((lin.bias, (slice(None),), lin.bias.data.clone()))
                    lin.bias.data += w.data[:, idx] @ fill
                saved.append((w, (slice(None), idx), w.data[:, idx].clone()))
                w.data[:, idx] = 0
                return saved
            params = [self.conv.weight] + ([self.conv.bias]
                                           if getattr(self.conv, "bias", None) is not None
                                           else [])
            if self.bn is not None:
                params += [p for p in (self.bn.weight, self.bn.bias) if p is not None]
            for p in params:
                saved.append((p, (idx,), p.data[idx].clone()))
                p.data[idx] = 0
        return saved


def _restore(saved: list[tuple[torch.Tensor, tuple[Any, ...], torch.Tensor]]) -> None:
    with torch.no_grad():
        for p, where, old in reversed(saved):
            p.data[where] = old


def linear_inputs(model: AuditModel, lin: nn.Module, xd: torch.Tensor) -> torch.Tensor:
    """The inputs a linear layer receives, per sample, without hooks: for one sample the
    layer's weight gradient is the outer product of the output gradient and the input, so the
    input is a row of it divided by that output's bias gradient (one backward pass per
    sample; RuntimeError for a layer without bias or that the model never uses)."""
    w, b = lin.weight, getattr(lin, "bias", None)
    if b is None:
        raise RuntimeError("a linear layer without bias")
    gen = torch.Generator().manual_seed(0)
    rows = []
    flags = (w.requires_grad, b.requires_grad)
    w.requires_grad_(True)
    b.requires_grad_(True)
    try:
        for i in range(len(xd)):
            out = model.logits(xd[i:i + 1])
            weights = torch.rand(out.shape[1:], generator=gen) + 0.5
            gw, gb = torch.autograd.grad((out[0] * weights).sum(), [w, b], allow_unused=True)
            if gw is None or gb is None:
                raise RuntimeError("the layer is not on the path to the output")
            j = int(gb.abs().argmax())
            rows.append(gw[j] / gb[j] if float(gb[j].abs()) > 1e-12
                        else torch.zeros_like(gw[j]))
    finally:
        w.requires_grad_(flags[0])
        b.requires_grad_(flags[1])
    return torch.stack(rows).detach() if rows else torch.zeros(0, w.shape[1])


def _trigger_units(units: _Units, model: AuditModel, x_others: torch.Tensor,
                   nc: CleanseResult, classes: list[int]) -> tuple[list[int], list[int]]:
    """The units each flagged trigger (mask or additive, as the search that flagged its class
    found it) excites far more than clean inputs do (robust z > 3 over the layer's units, the
    largest across triggers), most excited first; and those it excites less clearly (1 < z <=
    3), for a trigger spread over many units (a pooled layer)."""
    act_o = units.activation(model, x_others)
    z = np.full(units.n, -np.inf)
    for k in classes:
        for kind in trigger_kinds(nc, k):
            excess = units.activation(model, nc.stamp_tensor(x_others, k, kind)) - act_o
            z = np.maximum(z, robust_z(excess))
    order = np.argsort(-z)
    return ([int(c) for c in order if z[c] > 3.0],
            [int(c) for c in order if 1.0 < z[c] <= 3.0])


def fine_prune(model: AuditModel, clean: LabeledData, config: RepairConfig | None = None,
               nc: CleanseResult | None = None, trigger_classes: list[int] | None = None
               ) -> dict[str, Any]:
    """Fine-pruning in place; returns what was pruned and the fine-tuning record.

    The units are the last conv layer's channels, or its (channel, cell) outputs when the
    classifier reads the map position by position (a localised trigger's features live in one
    cell; pruning whole channels there misses them), or the inputs of a linear layer (see
    :class:`_Units`); when a reversed trigger excites none of them, the last linear layer whose
    inputs it does excite is pruned instead. Units are pruned by increasing mean clean
    activation while the clean accuracy stays within ``prune_budget``; with a reversed trigger,
    the units it excites far more than clean inputs do (robust z > 3) go first, regardless of
    the budget (the fine-tuning then recovers the accuracy); for a class flagged by the
    additive search, the units its perturbation excites count too (the largest robust z over
    the flagged triggers). When those units fill ``max_trigger_units`` and ``prune_stamp``
    is on (the default), the fine-tuning stamps the reversed trigger on part of each batch
    under the true labels, as :func:`unlearn` does (one run, no soup)."""
    cfg = config or RepairConfig()
    t0 = time.perf_counter()
    module = model.module.eval()
    units = _Units(module)
    n_ch = units.n
    tr, va = _split(clean, cfg.val_fraction, cfg.seed)
    x_all = to_data_tensor(clean.x)
    xv, yv = x_all[va], clean.y[va]
    try:
        act = units.activation(model, x_all[tr])
        ranking = "mean clean activation"
        units.fill = act
    except RuntimeError:
        act = units.ablation(model, x_all[tr][:128])
        ranking = "logit change when zeroed (no forward hooks on this model)"
    order = list(np.argsort(act, kind="stable"))
    trig_first: list[int] = []
    trig_more: list[int] = []
    classes = list(trigger_classes or [])
    if nc is not None and classes and ranking.startswith("mean"):
        others = tr[np.isin(clean.y[tr], classes, invert=True)][:256]
        trig_first, trig_more = _trigger_units(units, model, x_all[others], nc, classes)
        if not trig_first:
            # the default layer does not respond to the trigger: the last linear layer
            # whose inputs it excites instead (found by activation, whatever the names)
            for name, _m in reversed(_linears(module)):
                if name == units.layer:
                    continue
                cand = _Units(module, name)
                try:
                    found, more = _trigger_units(cand, model, x_all[others], nc, classes)
                except RuntimeError:
                    continue
                if found:
                    units, trig_first, trig_more = cand, found, more
                    n_ch = units.n
                    act = units.activation(model, x_all[tr])
                    units.fill = act
                    order = list(np.argsort(act, kind="stable"))
                    break
    base_pred = model.predict_data(xv)
    base_acc = float(np.mean(base_pred == yv)) if len(yv) else 0.0
    y_all = clean.y
    base_correct = model.predict_data(x_all) == y_all
    base_all = float(np.mean(base_correct)) if len(y_all) else 0.0
    pruned: list[int] = []
    curve: list[dict[str, Any]] = [{"n_pruned": 0, "clean_acc": base_all}]
    capped = False  # pruning used its whole unit budget with the reversed trigger still working
    if trig_first:
        # the trigger's units, most excited first, until no variant of the reversed trigger
        # (as stamped when unlearning: also its hardened, grown and box-filled masks) works
        variants = _Stamper(nc, classes, cfg.add_strengths)
        t_step = max(1, n_ch // 128)
        limit = max(1, int(cfg.max_trigger_units * n_ch))
        best, best_n, since, saved_after = np.inf, 0, 0, []
        queue = trig_first + trig_more
        for start in range(0, min(len(queue), limit), t_step):
            if start >= len(trig_first) and best <= 0.05:
                break  # the less excited units only while the trigger still works
            batch = queue[start:start + t_step]
            saved_after.append(units.zero(batch))
            pruned += batch
            rate = variants.worst_asr(model, x_all[tr], clean.y[tr])
            curve.append({"n_pruned": len(pruned), "clean_acc": _accuracy(model, x_all, y_all),
                          "trigger_asr": rate})
            if rate is None:
                break
            if rate < best - 0.01:
                best, best_n, since, saved_after = rate, len(pruned), 0, []
            elif best < 0.5:  # (while the trigger still works on most inputs, keep going)
                since += 1
            # stop once the trigger no longer works, or no longer responds to pruning (the
            # rest is the clean model's own response to the stamp); undo the steps that did
            # not help
            if best <= cfg.trigger_stop or since >= cfg.trigger_patience:
                break
        else:
            capped = len(queue) >= limit
        # the steps after the best are kept: once the reversed trigger sits at the clean
        # model's own response, the real trigger (of which it is often only a part) still
        # loses strength to further pruning of its units, at little cost in accuracy
        del saved_after, best_n
    # classic fine-pruning when no trigger is known: the least active units zeroed (no mean
    # fill: that hides each step's cost from a few hundred samples while the steps add up),
    # while the accuracy drop on the whole trusted set, plus ``prune_z`` standard errors of
    # the paired difference, stays within the budget (the same samples judge every step, so
    # a bare threshold drifts past the budget on new data)
    rest = [] if trig_first else [int(c) for c in order]
    step = cfg.prune_step or max(1, n_ch // 32)
    for start in range(0, len(rest), step):
        batch = rest[start:start + step]
        if len(pruned) + len(batch) >= n_ch:
            break
        saved = units.zero(batch, fold=False)
        correct = model.predict_data(x_all) == y_all
        acc = float(np.mean(correct))
        se = float(np.sqrt(np.sum(correct != base_correct))) / max(len(y_all), 1)
        if base_all - acc + cfg.prune_z * se > cfg.prune_budget + 1e-9:
            _restore(saved)
            break
        pruned += batch
        curve.append({"n_pruned": len(pruned), "clean_acc": acc})

    def keep_pruned() -> None:
        if pruned:
            units.zero(pruned, fold=False)

    stamped = bool(cfg.prune_stamp and nc is not None and classes and capped)
    ft = finetune(model, clean, cfg, stamp_classes=classes if stamped else None,
                  nc=nc if stamped else None, after_step=keep_pruned, ref_pred=base_pred)
    keep_pruned()
    return {"method": "fine-prune", "layer": units.layer, "units": units.kind,
            "batchnorm": units.bn_name, "n_channels": n_ch, "n_pruned": len(pruned),
            "pruned": sorted(pruned), "trigger_channels_first": trig_first, "ranking": ranking,
            "trigger_kinds": ({int(k): list(trigger_kinds(nc, k)) for k in classes}
                              if nc is not None else {}),
            "val_acc_before": base_acc, "prune_curve": curve, "pruning_capped": capped,
            "finetune_stamped": stamped,
            "finetune": ft,
            "config": cfg.to_dict(), "runtime_s": round(time.perf_counter() - t0, 3)}


def unlearn(model: AuditModel, clean: LabeledData, nc: CleanseResult,
            classes: list[int], config: RepairConfig | None = None) -> dict[str, Any]:
    """Neural Cleanse unlearning in place: fine-tune with the reversed trigger(s) of
    ``classes`` stamped on clean inputs under their true labels (and away from ``classes``).

    ``config.soup`` runs are made from the same start with seeds ``seed``, ``seed + 1``, ...
    (sample order, held-out split, stamps) and their weights averaged (a "model soup",
    Wortsman et al. 2022): each run picks its epoch on a hundred or so held-out samples, and
    the average of several is less at the mercy of that choice; an average that scores more
    than a point below its runs on the trusted set is replaced by the best run. Runs that kept
    no epoch are left out; ``unchanged`` in the result: none kept one (no epoch stayed within
    the accuracy budget at any learning rate), so the weights are the original ones and the
    backdoor remains."""
    cfg = config or RepairConfig()
    if not classes:
        raise ConfigError("unlearning needs at least one reversed trigger (class)")
    t0 = time.perf_counter()
    module = model.module
    start = copy.deepcopy(module.state_dict())
    runs, kept = [], []
    for i in range(cfg.soup):
        if i:
            module.load_state_dict(start)
        ft = finetune(model, clean, replace(cfg, seed=cfg.seed + i), stamp_classes=classes,
                      nc=nc)
        runs.append(ft)
        if cfg.epochs == 0 or ft["chosen_epoch"] > 0:
            kept.append(copy.deepcopy(module.state_dict()))
    soup_note = None
    if len(kept) > 1:
        # runs at a high learning rate can land in different basins, and their average then
        # loses accuracy no single run lost: judged on the whole trusted set (each sample
        # was held out by some runs), a soup more than a point below its runs' mean gives way
        # to the best single run
        x_all = to_data_tensor(clean.x)
        accs = []
        for state in kept:
            module.load_state_dict(state)
            accs.append(_accuracy(model, x_all, clean.y))
        module.load_state_dict(_average_states(kept))
        soup_acc = _accuracy(model, x_all, clean.y)
        if soup_acc < float(np.mean(accs)) - 0.01:
            best = int(np.argmax(accs))
            soup_note = {"soup_acc": soup_acc, "run_accs": accs, "used_run": best}
            kept = [kept[best]]
    module.load_state_dict(_average_states(kept) if kept else start)
    module.eval()
    return {"method": "unlearn", "classes": [int(k) for k in classes],
            "unchanged": not kept and cfg.epochs > 0, "soup_kept": len(kept),
            "soup_rejected": soup_note,
            "trigger_kinds": {int(k): list(trigger_kinds(nc, k)) for k in classes},
            "finetune": runs[0], "soup_runs": [{"chosen_epoch": r["chosen_epoch"],
                                                 "lr": r["lr"]} for r in runs],
            "config": cfg.to_dict(), "runtime_s": round(time.perf_counter() - t0, 3)}


def _average_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of floating-point entries (others, e.g. batch-norm counters, from
    the first state)."""
    return {k: (torch.stack([s[k] for s in states]).mean(0) if v.is_floating_point() else v)
            for k, v in states[0].items()}


def reversed_trigger_asr(model: AuditModel, nc: CleanseResult, classes: list[int],
                         data: LabeledData) -> float | None:
    """Share of ``data`` samples (not of the class) that the reversed trigger(s) send to their
    class: the repair's own ASR proxy when the real trigger is unknown."""
    return _trigger_asr(model, nc, classes, to_data_tensor(data.x), data.y)
