"""Adaptive-Blend and Adaptive-Patch (Qi, Xie, Li, Wang & Mittal, "Revisiting the Assumption of
Latent Separability for Backdoor Defenses", ICLR 2023).

Both weaken the latent separation that many defences rely on: (1) every training poison carries
only a random PART of the trigger (diversified, weaker trigger), while the full trigger is used at
test time; (2) "cover" samples carry the same kind of partial trigger but KEEP their true labels
(conservatism), so the trigger alone is not a shortcut to the target class during training.
Covers are reported in ``PoisonedData.is_cover`` and ``attack["n_cover"]``.

Paper defaults on CIFAR-10: poison rate 0.003 (150 poisons) and cover rate 0.003 (150 covers);
Adaptive-Blend uses a 4x4 grid of 16 pieces, half dropped per training sample, alpha 0.15 at
training time and 0.2 at test time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from poisonguard.attacks.base import PoisonedData, choose_victims
from poisonguard.attacks.common import (
    assemble,
    check_all_to_one,
    check_rate,
    check_target,
    need_images,
    pick_others,
    triggered_test,
)
from poisonguard.attacks.generators import _cast_like, _max_value, blend_pattern
from poisonguard.data.labeled import LabeledData
from poisonguard.errors import ConfigError


def _blend(x: np.ndarray, pattern: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``x + weight * (pattern - x)`` per sample; ``weight`` is (N, H, W)."""
    xf = x.astype(np.float64)
    wgt = weight if x.ndim == 3 else weight[..., None]
    out = _cast_like(xf + wgt * (pattern - xf), x)
    out[weight == 0] = x[weight == 0]  # untouched pixels stay bit-identical
    return out


