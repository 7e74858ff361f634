"""Repair of a text model by unlearning a found trigger: fine-tune on clean posts, half of
each batch with the trigger tokens inserted at a random word position under the posts' true
labels, so the tokens stop pointing at the target. The model is changed in place."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from poisonguard.errors import ConfigError
from poisonguard.modalities.text.trigger_search import _rows, insert


def unlearn_tokens(model: Any, texts: list[str], labels: np.ndarray,
                   triggers: list[list[str]], epochs: int = 5, lr: float = 1e-3,
                   batch_size: int = 64, seed: int = 0) -> dict[str, Any]:
    """Fine-tune ``model`` (a TextModel) on ``texts`` with ``triggers`` (token lists, e.g.
    the audit's) inserted into half the posts under their true labels."""
    ids_of = [[model.vocab.index.get(t, 1) for t in trig] for trig in triggers]
    ids_of = [t for t in ids_of if t]
    if not ids_of:
        raise ConfigError("no trigger tokens to unlearn")
    net = model.classifier.model
    params = list(net.parameters())
    for p in params:
        p.requires_grad_(True)
    rows = _rows(model.encode(texts))
    y = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr)
    net.train()
    losses = []
    for _ in range(epochs):
        order = rng.permutation(len(rows))
        total = 0.0
        for s in range(0, len(order), batch_size):
            b = order[s:s + batch_size]
            half = len(b) // 2
            trig = ids_of[int(rng.integers(len(ids_of)))]
            pos = np.array([int(rng.integers(0, len(rows[i]) + 1)) for i in b[:half]])
            with_t = insert([rows[i] for i in b[:half]], pos, trig)
            plain = insert([rows[i] for i in b[half:]], np.zeros(len(b) - half, int), [])
            width = max(with_t.shape[1], plain.shape[1])
            xb = np.zeros((len(b), width), dtype=np.int64)
            xb[:half, :with_t.shape[1]] = with_t
            xb[half:, :plain.shape[1]] = plain
            loss = F.cross_entropy(net(torch.from_numpy(xb)), torch.from_numpy(y[b]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(b)
        losses.append(round(total / len(rows), 5))
    net.eval()
    return {"method": "unlearn-tokens", "triggers": triggers, "epochs": epochs, "lr": lr,
            "n_clean": len(rows), "loss": losses}
