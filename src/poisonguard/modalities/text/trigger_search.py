"""Model audit for text: a gradient-guided search of the vocabulary for trigger tokens (in the
spirit of T-Miner, PICCOLO and DBS, without their generators or word-level relaxations).

For every candidate target class ``t``: clean posts of the other classes that the model gets
right (the victims) get a placeholder token inserted at a seeded random word position; the
gradient of the loss toward ``t`` at the placeholder's embedding ranks every vocabulary token
by the first-order loss drop of putting it there (HotFlip); the ``n_candidates`` best are
inserted for real and their flip rate (victims predicted ``t``) measured; the best token is
then extended greedily by a second token. A model whose embedding layer cannot be hooked (a
TorchScript archive) is ranked by exact flip rates on a small probe instead.

The verdict needs no poison rate or target: a class is flagged when its best single token
flips at least ``min_flip`` of the victims and stands out from the class's own runners-up:
its flip rate's log-odds exceed those of the ``rank``-th best candidate by ``min_gap`` (rates
smoothed as (k + 0.5) / (n + 1)). A class that natural words reach easily (HSOL's
"offensive": dozens of slurs each flip most neutral tweets) has many strong tokens and a
small gap; a backdoor adds one token (or the few words of one sentence, hence rank 6) far
above the rest. The flagged class with the largest gap is the target.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from poisonguard.errors import ConfigError, DataError
from poisonguard.modalities.text.tokenizer import PAD, UNK

MIN_VICTIMS = 20


@dataclass(frozen=True)
class TokenSearchConfig:
    """Settings of :func:`search_triggers` (see the module docstring)."""

    max_victims: int = 300
    n_candidates: int = 64
    top: int = 5
    extend: bool = True
    min_flip: float = 0.8
    rank: int = 6
    min_gap: float = 2.5
    seed: int = 0


@dataclass
class TokenSearchResult:
    """Per class: the best triggers (token lists with flip rates), best flip rate; the
    flagged classes (target first) and the verdict."""

    classes: list[dict[str, Any]] = field(default_factory=list)
    flagged: list[int] = field(default_factory=list)
    config: TokenSearchConfig = field(default_factory=TokenSearchConfig)

    def verdict(self) -> dict[str, Any]:
        best = {c["class"]: c["best_flip"] for c in self.classes}
        gaps = {c["class"]: c["gap"] for c in self.classes}
        if self.flagged:
            t = self.flagged[0]
            trig = self.classes[t]["triggers"][0]
            summary = (f"BACKDOOR FOUND: class {t} is reached from {trig['flip_rate']:.0%} of "
                       f"other classes' clean posts by inserting {' '.join(trig['tokens'])!r}")
            return {"backdoored": True, "target_class": t, "summary": summary,
                    "triggers": [{"class": t, "modality": "text", "tokens": x["tokens"],
                                  "flip_rate": x["flip_rate"]}
                                 for x in self.classes[t]["triggers"]],
                    "best_flip_rate": best, "gap": gaps}
        top = max(best, key=lambda k: best[k])
        return {"backdoored": False, "target_class": None,
                "summary": f"no backdoor found: the strongest inserted token (class {top}) "
                           f"flips {best[top]:.0%} of the other classes' clean posts (no "
                           "class has one token far above its other candidates)",
                "triggers": [], "best_flip_rate": best, "gap": gaps}

    def to_dict(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "classes": self.classes,
                "flagged": self.flagged, "verdict": self.verdict()}


def _rows(ids: np.ndarray) -> list[list[int]]:
    return [[int(v) for v in r if v != PAD] or [UNK] for r in ids]


def insert(rows: list[list[int]], positions: np.ndarray, tokens: list[int]) -> np.ndarray:
    """(N, L) ids with ``tokens`` inserted into each row at ``positions`` (clipped)."""
    out = [r[:p] + tokens + r[p:] for r, p in zip(rows, np.minimum(positions,
                                                                    [len(r) for r in rows]))]
    width = max(len(r) for r in out)
    arr = np.zeros((len(out), width), dtype=np.int64)
    for i, r in enumerate(out):
        arr[i, :len(r)] = r
    return arr


def embedding_layer(module: nn.Module, vocab_size: int) -> nn.Embedding | None:
    """The model's token embedding (an ``nn.Embedding`` over the whole vocabulary)."""
    if isinstance(module, torch.jit.ScriptModule):
        return None
    for m in module.modules():
        if isinstance(m, nn.Embedding) and m.num_embeddings == vocab_size:
            return m
    return None


def _flip_rates(clf: Any, rows: list[list[int]], pos: np.ndarray, cands: list[list[int]],
                target: int) -> np.ndarray:
    return np.array([float((clf.predict(insert(rows, pos, c)) == target).mean())
                     for c in cands])


def _gradient_rank(clf: Any, emb: nn.Embedding, rows: list[list[int]], pos: np.ndarray,
                   target: int, prefix: list[int], exclude: set[int]) -> list[int]:
    """Vocabulary ids ordered by the first-order loss drop toward ``target`` when placed
    after ``prefix`` at ``pos`` (the placeholder is UNK)."""
    ids = insert(rows, pos, [*prefix, UNK])
    slot = np.minimum(pos, [len(r) for r in rows]) + len(prefix)
    grads: list[torch.Tensor] = []

    def hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
        out.retain_grad()
        grads.append(out)

    handle = emb.register_forward_hook(hook)
    model = clf.model
    try:
        total = torch.zeros(emb.embedding_dim)
        for s in range(0, len(ids), 256):
            grads.clear()
            xb = torch.from_numpy(ids[s:s + 256])
            loss = F.cross_entropy(model(xb), torch.full((len(xb),), target), reduction="sum")
            model.zero_grad()
            loss.backward()
            g = grads[0].grad
            total += g[torch.arange(len(xb)), torch.from_numpy(slot[s:s + 256])].sum(0)
    finally:
        handle.remove()
        model.zero_grad()
    with torch.no_grad():
        w = emb.weight
        gain = -((w - w[UNK]) @ total).numpy()
    gain[[PAD, UNK, *exclude]] = -np.inf
    return [int(i) for i in np.argsort(-gain)]


