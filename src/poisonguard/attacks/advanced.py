"""More trigger attacks: WaNet warping, SIG sinusoid (clean-label), Trojan watermark, low-frequency
smooth trigger and BadNets with a random-colour patch at a random position.

Each is a trigger object (``apply``/``describe``, like :class:`BadNetsTrigger`) plus an attack
function with the ``make_attack`` signature. Images only (NHW or NHWC, uint8 or float in [0, 1]).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from poisonguard.attacks.base import PoisonedData, attacker_labels, choose_victims, poison_dataset
from poisonguard.attacks.common import (
    assemble,
    check_all_to_one,
    check_rate,
    check_target,
    clean_label_victims,
    need_images,
    pick_others,
    triggered_test,
)
from poisonguard.attacks.generators import _cast_like, _max_value
from poisonguard.data.labeled import LabeledData
from poisonguard.errors import ConfigError


def _nchw(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
    return t[:, None] if x.ndim == 3 else t.permute(0, 3, 1, 2)


def _from_nchw(t: torch.Tensor, like: np.ndarray) -> np.ndarray:
    arr = t[:, 0] if like.ndim == 3 else t.permute(0, 2, 3, 1)
    return _cast_like(arr.numpy(), like)


# --------------------------------------------------------------------------------------- WaNet
@dataclass(frozen=True)
class WarpTrigger:
    """WaNet's fixed warping field (Nguyen & Tran, "WaNet - Imperceptible Warping-based Backdoor
    Attack", ICLR 2021, Sec. 3.2): a ``k x k`` grid of uniform(-1, 1) 2-D offsets, normalised by
    its mean absolute value, upsampled bicubically to H x W; the sampling grid is the identity
    plus ``s * field / H`` (``/ W`` for the x offsets) in [-1, 1] coordinates, clamped to [-1, 1],
    and images are resampled with bilinear ``grid_sample``. Paper defaults: k=4, s=0.5."""

    k: int = 4
    s: float = 0.5
    grid_seed: int = 12345

    def __post_init__(self) -> None:
        if int(self.k) != self.k or self.k < 2:
            raise ConfigError(f"WaNet grid size k must be an integer >= 2, got {self.k}")
        if not self.s > 0:
            raise ConfigError(f"WaNet warping strength s must be > 0, got {self.s}")

    def grid(self, h: int, w: int) -> torch.Tensor:
        """The (1, H, W, 2) sampling grid (x, y order, as grid_sample takes it)."""
        rng = np.random.default_rng(self.grid_seed)
        ins = torch.from_numpy(rng.uniform(-1.0, 1.0, (1, 2, self.k, self.k)))
        ins = ins / ins.abs().mean()
        field = F.interpolate(ins, size=(h, w), mode="bicubic", align_corners=True)
        field = field.permute(0, 2, 3, 1)  # (1, H, W, 2)
        ys, xs = torch.linspace(-1, 1, h, dtype=torch.float64), torch.linspace(
            -1, 1, w, dtype=torch.float64)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        identity = torch.stack((gx, gy), dim=-1)[None]
        scale = torch.tensor([w, h], dtype=torch.float64)
        return torch.clamp(identity + self.s * field / scale, -1, 1)

    def warp(self, x: np.ndarray, grids: torch.Tensor) -> np.ndarray:
        if len(x) == 0:
            return x.copy()
        out = F.grid_sample(_nchw(x), grids.expand(len(x), -1, -1, -1), mode="bilinear",
                            padding_mode="border", align_corners=True)
        return _from_nchw(out, x)

    def apply(self, x: np.ndarray) -> np.ndarray:
        h, w = need_images("wanet", x)
        return self.warp(x, self.grid(h, w))

    def apply_noisy(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """WaNet's "noise mode": the field plus a per-sample uniform(-1, 1) / H grid jitter."""
        h, w = need_images("wanet", x)
        jitter = torch.from_numpy(rng.uniform(-1.0, 1.0, (len(x), h, w, 2)))
        scale = torch.tensor([w, h], dtype=torch.float64)
        grids = torch.clamp(self.grid(h, w) + jitter / scale, -1, 1)
        return self.warp(x, grids)

    def describe(self) -> dict[str, Any]:
        return {"trigger": "wanet", "k": self.k, "s": self.s, "grid_seed": self.grid_seed}


