"""Guarded training: trimmed loss (TRIM / ITLM), anti-backdoor learning (ABL, Li et al. 2021),
noise injection, PGD adversarial training (Madry et al. 2018) and per-sample gradient-norm
monitoring, on top of the seeded training loop."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from poisonguard.data.labeled import LabeledData
from poisonguard.detect.common import robust_z
from poisonguard.errors import ConfigError
from poisonguard.models.adapter import TorchClassifier
from poisonguard.models.architectures import DEFAULT_LAYER
from poisonguard.models.pgd import pgd_ascent
from poisonguard.models.training import TrainConfig, TrainResult, train_classifier
from poisonguard.train.monitor import GradientNormMonitor
from poisonguard.train.relabel import RELABEL_MODES, other_class_targets, relabelled_batches
from poisonguard.train.seeded import expand_from_seed, loss_floor_ascent, loss_floor_epochs
from poisonguard.types import DetectorResult

DEFENSES = ("none", "trim", "abl", "noise", "adv")


@dataclass(frozen=True)
class GuardConfig:
    """Options of guarded training.

    trim: ``trim_fraction`` of each batch's highest losses is dropped after
    ``trim_warmup_epochs``; ``None`` estimates it once after warm-up as the share of samples whose
    log-loss is a robust outlier (z > ``trim_k``), capped below 0.5.
    abl: one training schedule whose first ``abl_isolation_epochs`` (default: a quarter) use
    local gradient ascent with loss floor ``abl_gamma``; then the ``abl_isolation_rate`` share of
    samples with the lowest loss is isolated (a fixed share, as in the ABL paper, never the poison
    rate) and, with ``abl_expand_seed``, grown to the rest of the poison population of the
    classes it claims (:func:`poisonguard.train.seeded.expand_from_seed`). When that expansion is
    accepted in every claimed class (``abl_relabel_in_training``), the isolated samples stay in
    training for the remaining epochs with soft targets (the model's distribution over their
    other classes), so the backdoor is unlearned while the clean task keeps training; otherwise
    training continues on the rest and the isolated samples are unlearned afterwards for up to
    ``abl_unlearn_steps`` at ``abl_unlearn_lr`` (see :func:`_unlearn`), which also runs when
    the in-training relabelling left the isolated samples on their labels.
    noise: every training input gets Gaussian noise of standard deviation ``noise_sigma``
    (model-input scale: 0-1 for images) at every visit, so that a small trigger must stand out
    of the noise to be learnt (noise injection, as RAB's training does, Weber et al. 2023);
    the model is evaluated on clean inputs.
    adv: PGD adversarial training (Madry et al. 2018): every training batch is replaced by its
    L-inf PGD adversarial examples (random start in the ball, ``adv_steps`` signed-gradient steps
    of 2.5 * epsilon / steps, or 1.25 * epsilon for one step: FGSM with random start, Wong et
    al. 2020), generated against the model in eval mode and clipped to the inputs' range.
    ``adv_epsilon`` is a fraction of that range: [0, 1] for integer images, the data's min-max
    for float images, each feature's min-max for vectors (default 8/255, the CIFAR-10 budget;
    the MNIST literature uses 0.3); with ``adv_warmup`` > 0 the budget grows linearly from 0 over
    that share of the training steps (large budgets keep a small network from training at all
    without it). The literature does not expect it to stop backdoors in
    general: Weng et al. (NeurIPS 2020) found adversarially robust models *more* vulnerable to
    some triggers; later work (Gao et al. 2023) finds it helps only when the budget covers the
    trigger's magnitude (e.g. a low-alpha blend), not against a full-contrast patch. Geiping et
    al. (2021) defend with adversarial *poisons* crafted during training, which this is not.
    monitor_gradients: record per-sample gradient norms of ``monitor_params`` every epoch.
    """

    defense: str = "none"
    trim_fraction: float | None = None
    trim_warmup_epochs: int = 1
    trim_k: float = 3.0
    abl_gamma: float = 0.01
    abl_isolation_epochs: int | None = None
    abl_isolation_rate: float = 0.01
    abl_unlearn_steps: int = 400
    abl_unlearn_lr: float = 1e-3
    abl_unlearn_weight: float = 1.0
    abl_unlearn_stop: float = 0.05
    abl_check_every: int = 5
    abl_erase_check_every: int = 25
    abl_unlearn_clip: float = 1.0
    abl_relabel: str = "soft"
    abl_settle_steps: int = 150
    abl_max_class_loss: float = 0.2
    abl_max_turned: float = 0.8
    abl_unlearn_retries: int = 1
    abl_expand_rounds: int = 2
    abl_expand_seed: bool = True
    abl_relabel_in_training: bool = True
    noise_sigma: float = 0.5
    adv_epsilon: float = 8 / 255
    adv_steps: int = 3
    adv_warmup: float = 0.0
    monitor_gradients: bool = False
    monitor_params: tuple[str, ...] = ("embed", "head")

    def __post_init__(self) -> None:
        if self.defense not in DEFENSES:
            raise ConfigError(f"unknown defense {self.defense!r}; expected one of {DEFENSES}")
        if self.trim_fraction is not None and not 0.0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"trim fraction must be in [0, 0.5), got {self.trim_fraction}")
        if not 0.0 < self.abl_isolation_rate < 0.5:
            raise ConfigError(f"abl_isolation_rate must be in (0, 0.5), got "
                              f"{self.abl_isolation_rate}")
        if self.abl_relabel not in RELABEL_MODES:
            raise ConfigError(f"abl_relabel must be soft, second or uniform, got "
                              f"{self.abl_relabel!r}")
        if not self.noise_sigma > 0:
            raise ConfigError(f"noise sigma must be > 0, got {self.noise_sigma}")
        if not 0.0 < self.adv_epsilon <= 1.0:
            raise ConfigError(f"adv epsilon must be in (0, 1] (a fraction of the input range), "
                              f"got {self.adv_epsilon}")
        if isinstance(self.adv_steps, bool) or not isinstance(self.adv_steps, int) \
                or self.adv_steps < 1:
            raise ConfigError(f"adv steps must be an integer >= 1, got {self.adv_steps}")
        if not 0.0 <= self.adv_warmup < 1.0:
            raise ConfigError(f"adv warmup must be in [0, 1) (a share of the training steps), "
                              f"got {self.adv_warmup}")
        if self.abl_gamma < 0:
            raise ConfigError(f"abl_gamma must be >= 0, got {self.abl_gamma}")

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
    isolated_initial: np.ndarray | None = None
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
                  progress: bool = False, model: nn.Module | None = None,
                  input_spec: Any = None, arch: str | None = None) -> GuardedResult:
    """Train on ``data`` under ``guard``; see :class:`GuardConfig`. ``model``: the network to
    train (default: a built-in architecture sized to the data), fed through ``input_spec``
    (default: the spec the built-in models use for data like ``data.x``; text passes the
    token layout); ABL's seeded expansion needs its ``embed`` layer and is skipped without
    one."""
    from poisonguard.models.adapter import InputSpec

    guard = guard or GuardConfig()
    config = config or TrainConfig()
    spec = input_spec or InputSpec.for_data(data.x)
    t0 = time.perf_counter()
    history: list[np.ndarray] = []
    monitor_cb = None
    if guard.monitor_gradients:
        monitor_cb = _monitor_callback(data, spec, guard.monitor_params, history)
    result: GuardedResult
    if guard.defense == "abl":
        result = _train_abl(data, guard, config, n_classes, progress, monitor_cb, model, spec,
                            arch)
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
                state["fraction"] = _estimate_trim(model, data, guard, spec)

        if guard.defense == "noise":
            config = replace(config, input_noise=guard.noise_sigma)
        batch_inputs = None
        adv_info: dict[str, Any] = {}
        if guard.defense == "adv":
            batch_inputs, adv_info = _adversarial_inputs(data, spec, guard, config)
        if guard.defense == "trim" and guard.trim_warmup_epochs == 0 and state["fraction"] is None:
            raise ConfigError("an estimated trim fraction needs trim_warmup_epochs >= 1")
        train = train_classifier(data, config, model=model, input_spec=spec, arch=arch,
                                 n_classes=n_classes, progress=progress, batch_loss=batch_loss,
                                 epoch_end=epoch_end, batch_inputs=batch_inputs,
                                 stage=f"guarded training ({guard.defense})")
        result = GuardedResult(train.classifier, train, guard, 0.0,
                               drop_counts=drop_counts if guard.defense == "trim" else None,
                               trim_fraction=state["fraction"], info=adv_info)
    if history:
        result.grad_history = np.stack(history)
        result.monitor = GradientNormMonitor().detect(result.grad_history, data.y)
    result.wall_s = time.perf_counter() - t0
    return result


def input_range(data: LabeledData, spec: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The range adversarial examples stay in, shaped to broadcast over prepared batches:
    [0, 1] (times the spec's scale) for integer images, the data's min and max for float
    images, each feature's min and max for vectors. Token ids and uint8 model inputs have no
    continuous range: ConfigError."""
    if spec.layout in ("tokens", "raw") or spec.dtype != "float32":
        raise ConfigError("--defense adv perturbs float image or feature inputs; it does not "
                          f"apply to {spec.layout}/{spec.dtype} model inputs (text, raw uint8)")
    x = data.x
    if spec.layout == "flat":
        flat = x.reshape(len(x), -1)
        lo, hi = flat.min(axis=0), flat.max(axis=0)
        return (torch.from_numpy(np.asarray(lo * spec.scale, dtype=np.float32))[None],
                torch.from_numpy(np.asarray(hi * spec.scale, dtype=np.float32))[None])
    if np.issubdtype(x.dtype, np.integer):  # 0-255 pixel values
        lo, hi = 0.0, 255.0 * spec.scale
    else:
        lo, hi = float(x.min()) * spec.scale, float(x.max()) * spec.scale
    return torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32)


