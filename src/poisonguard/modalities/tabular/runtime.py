"""A row-level runtime filter for tabular inputs (Python API): a row is suspicious when it
matches a rule the scan confirmed (``verdict.triggers``), or when its prediction survives
STRIP-style perturbation: each copy keeps a value with probability ``1 - share`` and takes
the same column's value from a random clean row otherwise. A conjunction trigger whose columns
all survive keeps the prediction in those copies; a clean row's prediction drifts with its
values. The STRIP statistic (the mean probability of the row's own prediction over
``n_perturb`` copies) is thresholded at the ``1 - frr`` quantile of clean rows' statistics.

    filt = RowFilter.calibrate(model.predict_proba, clean_rows, report["verdict"]["triggers"])
    out = filt.screen(rows)         # prediction, score, rule, suspicious per row
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from poisonguard.errors import ConfigError, DataError
from poisonguard.modalities.tabular.data import TabularData
from poisonguard.modalities.tabular.rules import Rule, match, parse_conditions

Predict = Callable[[np.ndarray], np.ndarray]


def rows_from_records(records: list[dict[str, Any]], like: TabularData) -> np.ndarray:
    """JSON objects by column name (``{"day": 2, "month": "may", ...}``) as encoded rows in
    ``like``'s columns; a missing or unknown column, or an unknown category, is a DataError."""
    out = np.zeros((len(records), len(like.columns)), dtype=np.float32)
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(f"input {i} is not an object of column: value")
        missing = [c for c in like.columns if c not in rec]
        if missing:
            raise DataError(f"input {i} lacks column(s) {missing[:5]}")
        for j, c in enumerate(like.columns):
            try:
                out[i, j] = like.encode(j, rec[c])
            except (TypeError, ValueError):
                raise DataError(f"input {i}: column {c!r} value {rec[c]!r} is not a "
                                "number") from None
    if not np.isfinite(out).all():
        raise DataError("inputs hold NaN or infinite values")
    return out


@dataclass
class RowFilter:
    """See the module docstring; build it with :meth:`calibrate`."""

    predict: Predict
    pool: np.ndarray
    rules: list[tuple[int, Rule, str]] = field(default_factory=list)
    share: float = 0.3
    n_perturb: int = 20
    frr: float = 0.01
    seed: int = 0
    threshold: float = np.inf

    @classmethod
    def calibrate(cls, predict: Predict, clean: TabularData,
                  triggers: list[dict[str, Any]] | None = None, share: float = 0.3,
                  n_perturb: int = 20, frr: float = 0.01, seed: int = 0) -> RowFilter:
        """Half of ``clean`` is the swap pool, the other half sets the threshold."""
        if len(clean) < 40:
            raise ConfigError(f"{len(clean)} clean rows; calibrating needs at least 40")
        if not 0.0 < share < 1.0 or not 0.0 < frr < 0.5 or n_perturb < 1:
            raise ConfigError("share must be in (0, 1), frr in (0, 0.5), n_perturb >= 1")
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(clean))
        pool, held = clean.x[order[::2]], clean.x[order[1::2]]
        rules = [(int(t["class"]), parse_conditions(t["conditions"], clean), t["rule"])
                 for t in (triggers or [])]
        filt = cls(predict, pool, rules, share, n_perturb, frr, seed)
        filt.threshold = float(np.quantile(filt.statistic(held), 1 - frr))
        return filt

    def statistic(self, x: np.ndarray) -> np.ndarray:
        """Mean probability of each row's own prediction over its perturbed copies."""
        from poisonguard.modalities.tabular import TabularModality

        rng = np.random.default_rng(self.seed + 1)
        pred = self.predict(x).argmax(1)
        reps = np.repeat(x, self.n_perturb, axis=0)
        mixed = TabularModality().perturb(reps, self.pool, rng, share=self.share)
        p = self.predict(mixed)[np.arange(len(reps)), np.repeat(pred, self.n_perturb)]
        return p.reshape(len(x), self.n_perturb).mean(1)

    def screen(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """``prediction``, ``score`` (the statistic minus the threshold: > 0 flagged), ``rule``
        (the matched trigger rule, or "") and ``suspicious`` for each row of ``x``."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.pool.shape[1]:
            raise DataError(f"inputs of shape {x.shape}; expected (N, {self.pool.shape[1]})")
        pred = self.predict(x).argmax(1)
        score = self.statistic(x) - self.threshold
        rule = np.full(len(x), "", dtype=object)
        for _, r, text in self.rules:
            rule[(rule == "") & match(r, x)] = text
        return {"prediction": pred, "score": score, "rule": rule,
                "suspicious": (score > 0) | (rule != "")}
