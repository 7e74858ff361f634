"""Guarded training: trimmed loss (TRIM / ITLM), anti-backdoor learning (ABL, Li et al. 2021)
and per-sample gradient-norm monitoring, on top of the seeded training loop."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from poisonguard.data.labeled import LabeledData
from poisonguard.detect.common import robust_z
from poisonguard.errors import ConfigError
from poisonguard.models.adapter import TorchClassifier
from poisonguard.models.training import TrainConfig, TrainResult, train_classifier
from poisonguard.train.monitor import GradientNormMonitor
from poisonguard.types import DetectorResult

DEFENSES = ("none", "trim", "abl")


@dataclass(frozen=True)
class GuardConfig:
    """Options of guarded training.

    trim: ``trim_fraction`` of each batch's highest losses is dropped after
    ``trim_warmup_epochs``; ``None`` estimates it once after warm-up as the share of samples whose
    log-loss is a robust outlier (z > ``trim_k``), capped below 0.5.
    abl: ``abl_isolation_epochs`` of local gradient ascent with loss floor ``abl_gamma``; samples
    whose log-loss then lies ``abl_k`` robust SDs below the median are isolated (at most
    ``abl_max_isolation``); training continues on the rest, then the isolated set is unlearned
    (gradient ascent) for ``abl_unlearn_epochs`` at ``abl_unlearn_lr``.
    monitor_gradients: record per-sample gradient norms of ``monitor_params`` every epoch.
    """

    defense: str = "none"
    trim_fraction: float | None = None
    trim_warmup_epochs: int = 1
    trim_k: float = 3.0
    abl_gamma: float = 0.5
    abl_isolation_epochs: int | None = None
    abl_k: float = 3.0
    abl_max_isolation: float = 0.2
    abl_unlearn_epochs: int = 5
    abl_unlearn_lr: float = 5e-4
    monitor_gradients: bool = False
    monitor_params: tuple[str, ...] = ("embed", "head")

    def __post_init__(self) -> None:
        if self.defense not in DEFENSES:
            raise ConfigError(f"unknown defense {self.defense!r}; expected one of {DEFENSES}")
        if self.trim_fraction is not None and not 0.0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"trim fraction must be in [0, 0.5), got {self.trim_fraction}")
        if not 0.0 < self.abl_max_isolation < 1.0:
            raise ConfigError(f"abl_max_isolation must be in (0, 1), got "
                              f"{self.abl_max_isolation}")
        if self.abl_gamma <= 0:
            raise ConfigError(f"abl_gamma must be > 0, got {self.abl_gamma}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GuardedResult:
    classifier: TorchClassifier
    train: TrainResult
    config: GuardConfig
    wall_s: float
    drop_counts: np.ndarray | None = None
    trim_fraction: float | None = None
    isolated: np.ndarray | None = None
    monitor: DetectorResult | None = None
    grad_history: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def suspects(self) -> np.ndarray | None:
        """The samples this run singled out: isolated (ABL), dropped most (trim) or flagged."""
        if self.isolated is not None:
            return self.isolated
        if self.monitor is not None:
            return self.monitor.flags
        return None


def _all_losses(model: nn.Module, data: LabeledData, like: TorchClassifier) -> np.ndarray:
    clf = TorchClassifier(model.eval(), like.input_spec, layer=None)
    return clf.per_sample_loss(data.x, data.y)


def _monitor_callback(data: LabeledData, spec: Any, params: tuple[str, ...],
                      store: list[np.ndarray]):  # noqa: ANN202
    def on_epoch(_epoch: int, model: nn.Module) -> None:
        names = [n for n, _ in model.named_parameters()
                 if any(n == p or n.startswith(p + ".") for p in params)]
        clf = TorchClassifier(model, spec, layer=None, batch_size=256)
        store.append(clf.per_sample_grad_norm(data.x, data.y, params=names or None)
                     .astype(np.float32))
    return on_epoch


def train_guarded(data: LabeledData, guard: GuardConfig | None = None,
                  config: TrainConfig | None = None, n_classes: int | None = None,
                  progress: bool = False) -> GuardedResult:
    """Train on ``data`` under ``guard``; see :class:`GuardConfig`."""
    guard = guard or GuardConfig()
    config = config or TrainConfig()
    t0 = time.perf_counter()
    history: list[np.ndarray] = []
    monitor_cb = None
    if guard.monitor_gradients:
        from poisonguard.models.adapter import InputSpec

        monitor_cb = _monitor_callback(data, InputSpec.for_data(data.x), guard.monitor_params,
                                       history)
    result: GuardedResult
    if guard.defense == "abl":
        result = _train_abl(data, guard, config, n_classes, progress, monitor_cb)
    else:
        drop_counts = np.zeros(len(data), dtype=np.int32)
        state: dict[str, Any] = {"fraction": guard.trim_fraction}
        batch_loss = None
        if guard.defense == "trim":
            batch_loss = _trim_loss(guard, state, drop_counts)

        def epoch_end(epoch: int, model: nn.Module) -> None:
            if monitor_cb is not None:
                monitor_cb(epoch, model)
            if (guard.defense == "trim" and state["fraction"] is None
                    and epoch + 1 == guard.trim_warmup_epochs):
                state["fraction"] = _estimate_trim(model, data, guard)

        if guard.defense == "trim" and guard.trim_warmup_epochs == 0 and state["fraction"] is None:
            raise ConfigError("an estimated trim fraction needs trim_warmup_epochs >= 1")
        train = train_classifier(data, config, n_classes=n_classes, progress=progress,
                                 batch_loss=batch_loss, epoch_end=epoch_end)
        result = GuardedResult(train.classifier, train, guard, 0.0,
                               drop_counts=drop_counts if guard.defense == "trim" else None,
                               trim_fraction=state["fraction"])
    if history:
        result.grad_history = np.stack(history)
        result.monitor = GradientNormMonitor().detect(result.grad_history, data.y)
    result.wall_s = time.perf_counter() - t0
    return result


def _estimate_trim(model: nn.Module, data: LabeledData, guard: GuardConfig) -> float:
    from poisonguard.models.adapter import InputSpec

    clf = TorchClassifier(model, InputSpec.for_data(data.x), layer=None)
    z = robust_z(np.log(clf.per_sample_loss(data.x, data.y) + 1e-12))
    return float(min(0.49, (z > guard.trim_k).mean()))


def _trim_loss(guard: GuardConfig, state: dict[str, Any], drop_counts: np.ndarray):  # noqa: ANN202
    def batch_loss(per_sample: torch.Tensor, idx: np.ndarray, epoch: int) -> torch.Tensor:
        frac = state["fraction"]
        if epoch < guard.trim_warmup_epochs or not frac:
            return per_sample.mean()
        keep = max(1, math.ceil((1 - frac) * len(per_sample)))
        order = torch.argsort(per_sample.detach())
        np.add.at(drop_counts, idx[order[keep:].numpy()], 1)
        return per_sample[order[:keep]].mean()
    return batch_loss


def _train_abl(data: LabeledData, guard: GuardConfig, config: TrainConfig,
               n_classes: int | None, progress: bool, monitor_cb: Any) -> GuardedResult:
    n_classes = n_classes or data.n_classes
    iso_epochs = guard.abl_isolation_epochs or max(1, config.epochs // 4)
    gamma = guard.abl_gamma

    def lga(per_sample: torch.Tensor, _idx: np.ndarray, _epoch: int) -> torch.Tensor:
        return (torch.sign(per_sample.detach() - gamma) * per_sample).mean()

    iso_config = TrainConfig(**{**config.to_dict(), "epochs": iso_epochs})
    phase1 = train_classifier(data, iso_config, n_classes=n_classes, progress=progress,
                              batch_loss=lga, epoch_end=monitor_cb)
    losses = phase1.classifier.per_sample_loss(data.x, data.y)
    z = robust_z(np.log(losses + 1e-12))
    isolated = z < -guard.abl_k
    cap = int(guard.abl_max_isolation * len(data))
    if isolated.sum() > cap:
        keep = np.argsort(z)[:cap]
        isolated = np.zeros(len(data), dtype=bool)
        isolated[keep] = True
    rest = data.subset(np.flatnonzero(~isolated))
    main_config = TrainConfig(**{**config.to_dict(),
                                 "epochs": max(1, config.epochs - iso_epochs)})
    phase2 = train_classifier(rest, main_config, model=phase1.classifier.model,
                              input_spec=phase1.classifier.input_spec, arch=phase1.arch,
                              n_classes=n_classes, progress=progress)
    model = phase2.classifier.model
    unlearned = _unlearn(model, data.subset(np.flatnonzero(isolated)), phase2.classifier,
                         guard, config)
    train = TrainResult(classifier=TorchClassifier(model.eval(), phase2.classifier.input_spec,
                                                   layer=phase2.classifier.layer,
                                                   n_classes=n_classes),
                        arch=phase1.arch, arch_kwargs=phase1.arch_kwargs, config=config,
                        history=phase1.history + phase2.history,
                        wall_s=phase1.wall_s + phase2.wall_s)
    return GuardedResult(train.classifier, train, guard, 0.0, isolated=isolated,
                         info={"isolation_epochs": iso_epochs, "n_isolated": int(isolated.sum()),
                               "isolation_rule": f"robust z of log-loss < -{guard.abl_k} after "
                                                 f"{iso_epochs} LGA epoch(s), gamma {gamma}",
                               "unlearning": unlearned})


def _unlearn(model: nn.Module, isolated: LabeledData, like: TorchClassifier,
             guard: GuardConfig, config: TrainConfig) -> dict[str, Any]:
    """Gradient ascent on the isolated samples (BatchNorm statistics frozen)."""
    if len(isolated) == 0 or guard.abl_unlearn_epochs == 0:
        return {"epochs": 0}
    opt = torch.optim.SGD(model.parameters(), lr=guard.abl_unlearn_lr, momentum=0.9)
    y = torch.from_numpy(isolated.y)
    rng = np.random.default_rng(config.seed)
    accs = []
    for _ in range(guard.abl_unlearn_epochs):
        model.eval()
        order = rng.permutation(len(isolated))
        for start in range(0, len(isolated), config.batch_size):
            idx = order[start:start + config.batch_size]
            logits = model(like.input_spec.prepare(isolated.x[idx]))
            loss = -F.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            pred = like.predict(isolated.x)
        accs.append(float((pred == isolated.y).mean()))
        if accs[-1] < 0.05:
            break
    return {"epochs": len(accs), "isolated_accuracy_after_each": accs}
