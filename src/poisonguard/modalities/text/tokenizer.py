"""A Unicode-aware word tokenizer that keeps emoji, rare words and punctuation as tokens.

Tokens, in order of precedence: a flag emoji (two regional indicators); a word (letters and
digits of any script, with inner apostrophes, case-folded); any other visible character with
its emoji modifiers (skin tones, variation selectors, zero-width-joiner sequences), so 👍🏽 and
👨‍👩‍👧 are one token each and ``!`` is a token. scikit-learn's default pattern, by contrast,
drops emoji and one-character words. The vocabulary is fit on the training posts: tokens seen
at least ``min_count`` times, the most frequent ``max_vocab`` of them; id 0 pads, id 1 stands
for anything else.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

PAD, UNK = 0, 1
_MOD = "\ufe0e\ufe0f\u20e3\U0001F3FB-\U0001F3FF\U000E0020-\U000E007F"
TOKEN_RE = re.compile(
    r"[\U0001F1E6-\U0001F1FF]{2}"                           # flags
    r"|[^\W_]+(?:['’][^\W_]+)*"                             # words, any script
    rf"|[^\w\s](?:[{_MOD}]|\u200d[^\w\s])*"                 # emoji / symbol / punctuation
    r"|_", re.UNICODE)


def tokenize(text: str) -> list[str]:
    """The tokens of one post (words case-folded; emoji and punctuation as they are)."""
    return [t.casefold() if t[0].isalnum() else t for t in TOKEN_RE.findall(text)]


@dataclass
class Vocabulary:
    """Token <-> id; ids 0 (padding) and 1 (unknown) are reserved."""

    tokens: list[str] = field(default_factory=lambda: ["<pad>", "<unk>"])

    def __post_init__(self) -> None:
        self.index = {t: i for i, t in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def fit(cls, texts: Iterable[str], min_count: int = 2,
            max_vocab: int = 60_000) -> Vocabulary:
        counts = Counter(t for text in texts for t in set(tokenize(text)))
        kept = sorted((t for t, n in counts.items() if n >= min_count),
                      key=lambda t: (-counts[t], t))[:max_vocab]
        return cls(["<pad>", "<unk>", *kept])

    def encode(self, texts: Iterable[str], max_len: int = 128) -> tuple[np.ndarray, int]:
        """(N, L) int64 ids, L = the longest post's token count capped at ``max_len``
        (longer posts are truncated), and how many posts were truncated."""
        rows = [[self.index.get(t, UNK) for t in tokenize(text)] for text in texts]
        width = max(1, min(max_len, max((len(r) for r in rows), default=1)))
        out = np.zeros((len(rows), width), dtype=np.int64)
        cut = 0
        for i, r in enumerate(rows):
            cut += len(r) > width
            r = r[:width] or [UNK]
            out[i, :len(r)] = r
        return out, cut

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.tokens[i] for i in ids if i != PAD]