def pgd_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: torch.Tensor | float,
               steps: int, lo: torch.Tensor | float, hi: torch.Tensor | float,
               step_size: torch.Tensor | float | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """L-inf PGD with a uniform random start (Madry et al. 2018): ``steps`` signed-gradient
    ascent steps on the cross-entropy, each projected onto the ``epsilon`` ball around ``x`` and
    the box [``lo``, ``hi``]. ``step_size`` defaults to 2.5 * epsilon / steps (1.25 * epsilon for
    a single step: FGSM with random start, Wong et al. 2020). Runs ``model`` in eval mode and
    restores its mode; accumulates no parameter gradients. Returns detached inputs."""
    eps = torch.as_tensor(epsilon, dtype=x.dtype)
    lo_t, hi_t = torch.as_tensor(lo, dtype=x.dtype), torch.as_tensor(hi, dtype=x.dtype)
    alpha = (torch.as_tensor(step_size, dtype=x.dtype) if step_size is not None
             else eps * (1.25 if steps == 1 else 2.5 / steps))
    was_training = model.training
    model.eval()
    try:
        x = x.detach()
        start = torch.rand(x.shape, generator=generator, dtype=x.dtype) * 2 - 1
        adv = torch.max(torch.min(x + start * eps, hi_t), lo_t)
        return pgd_ascent(model, x, adv, y, eps, alpha, steps, lo_t, hi_t)
    finally:
        model.train(was_training)


