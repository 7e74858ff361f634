"""Repair of a text model by unlearning a found trigger: fine-tune on clean posts, half of
each batch with the trigger tokens inserted at a random word position under the posts' true
labels, so the tokens stop pointing at the target. With ``rows_only`` (the default, for a
model with a hookable token embedding) only the embedding rows of the trigger tokens move,
starting from the unknown token's row (the model first forgets them as words it never saw):
posts without those tokens get exactly the predictions they had, so clean accuracy on them
cannot drop; otherwise every parameter is fine-tuned. The model is changed in place."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from poisonguard.errors import ConfigError
from poisonguard.modalities.text.tokenizer import UNK
from poisonguard.modalities.text.trigger_search import _rows, insert


def tokens_to_unlearn(triggers: list[dict[str, Any]], min_flip: float) -> list[list[str]]:
    """The audit's one-token triggers that flip at least ``min_flip`` of the posts, and the
    best trigger's first token (a greedy second token is often a natural word of the class,
    which unlearning would damage)."""
    out = [[t["tokens"][0]] for t in triggers[:1]]
    out += [t["tokens"] for t in triggers
            if len(t["tokens"]) == 1 and t["flip_rate"] >= min_flip and t["tokens"] not in out]
    return out


def unlearn_tokens(model: Any, texts: list[str], labels: np.ndarray,
                   triggers: list[list[str]], epochs: int = 10, lr: float | None = None,
                   batch_size: int = 64, seed: int = 0, rows_only: bool = True
                   ) -> dict[str, Any]:
    """Fine-tune ``model`` (a TextModel) on ``texts`` with ``triggers`` (token lists, e.g.
    the audit's) inserted into half the posts under their true labels (learning rate 1e-2
    for the embedding rows alone, 1e-3 for the whole model)."""
    from poisonguard.modalities.text.trigger_search import embedding_layer

    ids_of = [[model.vocab.index.get(t, 1) for t in trig] for trig in triggers]
    ids_of = [t for t in ids_of if t]
    if not ids_of:
        raise ConfigError("no trigger tokens to unlearn")
    net = model.classifier.model
    emb = embedding_layer(net, len(model.vocab)) if rows_only else None
    params = list(net.parameters()) if emb is None else [emb.weight]
    for p in net.parameters():
        p.requires_grad_(emb is None)
    handle = None
    if emb is not None:
        emb.weight.requires_grad_(True)
        moved = sorted({i for t in ids_of for i in t} - {UNK})
        keep = torch.zeros(emb.num_embeddings, 1)
        keep[moved] = 1.0
        with torch.no_grad():
            emb.weight[moved] = emb.weight[UNK].clone()
        handle = emb.weight.register_hook(lambda g: g * keep)
    lr = lr if lr is not None else (1e-3 if emb is None else 1e-2)
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
    if handle is not None:
        handle.remove()
    for p in net.parameters():
        p.requires_grad_(True)
    return {"method": "unlearn-tokens", "triggers": triggers, "epochs": epochs, "lr": lr,
            "rows_only": emb is not None, "n_clean": len(rows), "loss": losses}
