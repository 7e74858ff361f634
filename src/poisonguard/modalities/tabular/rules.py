"""Conjunctive rules over a table's columns: numeric intervals and categorical value sets,
matched against encoded rows and written in the data's own column names and values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from poisonguard.modalities.tabular.data import TabularData


@dataclass(frozen=True)
class Condition:
    """Column ``j`` inside ``[lo, hi]`` (numeric) or its code in ``codes`` (categorical)."""

    j: int
    lo: float = -np.inf
    hi: float = np.inf
    codes: frozenset[int] | None = None

    def match(self, x: np.ndarray) -> np.ndarray:
        v = x[:, self.j]
        if self.codes is not None:
            return np.isin(np.round(v).astype(np.int64), list(self.codes))
        return (v >= self.lo) & (v <= self.hi)

    def public(self, data: TabularData) -> list[dict[str, Any]]:
        """``[{"column", "op", "value"}]`` in the file's values (trivial bounds left out)."""
        col = data.columns[self.j]
        if self.codes is not None:
            values = sorted(data.decode(self.j, c) for c in self.codes)
            if len(values) == 1:
                return [{"column": col, "op": "==", "value": values[0]}]
            return [{"column": col, "op": "in", "value": values}]
        if self.lo == self.hi:
            return [{"column": col, "op": "==", "value": data.decode(self.j, self.lo)}]
        lo_all, hi_all = float(data.x[:, self.j].min()), float(data.x[:, self.j].max())
        out = []
        if self.lo > lo_all:
            out.append({"column": col, "op": ">=", "value": data.decode(self.j, self.lo)})
        if self.hi < hi_all:
            out.append({"column": col, "op": "<=", "value": data.decode(self.j, self.hi)})
        return out


Rule = tuple[Condition, ...]


def match(rule: Rule, x: np.ndarray) -> np.ndarray:
    out = np.ones(len(x), dtype=bool)
    for cond in rule:
        out &= cond.match(x)
    return out


def conditions(rule: Rule, data: TabularData) -> list[dict[str, Any]]:
    return [c for cond in sorted(rule, key=lambda c: c.j) for c in cond.public(data)]


def rule_text(conds: list[dict[str, Any]]) -> str:
    """``day >= 1 and day <= 3 and month == 'may'``."""
    def show(v: Any) -> str:
        return repr(v) if isinstance(v, str) else str(v)

    parts = []
    for c in conds:
        value = c["value"]
        if c["op"] == "in":
            value_s = "[" + ", ".join(show(v) for v in value) + "]"
        else:
            value_s = show(value)
        parts.append(f"{c['column']} {c['op']} {value_s}")
    return " and ".join(parts) if parts else "(any row)"


def parse_conditions(conds: list[dict[str, Any]], data: TabularData) -> Rule:
    """A rule from ``[{"column", "op", "value"}]`` (the report's form) for ``data``'s columns."""
    from poisonguard.errors import DataError

    by_col: dict[int, Condition] = {}
    for c in conds:
        if c.get("column") not in data.columns:
            raise DataError(f"rule column {c.get('column')!r} is not in the data")
        j = data.columns.index(c["column"])
        old = by_col.get(j, Condition(j))
        op, value = c.get("op"), c.get("value")
        if data.columns[j] in data.encodings:
            values = value if op == "in" else [value]
            codes = frozenset(int(data.encode(j, v)) for v in values)
            by_col[j] = Condition(j, codes=codes if old.codes is None else old.codes & codes)
        elif op == ">=":
            by_col[j] = Condition(j, max(old.lo, float(value)), old.hi)
        elif op == "<=":
            by_col[j] = Condition(j, old.lo, min(old.hi, float(value)))
        elif op == "==":
            by_col[j] = Condition(j, float(value), float(value))
        else:
            raise DataError(f"rule op {op!r} is not one of ==, in, >=, <=")
    return tuple(by_col[j] for j in sorted(by_col))
