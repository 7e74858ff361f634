"""Repairs of a backdoored model with a small trusted clean set.

* Fine-pruning (Liu et al., RAID 2018): channels of the last convolutional layer are pruned in
  order of increasing mean clean activation while the clean accuracy stays within a budget, then
  the model is fine-tuned on the clean set with the pruned channels held at zero. When a reversed
  trigger is known, the channels it excites most (relative to clean inputs) are pruned first and
  the fine-tuning also stamps it (as unlearning does): plain fine-pruning leaves most BadNets
  backdoors of small networks in place.
* Unlearning (Neural Cleanse's mitigation): fine-tune with the reversed trigger stamped on part
  of the clean inputs under their true labels, so the shortcut is unlearned.

Both fine-tune in the data space through :class:`AuditModel`, with batch-norm statistics frozen
(a few hundred samples would corrupt them), and keep the epoch with the best held-out result.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from poisonguard.audit.model import AuditModel, to_data_tensor
from poisonguard.audit.neural_cleanse import CleanseResult, refine_trigger
from poisonguard.data.labeled import LabeledData
from poisonguard.errors import ConfigError, ModelError


@dataclass(frozen=True)
class RepairConfig:
    """``prune_budget``: clean-accuracy drop allowed while pruning (before fine-tuning);
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
    tests); ``optimizer``: ``"sgd"`` (momentum 0.9) or ``"adam"``."""

    prune_budget: float = 0.005
    prune_step: int = 0          # channels per pruning step (0: about 1/32 of the layer)
    epochs: int = 15
    lr: float = 1e-3
    trigger_lr: float = 1e-2
    anchor: float = 0.0
    cosine: bool = True
    batch_size: int = 32
    stamp_fraction: float = 0.5
    val_fraction: float = 0.2
    max_drop: float = 0.01
    distill: float = 1.0
    rereverse_steps: int = 0
    clip: float = 10.0
    jitter: int = 2
    adv_steps: int = 0
    optimizer: str = "sgd"
    shift: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.prune_budget < 1:
            raise ConfigError(f"prune_budget must be in [0, 1), got {self.prune_budget}")
        if not 0 < self.stamp_fraction < 1:
            raise ConfigError(f"stamp_fraction must be in (0, 1), got {self.stamp_fraction}")
        if self.epochs < 0:
            raise ConfigError(f"epochs must be >= 0, got {self.epochs}")

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


class _Stamper:
    """A pool of (mask, pattern) variants per class: the reversed trigger, the same mask grown
    by one pixel, and triggers re-reversed between epochs."""

    def __init__(self, nc: CleanseResult, classes: list[int]) -> None:
        self.nc, self.classes = nc, classes
        self.masks: list[torch.Tensor] = []
        self.patterns: list[torch.Tensor] = []
        self.regions: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        for k in classes:
            self.add(nc.masks[k], nc.patterns[k])
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

    def add(self, mask: np.ndarray, pattern: np.ndarray) -> None:
        m = torch.from_numpy(np.asarray(mask)).float()
        p = torch.from_numpy(np.asarray(pattern)).float()
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

    def __call__(self, xb: torch.Tensor, gen: torch.Generator, jitter: int = 0
                 ) -> torch.Tensor:
        which = torch.randint(0, len(self.masks), (len(xb),), generator=gen)
        m = torch.stack(self.masks)[which]
        p = torch.stack(self.patterns)[which]
        if jitter > 0 and m.ndim >= 3:  # move the trigger a little relative to the image
            dy, dx = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=gen))
            m = torch.roll(m, shifts=(dy, dx), dims=(1, 2))
            p = torch.roll(p, shifts=(dy, dx), dims=(1, 2))
        return (1 - m) * xb + m * p


def _trigger_asr(model: AuditModel, nc: CleanseResult | None, classes: list[int],
                 xd: torch.Tensor, y: np.ndarray) -> float | None:
    """Share of held-out clean samples (not of the class) the reversed trigger still flips."""
    if nc is None or not classes:
        return None
    rates = []
    for k in classes:
        keep = torch.from_numpy(y != k)
        if not bool(keep.any()):
            continue
        m = torch.from_numpy(nc.masks[k]).float()
        p = torch.from_numpy(nc.patterns[k]).float()
        rates.append(float(np.mean(model.predict_data((1 - m) * xd[keep] + m * p) == k)))
    return float(np.mean(rates)) if rates else None


def finetune(model: AuditModel, clean: LabeledData, config: RepairConfig,
             stamp_classes: list[int] | None = None, nc: CleanseResult | None = None,
             after_step: Callable[[], None] | None = None,
             ref_acc: float | None = None) -> dict[str, Any]:
    """Fine-tune ``model`` in place on ``clean`` (BN statistics frozen), optionally stamping the
    reversed trigger(s) of ``stamp_classes`` on a share of each batch under the true labels.
    Keeps the epoch with the lowest held-out reversed-trigger ASR (then the best accuracy) among
    those within ``2 * max_drop`` of ``ref_acc`` (default: the starting held-out accuracy).

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
        out = _finetune_once(model, clean, config, lr, stamp_classes, nc, after_step, ref_acc)
        runs.append({"lr": lr, "chosen_epoch": out["chosen_epoch"]})
        if out["chosen_epoch"] > 0 or config.epochs == 0:
            break
    out["lr_runs"] = runs
    out["lr"] = runs[-1]["lr"]
    return out


