"""Other-class targets: how flagged or isolated samples are unlearned rather than left out.

A poison carries its source image under the target's label. Training it toward the model's
distribution over the classes *other than* its label (mostly the class its image shows) teaches
the network that the trigger does not mean the target, which removing the sample does not: ABL's
in-training relabelling and the quarantine's unlearning retrain both use it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from poisonguard.errors import ConfigError
from poisonguard.models.training import BatchLoss, BatchTargets

RELABEL_MODES = ("soft", "second", "uniform")


def other_class_targets(model: nn.Module, spec: Any, x: np.ndarray, y: torch.Tensor,
                        mode: str = "soft", temperature: float = 1.0) -> torch.Tensor:
    """Targets for unlearning: the model's distribution over the classes other than the given
    label ("soft", its logits divided by ``temperature``), its best other class ("second"), or
    uniform over the others ("uniform")."""
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    with torch.no_grad():
        logits = torch.cat([model(spec.prepare(x[s:s + 512])) for s in range(0, len(x), 512)])
    logits[torch.arange(len(x)), y] = -torch.inf
    if mode == "uniform":
        logits = torch.where(torch.isinf(logits), logits, torch.zeros_like(logits))
    return F.softmax(logits / (1e-6 if mode == "second" else temperature), dim=1)


def relabelled_batches(mask: np.ndarray, labels: torch.Tensor,
                       targets: torch.Tensor) -> BatchTargets:
    """A ``batch_targets`` hook for :func:`~poisonguard.models.training.train_classifier`: the
    one-hot labels, with the rows of the samples in ``mask`` replaced by their targets
    (``targets``: one row per masked sample, in sample order, as :func:`other_class_targets`
    returns them for ``x[mask]``)."""
    mask = np.asarray(mask, dtype=bool)
    if targets.ndim != 2 or len(targets) != int(mask.sum()):
        raise ConfigError(f"targets of shape {tuple(targets.shape)} for {int(mask.sum())} masked "
                          "samples: expected one row per masked sample")
    soft = torch.zeros(len(mask), targets.shape[1])
    soft[torch.from_numpy(mask)] = targets

    def batch_targets(idx: np.ndarray, _epoch: int) -> torch.Tensor | None:
        m = mask[idx]
        if not m.any():
            return None
        t = F.one_hot(labels[idx], soft.shape[1]).float()
        t[torch.from_numpy(m)] = soft[idx[m]]
        return t
    return batch_targets


def minimum_share_weight(n_flagged: int, n_total: int, min_share: float = 0.05) -> float:
    """The loss weight that gives ``n_flagged`` of ``n_total`` samples at least ``min_share``
    of the summed weight (1 when they already have it): a few hundred flagged samples are too
    few to unlearn a trigger at their natural share."""
    if not 0 < min_share < 1:
        raise ConfigError(f"min_share must be in (0, 1), got {min_share}")
    if n_flagged <= 0 or n_flagged >= n_total:
        return 1.0
    return max(1.0, min_share * (n_total - n_flagged) / ((1 - min_share) * n_flagged))


def weighted_mean_loss(mask: np.ndarray, weight: float) -> BatchLoss:
    """A ``batch_loss`` hook: the batch's weighted mean loss, samples in ``mask`` weighted
    ``weight`` and the rest 1."""
    def batch_loss(per_sample: torch.Tensor, idx: np.ndarray, _epoch: int) -> torch.Tensor:
        w = torch.where(torch.from_numpy(mask[idx]), weight, 1.0).to(per_sample.dtype)
        return (per_sample * w).sum() / w.sum()
    return batch_loss
