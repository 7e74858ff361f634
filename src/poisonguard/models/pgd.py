"""L-inf projected gradient ascent on the cross-entropy (Madry et al. 2018), shared by the
label-consistent attack (hard samples) and adversarial training (``train --defense adv``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def pgd_ascent(forward: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor,
               start: torch.Tensor, y: torch.Tensor, radius: torch.Tensor | float,
               step: torch.Tensor | float, steps: int, lo: torch.Tensor | float,
               hi: torch.Tensor | float) -> torch.Tensor:
    """From ``start`` (a point in the box near ``x0``), ``steps`` signed-gradient steps of size
    ``step`` that raise the cross-entropy of ``forward(adv)`` against ``y``, each projected onto
    the L-inf ball of ``radius`` around ``x0`` and then the box [``lo``, ``hi``]. Accumulates
    no parameter gradients; returns detached inputs."""
    adv = start.detach()
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = F.cross_entropy(forward(adv), y)
        (grad,) = torch.autograd.grad(loss, adv)
        adv = adv.detach() + step * grad.sign()
        adv = torch.clamp(torch.minimum(torch.maximum(adv, x0 - radius), x0 + radius), lo, hi)
    return adv.detach()