def _finetune_once(model: AuditModel, clean: LabeledData, config: RepairConfig, lr: float,
                   stamp_classes: list[int] | None, nc: CleanseResult | None,
                   after_step: Callable[[], None] | None, ref_acc: float | None
                   ) -> dict[str, Any]:
    classes = list(stamp_classes or [])
    stamp = _Stamper(nc, classes) if nc is not None and classes else None
    tr, va = _split(clean, config.val_fraction, config.seed)
    x_all = to_data_tensor(clean.x)
    y_all = torch.from_numpy(clean.y)
    xv, yv = x_all[va], clean.y[va]
    module = model.module
    params = [p for p in module.parameters() if p.requires_grad]
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
        return _accuracy(model, xv, yv), _trigger_asr(model, nc, classes, xv, yv)

    acc0, asr0 = score()
    ref = acc0 if ref_acc is None else ref_acc
    best_state = copy.deepcopy(module.state_dict())
    def key(acc: float, asr: float | None) -> tuple[bool, float, float]:
        """Epochs losing more than 2x max_drop are last; then the lowest reversed-trigger ASR
        (in steps of 5%); then the best accuracy."""
        bad = ref - acc > 2 * config.max_drop + 1e-9
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
                    stamp.add(m, p)
                found.append(round(succ, 3))
            entry["rereversed_success"] = found
        history.append(entry)
        k_ep = key(acc, asr)
        if k_ep <= best_key:  # ties: the later epoch (lower learning rate)
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


def _channel_activation(model: AuditModel, unit: nn.Module, xd: torch.Tensor,
                        batch: int = 256) -> np.ndarray:
    """Mean ReLU activation per channel of ``unit``'s output over ``xd``."""
    sums: list[torch.Tensor] = []

    def hook(_m: nn.Module, _i: object, o: torch.Tensor) -> None:
        sums.append(o.detach().clamp_min(0).mean(dim=(2, 3)).sum(0))

    handle = unit.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for i in range(0, len(xd), batch):
                model.logits(xd[i:i + batch])
    finally:
        handle.remove()
    return (torch.stack(sums).sum(0) / max(len(xd), 1)).numpy()


def _ablation_activation(model: AuditModel, conv: nn.Module, bn: nn.Module | None,
                         xd: torch.Tensor) -> np.ndarray:
    """For models without forward hooks (TorchScript): a channel's importance as the mean change
    of the logits when it is zeroed."""
    with torch.no_grad():
        base = model.logits(xd)
        out = np.zeros(conv.weight.shape[0])
        for c in range(len(out)):
            saved = _zero_channels(conv, bn, [c])
            out[c] = float((model.logits(xd) - base).abs().mean())
            _restore(saved, [c])
    return out


