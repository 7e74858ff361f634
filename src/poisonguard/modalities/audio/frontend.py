"""A log-mel front end written with ``torch.stft`` (no torchaudio): a Hann-window STFT, a
triangular mel filterbank (HTK mel scale) up to Nyquist, and ``log(mel + 1e-6)``. The same
module runs inside the built-in model and, in numpy, for the trigger miner."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


def hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m: np.ndarray | float) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


@dataclass(frozen=True)
class MelConfig:
    """STFT and filterbank settings; ``n_fft`` and ``hop`` in samples (at 8 kHz: 32 ms
    windows every 8 ms)."""

    sample_rate: int = 8000
    n_fft: int = 256
    hop: int = 64
    n_mels: int = 40
    f_min: float = 0.0

    @classmethod
    def for_rate(cls, sample_rate: int) -> MelConfig:
        """Window and hop scaled with the rate (32 ms / 8 ms)."""
        n_fft = int(2 ** round(np.log2(0.032 * sample_rate)))
        return cls(sample_rate=sample_rate, n_fft=n_fft, hop=n_fft // 4)

    def band_edges_hz(self) -> np.ndarray:
        """(n_mels + 2,) mel-spaced edges in Hz: band b spans edges[b]..edges[b + 2]."""
        m = np.linspace(hz_to_mel(self.f_min), hz_to_mel(self.sample_rate / 2), self.n_mels + 2)
        return mel_to_hz(m)

    def filterbank(self) -> np.ndarray:
        """(n_mels, n_fft // 2 + 1) triangular filters."""
        freqs = np.linspace(0, self.sample_rate / 2, self.n_fft // 2 + 1)
        edges = self.band_edges_hz()
        fb = np.zeros((self.n_mels, len(freqs)))
        for b in range(self.n_mels):
            lo, mid, hi = edges[b], edges[b + 1], edges[b + 2]
            up = (freqs - lo) / max(mid - lo, 1e-9)
            down = (hi - freqs) / max(hi - mid, 1e-9)
            fb[b] = np.clip(np.minimum(up, down), 0, None)
        return fb

    def frame_times(self, n_frames: int) -> np.ndarray:
        return np.arange(n_frames) * self.hop / self.sample_rate


class LogMel(nn.Module):
    """(B, T) waveforms -> (B, n_mels, frames) log-mel energies."""

    def __init__(self, config: MelConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("window", torch.hann_window(config.n_fft), persistent=False)
        self.register_buffer("fb", torch.from_numpy(config.filterbank()).float(),
                             persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(wave, self.config.n_fft, self.config.hop, window=self.window,
                          center=True, return_complex=True)
        power = spec.real ** 2 + spec.imag ** 2
        return torch.log(torch.matmul(self.fb, power) + 1e-6)


def log_mel(x: np.ndarray, config: MelConfig, batch: int = 512) -> np.ndarray:
    """(N, T) waveforms -> (N, n_mels, frames) float32 log-mel, batched."""
    front = LogMel(config)
    out = []
    with torch.no_grad():
        for s in range(0, len(x), batch):
            out.append(front(torch.from_numpy(np.ascontiguousarray(x[s:s + batch],
                                                                   dtype=np.float32))).numpy())
    return np.concatenate(out) if out else np.zeros((0, config.n_mels, 0), np.float32)


def band_stop(x: np.ndarray, config: MelConfig, hz: tuple[float, float],
              frames: np.ndarray | None = None) -> np.ndarray:
    """Waveforms with the STFT bins in ``hz`` zeroed (over ``frames`` (N, n_frames) bool, or
    the whole clip), resynthesised with ``torch.istft``; same shape out."""
    n_fft, hop = config.n_fft, config.hop
    window = torch.hann_window(n_fft)
    wave = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    spec = torch.stft(wave, n_fft, hop, window=window, center=True, return_complex=True)
    freqs = torch.linspace(0, config.sample_rate / 2, n_fft // 2 + 1)
    in_band = (freqs >= hz[0]) & (freqs <= hz[1])
    mask = in_band[None, :, None].expand(spec.shape[0], -1, spec.shape[2])
    if frames is not None:
        mask = mask & torch.from_numpy(frames[:, None, :spec.shape[2]])
    spec = spec.masked_fill(mask, 0)
    out = torch.istft(spec, n_fft, hop, window=window, center=True, length=x.shape[1])
    return out.numpy().astype(np.float32)
