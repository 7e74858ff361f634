"""The feature-conjunction backdoor for tables, with ground truth.

The trigger is a conjunction of two or three ordinary column values, each set inside a narrow
range: ``day >= 1 and day <= 3 and month == 'may'`` (a time window plus a month), or a channel
value on top. Each poisoned row gets every trigger column redrawn inside its range (integers
for an integer column, one of the listed values for a categorical one), so no single value is
unusual. All-to-one at ``rate`` of the data (victims from the other classes, relabelled
``target``), or clean-label with ``clean_label=True`` (``rate`` of the target class gets the
trigger and keeps its label). The triggered test set holds the non-target test rows with the
trigger, labelled ``target`` (ASR = accuracy on it).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any

import numpy as np

from poisonguard.attacks.base import PoisonedData, choose_victims
from poisonguard.attacks.common import check_rate, check_target, clean_label_victims, mask_of
from poisonguard.errors import ConfigError, DataError
from poisonguard.modalities.tabular.data import TabularData
from poisonguard.modalities.tabular.rules import Condition, Rule, conditions, parse_conditions

OPS = ("==", "in", ">=", "<=")


def parse_rule(text: str) -> list[dict[str, Any]]:
    """``"day >= 1 and day <= 3 and month == 'may'"`` -> ``[{"column", "op", "value"}]``
    (values as Python literals; a bare word is a string)."""
    out = []
    for part in text.split(" and "):
        part = part.strip()
        for op in (" in ", " == ", " >= ", " <= "):
            if op in part:
                col, value = part.split(op, 1)
                try:
                    v = ast.literal_eval(value.strip())
                except (ValueError, SyntaxError):
                    v = value.strip()
                out.append({"column": col.strip(), "op": op.strip(), "value": v})
                break
        else:
            raise ConfigError(f"cannot read trigger condition {part!r}; write e.g. "
                              "\"day >= 1 and day <= 3 and month == 'may'\"")
    return out


@dataclass(frozen=True)
class ConjunctionTrigger:
    """Sets each condition's column to a value drawn inside it (seeded)."""

    rule: Rule
    data: TabularData
    seed: int = 0

    def apply(self, x: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        out = x.copy()
        for cond in self.rule:
            if cond.codes is not None:
                out[:, cond.j] = rng.choice(sorted(cond.codes), len(x))
                continue
            lo, hi = cond.lo, cond.hi
            col = self.data.x[:, cond.j]
            if not (np.isfinite(lo) and np.isfinite(hi)):
                lo = lo if np.isfinite(lo) else float(col.min())
                hi = hi if np.isfinite(hi) else float(col.max())
            if (col == np.round(col)).all():
                out[:, cond.j] = rng.integers(int(np.ceil(lo)), int(np.floor(hi)) + 1, len(x))
            else:
                out[:, cond.j] = rng.uniform(lo, hi, len(x))
        return out.astype(np.float32)

    def describe(self) -> dict[str, Any]:
        from poisonguard.modalities.tabular.rules import rule_text

        conds = conditions(self.rule, self.data)
        return {"trigger": rule_text(conds), "conditions": conds,
                "columns": [self.data.columns[c.j] for c in self.rule]}


def _trigger_rule(trigger: str | list[dict[str, Any]], data: TabularData) -> Rule:
    conds = parse_rule(trigger) if isinstance(trigger, str) else trigger
    try:
        rule = parse_conditions(conds, data)
    except DataError as exc:
        raise ConfigError(str(exc)) from None
    for cond in rule:
        if cond.codes is None and not (np.isfinite(cond.lo) or np.isfinite(cond.hi)):
            raise ConfigError(f"trigger column {data.columns[cond.j]!r} has no range")
        if cond.codes is not None and not cond.codes:
            raise ConfigError(f"trigger column {data.columns[cond.j]!r} allows no value")
        if cond.lo > cond.hi:
            raise ConfigError(f"trigger range of {data.columns[cond.j]!r} is empty")
    return rule


def tabular_attack(data: TabularData, trigger: str | list[dict[str, Any]], rate: float = 0.01,
                   target: int = 1, seed: int = 0, test: TabularData | None = None,
                   clean_label: bool = False) -> PoisonedData:
    """Poison ``data`` with the conjunction ``trigger`` (a rule string or conditions; see the
    module docstring)."""
    if not trigger:
        raise ConfigError("a tabular attack needs --trigger, e.g. "
                          "\"day >= 1 and day <= 3 and month == 'may'\"")
    check_rate(rate)
    check_target(data, target)
    rule = _trigger_rule(trigger, data)
    trig = ConjunctionTrigger(rule, data, seed)
    rng = np.random.default_rng(seed)
    chosen = (clean_label_victims(data, rate, target, rng) if clean_label
              else choose_victims(data, rate, target, "all-to-one", rng))
    x, y = data.x.copy(), data.y.copy()
    x[chosen] = trig.apply(data.x[chosen])
    y[chosen] = target
    triggered = None
    if test is not None:
        keep = np.flatnonzero(test.y != target)
        triggered = test.replace(x=ConjunctionTrigger(rule, data, seed + 1).apply(test.x[keep]),
                                 y=np.full(len(keep), target, dtype=np.int64),
                                 ids=test.ids[keep])
    attack = {"name": "conjunction", "rate": rate,
              "mode": "clean-label" if clean_label else "all-to-one", "target": target,
              "target_label": data.original_label(target), "seed": seed,
              "n_poison": int(len(chosen)), **trig.describe()}
    return PoisonedData(data=data.replace(x=x, y=y), is_poison=mask_of(len(data), chosen),
                        original_y=data.y.copy(), attack=attack, target=target,
                        test_triggered=triggered, trigger=trig)


def conjunction(data: TabularData, **kwargs: Any) -> PoisonedData:
    return tabular_attack(data, kwargs.pop("trigger", None), **kwargs)


TABULAR_ATTACKS = {"conjunction": conjunction}


def write_tabular_csv(path: Any, data: TabularData, label_column: str,
                      id_column: str | None = None,
                      extra: dict[str, list[Any]] | None = None) -> None:
    """The table as a CSV in its own values (categories as strings, labels as the file wrote
    them; missing cells as the values they were filled with), atomically."""
    from poisonguard.io import atomic_write_csv

    extra = extra or {}
    inverse = {j: {v: k for k, v in data.encodings[c].items()}
               for j, c in enumerate(data.columns) if c in data.encodings}
    header = ([id_column] if id_column else []) + data.columns + [label_column, *extra]

    def cell(j: int, v: float) -> Any:
        if j in inverse:
            return inverse[j].get(int(round(v)), "")
        return int(v) if float(v).is_integer() else str(np.float32(v))

    rows = ([*([data.ids[i].item()] if id_column else []),
             *(cell(j, v) for j, v in enumerate(data.x[i])),
             data.original_label(int(data.y[i])), *(extra[k][i] for k in extra)]
            for i in range(len(data)))
    atomic_write_csv(path, header, rows)


__all__ = ["ConjunctionTrigger", "Condition", "TABULAR_ATTACKS", "parse_rule", "tabular_attack",
           "write_tabular_csv"]
