"""Label-consistent backdoor (Turner, Tsipras & Madry, "Label-Consistent Backdoor Attacks",
arXiv:1912.02771, 2019).

Clean-label: only target-class images are poisoned and their labels are kept. To make the model
rely on the trigger, each poison is first made hard to classify by an untargeted L-inf PGD
perturbation (Madry et al. 2018) against a surrogate model, then stamped with the trigger: a 3x3
black-and-white checkerboard in each of the four corners (the paper's pattern). Paper settings:
eps 8/255 (also 16 and 32), PGD against an adversarially trained surrogate; here the surrogate is
a small model trained for ``surrogate_epochs`` (default 2) on the clean data, or one you pass, and
PGD uses ``steps`` (default 10) steps of ``2.5 * eps / steps`` from a random start.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from poisonguard.attacks.base import PoisonedData
from poisonguard.attacks.common import (
    assemble,
    check_all_to_one,
    check_rate,
    check_target,
    clean_label_victims,
    need_images,
    triggered_test,
)
from poisonguard.attacks.generators import BadNetsTrigger, _cast_like, _max_value
from poisonguard.data.labeled import LabeledData
from poisonguard.errors import ConfigError
from poisonguard.models.pgd import pgd_ascent

CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


class FourCornerTrigger:
    """A ``size x size`` checkerboard :class:`BadNetsTrigger` in each of the four corners
    (``margin`` pixels from the border; default 3x3, margin 0, as in Turner et al.)."""

    def __init__(self, size: int = 3, margin: int = 0) -> None:
        self.size, self.margin = size, margin
        self.parts = [BadNetsTrigger(size=size, position=c, pattern="checker", margin=margin)
                      for c in CORNERS]

    def apply(self, x: np.ndarray) -> np.ndarray:
        for part in self.parts:
            x = part.apply(x)
        return x

    def describe(self) -> dict[str, Any]:
        return {"trigger": "checker-four-corners", "size": self.size, "margin": self.margin}


def _model_input(adv: torch.Tensor, spec: Any) -> torch.Tensor:
    """The differentiable twin of ``InputSpec.prepare`` for float inputs."""
    if spec.layout == "flat":
        t = adv.reshape(len(adv), -1)
    elif adv.ndim == 3:
        t = adv[:, None]
    else:
        t = adv.permute(0, 3, 1, 2)
    return t * spec.scale if spec.scale != 1.0 else t


def pgd_untargeted(classifier: Any, x: np.ndarray, y: np.ndarray, eps: float, steps: int,
                   seed: int = 0, batch_size: int = 256) -> np.ndarray:
    """L-inf PGD that raises the loss of the true labels ``y``; ``eps`` is a fraction of the
    pixel range. Returns samples of ``x``'s dtype within ``eps`` (plus rounding) of ``x``."""
    spec = classifier.input_spec
    if spec.layout not in ("nchw", "flat") or spec.dtype != "float32":
        raise ConfigError("label-consistent PGD needs a float model input (layout nchw or "
                          f"flat); the surrogate takes {spec.layout}/{spec.dtype}")
    top = _max_value(x)
    radius, step = eps * top, 2.5 * eps * top / steps
    model = classifier.model.eval()
    rng = np.random.default_rng(seed)
    out = np.empty_like(x)
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size].astype(np.float32)
        x0 = torch.from_numpy(xb)
        yb = torch.from_numpy(np.asarray(y[start:start + batch_size], dtype=np.int64))
        noise = rng.uniform(-radius, radius, xb.shape).astype(np.float32)
        adv = torch.clamp(x0 + torch.from_numpy(noise), 0, top)
        adv = pgd_ascent(lambda a: model(_model_input(a, spec)), x0, adv, yb, radius, step,
                         steps, 0, top)
        out[start:start + batch_size] = _cast_like(adv.double().numpy(), x)
    return out


def label_consistent(data: LabeledData, rate: float = 0.5, target: int | None = 0,
                     mode: str = "all-to-one", seed: int = 0, test: LabeledData | None = None,
                     eps: float = 8 / 255, steps: int = 10, surrogate: Any = None,
                     surrogate_epochs: int = 2, size: int = 3) -> PoisonedData:
    """Label-consistent attack (Turner et al. 2019): ``rate`` (default 0.5) of the TARGET class
    get an untargeted PGD perturbation (L-inf ``eps`` = 8/255 of the range, ``steps`` = 10)
    against ``surrogate`` (a ``TorchClassifier``; default: a built-in model trained
    ``surrogate_epochs`` = 2 epochs on ``data``), then the four-corner 3x3 checkerboard;
    labels unchanged. Triggered test: non-target test images with the corners (no PGD),
    labelled ``target``."""
    check_all_to_one("label-consistent", mode)
    check_rate(rate, "label-consistent rate (fraction of the target class)")
    check_target(data, target)
    if not 0.0 < eps < 1.0:
        raise ConfigError(f"PGD eps must be in (0, 1) (a fraction of the pixel range), got {eps}")
    if int(steps) != steps or steps < 1:
        raise ConfigError(f"PGD steps must be an integer >= 1, got {steps}")
    if surrogate is None and (int(surrogate_epochs) != surrogate_epochs or surrogate_epochs < 1):
        raise ConfigError(f"surrogate_epochs must be an integer >= 1, got {surrogate_epochs}")
    h, w = need_images("label-consistent", data.x)
    if size < 1 or 2 * size > min(h, w):
        raise ConfigError(f"four {size}x{size} corner patches do not fit {h}x{w} images")
    trigger = FourCornerTrigger(size=size)
    poisons = clean_label_victims(data, rate, int(target), np.random.default_rng(seed))
    how = "given"
    if surrogate is None:
        from poisonguard.models.training import TrainConfig, train_classifier

        config = TrainConfig(epochs=int(surrogate_epochs), seed=seed,
                             batch_size=min(128, max(8, len(data) // 4)))
        surrogate = train_classifier(data, config).classifier
        how = f"trained {int(surrogate_epochs)} epoch(s) on the clean data"
    x = data.x.copy()
    hard = pgd_untargeted(surrogate, data.x[poisons], data.y[poisons], eps, int(steps), seed)
    x[poisons] = trigger.apply(hard)
    attack = {"name": "label-consistent", "rate": rate, "mode": mode, "target": target,
              "seed": seed, "clean_label": True, "n_poison": int(len(poisons)), "eps": eps,
              "steps": int(steps), "surrogate": how, **trigger.describe()}
    return assemble(data, x, data.y.copy(), poisons, attack, target,
                    triggered_test(test, trigger.apply, target, mode, data.n_classes), trigger)