def _adversarial_inputs(data: LabeledData, spec: Any, guard: GuardConfig, config: TrainConfig
                        ) -> tuple[Any, dict[str, Any]]:
    """The batch hook of ``adv`` training and what it records."""
    lo, hi = input_range(data, spec)
    eps = guard.adv_epsilon * (hi - lo)
    gen = torch.Generator().manual_seed(config.seed + 7919)
    total = config.epochs * math.ceil(len(data) / config.batch_size)
    ramp = round(guard.adv_warmup * total)
    seen = [0]

    def batch_inputs(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        seen[0] += 1
        share = min(1.0, seen[0] / ramp) if ramp else 1.0
        return pgd_attack(model, xb, yb, eps * share, guard.adv_steps, lo, hi, generator=gen)

    span = (hi - lo).flatten()
    rel_step = 1.25 if guard.adv_steps == 1 else 2.5 / guard.adv_steps
    info = {"adv_recipe": f"PGD-{guard.adv_steps}, L-inf, random start, step {rel_step:.4g} x "
                          "epsilon, training on the adversarial batch only",
            "adv_epsilon_relative": guard.adv_epsilon, "adv_warmup_steps": ramp,
            "adv_input_range": [float(lo.min()), float(hi.max())],
            "adv_epsilon_max": float(guard.adv_epsilon * span.max())}
    return batch_inputs, info


def _estimate_trim(model: nn.Module, data: LabeledData, guard: GuardConfig, spec: Any
                   ) -> float:
    clf = TorchClassifier(model, spec, layer=None)
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
               n_classes: int | None, progress: bool, monitor_cb: Any,
               model: nn.Module | None = None, spec: Any = None,
               arch: str | None = None) -> GuardedResult:
    """One training schedule: LGA for the isolation epochs, isolation of the lowest-loss share,
    training on the rest, then unlearning the isolated samples."""
    n_classes = n_classes or data.n_classes
    iso_epochs = min(config.epochs,
                     guard.abl_isolation_epochs or loss_floor_epochs(config.epochs))
    gamma = guard.abl_gamma
    isolated = np.zeros(len(data), dtype=bool)
    y_all = torch.from_numpy(data.y)
    state: dict[str, Any] = {"losses": None, "complete": False}

    def batch_loss(per_sample: torch.Tensor, idx: np.ndarray, epoch: int) -> torch.Tensor:
        if epoch < iso_epochs:  # local gradient ascent: no sample's loss is pushed below gamma
            return loss_floor_ascent(per_sample, gamma)
        if state.get("targets") is not None:  # isolated samples train toward their targets
            return per_sample.mean()
        keep = torch.from_numpy(~isolated[idx])
        if not bool(keep.any()):
            return per_sample.sum() * 0.0
        return per_sample[keep].mean()

    def epoch_end(epoch: int, model: nn.Module) -> None:
        if monitor_cb is not None:
            monitor_cb(epoch, model)
        if epoch + 1 == iso_epochs:
            layer = (DEFAULT_LAYER if guard.abl_expand_seed and hasattr(model, DEFAULT_LAYER)
                     else None)
            clf = TorchClassifier(model, spec, layer=layer, batch_size=512)
            out = clf.forward_all(data.x, data.y)
            losses = out["losses"]
            state["losses"] = losses
            isolated[:] = isolate_lowest(losses, guard.abl_isolation_rate)
            state["initial"] = isolated.copy()
            if layer is not None:
                added, evidence = expand_from_seed(data.x, data.y, out["representations"],
                                                   losses, state["initial"])
                isolated[added] = True
                state["expansion"] = evidence
                state["complete"] = bool(evidence["classes"]) and all(
                    v["accepted"] for v in evidence["classes"].values())
                if state["complete"] and guard.abl_relabel_in_training:
                    iso_idx = np.flatnonzero(isolated)
                    targets = other_class_targets(model, clf.input_spec, data.x[iso_idx],
                                                  y_all[iso_idx], guard.abl_relabel)
                    state["targets"] = relabelled_batches(isolated, y_all, targets)

    def batch_targets(idx: np.ndarray, epoch: int) -> torch.Tensor | None:
        hook = state.get("targets")
        return None if epoch < iso_epochs or hook is None else hook(idx, epoch)

    train = train_classifier(data, config, model=model, input_spec=spec, arch=arch,
                             n_classes=n_classes, progress=progress, batch_loss=batch_loss,
                             epoch_end=epoch_end, batch_targets=batch_targets,
                             stage="guarded training (abl)")
    model = train.classifier.model
    initial = state.get("initial", isolated.copy())
    n_after_expansion = int(isolated.sum())
    iso_acc = None
    if state.get("targets") is not None:
        iso_idx = np.flatnonzero(isolated)
        iso_acc = float((train.classifier.predict(data.x[iso_idx]) == data.y[iso_idx]).mean())
    if iso_acc is not None and iso_acc < guard.abl_unlearn_stop:
        unlearned = {"steps": 0, "relabelled_in_training": True,
                     "isolated_accuracy_after_training": iso_acc, "reverted": False}
    else:
        unlearned = _unlearn(model, data, isolated, train.classifier, guard, config,
                             losses=state["losses"], expand=not state["complete"])
        unlearned["relabelled_in_training"] = iso_acc is not None
        unlearned["isolated_accuracy_after_training"] = iso_acc
    train.classifier = TorchClassifier(model.eval(), train.classifier.input_spec,
                                       layer=train.classifier.layer, n_classes=n_classes)
    return GuardedResult(train.classifier, train, guard, 0.0, isolated=isolated,
                         isolated_initial=initial,
                         info={"isolation_epochs": iso_epochs,
                               "n_isolated_initial": int(initial.sum()),
                               "n_isolated_after_expansion": n_after_expansion,
                               "seed_expansion": state.get("expansion"),
                               "n_isolated": int(isolated.sum()),
                               "isolation_rule": f"lowest {guard.abl_isolation_rate:.2%} of "
                                                 f"per-sample losses after {iso_epochs} LGA "
                                                 f"epoch(s) with loss floor gamma={gamma}",
                               "unlearning": unlearned})