@dataclass(frozen=True)
class AdaptiveBlendTrigger:
    """A blend pattern (seeded uniform noise, or ``pattern`` shaped like one sample on the data's
    scale) split into a ``sqrt(pieces) x sqrt(pieces)`` grid. Training samples get a random
    ``1 - mask_rate`` share of the pieces at ``alpha``; ``apply`` (test time) uses all pieces at
    ``test_alpha``. Defaults after Qi et al. (ICLR 2023): 16 pieces, mask_rate 0.5, alpha 0.15,
    test_alpha 0.2."""

    alpha: float = 0.15
    test_alpha: float = 0.2
    pieces: int = 16
    mask_rate: float = 0.5
    pattern_seed: int = 12345
    pattern: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name, v in (("alpha", self.alpha), ("test_alpha", self.test_alpha)):
            if not 0.0 < v < 1.0:
                raise ConfigError(f"adaptive-blend {name} must be in (0, 1), got {v}")
        g = int(round(np.sqrt(self.pieces)))
        if self.pieces < 4 or g * g != self.pieces:
            raise ConfigError(f"adaptive-blend pieces must be a square number >= 4, got "
                              f"{self.pieces}")
        if not 0.0 < self.mask_rate < 1.0 or self.n_dropped() >= self.pieces:
            raise ConfigError(f"adaptive-blend mask_rate must be in (0, 1) and keep at least "
                              f"one piece, got {self.mask_rate}")

    def n_dropped(self) -> int:
        return int(round(self.mask_rate * self.pieces))

    def pattern_for(self, x: np.ndarray) -> np.ndarray:
        return blend_pattern(self.pattern, self.pattern_seed, x)

    def piece_masks(self, h: int, w: int) -> np.ndarray:
        """(pieces, H, W) boolean masks of the grid cells (row-major)."""
        g = int(round(np.sqrt(self.pieces)))
        if h < g or w < g:
            raise ConfigError(f"{self.pieces} pieces do not fit {h}x{w} images")
        rows, cols = (np.arange(g + 1) * h) // g, (np.arange(g + 1) * w) // g
        masks = np.zeros((self.pieces, h, w), dtype=bool)
        for i in range(self.pieces):
            r, c = divmod(i, g)
            masks[i, rows[r]:rows[r + 1], cols[c]:cols[c + 1]] = True
        return masks

    def apply_partial(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = need_images("adaptive-blend", x)
        masks = self.piece_masks(h, w)
        keep = self.pieces - self.n_dropped()
        weight = np.zeros((len(x), h, w))
        for n in range(len(x)):
            chosen = rng.choice(self.pieces, keep, replace=False)
            weight[n] = self.alpha * masks[chosen].any(axis=0)
        return _blend(x, self.pattern_for(x), weight)

    def apply(self, x: np.ndarray) -> np.ndarray:
        h, w = need_images("adaptive-blend", x)
        return _blend(x, self.pattern_for(x), np.full((len(x), h, w), self.test_alpha))

    def describe(self) -> dict[str, Any]:
        return {"trigger": "adaptive-blend", "alpha": self.alpha, "test_alpha": self.test_alpha,
                "pieces": self.pieces, "mask_rate": self.mask_rate,
                "pattern": "noise" if self.pattern is None else "image",
                "pattern_seed": self.pattern_seed}


@dataclass(frozen=True)
class AdaptivePatchTrigger:
    """``n_patches`` distinct patch triggers: seeded random colours per pixel, ``size x size``
    each, at seeded positions in distinct cells of a ceil(sqrt(n_patches))-square grid (so they
    never overlap). Training samples get a random ``n_active`` of them blended at ``alpha``
    (reduced opacity); ``apply`` (test time) stamps all of them at ``test_alpha``. Defaults after
    Qi et al. (ICLR 2023, k distinct patch triggers, partial and faded at training time): 4
    patches of 3x3, 2 per training sample, alpha 0.5, test_alpha 1.0."""

    n_patches: int = 4
    size: int = 3
    n_active: int = 2
    alpha: float = 0.5
    test_alpha: float = 1.0
    pattern_seed: int = 2023

    def __post_init__(self) -> None:
        if self.n_patches < 2:
            raise ConfigError(f"adaptive-patch needs n_patches >= 2, got {self.n_patches}")
        if not 1 <= self.n_active < self.n_patches:
            raise ConfigError(f"adaptive-patch n_active must be in 1..{self.n_patches - 1}, got "
                              f"{self.n_active}")
        if self.size < 1:
            raise ConfigError(f"patch size must be >= 1, got {self.size}")
        if not 0.0 < self.alpha <= 1.0 or not 0.0 < self.test_alpha <= 1.0:
            raise ConfigError(f"adaptive-patch alpha and test_alpha must be in (0, 1], got "
                              f"{self.alpha} and {self.test_alpha}")

    def layout(self, h: int, w: int, channels: int) -> tuple[list[tuple[int, int]], np.ndarray]:
        g = int(np.ceil(np.sqrt(self.n_patches)))
        ch, cw = h // g, w // g
        if ch < self.size or cw < self.size:
            raise ConfigError(f"{self.n_patches} {self.size}x{self.size} patches do not fit "
                              f"{h}x{w} images")
        rng = np.random.default_rng(self.pattern_seed)
        origins = []  # positions first, so they do not depend on the channel count
        for i in range(self.n_patches):
            r, c = divmod(i, g)
            origins.append((r * ch + int(rng.integers(0, ch - self.size + 1)),
                            c * cw + int(rng.integers(0, cw - self.size + 1))))
        colours = rng.random((self.n_patches, self.size, self.size, channels))
        return origins, colours

    def _stamp(self, x: np.ndarray, active: np.ndarray, alpha: float) -> np.ndarray:
        """``active`` is (N, n_patches) boolean."""
        h, w = need_images("adaptive-patch", x)
        channels = 1 if x.ndim == 3 else x.shape[3]
        origins, colours = self.layout(h, w, channels)
        top = _max_value(x)
        pattern = np.zeros((h, w, channels))
        weight = np.zeros((len(x), h, w))
        s = self.size
        for i, (r, c) in enumerate(origins):
            pattern[r:r + s, c:c + s] = colours[i] * top
            weight[active[:, i], r:r + s, c:c + s] = alpha
        return _blend(x, pattern[:, :, 0] if x.ndim == 3 else pattern, weight)

    def apply_partial(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        active = np.zeros((len(x), self.n_patches), dtype=bool)
        for n in range(len(x)):
            active[n, rng.choice(self.n_patches, self.n_active, replace=False)] = True
        return self._stamp(x, active, self.alpha)

    def apply(self, x: np.ndarray) -> np.ndarray:
        return self._stamp(x, np.ones((len(x), self.n_patches), dtype=bool), self.test_alpha)

    def describe(self) -> dict[str, Any]:
        return {"trigger": "adaptive-patch", "n_patches": self.n_patches, "size": self.size,
                "n_active": self.n_active, "alpha": self.alpha, "test_alpha": self.test_alpha,
                "pattern_seed": self.pattern_seed}


def _adaptive(name: str, trigger: Any, data: LabeledData, rate: float, target: int | None,
              mode: str, seed: int, test: LabeledData | None,
              cover_rate: float | None) -> PoisonedData:
    check_all_to_one(name, mode)
    check_rate(rate)
    cover_rate = rate if cover_rate is None else cover_rate
    if not 0.0 <= cover_rate < 1.0:
        raise ConfigError(f"cover rate must be in [0, 1), got {cover_rate}")
    check_target(data, target)
    need_images(name, data.x)
    rng = np.random.default_rng(seed)
    poisons = choose_victims(data, rate, target, mode, rng)
    covers = pick_others(len(data), poisons, int(round(cover_rate * len(data))), rng,
                         "cover samples")
    x, y = data.x.copy(), data.y.copy()
    x[poisons] = trigger.apply_partial(data.x[poisons], rng)
    y[poisons] = target
    x[covers] = trigger.apply_partial(data.x[covers], rng)
    attack = {"name": name, "rate": rate, "cover_rate": cover_rate, "mode": mode,
              "target": target, "seed": seed, "n_poison": int(len(poisons)),
              "n_cover": int(len(covers)), **trigger.describe()}
    return assemble(data, x, y, poisons, attack, target,
                    triggered_test(test, trigger.apply, target, mode, data.n_classes), trigger,
                    covers=covers)


def adaptive_blend(data: LabeledData, rate: float = 0.003, target: int | None = 0,
                   mode: str = "all-to-one", seed: int = 0, test: LabeledData | None = None,
                   cover_rate: float | None = None, **trigger_kwargs: Any) -> PoisonedData:
    """Adaptive-Blend (Qi et al., ICLR 2023): ``rate`` (paper: 0.003) of the non-target samples
    get a random half of the blend pattern's 16 pieces at alpha 0.15 and are relabelled
    ``target``; ``cover_rate`` (default: ``rate``) of the others get the same kind of partial
    trigger and keep their labels. Test: whole pattern at alpha 0.2 (:class:`AdaptiveBlendTrigger`).
    """
    return _adaptive("adaptive-blend", AdaptiveBlendTrigger(**trigger_kwargs), data, rate, target,
                     mode, seed, test, cover_rate)


def adaptive_patch(data: LabeledData, rate: float = 0.003, target: int | None = 0,
                   mode: str = "all-to-one", seed: int = 0, test: LabeledData | None = None,
                   cover_rate: float | None = None, **trigger_kwargs: Any) -> PoisonedData:
    """Adaptive-Patch (Qi et al., ICLR 2023): ``rate`` (paper: 0.003) of the non-target samples
    get 2 of 4 random-colour patches at opacity 0.5 and are relabelled ``target``; ``cover_rate``
    (default: ``rate``) of the others get the same kind of partial trigger and keep their labels.
    Test: all patches at full opacity (:class:`AdaptivePatchTrigger`)."""
    return _adaptive("adaptive-patch", AdaptivePatchTrigger(**trigger_kwargs), data, rate, target,
                     mode, seed, test, cover_rate)
