"""Concrete attacks: BadNets patch, blended pattern, label flip."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from poisonguard.attacks.base import PoisonedData, choose_victims, poison_dataset
from poisonguard.data.labeled import LabeledData
from poisonguard.errors import ConfigError

POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left", "center")


def _max_value(x: np.ndarray) -> float:
    return 255.0 if np.issubdtype(x.dtype, np.integer) else 1.0


def _cast_like(values: np.ndarray, like: np.ndarray) -> np.ndarray:
    if np.issubdtype(like.dtype, np.integer):
        return np.clip(np.rint(values), 0, 255).astype(like.dtype)
    return values.astype(like.dtype)


@dataclass(frozen=True)
class BadNetsTrigger:
    """A square patch of ``size`` pixels at ``position`` (name or (row, col)) with ``margin``
    pixels from the border. ``colour`` is a fraction of the maximum pixel value (scalar or per
    channel); ``pattern`` is ``"solid"`` or ``"checker"``. On vectors, the last size*size
    features are set."""

    size: int = 3
    position: str | tuple[int, int] = "bottom-right"
    colour: float | tuple[float, ...] = 1.0
    pattern: str = "solid"
    margin: int = 1

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigError(f"patch size must be >= 1, got {self.size}")
        if isinstance(self.position, str) and self.position not in POSITIONS:
            raise ConfigError(f"position must be one of {POSITIONS} or (row, col), got "
                              f"{self.position!r}")
        if self.pattern not in ("solid", "checker"):
            raise ConfigError(f"pattern must be 'solid' or 'checker', got {self.pattern!r}")

    def _origin(self, h: int, w: int) -> tuple[int, int]:
        s, m = self.size, self.margin
        if not isinstance(self.position, str):
            r, c = self.position
        else:
            r = {"top": m, "bottom": h - s - m, "center": (h - s) // 2}[
                "center" if self.position == "center" else self.position.split("-")[0]]
            c = {"left": m, "right": w - s - m, "center": (w - s) // 2}[
                "center" if self.position == "center" else self.position.split("-")[1]]
        if r < 0 or c < 0 or r + s > h or c + s > w:
            raise ConfigError(f"a {s}x{s} patch at ({r}, {c}) does not fit {h}x{w} images")
        return r, c

    def apply(self, x: np.ndarray) -> np.ndarray:
        out = x.copy()
        top = _max_value(x)
        if x.ndim == 2:
            k = self.size * self.size
            out[:, -k:] = _cast_like(np.full(k, np.max(self.colour) * top), x)
            return out
        h, w = x.shape[1], x.shape[2]
        r, c = self._origin(h, w)
        s = self.size
        patch = np.ones((s, s), dtype=np.float64)
        if self.pattern == "checker":
            patch = ((np.add.outer(np.arange(s), np.arange(s)) % 2) == 0).astype(np.float64)
        colour = np.atleast_1d(np.asarray(self.colour, dtype=np.float64)) * top
        if x.ndim == 3:
            out[:, r:r + s, c:c + s] = _cast_like(patch * colour[0], x)
        else:
            cols = np.broadcast_to(colour, (x.shape[3],))
            out[:, r:r + s, c:c + s, :] = _cast_like(patch[:, :, None] * cols, x)
        return out

    def describe(self) -> dict[str, Any]:
        return {"trigger": "badnets", "size": self.size, "position": self.position,
                "colour": self.colour, "pattern": self.pattern, "margin": self.margin}


def blend_pattern(pattern: np.ndarray | None, seed: int, x: np.ndarray) -> np.ndarray:
    """A blend pattern shaped like one sample of ``x``: the given array (checked), or uniform
    noise over the data's range drawn with ``seed``."""
    if pattern is not None:
        p = np.asarray(pattern, dtype=np.float64)
        if p.shape != x.shape[1:]:
            raise ConfigError(f"blend pattern shape {p.shape} does not match samples "
                              f"{x.shape[1:]}")
        return p
    return np.random.default_rng(seed).uniform(0, _max_value(x), size=x.shape[1:])


@dataclass(frozen=True)
class BlendTrigger:
    """``x' = (1 - alpha) x + alpha * pattern``; the pattern is uniform noise (seeded) shaped like
    one sample, or a given array of that shape scaled like the data."""

    alpha: float = 0.2
    pattern_seed: int = 12345
    pattern: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ConfigError(f"alpha must be in (0, 1), got {self.alpha}")

    def _pattern(self, x: np.ndarray) -> np.ndarray:
        return blend_pattern(self.pattern, self.pattern_seed, x)

    def apply(self, x: np.ndarray) -> np.ndarray:
        blended = (1 - self.alpha) * x.astype(np.float64) + self.alpha * self._pattern(x)
        return _cast_like(blended, x)

    def describe(self) -> dict[str, Any]:
        return {"trigger": "blended", "alpha": self.alpha,
                "pattern": "noise" if self.pattern is None else "image",
                "pattern_seed": self.pattern_seed}


def badnets(data: LabeledData, rate: float = 0.1, target: int | None = 0,
            mode: str = "all-to-one", seed: int = 0, test: LabeledData | None = None,
            **trigger_kwargs: Any) -> PoisonedData:
    """BadNets (Gu et al. 2017): a patch trigger, poisoned samples relabelled."""
    return poison_dataset(data, BadNetsTrigger(**trigger_kwargs), rate, target, mode, seed, test,
                          name="badnets")


def blended(data: LabeledData, rate: float = 0.1, target: int | None = 0,
            mode: str = "all-to-one", seed: int = 0, test: LabeledData | None = None,
            **trigger_kwargs: Any) -> PoisonedData:
    """Blended (Chen et al. 2017): a full-image pattern mixed in at ``alpha``."""
    return poison_dataset(data, BlendTrigger(**trigger_kwargs), rate, target, mode, seed, test,
                          name="blended")


def label_flip(data: LabeledData, rate: float = 0.1, target: int | None = None,
               mode: str = "all-to-all", seed: int = 0, test: LabeledData | None = None
               ) -> PoisonedData:
    """Availability poisoning: flip the labels of random samples (no trigger).

    ``mode='all-to-one'`` flips to ``target``; ``'all-to-all'`` flips to a random other class.
    """
    rng = np.random.default_rng(seed)
    k = data.n_classes
    chosen = choose_victims(data, rate, target, mode, rng)
    n = len(chosen)
    y = data.y.copy()
    if mode == "all-to-one":
        y[chosen] = target
    else:
        y[chosen] = (data.y[chosen] + rng.integers(1, k, size=n)) % k
    mask = np.zeros(len(data), dtype=bool)
    mask[chosen] = True
    return PoisonedData(data=LabeledData(x=data.x, y=y, ids=data.ids), is_poison=mask,
                        original_y=data.y.copy(),
                        attack={"name": "label-flip", "rate": rate, "mode": mode,
                                "target": target, "seed": seed, "n_poison": n},
                        target=target, test_triggered=None)


ATTACKS = {"badnets": badnets, "blended": blended, "label-flip": label_flip}


def make_attack(name: str, data: LabeledData, **kwargs: Any) -> PoisonedData:
    """Run an attack by name (a key of ``ATTACKS``: ``badnets``, ``blended``, ``label-flip`` and
    the advanced ones registered by ``poisonguard.attacks``)."""
    if name not in ATTACKS:
        raise ConfigError(f"unknown attack {name!r}; expected one of {sorted(ATTACKS)}")
    return ATTACKS[name](data, **kwargs)
