"""The runtime filter for posts (``filter`` / ``serve`` on a text model), two tests:

* ``strip`` (STRIP for text, after Gao et al. 2021's STRIP-ViTA): ``n_copies`` copies of the
  post, each with ``share`` of its words replaced by words of random clean posts; a trigger
  word survives in most copies and keeps the prediction, so the mean prediction entropy over
  the copies is low. Statistic: minus that entropy (bits), or with ``statistic="probability"``
  the mean probability of the post's own prediction.
* ``onion`` (after Qi et al. 2021's ONION, with a bigram model instead of GPT-2): the largest
  drop in log-perplexity from removing one word, under a language model fit on clean posts.
* ``loo`` (leave one word out, the model's side of ONION; the default): the largest drop in
  the log-odds of the post's own prediction (log p - log(1 - p)) when one word is removed. A
  trigger carries an extremely confident prediction on its own, so removing it (or one word
  of a trigger sentence) takes a large bite out of the log-odds; a clean post's prediction
  rests on several words and is rarely that confident. On SST-2 (benchmarks/text_runtime.py)
  STRIP's and ONION's statistics separate triggered from clean posts far worse at a 2% FRR.
* ``span``: the same log-odds drop when a run of 2..``max_span`` consecutive words is
  removed (an inserted sentence, each of whose words alone may not carry the prediction);
  with ``loo`` as ``loo+span`` each test gets half the FRR.

Half of the clean posts give the word pool and the language model, the other half set each
test's threshold at ``frr / n_tests`` of their statistics (split conformal); a post is flagged
when any test fires. ``score`` = the largest (statistic - threshold) / clean spread over the
tests, so > 0 means flagged and higher is more suspicious; no poison rate or target is used.

    filt = TextFilter.calibrate(model.predict_proba, clean_posts)
    out = filt.screen(posts)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from poisonguard.errors import ConfigError, DataError
from poisonguard.modalities.text.lm import BigramLM

Predict = Callable[[list[str]], np.ndarray]
TESTS = ("strip", "onion", "loo", "span")
FILTER_JSON = "text_filter.json"
MIN_CLEAN = 40


@dataclass(frozen=True)
class TextFilterConfig:
    """Settings of :class:`TextFilter` (see the module docstring)."""

    tests: tuple[str, ...] = ("loo",)
    share: float = 0.3
    n_copies: int = 20
    frr: float = 0.02
    statistic: str = "entropy"
    seed: int = 0
    max_tokens: int = 128
    max_span: int = 1

    def __post_init__(self) -> None:
        bad = [t for t in self.tests if t not in TESTS]
        if not self.tests or bad:
            raise ConfigError(f"text filter tests must be among {list(TESTS)}, got "
                              f"{list(self.tests)}")
        if not 0.0 < self.share < 1.0:
            raise ConfigError(f"--share must be in (0, 1), got {self.share}")
        if not 0.0 < self.frr < 0.5:
            raise ConfigError(f"--frr must be in (0, 0.5), got {self.frr}")
        if self.n_copies < 1:
            raise ConfigError("--n-blends must be at least 1")
        if not 1 <= self.max_span <= 16:
            raise ConfigError(f"--max-span must be in 1..16, got {self.max_span}")
        if self.statistic not in ("entropy", "probability"):
            raise ConfigError(f"text STRIP statistic is 'entropy' or 'probability', got "
                              f"{self.statistic!r}")


def check_posts(texts: list[str], what: str = "inputs") -> list[str]:
    """Strings, not empty; each cut to 20,000 characters (as the loader does)."""
    from poisonguard.modalities.text.data import MAX_CHARS

    if not all(isinstance(t, str) for t in texts):
        raise DataError(f"{what}: every input must be a string")
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise DataError(f"{what}: {len(empty)} empty post(s) (first at {empty[0]})")
    return [t[:MAX_CHARS] for t in texts]


def log_odds(p: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1.0 - eps)
    return np.log(p) - np.log1p(-p)


@dataclass
class TextFilter:
    """Calibrated STRIP / ONION tests over a model's ``predict`` (posts -> probabilities)."""

    predict: Predict
    pool: list[str]
    held: list[str]
    config: TextFilterConfig = field(default_factory=TextFilterConfig)
    thresholds: dict[str, float] = field(default_factory=dict)
    spread: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.lm = BigramLM.fit(self.pool, max_tokens=self.config.max_tokens)
        self.words = [w for t in self.pool for w in t.split()] or ["<unk>"]

    @classmethod
    def calibrate(cls, predict: Predict, clean: list[str],
                  config: TextFilterConfig | None = None) -> TextFilter:
        config = config or TextFilterConfig()
        clean = check_posts(list(clean), "clean posts")
        if len(clean) < MIN_CLEAN:
            raise ConfigError(f"{len(clean)} clean posts; calibrating needs at least "
                              f"{MIN_CLEAN}")
        order = np.random.default_rng(config.seed).permutation(len(clean))
        filt = cls(predict, [clean[i] for i in order[::2]], [clean[i] for i in order[1::2]],
                   config)
        filt._set_thresholds()
        return filt

    def _set_thresholds(self) -> None:
        from poisonguard.runtime.strip import conformal_threshold

        stats = self.statistics(self.held)
        rate = self.config.frr / len(self.config.tests)
        for t in self.config.tests:
            v = stats[t]
            self.thresholds[t] = conformal_threshold(v, rate)
            q = np.quantile(v, [0.25, 0.75])
            self.spread[t] = float(max(q[1] - q[0], v.std(), 1e-6))

    def strip(self, texts: list[str], pred: np.ndarray) -> np.ndarray:
        """STRIP statistic per post (higher = the prediction survives the word swaps)."""
        from poisonguard.modalities.text import TextModality

        c = self.config
        rng = np.random.default_rng(c.seed + 1)
        reps = np.empty(len(texts) * c.n_copies, dtype=object)
        reps[:] = [t for t in texts for _ in range(c.n_copies)]
        pool = np.array(self.words, dtype=object)
        mixed = TextModality().perturb(reps, pool, rng, share=c.share)
        p = np.asarray(self.predict(mixed.tolist()), dtype=np.float64)
        if c.statistic == "probability":
            own = p[np.arange(len(p)), np.repeat(pred, c.n_copies)]
            return own.reshape(len(texts), c.n_copies).mean(1)
        ent = -(p * np.log2(np.clip(p, 1e-12, 1.0))).sum(1)
        return -ent.reshape(len(texts), c.n_copies).mean(1)

    def statistics(self, texts: list[str]) -> dict[str, np.ndarray]:
        texts = check_posts(list(texts))
        out: dict[str, np.ndarray] = {}
        probs = np.asarray(self.predict(texts))
        out["prediction"] = probs.argmax(1)
        if "strip" in self.config.tests:
            out["strip"] = self.strip(texts, out["prediction"])
        if "onion" in self.config.tests:
            out["onion"] = self.lm.onion_scores(texts, self.config.max_tokens)
        if "loo" in self.config.tests:  # single words when the span test takes the runs
            out["loo"] = self.leave_one_out(
                texts, probs, last=1 if "span" in self.config.tests else None)
        if "span" in self.config.tests:
            out["span"] = self.leave_one_out(texts, probs, first=2,
                                             last=max(2, self.config.max_span))
        return out

    def leave_one_out(self, texts: list[str], probs: np.ndarray, first: int = 1,
                      last: int | None = None) -> np.ndarray:
        """Per post: its own prediction's log-odds minus the least they fall to when a run of
        ``first``..``last`` (default ``max_span``) consecutive words among its first
        ``max_tokens`` is removed (never all of them); 0 when no such run exists."""
        copies, owner = [], []
        for i, t in enumerate(texts):
            ws = t.split()[:self.config.max_tokens]
            for span in range(first, min(last or self.config.max_span, len(ws) - 1) + 1):
                copies += [" ".join(ws[:j] + ws[j + span:]) for j in range(len(ws) - span + 1)]
                owner += [i] * (len(ws) - span + 1)
        pred = probs.argmax(1)
        own = log_odds(probs[np.arange(len(texts)), pred])
        low = own.copy()
        if copies:
            owner_arr = np.array(owner)
            p = np.asarray(self.predict(copies))[np.arange(len(copies)), pred[owner_arr]]
            np.minimum.at(low, owner_arr, log_odds(p))
        return own - low

    def screen(self, texts: list[str]) -> dict[str, np.ndarray]:
        """``prediction``, each test's statistic, ``score`` (> 0 flagged), ``fired`` (the
        tests past their threshold, joined by '+') and ``suspicious`` per post."""
        if not self.thresholds:
            raise ConfigError("the text filter is not calibrated")
        stats = self.statistics(texts)
        margins = np.stack([(stats[t] - self.thresholds[t]) / self.spread[t]
                            for t in self.config.tests])
        fired = np.array(["+".join(t for t, m in zip(self.config.tests, col) if m > 0)
                          for col in margins.T], dtype=object)
        return {**stats, "score": margins.max(0), "fired": fired,
                "suspicious": margins.max(0) > 0}

    def describe(self) -> dict[str, Any]:
        return {"modality": "text", "config": {**asdict(self.config),
                                               "tests": list(self.config.tests)},
                "thresholds": self.thresholds, "spread": self.spread,
                "n_pool": len(self.pool), "n_held": len(self.held)}

    def save(self, out_dir: str | Path) -> Path:
        """``text_filter.json``: settings, thresholds and the clean posts (pool and held)."""
        from poisonguard.io import atomic_write_json

        return atomic_write_json(Path(out_dir) / FILTER_JSON,
                                 {**self.describe(), "pool": self.pool, "held": self.held})

    @classmethod
    def load(cls, path: str | Path, predict: Predict) -> TextFilter:
        import json

        p = Path(path)
        p = p / FILTER_JSON if p.is_dir() else p
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
            cfg = dict(doc["config"])
            cfg["tests"] = tuple(cfg["tests"])
            filt = cls(predict, list(doc["pool"]), list(doc["held"]), TextFilterConfig(**cfg))
            filt.thresholds = {k: float(v) for k, v in doc["thresholds"].items()}
            filt.spread = {k: float(v) for k, v in doc["spread"].items()}
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{p}: not a text filter calibration ({exc})") from None
        return filt


def evaluate(clean: dict[str, np.ndarray], triggered: dict[str, np.ndarray]
             ) -> dict[str, Any]:
    """FRR (clean posts flagged) and FAR (triggered posts not flagged), overall and per
    test."""
    out: dict[str, Any] = {"n_clean": len(clean["score"]), "n_triggered": len(triggered["score"]),
                           "frr": float(clean["suspicious"].mean()),
                           "far": float((~triggered["suspicious"]).mean())}
    for name in TESTS:
        if name in clean:
            out[f"far_{name}"] = float(np.mean([name not in f.split("+")
                                                for f in triggered["fired"]]))
            out[f"frr_{name}"] = float(np.mean([name in f.split("+") for f in clean["fired"]]))
    return out
