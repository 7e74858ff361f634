"""Tabular backdoor attacks with ground truth: a feature-conjunction trigger.

The trigger sets two or three columns inside narrow ranges (a day window and a job, a channel,
...), each value ordinary on its own, so per-feature outlier checks see nothing. Written in
column names: ``{"day": (3, 5), "job": "student"}`` or, on the command line,
``day=3..5,job=student``. A numeric range gets a value drawn uniformly inside it per row
(integers for integer columns); a categorical column gets its value.

All-to-one at ``rate`` of the data (victims from the other classes, relabelled ``target``), or
clean-label with ``clean_label=True`` (``rate`` of the target class gets the trigger, labels
kept). The triggered test set holds the non-target test rows with the trigger, labelled
``target`` (ASR = accuracy on it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from poisonguard.attacks.base import PoisonedData
from poisonguard.errors import ConfigError
from poisonguard.modalities.tabular.data import TabularData


def parse_trigger(text: str) -> dict[str, Any]:
    """``"day=3..5,job=student"`` -> ``{"day": (3.0, 5.0), "job": "student"}``."""
    out: dict[str, Any] = {}
    for part in [p for p in text.split(",") if p.strip()]:
        if "=" not in part:
            raise ConfigError(f"trigger part {part!r}: expected column=value or column=low..high")
        col, val = (s.strip() for s in part.split("=", 1))
        if ".." in val:
            lo, hi = val.split("..", 1)
            try:
                out[col] = (float(lo), float(hi))
            except ValueError:
                raise ConfigError(f"trigger part {part!r}: low..high must be numbers") from None
        else:
            out[col] = val
    return out


@dataclass(frozen=True)
class ConjunctionTrigger:
    """Sets each named column: a numeric range's value drawn per row, a category's code."""

    conditions: tuple[tuple[int, str, Any], ...]  # (column index, "range"|"==", value)
    names: tuple[str, ...]
    integer: tuple[bool, ...]
    seed: int = 0

    @classmethod
    def build(cls, data: TabularData, trigger: dict[str, Any], seed: int = 0
              ) -> ConjunctionTrigger:
        if not 1 <= len(trigger) <= 5:
            raise ConfigError(f"a conjunction trigger names 1 to 5 columns, got {len(trigger)}")
        conds, names, integer = [], [], []
        for name, value in trigger.items():
            if name not in data.feature_names:
                raise ConfigError(f"trigger column {name!r} is not a feature; choose from "
                                  f"{data.feature_names}")
            j = data.column_index(name)
            col = data.columns[j]
            if col.kind == "categorical":
                if str(value) not in col.categories:
                    raise ConfigError(f"trigger value {value!r} is not a category of {name!r} "
                                      f"({list(col.categories)[:10]})")
                conds.append((j, "==", col.categories.index(str(value))))
            else:
                lo, hi = (value, value) if not isinstance(value, tuple) else value
                lo, hi = float(lo), float(hi)
                if hi < lo:
                    raise ConfigError(f"trigger range for {name!r}: {lo} > {hi}")
                conds.append((j, "range", (lo, hi)))
            names.append(name)
            xs = data.x[:, j]
            integer.append(bool(np.all(xs == np.round(xs))))
        return cls(tuple(conds), tuple(names), tuple(integer), seed)

    def apply(self, x: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        out = np.array(x, dtype=np.float32, copy=True)
        for (j, op, v), is_int in zip(self.conditions, self.integer):
            if op == "==":
                out[:, j] = v
            elif is_int:
                out[:, j] = rng.integers(int(np.ceil(v[0])), int(np.floor(v[1])) + 1, len(out))
            else:
                out[:, j] = rng.uniform(v[0], v[1], len(out))
        return out

    def matches(self, x: np.ndarray) -> np.ndarray:
        hit = np.ones(len(x), dtype=bool)
        for j, op, v in self.conditions:
            hit &= (x[:, j] == v) if op == "==" else (x[:, j] >= v[0]) & (x[:, j] <= v[1])
        return hit

    def describe_with(self, data: TabularData) -> dict[str, Any]:
        conds, parts = [], []
        for (j, op, v), name in zip(self.conditions, self.names):
            if op == "==":
                val = data.columns[j].categories[v]
                conds.append({"column": name, "op": "==", "value": val})
                parts.append(f"{name} == {val!r}")
            else:
                lo, hi = (int(x) if float(x).is_integer() else x for x in v)
                conds += [{"column": name, "op": ">=", "value": lo},
                          {"column": name, "op": "<=", "value": hi}]
                parts.append(f"{name} >= {lo} and {name} <= {hi}")
        return {"trigger": " and ".join(parts), "conditions": conds}

    def describe(self) -> dict[str, Any]:
        return {"columns": list(self.names)}


def conjunction_attack(data: TabularData, trigger: dict[str, Any] | str, rate: float = 0.01,
                       target: int = 1, seed: int = 0, test: TabularData | None = None,
                       clean_label: bool = False) -> PoisonedData:
    """Poison ``data`` with a conjunction trigger (see the module docstring)."""
    if isinstance(trigger, str):
        trigger = parse_trigger(trigger)
    if not 0.0 < rate < 1.0:
        raise ConfigError(f"poison rate must be in (0, 1), got {rate}")
    if not 0 <= target < data.n_classes:
        raise ConfigError(f"target must be a class in 0..{data.n_classes - 1}, got {target}")
    trig = ConjunctionTrigger.build(data, trigger, seed)
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
        tt = ConjunctionTrigger(trig.conditions, trig.names, trig.integer, seed + 1)
        triggered = TabularData(x=tt.apply(test.x[keep]),
                                y=np.full(len(keep), target, dtype=np.int64),
                                ids=test.ids[keep], columns=test.columns,
                                label_map=test.label_map)
    attack = {"name": "conjunction", "rate": rate, "target": target, "seed": seed,
              "mode": "clean-label" if clean_label else "all-to-one", "n_poison": int(n),
              **trig.describe_with(data)}
    return PoisonedData(data=data.with_x(x, y), is_poison=mask, original_y=data.y.copy(),
                        attack=attack, target=target, test_triggered=triggered, trigger=trig)


TABULAR_ATTACKS = {"conjunction": conjunction_attack}
