"""Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021) with a small trusted clean set.

Backdoor neurons are fragile: a small multiplicative perturbation of their weights makes the
model misbehave on clean inputs. ANP gives every neuron (every channel of a batch-norm layer,
or of a conv/linear layer in models without batch norm) a mask ``m`` in [0, 1] and learns the
masks on the clean set under the worst-case perturbation of the neurons' weights and biases::

    min_m  a CE(f(x; m w, b)) + (1 - a) max_{|d|,|e| <= eps} CE(f(x; (m + d) w, (1 + e) b))

(the inner maximum by one signed-gradient step from a random start). Neurons that the model
needs for clean inputs keep masks near 1; neurons whose perturbation alone wrecks the model
(the backdoor's) fall towards 0. They are pruned (weight set to 0) in order of increasing mask,
as long as the clean accuracy on the trusted set stays within a budget.

No trigger is needed: ANP works on undetected and on unknown backdoors alike.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from poisonguard.audit.model import AuditModel, to_data_tensor
from poisonguard.data.labeled import LabeledData
from poisonguard.errors import ConfigError, ModelError


@dataclass(frozen=True)
class ANPConfig:
    """``eps``: perturbation budget (relative to each weight); ``alpha``: weight of the
    unperturbed loss; ``iterations``/``batch_size``/``lr``: the mask optimisation (SGD,
    momentum 0.9); ``threshold``: only neurons with a mask below it are pruning candidates;
    ``acc_budget``: the clean-accuracy drop (on the trusted set) pruning may cause;
    ``max_fraction``: the largest share of all neurons that may be pruned; ``spatial``: mask
    the (channel, cell) inputs of a linear layer reading the last conv map by position;
    ``channels``: mask the output channels of the batch-norm (or conv) layers.

    Defaults: the paper's eps 0.4 and alpha 0.2, on the spatial units only, pruned by
    increasing mask within the accuracy budget (threshold 1: no mask cut-off). On the small
    CNNs of our benchmark every batch-norm channel is fragile (at eps 0.4 the perturbed loss
    is 8 and a tenth of the channels' masks fall to about 0, so the paper's 0.2 cut-off
    prunes needed channels and no backdoor ones), and a localised trigger's features live in one
    spatial cell of the last map."""

    eps: float = 0.4
    alpha: float = 0.2
    iterations: int = 200
    batch_size: int = 64
    lr: float = 0.2
    threshold: float = 1.0
    acc_budget: float = 0.01
    max_fraction: float = 0.1
    spatial: bool = True
    channels: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.eps <= 1:
            raise ConfigError(f"eps must be in [0, 1], got {self.eps}")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.iterations < 1 or self.batch_size < 1:
            raise ConfigError("iterations and batch_size must be >= 1")
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"threshold must be in (0, 1], got {self.threshold}")
        if not 0 <= self.acc_budget < 1 or not 0 < self.max_fraction <= 1:
            raise ConfigError("acc_budget must be in [0, 1) and max_fraction in (0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _kind(mod: nn.Module) -> str:
    return getattr(mod, "original_name", None) or type(mod).__name__


def neuron_layers(module: nn.Module, spatial: bool = True, channels: bool = True
                  ) -> list[tuple[str, nn.Module, int]]:
    """The layers whose units are ANP's neurons, as (name, module, weight axis): the output
    channels of every affine batch-norm layer (in models without one, of every conv layer and
    every linear layer but the logits); with ``spatial``, also the inputs of a linear layer
    that reads the last conv map position by position (a channel at one cell: where a
    localised trigger's features live)."""
    mods = list(module.named_modules())
    out = [(n, m, 0) for n, m in mods if _kind(m) in ("BatchNorm1d", "BatchNorm2d")
           and getattr(m, "weight", None) is not None]
    if not out:
        out = [(n, m, 0) for n, m in mods if _kind(m) in ("Conv1d", "Conv2d", "Linear")]
        if out and _kind(out[-1][1]) == "Linear":
            out = out[:-1]
    if not channels:
        out = []
    if spatial:
        convs = [m for _n, m in mods if _kind(m) == "Conv2d"]
        if convs:
            from poisonguard.audit.repair import _spatial_head

            head = _spatial_head(module, convs[-1])
            if head is not None:
                out.append((head[0], head[1], 1))
    if not out:
        raise ModelError("ANP needs batch-norm, convolutional or hidden linear layers; this "
                         "model has none")
    return out


def _shape(w: torch.Tensor, v: torch.Tensor, axis: int = 0) -> torch.Tensor:
    return v.reshape(-1, *([1] * (w.ndim - 1))) if axis == 0 else v.reshape(1, -1)


class _Masked:
    """Masks and perturbations of the neurons, applied through ``torch.func.functional_call``
    (the model's own parameters are never touched while the masks are learned)."""

    def __init__(self, model: AuditModel, layers: list[tuple[str, nn.Module, int]]) -> None:
        self.model, self.layers = model, layers
        self.sizes = [int(m.weight.shape[axis]) for _, m, axis in layers]
        n = sum(self.sizes)
        self.mask = torch.ones(n, requires_grad=True)
        self.d_w = torch.zeros(n, requires_grad=True)
        self.d_b = torch.zeros(n, requires_grad=True)

    def logits(self, xin: torch.Tensor, perturbed: bool) -> torch.Tensor:
        params: dict[str, torch.Tensor] = {}
        mw = self.mask + self.d_w if perturbed else self.mask
        mb = 1 + self.d_b if perturbed else None
        start = 0
        for (name, mod, axis), size in zip(self.layers, self.sizes):
            sl = slice(start, start + size)
            start += size
            w = params.get(f"{name}.weight", mod.weight.detach())
            params[f"{name}.weight" if name else "weight"] = w * _shape(w, mw[sl], axis)
            b = getattr(mod, "bias", None)
            if b is not None and mb is not None and axis == 0:
                params[f"{name}.bias" if name else "bias"] = b.detach() * mb[sl]
        out = torch.func.functional_call(self.model.module, params, (xin,), strict=False)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if self.model.classifier.outputs == "probs":
            out = torch.log(out.clamp_min(1e-12))
        return out


def _prune(layers: list[tuple[str, nn.Module, int]], sizes: list[int], units: list[int]
           ) -> list[tuple[torch.Tensor, tuple[Any, ...], torch.Tensor]]:
    """Zero the weights of global neuron indices ``units``; returns what to restore."""
    saved = []
    offsets = np.cumsum([0] + sizes)
    with torch.no_grad():
        for u in units:
            li = int(np.searchsorted(offsets, u, side="right") - 1)
            _n, mod, axis = layers[li]
            c = int(u - offsets[li])
            where = (c,) if axis == 0 else (slice(None), c)
            saved.append((mod.weight, where, mod.weight.data[where].clone()))
            mod.weight.data[where] = 0
    return saved


def _restore(saved: list[tuple[torch.Tensor, tuple[Any, ...], torch.Tensor]]) -> None:
    with torch.no_grad():
        for w, where, old in reversed(saved):
            w.data[where] = old


def _acc(model: AuditModel, xd: torch.Tensor, y: np.ndarray) -> float:
    return float(np.mean(model.predict_data(xd) == y))


def learn_masks(model: AuditModel, clean: LabeledData, config: ANPConfig
                ) -> tuple[np.ndarray, list[tuple[str, nn.Module, int]], list[int], list[float]]:
    """Learn ANP's neuron masks on ``clean``; returns (masks, layers, layer sizes, loss curve)."""
    module = model.module
    if isinstance(module, torch.jit.ScriptModule):
        raise ModelError("ANP needs an ordinary PyTorch model (its weights are perturbed "
                         "functionally); TorchScript models are not supported, use "
                         "--method fine-prune or unlearn")
    module.eval()
    layers = neuron_layers(module, config.spatial, config.channels)
    st = _Masked(model, layers)
    gen = torch.Generator().manual_seed(config.seed)
    with torch.no_grad():
        xin = model.to_input(to_data_tensor(clean.x))
    y = torch.from_numpy(clean.y)
    req = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD([st.mask], lr=config.lr, momentum=0.9)
    bsz = min(config.batch_size, len(y))
    curve: list[float] = []
    try:
        for it in range(config.iterations):
            idx = torch.randperm(len(y), generator=gen)[:bsz]
            xb, yb = xin[idx], y[idx]
            if config.eps > 0:
                with torch.no_grad():  # random start inside the budget
                    for d in (st.d_w, st.d_b):
                        d.copy_((torch.rand(d.shape, generator=gen) * 2 - 1) * config.eps)
                loss = F.cross_entropy(st.logits(xb, True), yb)
                g_w, g_b = torch.autograd.grad(loss, [st.d_w, st.d_b], allow_unused=True,
                                               materialize_grads=True)
                with torch.no_grad():  # one ascent step of size eps, then back into the box
                    st.d_w.add_(config.eps * g_w.sign()).clamp_(-config.eps, config.eps)
                    st.d_b.add_(config.eps * g_b.sign()).clamp_(-config.eps, config.eps)
                loss_rob = F.cross_entropy(st.logits(xb, True), yb)
            else:
                loss_rob = torch.zeros(())
            loss_nat = F.cross_entropy(st.logits(xb, False), yb)
            loss = config.alpha * loss_nat + (1 - config.alpha) * loss_rob
            opt.zero_grad(set_to_none=True)
            (g_m,) = torch.autograd.grad(loss, [st.mask])
            st.mask.grad = g_m
            opt.step()
            with torch.no_grad():
                st.mask.clamp_(0, 1)
            if it % 50 == 0 or it == config.iterations - 1:
                curve.append(round(float(loss.detach()), 4))
    finally:
        for p_, r in zip(module.parameters(), req):
            p_.requires_grad_(r)
    return st.mask.detach().numpy().copy(), layers, st.sizes, curve


def anp_prune(model: AuditModel, clean: LabeledData, config: ANPConfig | None = None
              ) -> dict[str, Any]:
    """ANP in place: learn the masks, then prune neurons in order of increasing mask (only those
    below ``threshold``) while the clean accuracy on ``clean`` stays within ``acc_budget``."""
    cfg = config or ANPConfig()
    if len(clean) < 2:
        raise ConfigError("ANP needs trusted clean samples")
    t0 = time.perf_counter()
    masks, layers, sizes, curve = learn_masks(model, clean, cfg)
    xd = to_data_tensor(clean.x)
    base = _acc(model, xd, clean.y)
    order = [int(u) for u in np.argsort(masks, kind="stable") if masks[u] < cfg.threshold]
    order = order[:max(0, int(cfg.max_fraction * len(masks)))]
    pruned: list[int] = []
    curve_acc = [{"n_pruned": 0, "clean_acc": base}]
    step = max(1, len(masks) // 128)
    for s in range(0, len(order), step):
        batch = order[s:s + step]
        saved = _prune(layers, sizes, batch)
        acc = _acc(model, xd, clean.y)
        if acc < base - cfg.acc_budget - 1e-9:
            _restore(saved)
            break
        pruned += batch
        curve_acc.append({"n_pruned": len(pruned), "clean_acc": acc})
    offsets = np.cumsum([0] + sizes)
    by_layer: dict[str, list[int]] = {}
    for u in pruned:
        li = int(np.searchsorted(offsets, u, side="right") - 1)
        by_layer.setdefault(layers[li][0], []).append(int(u - offsets[li]))
    model.module.eval()
    return {"method": "anp", "n_neurons": int(len(masks)), "n_pruned": len(pruned),
            "n_below_threshold": int(np.sum(masks < cfg.threshold)),
            "pruned": {k: sorted(v) for k, v in by_layer.items()},
            "mask_quantiles": [round(float(q), 4) for q in
                               np.quantile(masks, [0, 0.01, 0.05, 0.1, 0.5])],
            "layers": [f"{n} ({'inputs' if a else 'outputs'})" for n, _m, a in layers],
            "loss_curve": curve, "prune_curve": curve_acc,
            "clean_acc_before": base, "config": cfg.to_dict(),
            "runtime_s": round(time.perf_counter() - t0, 3)}
