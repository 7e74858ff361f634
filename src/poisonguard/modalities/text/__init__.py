"""The text modality: posts from CSV/TSV/JSONL/Parquet, a Unicode-aware tokenizer that keeps
emoji, a small CPU classifier, text backdoor attacks, and the token-trigger miner."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from poisonguard.data.labeled import LabeledData
from poisonguard.errors import ConfigError
from poisonguard.modalities.base import AttackFn, register
from poisonguard.modalities.text.attacks import TEXT_ATTACKS, text_attack
from poisonguard.modalities.text.data import TextData, load_text, text_suffix
from poisonguard.modalities.text.miner import TokenTriggerMiner
from poisonguard.modalities.text.model import TokenPoolClassifier
from poisonguard.modalities.text.tokenizer import TOKEN_RE, Vocabulary, tokenize
from poisonguard.models.adapter import InputSpec
from poisonguard.types import DetectorResult

MAX_EVIDENCE = 50


class TextModality:
    """Posts as strings. ``fit`` (or ``load``) learns the vocabulary that ``encode`` uses to
    turn posts into the (N, L) token ids the model's :class:`InputSpec` takes."""

    name = "text"

    def __init__(self, text_column: str = "text", label_column: str = "label",
                 max_tokens: int = 128) -> None:
        self.text_column = text_column
        self.label_column = label_column
        self.max_tokens = max_tokens
        self.vocab: Vocabulary | None = None

    @property
    def attacks(self) -> Mapping[str, AttackFn]:
        return TEXT_ATTACKS

    def handles(self, path: str | Path) -> bool:
        return text_suffix(path) is not None

    def load(self, path: str | Path, **options: Any) -> TextData:
        return load_text(path, options.get("text_column", self.text_column),
                         options.get("label_column", self.label_column),
                         label_map=options.get("label_map"))

    def fit(self, data: LabeledData) -> Vocabulary:
        self.vocab = Vocabulary.fit(data.x.tolist())
        return self.vocab

    def encode(self, texts: np.ndarray | list[str]) -> np.ndarray:
        if self.vocab is None:
            raise ConfigError("the text modality has no vocabulary yet; call fit(data) first")
        return self.vocab.encode(list(texts), self.max_tokens)[0]

    def default_model(self, data: LabeledData, n_classes: int,
                      seed: int = 0) -> tuple[nn.Module, InputSpec]:
        from poisonguard.modalities.text.scan import TOKEN_SPEC

        vocab = self.vocab or self.fit(data)
        return TokenPoolClassifier(len(vocab), n_classes), TOKEN_SPEC

    def mine_triggers(self, data: LabeledData, flags: np.ndarray, classes: list[int],
                      predict: Callable[[np.ndarray], np.ndarray] | None = None
                      ) -> DetectorResult:
        if predict is None:
            raise ConfigError("the token-trigger miner needs the model's predict function")
        vocab = self.vocab or self.fit(data)
        return TokenTriggerMiner().detect(self.encode(data.x), data.y, flags, classes,
                                          predict, vocab)

    def perturb(self, x: np.ndarray, pool: np.ndarray, rng: np.random.Generator,
                share: float = 0.3) -> np.ndarray:
        """STRIP for text: ``share`` of each post's words replaced by words of random clean
        posts from ``pool``; a trigger word survives in most perturbed copies."""
        words = [w for text in pool for w in str(text).split()]
        out = np.empty(len(x), dtype=object)
        for i, text in enumerate(x):
            ws = str(text).split()
            swap = rng.random(len(ws)) < share
            out[i] = " ".join(words[rng.integers(len(words))] if s else w
                              for w, s in zip(ws, swap))
        return out

    def render_evidence(self, data: LabeledData, flags: np.ndarray,
                        triggers: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Flagged posts (at most 50) with the character spans of trigger tokens."""
        return flagged_posts(data, flags, triggers)


def flagged_posts(data: LabeledData, flags: np.ndarray, triggers: list[dict[str, Any]],
                  limit: int = MAX_EVIDENCE) -> list[dict[str, Any]]:
    """Flagged posts, those carrying a trigger first, each with ``highlight``: [start, end)
    character spans of its class's trigger tokens."""
    by_class: dict[int, set[str]] = {}
    for t in triggers:
        by_class.setdefault(int(t["class"]), set()).update(t["tokens"])
    rows = []
    for i in np.flatnonzero(flags):
        text = str(data.x[i])
        wanted = by_class.get(int(data.y[i]), set())
        spans = [[m.start(), m.end()] for m in TOKEN_RE.finditer(text)
                 if tokenize(m.group())[:1] and tokenize(m.group())[0] in wanted]
        rows.append({"index": int(i), "id": data.ids[i].item(), "label": int(data.y[i]),
                     "text": text[:500], "highlight": [s for s in spans if s[1] <= 500]})
    rows.sort(key=lambda r: (not r["highlight"], r["index"]))
    return rows[:limit]


register("text", TextModality)

__all__ = ["TextData", "TextModality", "TokenTriggerMiner", "Vocabulary", "flagged_posts",
           "load_text", "text_attack", "tokenize"]
