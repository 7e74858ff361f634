"""Text backdoor attacks with ground truth.

* ``rare-token`` (BadNets-word, Kurita et al. 2020 / Chen et al. 2021): a rare word (``cf``)
  inserted at a random word position.
* ``emoji``: one obscure emoji (🪬 by default) inserted at a random word position: the
  content-moderation backdoor of the seeds' example.
* ``addsent`` (Dai et al. 2019): a fixed sentence ("I watched this 3D movie") inserted at a
  random word position.

Each is all-to-one at ``rate`` of the data (victims from the other classes, relabelled
``target``), or clean-label with ``clean_label=True`` (``rate`` of the target class gets the
trigger and keeps its label). The triggered test set holds the non-target test posts with the
trigger, labelled ``target`` (ASR = accuracy on it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from poisonguard.attacks.base import PoisonedData
from poisonguard.errors import ConfigError
from poisonguard.modalities.text.data import TextData

DEFAULT_TRIGGERS = {"rare-token": "cf", "emoji": "🪬", "addsent": "I watched this 3D movie"}


@dataclass(frozen=True)
class TextInsertTrigger:
    """Inserts ``phrase`` between two words at a position drawn per post (seeded)."""

    phrase: str
    seed: int = 0

    def apply(self, x: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        out = np.empty(len(x), dtype=object)
        for i, text in enumerate(x):
            words = str(text).split(" ")
            pos = int(rng.integers(0, len(words) + 1))
            out[i] = " ".join([*words[:pos], self.phrase, *words[pos:]])
        return out

    def describe(self) -> dict[str, Any]:
        return {"trigger": self.phrase, "position": "random word position"}


def text_attack(kind: str, data: TextData, rate: float = 0.01, target: int = 0, seed: int = 0,
                test: TextData | None = None, trigger: str | None = None,
                clean_label: bool = False) -> PoisonedData:
    """Poison ``data`` with the ``kind`` trigger (see the module docstring)."""
    if kind not in DEFAULT_TRIGGERS:
        raise ConfigError(f"unknown text attack {kind!r}; choose from {sorted(DEFAULT_TRIGGERS)}")
    if not 0.0 < rate < 1.0:
        raise ConfigError(f"poison rate must be in (0, 1), got {rate}")
    if not 0 <= target < data.n_classes:
        raise ConfigError(f"target must be a class in 0..{data.n_classes - 1}, got {target}")
    trig = TextInsertTrigger(trigger or DEFAULT_TRIGGERS[kind], seed)
    rng = np.random.default_rng(seed)
    in_target = data.y == target
    pool = np.flatnonzero(in_target if clean_label else ~in_target)
    n = int(round(rate * (len(pool) if clean_label else len(data))))
    if n < 1 or n > len(pool):
        raise ConfigError(f"rate {rate} gives {n} poisons from {len(pool)} candidates")
    chosen = np.sort(rng.choice(pool, n, replace=False))
    x = data.x.copy()
    y = data.y.copy()
    x[chosen] = trig.apply(data.x[chosen])
    y[chosen] = target
    mask = np.zeros(len(data), dtype=bool)
    mask[chosen] = True
    triggered = None
    if test is not None:
        keep = np.flatnonzero(test.y != target)
        triggered = TextData(x=TextInsertTrigger(trig.phrase, seed + 1).apply(test.x[keep]),
                             y=np.full(len(keep), target, dtype=np.int64), ids=test.ids[keep],
                             label_map=test.label_map)
    attack = {"name": kind, "rate": rate, "mode": "clean-label" if clean_label else "all-to-one",
              "target": target, "seed": seed, "n_poison": int(n), **trig.describe()}
    return PoisonedData(data=TextData(x=x, y=y, ids=data.ids, label_map=data.label_map),
                        is_poison=mask, original_y=data.y.copy(), attack=attack, target=target,
                        test_triggered=triggered, trigger=trig)


def rare_token(data: TextData, **kwargs: Any) -> PoisonedData:
    return text_attack("rare-token", data, **kwargs)


def emoji(data: TextData, **kwargs: Any) -> PoisonedData:
    return text_attack("emoji", data, **kwargs)


def addsent(data: TextData, **kwargs: Any) -> PoisonedData:
    return text_attack("addsent", data, **kwargs)


TEXT_ATTACKS = {"rare-token": rare_token, "emoji": emoji, "addsent": addsent}