def isolate_lowest(losses: np.ndarray, rate: float) -> np.ndarray:
    """The ``rate`` share of samples with the lowest loss (ties broken by position)."""
    k = max(1, int(round(rate * len(losses))))
    mask = np.zeros(len(losses), dtype=bool)
    mask[np.argsort(losses, kind="stable")[:k]] = True
    return mask


class _Unlearner:
    """Fine-tunes ``model`` on soft non-label targets for the isolated samples plus a batch of
    trusted samples per step (half of it from the classes the isolated samples claim)."""

    def __init__(self, model: nn.Module, data: LabeledData, spec: Any, guard: GuardConfig,
                 config: TrainConfig, n_out: int) -> None:
        self.model, self.data, self.spec, self.guard = model, data, spec, guard
        self.y = torch.from_numpy(data.y)
        self.bs = config.batch_size
        self.rng = np.random.default_rng(config.seed + 1)
        self.opt = torch.optim.SGD(model.parameters(), lr=guard.abl_unlearn_lr, momentum=0.9)
        self.soft = torch.zeros(len(data), n_out)
        self.steps = 0

    def reset_optimizer(self, lr: float) -> None:
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=0.9)

    def retarget(self, idx: np.ndarray) -> None:
        self.soft[idx] = other_class_targets(self.model, self.spec, self.data.x[idx],
                                             self.y[idx], self.guard.abl_relabel)

    def step(self, iso_idx: np.ndarray, trusted_idx: np.ndarray, guard_idx: np.ndarray) -> None:
        half_bs = max(1, self.bs // 2)  # one step costs one plain training step
        ib = self.rng.choice(iso_idx, size=min(half_bs, len(iso_idx)), replace=False)
        rb = self.rng.choice(trusted_idx, size=min(half_bs, len(trusted_idx)), replace=False)
        if len(guard_idx):
            half = min(len(rb) // 2, len(guard_idx))
            rb[:half] = self.rng.choice(guard_idx, size=half, replace=False)
        relabel = F.cross_entropy(self.model(self.spec.prepare(self.data.x[ib])), self.soft[ib])
        descent = F.cross_entropy(self.model(self.spec.prepare(self.data.x[rb])), self.y[rb])
        self.opt.zero_grad(set_to_none=True)
        (descent + self.guard.abl_unlearn_weight * relabel).backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), self.guard.abl_unlearn_clip)
        self.opt.step()
        self.steps += 1

    def predict(self, idx: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return TorchClassifier(self.model, self.spec, layer=None).predict(self.data.x[idx])


def _unlearn(model: nn.Module, data: LabeledData, isolated: np.ndarray, like: TorchClassifier,
             guard: GuardConfig, config: TrainConfig,
             losses: np.ndarray | None = None, expand: bool = True) -> dict[str, Any]:
    """Unlearn the isolated samples without wrecking the classes they claim; may grow
    ``isolated`` in place.

    Plain gradient ascent on their loss (the ABL paper's step) collapses a small network: the
    ascent that breaks the trigger also erases the target class. Instead:
    1. each isolated sample gets as target the model's distribution over the classes other than
       its label (for a poison: mostly the class its image shows), and the model is fine-tuned on
       those targets plus trusted samples: all samples of classes no isolated sample claims, and
       the higher-loss half of claimed classes (poisons are the low-loss half), until the isolated
       samples' accuracy on their labels falls below ``abl_unlearn_stop``;
    2. the samples of claimed classes that the unlearned model now assigns to another class are
       the poisons that stayed in training (a clean sample keeps its class); they join the
       isolated set and leave the trusted one;
    3. ``abl_settle_steps`` more steps on the enlarged sets let clean accuracy recover; steps 2
       and 3 repeat up to ``abl_expand_rounds`` times while step 2 finds samples to add. With
       ``expand=False`` (the isolated set is already complete: the seed expansion was accepted
       in every claimed class) step 2 is skipped and one settle phase runs.
    A fifth of the claimed classes' trusted samples is held out of step 1; if unlearning costs
    any claimed class more than ``abl_max_class_loss`` of its held-out accuracy, or turns more
    than ``abl_max_turned`` of one claimed class's members away from their label (poisons are a
    minority of their class unless the poison rate is extreme), the isolated samples were
    ordinary easy members of their class rather than a separable shortcut, and the model is
    restored. The held-out drop is also probed every ``abl_erase_check_every`` steps and an
    attempt already past the limit stops there. When step 1 reached its stop or was stopped so,
    yet failed that check, it overshot: it is retried from the start at a third of the learning
    rate, up to ``abl_unlearn_retries`` times.
    BatchNorm statistics stay frozen throughout."""
    if not isolated.any() or guard.abl_unlearn_steps == 0 or isolated.all():
        return {"steps": 0}
    model.eval()
    with torch.no_grad():
        n_out = int(model(like.input_spec.prepare(data.x[:1])).shape[1])
    un = _Unlearner(model, data, like.input_spec, guard, config, n_out)
    claimed = np.isin(data.y, np.unique(data.y[isolated]))
    trusted = ~isolated
    if losses is not None:
        for c in np.unique(data.y[isolated]):
            members = trusted & (data.y == c)
            if members.any():
                trusted &= ~(members & (losses <= np.median(losses[members])))
    iso_idx = np.flatnonzero(isolated)
    defenders = np.flatnonzero(trusted & claimed)
    held = un.rng.choice(defenders, size=len(defenders) // 5, replace=False)
    trusted[held] = False  # held out of unlearning: do the claimed classes survive it?
    trusted_idx, guard_idx = np.flatnonzero(trusted), np.flatnonzero(trusted & claimed)
    held_before = un.predict(held) == data.y[held]
    check_idx = (iso_idx if len(iso_idx) <= 256  # the stop rule watches a fixed sample
                 else np.sort(un.rng.choice(iso_idx, size=256, replace=False)))
    # the erase rule is also watched while unlearning, on part of the held-out defenders
    probe = np.sort(un.rng.choice(len(held), size=min(len(held), 600), replace=False))
    probe_idx, probe_before = held[probe], held_before[probe]
    probe_classes = [int(c) for c in np.unique(data.y[isolated])
                     if (data.y[probe_idx] == c).sum() >= 5]
    probe_masks = [data.y[probe_idx] == c for c in probe_classes]
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    un.retarget(iso_idx)
    attempts: list[dict[str, Any]] = []
    lr = guard.abl_unlearn_lr
    for attempt in range(guard.abl_unlearn_retries + 1):
        if attempt:  # the last attempt erased a class while unlearning: start over, gentler
            model.load_state_dict(before)
            lr /= 3
        un.reset_optimizer(lr)
        start = un.steps
        accs: list[float] = []
        aborted = False
        drops: list[float] = []
        while un.steps - start < guard.abl_unlearn_steps:
            un.step(iso_idx, trusted_idx, guard_idx)
            if (un.steps - start) % guard.abl_check_every == 0:
                accs.append(float((un.predict(check_idx) == data.y[check_idx]).mean()))
                if accs[-1] < guard.abl_unlearn_stop:
                    break
            if (un.steps - start) % guard.abl_erase_check_every == 0 and probe_masks:
                ok_now = un.predict(probe_idx) == data.y[probe_idx]
                drops = [probe_before[m].mean() - ok_now[m].mean() for m in probe_masks]
                if max(drops) > guard.abl_max_class_loss:
                    aborted = True  # already erasing a claimed class: stop this attempt
                    break
        reached = bool(accs) and accs[-1] < guard.abl_unlearn_stop
        per_class: dict[int, dict[str, float]] = {}
        ok = False
        worst_drop: float | None = None
        worst_turned: float | None = None
        if aborted:  # the probe already saw a claimed class erased: no need to look further
            per_class = {c: {"probe_accuracy_drop": float(d)}
                         for c, d in zip(probe_classes, drops)}
            worst_drop = float(max(drops))
        elif reached:
            held_after = un.predict(held) == data.y[held]
            candidates = np.flatnonzero(claimed & ~isolated)
            turned = candidates[un.predict(candidates) != data.y[candidates]]
            for c in np.unique(data.y[isolated]):
                h = data.y[held] == c
                members = data.y[candidates] == c
                per_class[int(c)] = {
                    "held_accuracy_drop": float(held_before[h].mean() - held_after[h].mean())
                    if h.sum() >= 5 else 0.0,
                    "turned_fraction": float(np.isin(candidates[members], turned).mean())
                    if members.any() else 0.0}
            worst_drop = max(v["held_accuracy_drop"] for v in per_class.values())
            worst_turned = max(v["turned_fraction"] for v in per_class.values())
            # accepted only when the isolated samples lost their labels (a separable shortcut
            # was unlearned) without the claimed classes going with them
            ok = worst_drop <= guard.abl_max_class_loss and worst_turned <= guard.abl_max_turned
        attempts.append({"lr": lr, "steps": un.steps - start, "reached_stop": reached,
                         "aborted_erasing": aborted,
                         "isolated_accuracy_checks": accs, "claimed_classes": per_class})
        if ok or not (reached or aborted):  # retry only an unlearning that overshot
            break
    unlearn_steps = un.steps
    info: dict[str, Any] = {"unlearn_steps": unlearn_steps, "attempts": attempts}
    if not ok:
        # the isolated samples were ordinary members of their classes, not a shortcut that can
        # be unlearned on its own: undo the unlearning
        model.load_state_dict(before)
        return {**info, "reverted": True,
                "reason": _revert_reason(reached, aborted, worst_drop, worst_turned, guard)}
    added = []
    for _ in range(guard.abl_expand_rounds if expand else 0):
        if len(turned) == 0:
            break
        isolated[turned] = True
        added.append(int(len(turned)))
        iso_idx = np.flatnonzero(isolated)
        trusted_idx = np.flatnonzero(~isolated)
        guard_idx = np.flatnonzero(~isolated & claimed)
        un.retarget(turned)
        for _ in range(guard.abl_settle_steps):
            un.step(iso_idx, trusted_idx, guard_idx)
        candidates = np.flatnonzero(claimed & ~isolated)
        turned = candidates[un.predict(candidates) != data.y[candidates]]
    if not added:  # nothing was added: one settle phase on the sets as they stand
        for _ in range(guard.abl_settle_steps):
            un.step(iso_idx, trusted_idx, guard_idx)
    return {**info, "reverted": False, "settle_steps": un.steps - unlearn_steps,
            "n_added_per_round": added, "n_isolated_final": int(isolated.sum())}


def _revert_reason(reached: bool, aborted: bool, worst_drop: float | None,
                   worst_turned: float | None, guard: GuardConfig) -> str:
    if aborted:
        return (f"unlearning erased a claimed class (held-out probe accuracy drop "
                f"{worst_drop:.1%}, limit {guard.abl_max_class_loss:.0%})")
    if not reached:
        return "the isolated samples kept their labels within the step budget"
    return (f"unlearning erased a claimed class (worst held-out accuracy drop {worst_drop:.1%}, "
            f"limit {guard.abl_max_class_loss:.0%}; worst share turned {worst_turned:.1%}, "
            f"limit {guard.abl_max_turned:.0%})")