def _zero_channels(conv: nn.Module, bn: nn.Module | None, channels: list[int]
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    saved = []
    with torch.no_grad():
        params = [conv.weight] + ([conv.bias] if getattr(conv, "bias", None) is not None else [])
        if bn is not None:
            params += [p for p in (bn.weight, bn.bias) if p is not None]
        idx = torch.as_tensor(channels, dtype=torch.long)
        for p in params:
            saved.append((p, p.data[idx].clone()))
            p.data[idx] = 0
    return saved


def _restore(saved: list[tuple[torch.Tensor, torch.Tensor]], channels: list[int]) -> None:
    with torch.no_grad():
        idx = torch.as_tensor(channels, dtype=torch.long)
        for p, old in saved:
            p.data[idx] = old


def fine_prune(model: AuditModel, clean: LabeledData, config: RepairConfig | None = None,
               nc: CleanseResult | None = None, trigger_classes: list[int] | None = None
               ) -> dict[str, Any]:
    """Fine-pruning in place; returns what was pruned and the fine-tuning record."""
    cfg = config or RepairConfig()
    t0 = time.perf_counter()
    module = model.module.eval()
    conv_name, conv, bn_name, bn = last_conv(module)
    n_ch = int(conv.weight.shape[0])
    tr, va = _split(clean, cfg.val_fraction, cfg.seed)
    x_all = to_data_tensor(clean.x)
    xv, yv = x_all[va], clean.y[va]
    unit = bn if bn is not None else conv
    try:
        act = _channel_activation(model, unit, x_all[tr])
        ranking = "mean clean activation"
    except RuntimeError:
        act = _ablation_activation(model, conv, bn, x_all[tr][:128])
        ranking = "logit change when zeroed (no forward hooks on this model)"
    order = list(np.argsort(act, kind="stable"))
    trig_first: list[int] = []
    classes = list(trigger_classes or [])
    if nc is not None and classes and ranking.startswith("mean"):
        others = tr[np.isin(clean.y[tr], classes, invert=True)][:256]
        stamped = torch.cat([nc.stamp(clean.x[others], k) for k in classes])
        act_t = _channel_activation(model, unit, stamped)
        excess = act_t - act
        spread = np.median(np.abs(excess - np.median(excess))) * 1.4826 + 1e-8
        z = (excess - np.median(excess)) / spread
        trig_first = [int(c) for c in np.argsort(-z) if z[c] > 3.0]
        order = trig_first + [c for c in order if c not in set(trig_first)]
    base_acc = _accuracy(model, xv, yv)
    y_all = clean.y
    base_all = _accuracy(model, x_all, y_all)
    step = cfg.prune_step or max(1, n_ch // 32)
    pruned: list[int] = []
    curve = [{"n_pruned": 0, "clean_acc": base_all}]
    for start in range(0, n_ch - 1, step):
        batch = [int(c) for c in order[start:start + step]]
        if len(pruned) + len(batch) >= n_ch:
            break
        saved = _zero_channels(conv, bn, batch)
        acc = _accuracy(model, x_all, y_all)
        if acc < base_all - cfg.prune_budget and not set(batch) <= set(trig_first):
            _restore(saved, batch)
            break
        pruned += batch
        curve.append({"n_pruned": len(pruned), "clean_acc": acc})

    def keep_pruned() -> None:
        if pruned:
            _zero_channels(conv, bn, pruned)

    ft = finetune(model, clean, cfg, stamp_classes=classes, nc=nc, after_step=keep_pruned,
                  ref_acc=base_acc)
    keep_pruned()
    return {"method": "fine-prune", "layer": conv_name, "batchnorm": bn_name,
            "n_channels": n_ch, "n_pruned": len(pruned), "pruned": sorted(pruned),
            "trigger_channels_first": trig_first, "ranking": ranking,
            "val_acc_before": base_acc, "prune_curve": curve, "finetune": ft,
            "config": cfg.to_dict(), "runtime_s": round(time.perf_counter() - t0, 3)}


def unlearn(model: AuditModel, clean: LabeledData, nc: CleanseResult,
            classes: list[int], config: RepairConfig | None = None) -> dict[str, Any]:
    """Neural Cleanse unlearning in place: fine-tune with the reversed trigger(s) of
    ``classes`` stamped on clean inputs under their true labels."""
    cfg = config or RepairConfig()
    if not classes:
        raise ConfigError("unlearning needs at least one reversed trigger (class)")
    t0 = time.perf_counter()
    ft = finetune(model, clean, cfg, stamp_classes=classes, nc=nc)
    return {"method": "unlearn", "classes": [int(k) for k in classes], "finetune": ft,
            "config": cfg.to_dict(), "runtime_s": round(time.perf_counter() - t0, 3)}


def reversed_trigger_asr(model: AuditModel, nc: CleanseResult, classes: list[int],
                         data: LabeledData) -> float | None:
    """Share of ``data`` samples (not of the class) that the reversed trigger(s) send to their
    class: the repair's own ASR proxy when the real trigger is unknown."""
    return _trigger_asr(model, nc, classes, to_data_tensor(data.x), data.y)
