"""Dormant-neuron scan ("neuron peeling"): units of a named layer that stay quiet on clean data
but fire strongly for a small subset of probe inputs (reversed-trigger inputs, or a dataset
under scan). A backdoor often lives in such units: they are idle on clean data and wake only
when the trigger is present.

Units are channels for convolutional outputs (activation averaged over the spatial positions)
and features for vectors. A unit's wake score on a probe sample is its robust z-score against
the clean distribution: ``(a - median_clean) / (1.4826 MAD_clean + eps)``, with eps scaled to
the layer so that constant-zero units do not score infinitely.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from poisonguard.audit.model import AuditModel
from poisonguard.errors import ModelError
from poisonguard.models.adapter import find_submodule


@dataclass
class DormantResult:
    layer: str
    n_units: int
    units: list[dict[str, Any]] = field(default_factory=list)
    wake: np.ndarray | None = field(default=None, repr=False)   # (n_probe, n_units) z-scores

    def summary(self, max_units: int = 20) -> dict[str, Any]:
        return {"layer": self.layer, "n_units": self.n_units, "n_dormant_woken": len(self.units),
                "units": self.units[:max_units]}


def unit_activations(model: AuditModel, xd: torch.Tensor, layer: str,
                     batch: int = 256) -> np.ndarray:
    """Per-unit activations of ``layer`` for data-space inputs ``xd``: (N, units)."""
    try:
        module = find_submodule(model.module, layer)
    except AttributeError:
        names = [n for n, _ in model.module.named_modules() if n]
        raise ModelError(f"layer {layer!r} does not exist in the model; available layers: "
                         f"{', '.join(names[:40])}") from None
    captured: list[torch.Tensor] = []

    def hook(_m: torch.nn.Module, _i: object, o: object) -> None:
        t = o[0] if isinstance(o, (tuple, list)) else o
        t = t.detach()
        captured.append((t.mean(dim=(2, 3)) if t.ndim == 4 else t.flatten(1)).clone())

    try:
        handle = module.register_forward_hook(hook)
    except RuntimeError as exc:
        raise ModelError(f"cannot attach a hook to layer {layer!r} of this model ({exc})"
                         ) from None
    try:
        model.run_batches(xd, batch)
    finally:
        handle.remove()
    return torch.cat(captured).numpy().astype(np.float64)


def default_layer(model: AuditModel) -> str | None:
    """The audit's default layer: the model's representation layer, else its last conv."""
    if model.classifier.layer:
        return model.classifier.layer
    last = None
    for name, mod in model.module.named_modules():
        if isinstance(mod, torch.nn.Conv2d) or getattr(mod, "original_name", "") == "Conv2d":
            last = name
    return last


def dormant_neurons(model: AuditModel, clean_xd: torch.Tensor, probe_xd: torch.Tensor,
                    layer: str, quiet_quantile: float = 0.5, z_threshold: float = 6.0,
                    min_count: int = 2, max_share: float = 1.0, top: int = 20,
                    clean_acts: np.ndarray | None = None) -> DormantResult:
    """Find units quiet on ``clean_xd`` (mean activation in the lower ``quiet_quantile`` of the
    layer's units) that wake (z-score > ``z_threshold``) on at least ``min_count`` and at most
    ``max_share`` of the probe samples; each is reported with the probe samples that wake it."""
    clean = clean_acts if clean_acts is not None else unit_activations(model, clean_xd, layer)
    probe = unit_activations(model, probe_xd, layer)
    med = np.median(clean, axis=0)
    mad = 1.4826 * np.median(np.abs(clean - med), axis=0)
    scale = np.maximum(mad, 0.05 * (np.abs(clean).mean() + 1e-8))
    z = (probe - med) / scale
    mean_clean = clean.mean(0)
    quiet = mean_clean <= np.quantile(mean_clean, quiet_quantile)
    units = []
    for u in np.flatnonzero(quiet):
        woken = np.flatnonzero(z[:, u] > z_threshold)
        if len(woken) < min_count or len(woken) > max_share * len(probe):
            continue
        order = woken[np.argsort(-z[woken, u])]
        units.append({"unit": int(u), "clean_mean": round(float(mean_clean[u]), 5),
                      "clean_q99": round(float(np.quantile(clean[:, u], 0.99)), 5),
                      "probe_mean_woken": round(float(probe[woken, u].mean()), 5),
                      "max_z": round(float(z[order[0], u]), 2), "n_woken": int(len(woken)),
                      "share_woken": round(len(woken) / len(probe), 4),
                      "samples": [int(i) for i in order[:20]]})
    units.sort(key=lambda d: (-d["n_woken"] * min(d["max_z"], 1e6)))
    return DormantResult(layer=layer, n_units=int(clean.shape[1]), units=units[:max(top, 0)]
                         if top else units, wake=z)
