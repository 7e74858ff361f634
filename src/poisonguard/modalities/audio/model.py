"""The built-in audio classifier: the log-mel front end, a per-band input normalisation fit on
the data, three conv blocks (3x3, batch norm, ReLU, 2x2 max-pool), mean- and max-pooled over
time and frequency, a 64-d ``embed`` layer (what the detectors read) and a linear head. It takes
raw (B, T) waveforms, so attacks, the miner and STRIP work on waveforms. Max-pooling lets a
short burst dominate a feature, as the token model's max-pool does for a trigger word."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from poisonguard.modalities.audio.frontend import LogMel, MelConfig, log_mel

ARCH = "audio-cnn"


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out),
                         nn.ReLU(), nn.MaxPool2d(2))


class AudioCNN(nn.Module):
    """(B, T) float waveforms -> logits (B, n_classes)."""

    def __init__(self, n_classes: int, sample_rate: int = 8000, width: int = 16,
                 embed_dim: int = 64) -> None:
        super().__init__()
        self.mel_config = MelConfig.for_rate(sample_rate)
        self.front = LogMel(self.mel_config)
        n = self.mel_config.n_mels
        self.register_buffer("mean", torch.zeros(1, 1, n, 1))
        self.register_buffer("std", torch.ones(1, 1, n, 1))
        self.features = nn.Sequential(_block(1, width), _block(width, 2 * width),
                                      _block(2 * width, 4 * width))
        self.embed = nn.Sequential(nn.Linear(8 * width, embed_dim), nn.ReLU())
        self.head = nn.Linear(embed_dim, n_classes)

    def fit_normalization(self, x: np.ndarray) -> None:
        """Per-band mean/std of the log-mel of ``x`` (a sample of the training clips)."""
        s = log_mel(x, self.mel_config)
        self.mean.copy_(torch.from_numpy(s.mean(axis=(0, 2))).view(1, 1, -1, 1))
        self.std.copy_(torch.from_numpy(s.std(axis=(0, 2)) + 1e-3).view(1, 1, -1, 1))

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        s = (self.front(wave).unsqueeze(1) - self.mean) / self.std
        h = self.features(s)
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return self.head(self.embed(pooled))
