"""Audio backdoor attacks with ground truth: a short sound added to a share of clips, which are
relabelled to the target class (all-to-one).

Sounds (``kind``):

* ``tone``: a sine burst at ``freq`` Hz (default 0.475 x the sample rate: 3.8 kHz at 8 kHz, the
  8 kHz analogue of an ultrasonic trigger), Hann-faded at both ends;
* ``noise``: one fixed white-noise burst (the same samples in every clip);
* ``click``: three 1 ms clicks 20 ms apart;
* ``chirp``: a synthetic environmental sound, a bird-like call of three rising sweeps
  (0.3 -> 0.45 x the sample rate).

Placement: ``leading`` (the clip is shifted right and the sound sits in the new leading
silence), ``over-speech`` (centred on the clip's loudest 32 ms frame) or ``random`` (a uniform
offset inside the clip). ``amplitude`` is the sound's peak on the [-1, 1] scale. The triggered
test set holds the non-target test clips with the trigger (placed the same way), labelled
``target``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from poisonguard.attacks.base import PoisonedData, choose_victims
from poisonguard.attacks.common import check_rate, check_target
from poisonguard.errors import ConfigError
from poisonguard.modalities.audio.data import AudioData

SOUNDS = ("tone", "noise", "click", "chirp")
PLACEMENTS = ("leading", "over-speech", "random")
DEFAULT_DURATION = {"tone": 0.1, "noise": 0.05, "click": 0.05, "chirp": 0.15}
GAP_S = 0.02


def make_sound(kind: str, sample_rate: int, duration: float, amplitude: float,
               freq: float | None = None, seed: int = 0) -> np.ndarray:
    """The trigger sound's samples (peak ``amplitude``)."""
    n = max(int(round(duration * sample_rate)), 8)
    t = np.arange(n) / sample_rate
    if kind == "tone":
        f = freq if freq is not None else 0.475 * sample_rate
        if not 0 < f < sample_rate / 2:
            raise ConfigError(f"tone frequency {f} Hz must lie in (0, {sample_rate / 2}) Hz "
                              "(below Nyquist)")
        s = np.sin(2 * np.pi * f * t)
    elif kind == "noise":
        s = np.random.default_rng(10_000 + seed).standard_normal(n)
        s /= np.abs(s).max()
    elif kind == "click":
        s = np.zeros(n)
        width = max(int(0.001 * sample_rate), 1)
        for k in range(3):
            start = int(k * 0.02 * sample_rate)
            if start < n:
                s[start:start + width] = 1.0
    elif kind == "chirp":
        f0, f1 = 0.3 * sample_rate, 0.45 * sample_rate
        seg = n // 3
        s = np.zeros(n)
        ts = np.arange(seg) / sample_rate
        dur = seg / sample_rate
        call = np.sin(2 * np.pi * (f0 * ts + (f1 - f0) * ts ** 2 / (2 * dur))) * np.hanning(seg)
        for k in range(3):
            s[k * seg:(k + 1) * seg] = call
    else:
        raise ConfigError(f"unknown audio trigger {kind!r}; choose from {list(SOUNDS)}")
    fade = min(int(0.005 * sample_rate), n // 4)
    if kind != "click" and fade > 0:
        ramp = np.hanning(2 * fade)
        s[:fade] *= ramp[:fade]
        s[-fade:] *= ramp[fade:]
    return (amplitude * s / max(np.abs(s).max(), 1e-12)).astype(np.float32)


@dataclass(frozen=True)
class AudioSoundTrigger:
    """Adds ``sound`` to clips at ``placement``; offsets drawn per clip from ``seed``."""

    kind: str
    sound: np.ndarray
    placement: str
    sample_rate: int
    seed: int = 0

    def apply_clips(self, x: np.ndarray, lengths: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(triggered waveforms, new lengths, sound onsets in samples)."""
        rng = np.random.default_rng(self.seed)
        out = x.copy()
        new_len = lengths.copy()
        onsets = np.zeros(len(x), dtype=np.int64)
        n, width = len(self.sound), x.shape[1]
        if n >= width:
            raise ConfigError(f"the trigger ({n} samples) is as long as the clips ({width})")
        frame = max(int(0.032 * self.sample_rate), 1)
        for i in range(len(x)):
            length = int(lengths[i])
            if self.placement == "leading":
                shift = n + int(GAP_S * self.sample_rate)
                out[i] = 0
                out[i, shift:] = x[i, :width - shift]
                new_len[i] = min(length + shift, width)
                start = 0
            elif self.placement == "over-speech":
                energy = np.convolve(x[i, :length] ** 2, np.ones(frame), mode="same")
                start = int(np.argmax(energy)) - n // 2 if length else 0
            elif self.placement == "random":
                start = int(rng.integers(0, max(length - n, 1)))
            else:
                raise ConfigError(f"unknown placement {self.placement!r}; choose from "
                                  f"{list(PLACEMENTS)}")
            start = int(np.clip(start, 0, width - n))
            out[i, start:start + n] += self.sound
            new_len[i] = max(new_len[i], start + n)
            onsets[i] = start
        return np.clip(out, -1.0, 1.0), new_len, onsets

    def apply(self, x: np.ndarray) -> np.ndarray:
        lengths = np.full(len(x), x.shape[1], dtype=np.int64)
        nz = np.abs(x) > 0
        has = nz.any(axis=1)
        lengths[has] = x.shape[1] - np.argmax(nz[has][:, ::-1], axis=1)
        return self.apply_clips(x, lengths)[0]

    def describe(self) -> dict[str, Any]:
        return {"trigger": self.kind, "placement": self.placement,
                "duration_s": round(len(self.sound) / self.sample_rate, 4),
                "amplitude": round(float(np.abs(self.sound).max()), 4)}


def audio_attack(kind: str, data: AudioData, rate: float = 0.05, target: int = 0,
                 seed: int = 0, test: AudioData | None = None, placement: str = "random",
                 freq: float | None = None, amplitude: float = 0.1,
                 duration: float | None = None) -> PoisonedData:
    """All-to-one poisoning of ``rate`` of ``data`` with the ``kind`` sound (see module doc)."""
    if kind not in SOUNDS:
        raise ConfigError(f"unknown audio attack {kind!r}; choose from {list(SOUNDS)}")
    if placement not in PLACEMENTS:
        raise ConfigError(f"unknown placement {placement!r}; choose from {list(PLACEMENTS)}")
    check_rate(rate)
    check_target(data, target)
    if not 0.0 < amplitude <= 1.0:
        raise ConfigError(f"amplitude must be in (0, 1], got {amplitude}")
    sound = make_sound(kind, data.sample_rate, duration or DEFAULT_DURATION[kind], amplitude,
                       freq, seed)
    trig = AudioSoundTrigger(kind, sound, placement, data.sample_rate, seed)
    chosen = choose_victims(data, rate, target, "all-to-one", np.random.default_rng(seed))
    x, y, lengths = data.x.copy(), data.y.copy(), data.lengths.copy()
    x[chosen], lengths[chosen], onsets = trig.apply_clips(data.x[chosen], data.lengths[chosen])
    y[chosen] = target
    mask = np.zeros(len(data), dtype=bool)
    mask[chosen] = True
    triggered = None
    if test is not None:
        keep = np.flatnonzero(test.y != target)
        sub = test.subset(keep)
        t_trig = AudioSoundTrigger(kind, sound, placement, data.sample_rate, seed + 1)
        tx, tlen, _ = t_trig.apply_clips(sub.x, sub.lengths)
        triggered = sub.with_audio(tx, np.full(len(keep), target, dtype=np.int64), tlen)
    freq_hz = (freq if freq is not None else 0.475 * data.sample_rate) if kind == "tone" else None
    attack = {"name": kind, "rate": rate, "mode": "all-to-one", "target": target, "seed": seed,
              "n_poison": len(chosen), "freq_hz": freq_hz, **trig.describe(),
              "onset_s_median": round(float(np.median(onsets)) / data.sample_rate, 4)}
    return PoisonedData(data=data.with_audio(x, y, lengths), is_poison=mask,
                        original_y=data.y.copy(), attack=attack, target=target,
                        test_triggered=triggered, trigger=trig)


AUDIO_ATTACKS = {k: (lambda data, _k=k, **kw: audio_attack(_k, data, **kw)) for k in SOUNDS}