def wanet(data: LabeledData, rate: float = 0.1, target: int | None = 0,
          mode: str = "all-to-one", seed: int = 0, test: LabeledData | None = None,
          k: int = 4, s: float = 0.5, grid_seed: int = 12345,
          cross_ratio: float = 2.0) -> PoisonedData:
    """WaNet (Nguyen & Tran, ICLR 2021): ``rate`` of the samples (paper: 0.1) are warped with the
    fixed field (:class:`WarpTrigger`, k=4, s=0.5) and relabelled (all-to-one: ``target``;
    all-to-all: y + 1). ``cross_ratio`` (paper: 2) times as many other samples are warped in
    noise mode (field plus random per-sample jitter) and KEEP their labels, so the model learns
    the exact field rather than any warp; they are in ``is_cover`` (not ``is_poison``) and counted
    in ``attack["n_cross"]``."""
    trigger = WarpTrigger(k=k, s=s, grid_seed=grid_seed)
    if not cross_ratio >= 0:
        raise ConfigError(f"cross_ratio must be >= 0, got {cross_ratio}")
    need_images("wanet", data.x)
    rng = np.random.default_rng(seed)
    poisons = choose_victims(data, rate, target, mode, rng)
    cross = pick_others(len(data), poisons, int(round(cross_ratio * len(poisons))), rng,
                        "WaNet noise-mode samples (cross_ratio x poisons)")
    x, y = data.x.copy(), data.y.copy()
    x[poisons] = trigger.apply(data.x[poisons])
    y[poisons] = attacker_labels(data.y[poisons], mode, target, data.n_classes)
    x[cross] = trigger.apply_noisy(data.x[cross], rng)
    attack = {"name": "wanet", "rate": rate, "mode": mode, "target": target, "seed": seed,
              "n_poison": int(len(poisons)), "n_cross": int(len(cross)),
              "cross_ratio": cross_ratio, **trigger.describe()}
    return assemble(data, x, y, poisons, attack, target,
                    triggered_test(test, trigger.apply, target, mode, data.n_classes), trigger,
                    covers=cross)


# ----------------------------------------------------------------------------------------- SIG
@dataclass(frozen=True)
class SigTrigger:
    """SIG's horizontal sinusoid (Barni, Kallas & Tondi, "A new backdoor attack in CNNs by
    training set corruption without label poisoning", ICIP 2019, Eq. 2):
    ``v(i, j) = delta * sin(2 pi j f / W)`` added to every channel and clipped; ``delta`` is on a
    0-255 scale (scaled for float data). Paper defaults: delta=20, f=6."""

    delta: float = 20.0
    freq: float = 6.0

    def __post_init__(self) -> None:
        if not 0 < self.delta <= 255:
            raise ConfigError(f"SIG amplitude delta must be in (0, 255], got {self.delta}")
        if not self.freq > 0:
            raise ConfigError(f"SIG frequency f must be > 0, got {self.freq}")

    def signal(self, w: int, top: float) -> np.ndarray:
        j = np.arange(w, dtype=np.float64)
        return self.delta * top / 255.0 * np.sin(2 * np.pi * j * self.freq / w)

    def apply(self, x: np.ndarray) -> np.ndarray:
        _, w = need_images("sig", x)
        top = _max_value(x)
        v = self.signal(w, top)
        v = v[None, None, :] if x.ndim == 3 else v[None, None, :, None]
        return _cast_like(np.clip(x.astype(np.float64) + v, 0, top), x)

    def describe(self) -> dict[str, Any]:
        return {"trigger": "sig", "delta": self.delta, "freq": self.freq}


def sig(data: LabeledData, rate: float = 0.8, target: int | None = 0, mode: str = "all-to-one",
        seed: int = 0, test: LabeledData | None = None, delta: float = 20.0,
        freq: float = 6.0) -> PoisonedData:
    """SIG (Barni et al., ICIP 2019), clean-label: the sinusoid (:class:`SigTrigger`, delta=20,
    f=6) is added to ``rate`` of the TARGET class only (default 0.8, as the common benchmark
    setting; the paper reports 20-30 % of the class on MNIST/GTSRB); labels are unchanged. The
    triggered test set is the non-target test images with the signal, labelled ``target``."""
    trigger = SigTrigger(delta=delta, freq=freq)
    check_all_to_one("sig", mode)
    check_rate(rate, "sig rate (fraction of the target class)")
    check_target(data, target)
    need_images("sig", data.x)
    poisons = clean_label_victims(data, rate, int(target), np.random.default_rng(seed))
    x = data.x.copy()
    x[poisons] = trigger.apply(data.x[poisons])
    attack = {"name": "sig", "rate": rate, "mode": mode, "target": target, "seed": seed,
              "clean_label": True, "n_poison": int(len(poisons)), **trigger.describe()}
    return assemble(data, x, data.y.copy(), poisons, attack, target,
                    triggered_test(test, trigger.apply, target, mode, data.n_classes), trigger)