def _probe_rank(clf: Any, rows: list[list[int]], pos: np.ndarray, target: int,
                prefix: list[int], vocab_size: int, exclude: set[int], probe: int = 16
                ) -> list[int]:
    """Without gradients: every token's mean target probability on ``probe`` victims."""
    rows, pos = rows[:probe], pos[:probe]
    score = np.full(vocab_size, -np.inf)
    for v in range(2, vocab_size):
        if v not in exclude:
            score[v] = float(clf.predict_proba(insert(rows, pos, [*prefix, v]))[:, target]
                             .mean())
    return [int(i) for i in np.argsort(-score)]


def search_class(clf: Any, vocab: Any, rows: list[list[int]], target: int,
                 config: TokenSearchConfig, rng: np.random.Generator) -> dict[str, Any]:
    """The best trigger tokens for ``target`` on the victims ``rows``."""
    pos = np.array([int(rng.integers(0, len(r) + 1)) for r in rows])
    model = clf.model
    emb = embedding_layer(model, len(vocab))
    grad_ok = emb is not None
    if grad_ok:
        for p in model.parameters():
            p.requires_grad_(True)

    def rank(prefix: list[int], exclude: set[int]) -> list[int]:
        if grad_ok:
            return _gradient_rank(clf, emb, rows, pos, target, prefix, exclude)
        return _probe_rank(clf, rows, pos, target, prefix, len(vocab), exclude)

    cands = [[v] for v in rank([], set())[:config.n_candidates]]
    rates = _flip_rates(clf, rows, pos, cands, target)
    order = np.argsort(-rates, kind="stable")
    found = [(cands[i], float(rates[i])) for i in order[:config.top]]
    single = found[0][1] if found else 0.0
    if config.extend and found and found[0][1] < 1.0:
        first = found[0][0]
        seconds = rank(first, set(first))[:config.n_candidates // 2]
        pairs = [[*first, v] for v in seconds]
        prates = _flip_rates(clf, rows, pos, pairs, target)
        j = int(np.argmax(prates))
        if prates[j] > found[0][1]:
            found.insert(0, (pairs[j], float(prates[j])))
    return {"class": int(target), "n_victims": len(rows), "gradient": grad_ok,
            "flip_rates": [round(float(r), 4) for r in rates[order]],
            "best_flip": round(single, 4),
            "gap": round(_gap(rates[order], len(rows), config.rank), 4),
            "best_flip_extended": round(found[0][1], 4) if found else 0.0,
            "triggers": [{"tokens": vocab.decode(t), "ids": t, "flip_rate": round(r, 4)}
                         for t, r in found[:config.top]]}


def _gap(sorted_rates: np.ndarray, n: int, rank: int) -> float:
    """log-odds of the best rate minus those of the ``rank``-th best (smoothed)."""
    if len(sorted_rates) == 0:
        return 0.0
    r = (np.asarray(sorted_rates) * n + 0.5) / (n + 1)
    lo = r[min(rank, len(r)) - 1]
    return float(np.log(r[0] / (1 - r[0])) - np.log(lo / (1 - lo)))


def search_triggers(model: Any, texts: list[str], labels: np.ndarray,
                    config: TokenSearchConfig | None = None) -> TokenSearchResult:
    """Audit ``model`` (a :class:`~poisonguard.modalities.text.io.TextModel`) with clean
    labelled posts; see the module docstring."""
    config = config or TokenSearchConfig()
    if (not 0.0 < config.min_flip <= 1.0 or config.n_candidates < 1 or config.top < 1
            or config.rank < 2):
        raise ConfigError("min_flip must be in (0, 1], n_candidates and top at least 1, "
                          "rank at least 2")
    labels = np.asarray(labels, dtype=np.int64)
    k = model.n_classes
    if labels.min() < 0 or labels.max() >= k:
        raise DataError(f"clean labels span {labels.min()}..{labels.max()}, but the model has "
                        f"{k} classes")
    ids = model.encode(texts)
    pred = model.classifier.predict(ids)
    rng = np.random.default_rng(config.seed)
    rows_all = _rows(ids)
    out = TokenSearchResult(config=config)
    for t in range(k):
        victims = np.flatnonzero((labels != t) & (pred == labels))
        if len(victims) < MIN_VICTIMS:
            raise DataError(f"only {len(victims)} clean posts outside class {t} are classified "
                            f"correctly; the audit needs at least {MIN_VICTIMS} per class")
        if len(victims) > config.max_victims:
            victims = np.sort(rng.choice(victims, config.max_victims, replace=False))
        out.classes.append(search_class(model.classifier, model.vocab,
                                        [rows_all[i] for i in victims], t, config, rng))
    best = np.array([c["best_flip"] for c in out.classes])
    gap = np.array([c["gap"] for c in out.classes])
    out.flagged = [int(t) for t in np.argsort(-gap, kind="stable")
                   if best[t] >= config.min_flip and gap[t] >= config.min_gap]
    return out
