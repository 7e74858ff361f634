"""A seeded training loop for the built-in (or any) classifier."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from poisonguard.data.labeled import LabeledData
from poisonguard.errors import ConfigError, DataError
from poisonguard.models.adapter import InputSpec, TorchClassifier
from poisonguard.models.architectures import (
    DEFAULT_LAYER,
    build_model,
    choose_architecture,
    fit_normalization,
)


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters. ``augment`` adds random crops (pad 2) and, for colour images
    when ``flip`` is on, horizontal flips. ``input_noise`` > 0 adds Gaussian noise of that
    standard deviation to every training input, on the model-input scale (0-1 for images)."""

    epochs: int = 4
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 5e-4
    seed: int = 0
    augment: bool = False
    label_smoothing: float = 0.0
    flip: bool = True
    input_noise: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not self.input_noise >= 0:
            raise ConfigError(f"input_noise must be >= 0, got {self.input_noise}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    classifier: TorchClassifier
    arch: str
    arch_kwargs: dict[str, Any]
    config: TrainConfig
    history: list[dict[str, float]] = field(default_factory=list)
    wall_s: float = 0.0


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def _augment(xb: torch.Tensor, gen: torch.Generator, flip: bool) -> torch.Tensor:
    n, _, h, w = xb.shape
    padded = F.pad(xb, (2, 2, 2, 2), mode="replicate")
    dx = torch.randint(0, 5, (1,), generator=gen).item()
    dy = torch.randint(0, 5, (1,), generator=gen).item()
    out = padded[:, :, dy:dy + h, dx:dx + w]
    if flip:
        mask = torch.rand(n, generator=gen) < 0.5
        out = torch.where(mask[:, None, None, None], out.flip(3), out)
    return out


BatchLoss = Callable[[torch.Tensor, np.ndarray, int], torch.Tensor]
BatchTargets = Callable[[np.ndarray, int], torch.Tensor | None]
EpochEnd = Callable[[int, nn.Module], None]
BatchInputs = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def train_classifier(data: LabeledData, config: TrainConfig | None = None,
                     model: nn.Module | None = None, input_spec: InputSpec | None = None,
                     arch: str | None = None, n_classes: int | None = None,
                     progress: bool = False, batch_loss: BatchLoss | None = None,
                     epoch_end: EpochEnd | None = None,
                     batch_targets: BatchTargets | None = None,
                     batch_inputs: BatchInputs | None = None,
                     stage: str = "training") -> TrainResult:
    """Train ``model`` (default: a built-in architecture sized to ``data``) on ``data``.

    ``batch_loss(per_sample_losses, dataset_indices, epoch)`` turns a batch's per-sample losses
    into the scalar to minimise (default: their mean); guarded training plugs in here.
    ``batch_targets(dataset_indices, epoch)`` may return a (batch, classes) matrix of target
    distributions that replaces the labels for that batch (``None``: the labels).
    ``batch_inputs(model, inputs, labels)`` may replace a batch's (augmented, noised) model
    inputs before the training step (adversarial training plugs in here).
    ``epoch_end(epoch, model)`` runs after every epoch. Deterministic for a given seed on one
    machine. Returns the trained adapter and history. With ``progress``, one bar per call
    named ``stage`` counts every step of every epoch (so its ETA is the whole stage's).
    """
    config = config or TrainConfig()
    spec = input_spec or InputSpec.for_data(data.x)
    n_classes = n_classes or data.n_classes
    if len(data) < config.batch_size // 4 or len(data) < 2:
        raise DataError(f"dataset has {len(data)} samples, too few for batch size "
                        f"{config.batch_size}; lower the batch size or add data")
    seed_everything(config.seed)
    arch_kwargs: dict[str, Any] = {}
    if model is None:
        chosen, arch_kwargs = choose_architecture(spec.sample_shape(data.x), n_classes)
        arch = arch or chosen
        model = build_model(arch, **arch_kwargs)
        sample = np.random.default_rng(config.seed).choice(len(data), min(len(data), 5000),
                                                            replace=False)
        fit_normalization(model, spec.prepare(data.x[np.sort(sample)]))
    arch = arch or "custom"
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = (len(data) + config.batch_size - 1) // config.batch_size
    total_steps = config.epochs * steps_per_epoch
    sched: torch.optim.lr_scheduler.LRScheduler
    if total_steps >= 8:
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr,
                                                    total_steps=total_steps, pct_start=0.25)
    else:  # too few steps for a warm-up/anneal cycle
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _step: 1.0)
    rng = np.random.default_rng(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    flip = config.flip and data.x.ndim == 4 and data.x.shape[-1] == 3
    y_all = torch.from_numpy(data.y)
    history = []
    t0 = time.perf_counter()
    bar = tqdm(total=total_steps, desc=stage, leave=False, unit="step") if progress else None
    for epoch in range(config.epochs):
        model.train()
        order = rng.permutation(len(data))
        total, correct, seen = 0.0, 0, 0
        if bar is not None:
            bar.set_postfix_str(f"epoch {epoch + 1}/{config.epochs}")
        for start in range(0, len(data), config.batch_size):
            if bar is not None:
                bar.update(1)
            idx = order[start:start + config.batch_size]
            if len(idx) < 2:
                continue
            xb = spec.prepare(data.x[idx])
            if config.augment and xb.ndim == 4:
                xb = _augment(xb, gen, flip)
            if config.input_noise > 0 and xb.is_floating_point():
                xb = xb + config.input_noise * torch.randn(xb.shape, generator=gen)
            yb = y_all[idx]
            if batch_inputs is not None:
                xb = batch_inputs(model, xb, yb)
            logits = model(xb)
            if logits.ndim != 2 or logits.shape[1] < n_classes:
                raise DataError(f"model output shape {tuple(logits.shape)} does not match "
                                f"{n_classes} classes")
            targets = None if batch_targets is None else batch_targets(idx, epoch)
            if targets is None:
                per_sample = F.cross_entropy(logits, yb, label_smoothing=config.label_smoothing,
                                             reduction="none")
            else:
                per_sample = F.cross_entropy(logits[:, :targets.shape[1]], targets,
                                             reduction="none")
            loss = per_sample.mean() if batch_loss is None else batch_loss(per_sample, idx,
                                                                           epoch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(idx)
        history.append({"epoch": epoch + 1, "loss": total / max(seen, 1),
                        "train_acc": correct / max(seen, 1)})
        if epoch_end is not None:
            model.eval()
            epoch_end(epoch, model)
    if bar is not None:
        bar.close()
    model.eval()
    clf = TorchClassifier(model, spec, layer=DEFAULT_LAYER if hasattr(model, DEFAULT_LAYER)
                          else None, n_classes=n_classes, progress=progress)
    return TrainResult(classifier=clf, arch=arch, arch_kwargs=arch_kwargs, config=config,
                       history=history, wall_s=time.perf_counter() - t0)
