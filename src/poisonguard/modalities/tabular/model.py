"""The built-in tabular classifier: standardised numbers plus, for each numeric column, an
embedding of its quantile bin (so that a narrow range, a day window, is one learnable unit),
an embedding per categorical column, a two-layer MLP whose 64-d ``embed`` layer is the
representation the detectors read, and a linear head. Standardisation and bin edges are fit on
the data and kept as buffers, so the model takes the encoded features as they are."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

ARCH = "tabular-mlp"
MAX_BINS = 32


def _emb_dim(card: int) -> int:
    return int(min(8, max(2, round(1.6 * card ** 0.4))))


class TabularMLP(nn.Module):
    """x (B, d) float32: numbers as read, categorical codes -> logits (B, n_classes)."""

    def __init__(self, categorical: list[bool], cardinalities: list[int], n_classes: int,
                 hidden: int = 128, embed_dim: int = 64) -> None:
        super().__init__()
        self.cat_idx = [j for j, c in enumerate(categorical) if c]
        self.num_idx = [j for j, c in enumerate(categorical) if not c]
        nn_ = len(self.num_idx)
        self.register_buffer("mean", torch.zeros(nn_))
        self.register_buffer("std", torch.ones(nn_))
        self.register_buffer("edges", torch.full((nn_, MAX_BINS - 1), float("inf")))
        self.cats = nn.ModuleList(nn.Embedding(max(cardinalities[j], 1), _emb_dim(cardinalities[j]))
                                  for j in self.cat_idx)
        self.bins = nn.ModuleList(nn.Embedding(MAX_BINS, 4) for _ in self.num_idx)
        width = nn_ + 4 * nn_ + sum(e.embedding_dim for e in self.cats)
        self.body = nn.Sequential(nn.Linear(width, hidden), nn.ReLU())
        self.embed = nn.Sequential(nn.Linear(hidden, embed_dim), nn.ReLU())
        self.head = nn.Linear(embed_dim, n_classes)

    def fit_scaling(self, x: np.ndarray) -> TabularMLP:
        """Standardisation and quantile-bin edges of the numeric columns, from ``x``."""
        num = x[:, self.num_idx].astype(np.float64)
        if num.shape[1]:
            std = num.std(0)
            self.mean.copy_(torch.from_numpy(num.mean(0)).float())
            self.std.copy_(torch.from_numpy(np.where(std > 0, std, 1.0)).float())
            edges = np.full((num.shape[1], MAX_BINS - 1), np.inf)
            for k in range(num.shape[1]):
                e = np.unique(np.quantile(num[:, k], np.linspace(0, 1, MAX_BINS + 1)[1:-1]))
                edges[k, :len(e)] = e
            self.edges.copy_(torch.from_numpy(edges).float())
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        parts = []
        if self.num_idx:
            num = x[:, self.num_idx]
            parts.append(((num - self.mean) / self.std).clamp(-10, 10))
            for k, emb in enumerate(self.bins):
                b = torch.searchsorted(self.edges[k].contiguous(), num[:, k].contiguous(),
                                       right=True)
                parts.append(emb(b.clamp(max=MAX_BINS - 1)))
        for k, emb in zip(self.cat_idx, self.cats):
            parts.append(emb(x[:, k].long().clamp(0, emb.num_embeddings - 1)))
        return torch.cat(parts, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(self.body(self.features(x))))
