"""The built-in tabular classifier: numeric columns standardised with the data's mean and
standard deviation (clipped to +-5), each categorical column through its own embedding
(min(8, K) dimensions), two hidden layers and a 64-d ``embed`` layer (the representation the
detectors read), then a linear head. It takes the encoded (N, F) float32 rows (categoricals as
codes) as the loader gives them, so attacks, the rule miner and the runtime filter all work on
rows in the data's own columns."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

ARCH = "tabular-mlp"
CLIP = 5.0


class TabularMLP(nn.Module):
    """(B, F) float rows -> logits (B, n_classes); ``cardinalities[j]`` > 0 marks column j
    categorical with that many codes (out-of-range codes are clamped)."""

    def __init__(self, cardinalities: list[int], n_classes: int, hidden: int = 128,
                 embed_dim: int = 64) -> None:
        super().__init__()
        self.cardinalities = list(cardinalities)
        num = [j for j, k in enumerate(cardinalities) if k == 0]
        cat = [j for j, k in enumerate(cardinalities) if k > 0]
        self.register_buffer("num_idx", torch.tensor(num, dtype=torch.long))
        self.register_buffer("cat_idx", torch.tensor(cat, dtype=torch.long))
        self.register_buffer("mean", torch.zeros(len(num)))
        self.register_buffer("std", torch.ones(len(num)))
        self.embeddings = nn.ModuleList(nn.Embedding(cardinalities[j], min(8, cardinalities[j]))
                                        for j in cat)
        width = len(num) + sum(min(8, cardinalities[j]) for j in cat)
        self.body = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(),
                                  nn.Linear(hidden, hidden), nn.ReLU())
        self.embed = nn.Sequential(nn.Linear(hidden, embed_dim), nn.ReLU())
        self.head = nn.Linear(embed_dim, n_classes)

    def fit_normalization(self, x: np.ndarray) -> None:
        """Mean and standard deviation of the numeric columns of ``x``."""
        num = self.num_idx.numpy()
        if len(num):
            v = x[:, num].astype(np.float64)
            self.mean.copy_(torch.from_numpy(v.mean(0)).float())
            self.std.copy_(torch.from_numpy(v.std(0) + 1e-6).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = []
        if len(self.num_idx):
            parts.append(((x[:, self.num_idx] - self.mean) / self.std).clamp(-CLIP, CLIP))
        for e, j in zip(self.embeddings, self.cat_idx.tolist()):
            codes = x[:, j].round().long().clamp(0, e.num_embeddings - 1)
            parts.append(e(codes))
        return self.head(self.embed(self.body(torch.cat(parts, dim=1))))
