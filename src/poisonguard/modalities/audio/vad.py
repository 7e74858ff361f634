"""Voice-activity detection: cut clips to their speech before training or screening, which
removes sounds in the silence around it (Bartolini, Stoyanov and Giaretta 2024 found a VAD
filter removes many sound triggers from speech models) and cannot remove those over speech.

Backend: the WebRTC VAD (``webrtcvad-wheels``, MIT; the detector itself is Google's BSD-licensed
WebRTC code compiled into the wheel, no model download) on 30 ms frames, at ``aggressiveness``
0-3; clips at a rate it does not take (8/16/32/48 kHz) are resampled to 16 kHz for the decision.
Where the package is not installed, :func:`energy_speech_mask` (frames within ``ENERGY_DB`` dB
of the loudest, a plain energy gate, not a speech model) is the fallback, named
``"energy"`` in :func:`backend`.

A clip is cut to its speech frames (each widened by ``PAD_MS`` on both sides, so word edges
stay); a clip where no frame is speech is kept whole.
"""

from __future__ import annotations

import numpy as np

from poisonguard.modalities.audio.data import AudioData, resample

FRAME_MS = 30
PAD_MS = 60
ENERGY_DB = 35.0
WEBRTC_RATES = (8000, 16000, 32000, 48000)


def backend() -> str:
    """"webrtc" when ``webrtcvad`` imports, else "energy"."""
    try:
        import webrtcvad  # noqa: F401
    except ImportError:
        return "energy"
    return "webrtc"


def energy_speech_mask(wave: np.ndarray, rate: int) -> np.ndarray:
    """(frames,) bool: 30 ms frames within ``ENERGY_DB`` dB of the clip's loudest (fallback)."""
    n = int(rate * FRAME_MS / 1000)
    k = len(wave) // n
    if k == 0:
        return np.zeros(0, dtype=bool)
    e = 10 * np.log10((wave[:k * n].reshape(k, n).astype(np.float64) ** 2).mean(1) + 1e-12)
    return e >= e.max() - ENERGY_DB


def webrtc_speech_mask(wave: np.ndarray, rate: int, aggressiveness: int = 2) -> np.ndarray:
    """(frames,) bool: the WebRTC VAD's decision per 30 ms frame (frames at ``rate``)."""
    import webrtcvad

    vad = webrtcvad.Vad(int(aggressiveness))
    r = rate if rate in WEBRTC_RATES else 16000
    w = wave if r == rate else resample(wave, rate, r)
    pcm = (np.clip(w, -1.0, 32767 / 32768) * 32768).astype("<i2")
    n = int(r * FRAME_MS / 1000)
    k = len(pcm) // n
    return np.array([vad.is_speech(pcm[i * n:(i + 1) * n].tobytes(), r) for i in range(k)],
                    dtype=bool)


def speech_mask(wave: np.ndarray, rate: int, aggressiveness: int = 2) -> np.ndarray:
    """(len(wave),) bool: the samples in speech frames, widened by ``PAD_MS``."""
    frames = (webrtc_speech_mask(wave, rate, aggressiveness) if backend() == "webrtc"
              else energy_speech_mask(wave, rate))
    n = int(rate * FRAME_MS / 1000)
    mask = np.zeros(len(wave), dtype=bool)
    pad = int(rate * PAD_MS / 1000)
    for i in np.flatnonzero(frames):
        mask[max(i * n - pad, 0):(i + 1) * n + pad] = True
    return mask


def trim_to_speech(wave: np.ndarray, rate: int, aggressiveness: int = 2) -> np.ndarray:
    """The clip's speech samples, joined (the clip itself where none is speech)."""
    mask = speech_mask(np.asarray(wave, dtype=np.float32), rate, aggressiveness)
    return wave[mask] if mask.any() else wave


def trim_dataset(data: AudioData, aggressiveness: int = 2) -> AudioData:
    """``data`` with every clip cut to its speech (left-aligned, zero-padded to the same
    width); lengths updated."""
    x = np.zeros_like(data.x)
    lengths = np.zeros(len(data), dtype=np.int64)
    for i in range(len(data)):
        w = trim_to_speech(data.x[i, :data.lengths[i]], data.sample_rate, aggressiveness)
        lengths[i] = len(w)
        x[i, :len(w)] = w
    return data.with_audio(x, lengths=lengths)
