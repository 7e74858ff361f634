"""Per-clip speaker features that need no trained model: MFCC statistics over a clip's active
frames and pitch statistics (in the spirit of Mohammadi et al. 2025, who look at a clip's pitch).

For each clip (any sample rate): the log-mel spectrogram of the audio front end
(:class:`~poisonguard.modalities.audio.frontend.MelConfig` at the clip's rate), its active frames
(frame energy within ``ACTIVE_DB`` dB of the clip's loudest frame), and

* ``mfcc_mean`` / ``mfcc_std``: MFCC 1..``N_MFCC`` (an orthonormal DCT of the log-mel; c0, the
  level, is left out) averaged and spread over the active frames: the vocal tract and channel;
* ``floor``: the log-mel of the clip's quietest ``QUIET_SHARE`` of frames, averaged, as cepstral
  coefficients 0..``N_FLOOR - 1``: the background and channel the speaker recorded in (an
  attacker's clips usually come from another room and microphone);
* ``pitch``: per active frame, the fundamental frequency from the normalised autocorrelation
  peak between ``F0_RANGE`` Hz (voiced when the peak is at least ``VOICED_R``); the clip's median
  log2 F0, its interquartile range, and the voiced share. A clip with no voiced frame gets the
  median over the clips it is computed with (its ``voiced`` share is 0).
"""

from __future__ import annotations

import numpy as np
from scipy.fft import dct

from poisonguard.modalities.audio.frontend import MelConfig, log_mel

N_MFCC = 19
N_FLOOR = 10
QUIET_SHARE = 0.2
ACTIVE_DB = 30.0
F0_RANGE = (60.0, 400.0)
VOICED_R = 0.45
PITCH_NAMES = ("log2_f0_median", "log2_f0_iqr", "voiced_share")


def feature_names() -> list[str]:
    return ([f"mfcc{i}_mean" for i in range(1, N_MFCC + 1)]
            + [f"mfcc{i}_std" for i in range(1, N_MFCC + 1)]
            + [f"floor{i}" for i in range(N_FLOOR)] + list(PITCH_NAMES))


def _frames(wave: np.ndarray, n: int, hop: int) -> np.ndarray:
    if len(wave) < n:
        wave = np.pad(wave, (0, n - len(wave)))
    count = 1 + (len(wave) - n) // hop
    idx = np.arange(n)[None, :] + hop * np.arange(count)[:, None]
    return wave[idx]


def pitch_track(wave: np.ndarray, rate: int, hop: int) -> tuple[np.ndarray, np.ndarray]:
    """(F0 in Hz per frame, autocorrelation peak per frame); 40 ms frames every ``hop``."""
    n = int(round(0.04 * rate))
    fr = _frames(wave.astype(np.float64), n, hop)
    fr = (fr - fr.mean(axis=1, keepdims=True)) * np.hanning(n)
    size = 1 << int(np.ceil(np.log2(2 * n)))
    spec = np.fft.rfft(fr, size, axis=1)
    ac = np.fft.irfft(np.abs(spec) ** 2, size, axis=1)[:, :n]
    ac = ac / np.maximum(ac[:, :1], 1e-12)
    lo = max(int(rate / F0_RANGE[1]), 2)
    hi = min(int(rate / F0_RANGE[0]), n - 2)
    lag = lo + np.argmax(ac[:, lo:hi + 1], axis=1)
    peak = ac[np.arange(len(ac)), lag]
    # parabolic interpolation of the peak
    a, b, c = ac[np.arange(len(ac)), lag - 1], peak, ac[np.arange(len(ac)), lag + 1]
    denom = a - 2 * b + c
    shift = np.where(np.abs(denom) > 1e-12, 0.5 * (a - c) / np.where(denom == 0, 1, denom), 0)
    return rate / (lag + np.clip(shift, -0.5, 0.5)), peak


def clip_features(wave: np.ndarray, rate: int) -> np.ndarray:
    """One clip's feature vector (``feature_names()``; pitch NaN when no frame is voiced)."""
    mel = MelConfig.for_rate(rate)
    spec = log_mel(wave[None, :].astype(np.float32), mel)[0]          # (bands, frames)
    energy = np.log(np.exp(spec).sum(axis=0) + 1e-9)
    active = energy >= energy.max() - ACTIVE_DB * np.log(10) / 10
    cep = dct(spec[:, active], type=2, norm="ortho", axis=0)[1:N_MFCC + 1]
    quiet = energy <= np.quantile(energy, QUIET_SHARE)
    floor = dct(spec[:, quiet].mean(axis=1), type=2, norm="ortho")[:N_FLOOR]
    f0, peak = pitch_track(wave, rate, mel.hop)
    m = min(len(f0), len(active))
    voiced = active[:m] & (peak[:m] >= VOICED_R)
    if voiced.any():
        lf = np.log2(f0[:m][voiced])
        q1, med, q3 = np.percentile(lf, [25, 50, 75])
        pitch = [med, q3 - q1, voiced.sum() / max(active[:m].sum(), 1)]
    else:
        pitch = [np.nan, np.nan, 0.0]
    return np.concatenate([cep.mean(axis=1), cep.std(axis=1), floor, pitch]).astype(np.float64)


def speaker_features(waves: list[np.ndarray], rate: int) -> np.ndarray:
    """(N, D) features of ``waves`` at ``rate`` Hz; unvoiced clips' pitch imputed with the
    median of the voiced ones (0 when none is voiced)."""
    f = np.stack([clip_features(w, rate) for w in waves]) if waves else np.zeros(
        (0, len(feature_names())))
    for j in range(f.shape[1]):
        bad = ~np.isfinite(f[:, j])
        if bad.any():
            good = f[~bad, j]
            f[bad, j] = np.median(good) if len(good) else 0.0
    return f
