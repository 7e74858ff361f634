"""Validation and assembly helpers shared by the advanced attacks (not part of the public API)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from poisonguard.attacks.base import PoisonedData, Trigger, attacker_labels
from poisonguard.data.labeled import LabeledData
from poisonguard.errors import ConfigError


def check_rate(rate: float, what: str = "poison rate") -> None:
    if not 0.0 < rate < 1.0:
        raise ConfigError(f"{what} must be in (0, 1), got {rate}")


def check_target(data: LabeledData, target: int | None) -> None:
    if target is None or not 0 <= target < data.n_classes:
        raise ConfigError(f"target must be a class in 0..{data.n_classes - 1}, got {target}")


def check_all_to_one(name: str, mode: str) -> None:
    if mode != "all-to-one":
        raise ConfigError(f"{name} is an all-to-one attack; mode must be 'all-to-one', got "
                          f"{mode!r}")


def need_images(name: str, x: np.ndarray) -> tuple[int, int]:
    """(H, W) of image data; ConfigError for vectors."""
    if x.ndim not in (3, 4):
        raise ConfigError(f"{name} needs images (N, H, W) or (N, H, W, C); got samples of shape "
                          f"{x.shape[1:]}")
    return int(x.shape[1]), int(x.shape[2])


def clean_label_victims(data: LabeledData, rate: float, target: int,
                        rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``rate`` of the target class (clean-label attacks)."""
    pool = np.flatnonzero(data.y == target)
    n = int(round(rate * len(pool)))
    if n < 1:
        raise ConfigError(f"rate {rate} of the {len(pool)} target-class samples gives no poisons")
    return np.sort(rng.choice(pool, n, replace=False))


def pick_others(n_total: int, exclude: np.ndarray, n: int, rng: np.random.Generator,
                what: str) -> np.ndarray:
    """Sorted ``n`` random indices of ``range(n_total)`` outside ``exclude``."""
    pool = np.setdiff1d(np.arange(n_total), exclude)
    if n > len(pool):
        raise ConfigError(f"{n} {what} asked for but only {len(pool)} samples are left; lower "
                          "the rate")
    return np.sort(rng.choice(pool, n, replace=False)) if n else np.zeros(0, dtype=np.int64)


def triggered_test(test: LabeledData | None, apply: Callable[[np.ndarray], np.ndarray],
                   target: int | None, mode: str, n_classes: int) -> LabeledData | None:
    """Non-target test samples with the trigger, labelled target (all-to-all: every sample,
    labelled y + 1 mod K)."""
    if test is None:
        return None
    keep = np.flatnonzero(test.y != target) if mode == "all-to-one" else np.arange(len(test))
    return LabeledData(x=apply(test.x[keep]),
                       y=attacker_labels(test.y[keep], mode, target, n_classes),
                       ids=test.ids[keep])


def mask_of(n: int, index: np.ndarray) -> np.ndarray:
    m = np.zeros(n, dtype=bool)
    m[index] = True
    return m


def assemble(data: LabeledData, x: np.ndarray, y: np.ndarray, poisons: np.ndarray,
             attack: dict[str, Any], target: int | None, triggered: LabeledData | None,
             trigger: Trigger | None, covers: np.ndarray | None = None) -> PoisonedData:
    n = len(data)
    return PoisonedData(data=LabeledData(x=x, y=y, ids=data.ids), is_poison=mask_of(n, poisons),
                        original_y=data.y.copy(), attack=attack, target=target,
                        test_triggered=triggered, trigger=trigger,
                        is_cover=None if covers is None else mask_of(n, covers))
