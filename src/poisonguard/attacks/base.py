"""PoisonedData and the generic poisoning procedure shared by the trigger attacks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from poisonguard.data.labeled import LabeledData
from poisonguard.errors import ConfigError


class Trigger(Protocol):
    """Stamps a trigger on a batch of raw samples (same shape and dtype out)."""

    def apply(self, x: np.ndarray) -> np.ndarray: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class PoisonedData:
    """A poisoned training set with its ground truth.

    ``test_triggered`` holds test samples (none of the target class for all-to-one) carrying the
    trigger, labelled with the attacker's desired output, so ASR = accuracy on it.
    ``is_cover`` (attacks with regularisation samples only: adaptive-blend/-patch covers, WaNet
    noise-mode samples) marks samples that carry a (partial or noisy) trigger but keep their true
    label; they are not in ``is_poison``. ``None`` for the other attacks.
    """

    data: LabeledData
    is_poison: np.ndarray
    original_y: np.ndarray
    attack: dict[str, Any]
    target: int | None
    test_triggered: LabeledData | None = None
    trigger: Trigger | None = field(default=None, repr=False)
    is_cover: np.ndarray | None = None

    @property
    def poison_ids(self) -> np.ndarray:
        return self.data.ids[self.is_poison]


def _validate_common(data: LabeledData, rate: float, target: int | None, mode: str) -> None:
    if not 0.0 < rate < 1.0:
        raise ConfigError(f"poison rate must be in (0, 1), got {rate}")
    if mode not in ("all-to-one", "all-to-all"):
        raise ConfigError(f"mode must be 'all-to-one' or 'all-to-all', got {mode!r}")
    if mode == "all-to-one":
        if target is None or not 0 <= target < data.n_classes:
            raise ConfigError(f"target must be a class in 0..{data.n_classes - 1}, got {target}")


def choose_victims(data: LabeledData, rate: float, target: int | None, mode: str,
                   rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``rate * len(data)`` random samples (non-target ones for all-to-one)."""
    _validate_common(data, rate, target, mode)
    pool = np.flatnonzero(data.y != target) if mode == "all-to-one" else np.arange(len(data))
    n = int(round(rate * len(data)))
    if n < 1 or n > len(pool):
        raise ConfigError(f"rate {rate} gives {n} poisons from {len(pool)} candidates")
    return np.sort(rng.choice(pool, n, replace=False))


def attacker_labels(y: np.ndarray, mode: str, target: int | None, n_classes: int) -> np.ndarray:
    if mode == "all-to-one":
        return np.full_like(y, target)
    return (y + 1) % n_classes


def poison_dataset(data: LabeledData, trigger: Trigger, rate: float, target: int | None,
                   mode: str = "all-to-one", seed: int = 0, test: LabeledData | None = None,
                   name: str = "trigger") -> PoisonedData:
    """Stamp ``trigger`` on ``rate * len(data)`` random samples and relabel them.

    All-to-one draws the victims from non-target classes and relabels them ``target``;
    all-to-all relabels class k as k+1 (mod K). The triggered test set is built the same way.
    """
    k = data.n_classes
    chosen = choose_victims(data, rate, target, mode, np.random.default_rng(seed))
    n_poison = len(chosen)
    x = data.x.copy()
    y = data.y.copy()
    x[chosen] = trigger.apply(data.x[chosen])
    y[chosen] = attacker_labels(data.y[chosen], mode, target, k)
    mask = np.zeros(len(data), dtype=bool)
    mask[chosen] = True
    triggered = None
    if test is not None:
        keep = np.flatnonzero(test.y != target) if mode == "all-to-one" else np.arange(len(test))
        triggered = LabeledData(x=trigger.apply(test.x[keep]),
                                y=attacker_labels(test.y[keep], mode, target, k),
                                ids=test.ids[keep])
    attack = {"name": name, "rate": rate, "mode": mode, "target": target, "seed": seed,
              "n_poison": int(n_poison), **trigger.describe()}
    return PoisonedData(data=LabeledData(x=x, y=y, ids=data.ids), is_poison=mask,
                        original_y=data.y.copy(), attack=attack, target=target,
                        test_triggered=triggered, trigger=trigger)