# ------------------------------------------------------------------------------------ Trojan WM
@dataclass(frozen=True)
class WatermarkTrigger:
    """A Trojan-style watermark (the fixed logo/watermark trigger of Liu et al., "Trojaning
    Attack on Neural Networks", NDSS 2018, as used in benchmark suites): a seeded random binary
    ``size x size`` shape (about half the pixels on) in one random colour, alpha-blended at
    ``alpha`` into the ``position`` corner, ``margin`` pixels from the border. Defaults: 8x8
    shape, alpha 1.0 (pasted), bottom-right."""

    size: int = 8
    alpha: float = 1.0
    position: str = "bottom-right"
    margin: int = 1
    pattern_seed: int = 2018

    def __post_init__(self) -> None:
        if self.size < 2:
            raise ConfigError(f"watermark size must be >= 2, got {self.size}")
        if not 0 < self.alpha <= 1:
            raise ConfigError(f"watermark alpha must be in (0, 1], got {self.alpha}")
        if self.position not in ("bottom-right", "bottom-left", "top-right", "top-left"):
            raise ConfigError(f"watermark position must be a corner, got {self.position!r}")

    def shape_and_colour(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.pattern_seed)
        shape = rng.random((self.size, self.size)) < 0.5
        shape[self.size // 2, :] = True  # a connected bar so no draw is nearly empty
        colour = rng.uniform(0.5, 1.0, 4)
        return shape, colour

    def region(self, h: int, w: int) -> tuple[int, int]:
        s, m = self.size, self.margin
        if s + m > h or s + m > w:
            raise ConfigError(f"a {s}x{s} watermark does not fit {h}x{w} images")
        vert, horiz = self.position.split("-")
        return (m if vert == "top" else h - s - m), (m if horiz == "left" else w - s - m)

    def apply(self, x: np.ndarray) -> np.ndarray:
        h, w = need_images("trojan", x)
        r, c = self.region(h, w)
        s = self.size
        shape, colour = self.shape_and_colour()
        top = _max_value(x)
        out = x.copy()
        a = self.alpha * shape.astype(np.float64)
        patch = x[:, r:r + s, c:c + s].astype(np.float64)
        if x.ndim == 3:
            mark = colour[0] * top
            out[:, r:r + s, c:c + s] = _cast_like((1 - a) * patch + a * mark, x)
        else:
            mark = colour[:x.shape[3]] * top
            a = a[:, :, None]
            out[:, r:r + s, c:c + s] = _cast_like((1 - a) * patch + a * mark, x)
        # keep untouched pixels bit-identical (no float round trip)
        region = out[:, r:r + s, c:c + s]
        region[:, ~shape] = x[:, r:r + s, c:c + s][:, ~shape]
        return out

    def describe(self) -> dict[str, Any]:
        return {"trigger": "trojan-watermark", "size": self.size, "alpha": self.alpha,
                "position": self.position, "margin": self.margin,
                "pattern_seed": self.pattern_seed}


def trojan(data: LabeledData, rate: float = 0.1, target: int | None = 0,
           mode: str = "all-to-one", seed: int = 0, test: LabeledData | None = None,
           **trigger_kwargs: Any) -> PoisonedData:
    """Trojan watermark attack, dirty-label (the fixed-watermark form of Liu et al., NDSS 2018,
    without their neuron-targeted trigger optimisation): :class:`WatermarkTrigger` (8x8 seeded
    shape, alpha 1.0) on ``rate`` (default 0.1) of the samples, relabelled."""
    trigger = WatermarkTrigger(**trigger_kwargs)
    need_images("trojan", data.x)
    return poison_dataset(data, trigger, rate, target, mode, seed, test, name="trojan")


# -------------------------------------------------------------------------------- low-frequency
@dataclass(frozen=True)
class LowFrequencyTrigger:
    """A smooth additive trigger in the spirit of Zeng et al., "Rethinking the Backdoor Attacks'
    Triggers: A Frequency Perspective", ICCV 2021 (Sec. 5, smooth triggers): seeded Gaussian
    noise per channel is low-pass filtered by keeping only the 2-D DFT frequencies with
    ``|u|, |v| <= cutoff`` (a square window around DC), scaled so its largest magnitude is
    ``eps`` of the pixel range, added and clipped. The paper optimises the trigger inside such a
    low-pass constraint; here it is random (no optimisation). Defaults: cutoff 2, eps 0.1."""

    eps: float = 0.1
    cutoff: int = 2
    pattern_seed: int = 2021

    def __post_init__(self) -> None:
        if not 0 < self.eps <= 1:
            raise ConfigError(f"low-frequency amplitude eps must be in (0, 1], got {self.eps}")
        if int(self.cutoff) != self.cutoff or self.cutoff < 1:
            raise ConfigError(f"low-frequency cutoff must be an integer >= 1, got {self.cutoff}")

    def pattern(self, sample_shape: tuple[int, ...], top: float) -> np.ndarray:
        h, w = sample_shape[0], sample_shape[1]
        c = sample_shape[2] if len(sample_shape) == 3 else 1
        noise = np.random.default_rng(self.pattern_seed).normal(0, 1, (c, h, w))
        spec = np.fft.fft2(noise)
        fu = np.abs(np.fft.fftfreq(h) * h)[:, None]
        fv = np.abs(np.fft.fftfreq(w) * w)[None, :]
        spec[:, (fu > self.cutoff) | (fv > self.cutoff)] = 0
        spec[:, 0, 0] = 0  # no constant shift
        smooth = np.real(np.fft.ifft2(spec))
        smooth *= self.eps * top / max(np.abs(smooth).max(), 1e-12)
        smooth = np.moveaxis(smooth, 0, -1)
        return smooth if len(sample_shape) == 3 else smooth[:, :, 0]

    def apply(self, x: np.ndarray) -> np.ndarray:
        need_images("low-frequency", x)
        top = _max_value(x)
        p = self.pattern(x.shape[1:], top)
        return _cast_like(np.clip(x.astype(np.float64) + p, 0, top), x)

    def describe(self) -> dict[str, Any]:
        return {"trigger": "low-frequency", "eps": self.eps, "cutoff": self.cutoff,
                "pattern_seed": self.pattern_seed}


def low_frequency(data: LabeledData, rate: float = 0.1, target: int | None = 0,
                  mode: str = "all-to-one", seed: int = 0, test: LabeledData | None = None,
                  **trigger_kwargs: Any) -> PoisonedData:
    """Low-frequency (smooth) trigger attack after Zeng et al. (ICCV 2021), dirty-label:
    :class:`LowFrequencyTrigger` (eps 0.1, cutoff 2) on ``rate`` of the samples, relabelled."""
    trigger = LowFrequencyTrigger(**trigger_kwargs)
    need_images("low-frequency", data.x)
    return poison_dataset(data, trigger, rate, target, mode, seed, test, name="low-frequency")


# ------------------------------------------------------------------------------ BadNets random
@dataclass(frozen=True)
class RandomPatchTrigger:
    """A BadNets patch (Gu et al. 2017) with a seeded random colour per pixel (and channel) at a
    seeded random position fully inside the image and away from the corners (at least 2 pixels
    from every border). Default 3x3."""

    size: int = 3
    pattern_seed: int = 1717

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigError(f"patch size must be >= 1, got {self.size}")

    def layout(self, h: int, w: int, channels: int) -> tuple[int, int, np.ndarray]:
        s = self.size
        if h < s + 4 or w < s + 4:
            raise ConfigError(f"a {s}x{s} random patch needs images of at least {s + 4}x{s + 4}"
                              f", got {h}x{w}")
        rng = np.random.default_rng(self.pattern_seed)
        r = int(rng.integers(2, h - s - 1))  # position first: independent of the channels
        c = int(rng.integers(2, w - s - 1))
        colours = rng.random((s, s, channels))
        return r, c, colours

    def apply(self, x: np.ndarray) -> np.ndarray:
        h, w = need_images("badnets-random", x)
        ch = 1 if x.ndim == 3 else x.shape[3]
        r, c, colours = self.layout(h, w, ch)
        s = self.size
        out = x.copy()
        vals = _cast_like(colours * _max_value(x), x)
        out[:, r:r + s, c:c + s] = vals[:, :, 0] if x.ndim == 3 else vals
        return out

    def describe(self) -> dict[str, Any]:
        return {"trigger": "badnets-random", "size": self.size, "pattern_seed": self.pattern_seed}


def badnets_random(data: LabeledData, rate: float = 0.1, target: int | None = 0,
                   mode: str = "all-to-one", seed: int = 0, test: LabeledData | None = None,
                   **trigger_kwargs: Any) -> PoisonedData:
    """BadNets (Gu et al. 2017) with :class:`RandomPatchTrigger`: a random-colour 3x3 patch at a
    random (seeded) inner position; poisoned samples relabelled (all-to-one or all-to-all)."""
    trigger = RandomPatchTrigger(**trigger_kwargs)
    h, w = need_images("badnets-random", data.x)
    r, c, _ = trigger.layout(h, w, 1)
    p = poison_dataset(data, trigger, rate, target, mode, seed, test, name="badnets-random")
    p.attack["patch_origin"] = [r, c]
    return p
