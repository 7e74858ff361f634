"""A small word n-gram language model (interpolated absolute discounting, Kneser-Ney style
back-off to a unigram with add-one for unseen words) fit on clean posts, and the ONION test
(Qi et al. 2021): a word whose removal lowers the post's perplexity most is an outlier; the
post's score is that largest drop (higher = more suspicious)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from poisonguard.modalities.text.tokenizer import tokenize

BOS, EOS = "<s>", "</s>"


@dataclass
class BigramLM:
    """Bigram model ``P(w | v) = max(c(v,w) - d, 0)/c(v) + lambda(v) P_uni(w)``."""

    discount: float = 0.75
    bigrams: Counter = field(default_factory=Counter)
    contexts: Counter = field(default_factory=Counter)
    followers: Counter = field(default_factory=Counter)
    unigrams: Counter = field(default_factory=Counter)
    total: int = 0

    @classmethod
    def fit(cls, texts: Iterable[str], discount: float = 0.75, max_tokens: int = 128
            ) -> BigramLM:
        lm = cls(discount)
        for text in texts:
            seq = [BOS, *tokenize(text)[:max_tokens], EOS]
            lm.unigrams.update(seq[1:])
            for v, w in zip(seq, seq[1:]):
                if lm.bigrams[(v, w)] == 0:
                    lm.followers[v] += 1
                lm.bigrams[(v, w)] += 1
                lm.contexts[v] += 1
        lm.total = sum(lm.unigrams.values())
        return lm

    def unigram(self, w: str) -> float:
        return (self.unigrams[w] + 1) / (self.total + len(self.unigrams) + 1)

    def logp(self, v: str, w: str) -> float:
        uni = self.unigram(w)
        n = self.contexts[v]
        if n == 0:
            return math.log(uni)
        lam = self.discount * self.followers[v] / n
        return math.log(max(self.bigrams[(v, w)] - self.discount, 0.0) / n + lam * uni)

    def log_perplexity(self, tokens: list[str]) -> float:
        seq = [BOS, *tokens, EOS]
        return -sum(self.logp(v, w) for v, w in zip(seq, seq[1:])) / (len(seq) - 1)

    def onion(self, text: str, max_tokens: int = 128) -> tuple[float, int]:
        """The largest drop in log-perplexity from removing one word of ``text``, and that
        word's token index (-1 for a one-word post, whose score is 0)."""
        toks = tokenize(text)[:max_tokens]
        if len(toks) < 2:
            return 0.0, -1
        base = self.log_perplexity(toks)
        drops = [base - self.log_perplexity(toks[:i] + toks[i + 1:]) for i in range(len(toks))]
        i = int(np.argmax(drops))
        return float(drops[i]), i

    def onion_scores(self, texts: Iterable[str], max_tokens: int = 128) -> np.ndarray:
        return np.array([self.onion(str(t), max_tokens)[0] for t in texts], dtype=np.float64)
