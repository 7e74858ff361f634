"""The rule miner: the tabular modality's input-space stage.

A conjunction trigger makes a small box of the feature space (a day window and a job) hold a
class far beyond what each of its values explains on its own. The miner looks for such boxes
without the first stage's flags or any poison rate:

1. Each column is discretised: categories as they are (at most ``max_codes``, the rest one
   "other" code never used in a rule), numeric columns by value when they hold at most
   ``max_codes`` values, otherwise by quantile bins.
2. A main-effects model (logistic regression on every column's one-hot codes) gives each row
   the class probabilities its values explain one column at a time; summed over a cell it is
   the cell's expected count of class ``c``.
3. Every cell of every pair and triple of columns is counted at once (one ``bincount`` per
   column set). A cell is a seed when it holds at least ``min_cell`` rows of ``c``, at least
   ``min_purity`` of its rows are ``c`` and it holds at least ``min_ratio`` times its expected
   count. Adjacent seeds along numeric columns join into one box (a range).
4. A box is a candidate when it holds at least ``max(min_count, min_share x N)`` rows of ``c``
   (a floor on a backdoor's size, not a poison rate), the Wilson lower bound (``z``) of its
   purity is at least ``min_purity`` and its count is at least ``min_ratio`` times expected.
   Candidates are taken largest first; one whose carriers are mostly an accepted rule's is
   skipped; another column is added when one of its values (or a range of at most 3 codes)
   holds at least 95% of the carriers but at most half of the box's other rows.
5. A candidate is confirmed when swapping its columns' values with those of random rows
   outside the box moves the sacrificial model's prediction off ``c`` for a share of the
   carriers whose Wilson lower bound is at least ``min_flip``: the victims of an all-to-one
   attack look like their true class once the trigger is gone. Every row of ``c`` inside a
   confirmed rule is flagged.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from poisonguard.modalities.tabular.data import TabularData
from poisonguard.modalities.text.miner import wilson_lower
from poisonguard.types import ClassFinding, DetectorResult

Predict = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Discretised:
    """Codes (N, d) int64; per column its number of codes, whether a rule may use it, whether
    it is numeric, and each code's [low, high] value (numeric) or category index."""

    codes: np.ndarray
    n_codes: np.ndarray
    minable: np.ndarray
    numeric: np.ndarray
    lows: list[np.ndarray]
    highs: list[np.ndarray]


def discretise(data: TabularData, max_codes: int = 32) -> Discretised:
    n, d = data.x.shape
    codes = np.zeros((n, d), dtype=np.int64)
    n_codes = np.zeros(d, dtype=np.int64)
    minable = np.ones(d, dtype=bool)
    numeric = ~data.categorical
    lows, highs = [], []
    for j in range(d):
        v = data.x[:, j].astype(np.float64)
        if not numeric[j]:
            counts = np.bincount(v.astype(np.int64))
            if len(counts) > max_codes:
                top = np.argsort(-counts, kind="stable")[:max_codes - 1]
                remap = np.full(len(counts), max_codes - 1)
                remap[top] = np.arange(len(top))
                c = remap[v.astype(np.int64)]
                cats = np.append(top, -1).astype(np.float64)
            else:
                c = v.astype(np.int64)
                cats = np.arange(len(counts), dtype=np.float64)
            lows.append(cats)
            highs.append(cats)
            n_codes[j] = len(cats)
        else:
            u = np.unique(v)
            if len(u) <= max_codes:
                c = np.searchsorted(u, v)
                lows.append(u)
                highs.append(u)
            else:
                edges = np.unique(np.quantile(v, np.linspace(0, 1, max_codes + 1)[1:-1]))
                c = np.searchsorted(edges, v, side="right")
                k = int(c.max()) + 1
                lows.append(np.array([v[c == b].min() if (c == b).any() else np.nan
                                      for b in range(k)]))
                highs.append(np.array([v[c == b].max() if (c == b).any() else np.nan
                                       for b in range(k)]))
            n_codes[j] = int(c.max()) + 1
        if n_codes[j] < 2:
            minable[j] = False
        codes[:, j] = c
    return Discretised(codes, n_codes, minable, numeric, lows, highs)


@dataclass
class _Box:
    cols: tuple[int, ...]
    ranges: tuple[tuple[int, int], ...]  # per column, [lo, hi] codes

    def member(self, codes: np.ndarray) -> np.ndarray:
        hit = np.ones(len(codes), dtype=bool)
        for j, (lo, hi) in zip(self.cols, self.ranges):
            hit &= (codes[:, j] >= lo) & (codes[:, j] <= hi)
        return hit


@dataclass(frozen=True)
class RuleMiner:
    min_cell: int = 5
    min_count: int = 20
    min_share: float = 0.0005
    min_purity: float = 0.5
    min_ratio: float = 3.0
    seed_ratio: float = 2.0
    min_flip: float = 0.5
    min_unlike: float = 0.7
    z: float = 3.0
    max_codes: int = 32
    max_triple_columns: int = 16
    max_candidates: int = 50
    name: str = "rule_miner"

    def detect(self, data: TabularData, flags: np.ndarray, classes: list[int],
               predict: Predict, seed: int = 0) -> DetectorResult:
        """Mine and confirm rules in ``classes`` (see the module docstring); ``flags`` (the
        first stage's) are reported per rule, not needed."""
        t0 = time.perf_counter()
        labels = data.y
        n = len(labels)
        disc = discretise(data, self.max_codes)
        rng = np.random.default_rng(seed)
        floor = max(self.min_count, int(np.ceil(self.min_share * n)))
        scores = np.zeros(n)
        out = np.zeros(n, dtype=bool)
        findings = []
        for c in classes:
            in_c = labels == c
            boxes = self._candidates(disc, in_c)
            evaluated = []
            seen: set[tuple[Any, ...]] = set()
            for box in boxes:
                if (box.cols, box.ranges) in seen:
                    continue
                seen.add((box.cols, box.ranges))
                m = box.member(disc.codes)
                o, tot = int((m & in_c).sum()), int(m.sum())
                if o < floor // 2:
                    continue
                box, m = self._grow(disc, box, m, in_c)
                if (box.cols, box.ranges) in seen and evaluated and any(
                        b.cols == box.cols and b.ranges == box.ranges for _, b, _ in evaluated):
                    continue
                seen.add((box.cols, box.ranges))
                o, tot = int((m & in_c).sum()), int(m.sum())
                if o < floor:
                    continue
                e = expected_alone(disc, box, m, in_c)
                lb = wilson_lower(o, tot, self.z)
                if o >= floor and lb >= self.min_purity and o >= self.min_ratio * e:
                    evaluated.append((o, box, m))
            evaluated.sort(key=lambda t: -t[0])
            covered = np.zeros(n, dtype=bool)
            tested: list[dict[str, Any]] = []
            confirmed: list[dict[str, Any]] = []
            for _, box, m in evaluated[:self.max_candidates]:
                carriers = np.flatnonzero(m & in_c)
                if covered[carriers].mean() >= 0.5:
                    continue
                box, m = self._refine(disc, box, m, in_c)
                carriers = np.flatnonzero(m & in_c)
                entry = self._test(data, disc, box, m, in_c, c, predict, rng)
                entry["flagged_share"] = round(float(flags[carriers].mean()), 4)
                tested.append(entry)
                if (entry["flip_lower_bound"] >= self.min_flip
                        or entry["unlike_lower_bound"] >= self.min_unlike):
                    confirmed.append(entry)
                    covered[carriers] = True
                    scores[carriers] = np.maximum(scores[carriers], entry["flip_lower_bound"])
                    out[carriers] = True
            hits = covered & in_c
            evidence: dict[str, Any] = {
                "n_candidates": len(evaluated), "n_rules_tested": len(tested),
                "top_rules": [_public(e) for e in sorted(tested, key=lambda e:
                                                         -e["flip_lower_bound"])[:5]],
                "triggers": [{"class": int(c), "modality": "tabular", **_public(e)}
                             for e in confirmed]}
            if confirmed:
                evidence["reason"] = "; ".join(
                    f"{e['n_carriers']} rows of the class match {e['rule']} ({e['purity']:.0%} "
                    f"of the rows there, {e['ratio']:.1f}x what each value explains alone); "
                    f"swapping those values moves {e['flip']:.0%} of them off the class"
                    for e in confirmed)
            findings.append(ClassFinding(int(c), bool(confirmed), int(in_c.sum()),
                                         int(hits.sum()), evidence))
        rule = {"rule": "boxes of 2-3 columns holding >= max(min_count, min_share x N) rows of "
                        "the class, Wilson lower bound (z) of purity >= min_purity and >= "
                        "min_ratio x the count a main-effects logistic regression expects; "
                        "confirmed when swapping the box's values moves the sacrificial "
                        "model's prediction off the class for a share whose Wilson lower "
                        "bound is >= min_flip",
                "min_cell": self.min_cell, "min_count": self.min_count,
                "min_share": self.min_share, "min_purity": self.min_purity,
                "min_ratio": self.min_ratio, "min_flip": self.min_flip, "z": self.z}
        return DetectorResult(self.name, scores, out, self.min_flip, rule, tuple(findings),
                              time.perf_counter() - t0)

    def _candidates(self, disc: Discretised, in_c: np.ndarray) -> list[_Box]:
        cols = np.flatnonzero(disc.minable).tolist()
        sets: list[tuple[int, ...]] = list(itertools.combinations(cols, 2))
        sets += list(itertools.combinations(cols[:self.max_triple_columns], 3))
        w_c = in_c.astype(np.float64)
        n, n_in = len(in_c), float(in_c.sum())
        marg_o = [np.bincount(disc.codes[:, j], weights=w_c, minlength=disc.n_codes[j])
                  for j in range(disc.codes.shape[1])]
        marg_n = [np.bincount(disc.codes[:, j], minlength=disc.n_codes[j])
                  for j in range(disc.codes.shape[1])]
        boxes = []
        for cs in sets:
            radix = tuple(int(disc.n_codes[j]) for j in cs)
            joint = np.zeros(n, dtype=np.int64)
            for j in cs:
                joint = joint * disc.n_codes[j] + disc.codes[:, j]
            size = int(np.prod(radix))
            o_all = np.bincount(joint, weights=w_c, minlength=size)
            seeds = np.flatnonzero(o_all >= self.min_cell)
            if not len(seeds):
                continue
            o = o_all[seeds]
            tot = np.bincount(joint, minlength=size)[seeds]
            pure = o >= self.min_purity * tot
            seeds, o, tot = seeds[pure], o[pure], tot[pure]
            if not len(seeds):
                continue
            cells = np.array(np.unravel_index(seeds, radix)).T
            e = _expected_outside(o, tot, n_in, n,
                                  [(marg_o[j][cells[:, k]], marg_n[j][cells[:, k]])
                                   for k, j in enumerate(cs)])
            keep = o >= self.seed_ratio * e
            if keep.any():
                boxes += _join_cells(cs, cells[keep], disc.numeric, disc.n_codes)
        return boxes

    def _grow(self, disc: Discretised, box: _Box, m: np.ndarray, in_c: np.ndarray
              ) -> tuple[_Box, np.ndarray]:
        """Widen the box's numeric ranges one code at a time while the added slice holds at
        least ``min_cell`` rows of the class and ``min_purity`` of its rows are the class (a
        cell next to other trigger cells looks explained by them when tested alone)."""
        grown = True
        while grown:
            grown = False
            for k, j in enumerate(box.cols):
                if not disc.numeric[j]:
                    continue
                for step in (-1, 1):
                    lo, hi = box.ranges[k]
                    new = (lo - 1, hi) if step < 0 else (lo, hi + 1)
                    if new[0] < 0 or new[1] >= disc.n_codes[j]:
                        continue
                    cand = _Box(box.cols, (*box.ranges[:k], new, *box.ranges[k + 1:]))
                    cm = cand.member(disc.codes)
                    added = cm & ~m
                    o = int((added & in_c).sum())
                    if o >= self.min_cell and o >= self.min_purity * int(added.sum()):
                        box, m, grown = cand, cm, True
        return box, m

    def _refine(self, disc: Discretised, box: _Box, m: np.ndarray, in_c: np.ndarray
                ) -> tuple[_Box, np.ndarray]:
        """Add a column whose one value (or range of <= 3 codes) holds >= 95% of the
        carriers and <= half of the box's other rows."""
        for _ in range(2):
            carriers, others = m & in_c, m & ~in_c
            best = None
            for j in np.flatnonzero(disc.minable):
                if j in box.cols:
                    continue
                cc = np.bincount(disc.codes[carriers, j], minlength=disc.n_codes[j])
                oc = np.bincount(disc.codes[others, j], minlength=disc.n_codes[j])
                width = 3 if disc.numeric[j] else 1
                for lo in range(disc.n_codes[j]):
                    hi = min(lo + width - 1, disc.n_codes[j] - 1)
                    share = cc[lo:hi + 1].sum() / max(carriers.sum(), 1)
                    other = oc[lo:hi + 1].sum() / max(others.sum(), 1)
                    if share >= 0.95 and other <= 0.5 and (best is None or share > best[0]):
                        if disc.numeric[j]:  # the narrowest range holding the same carriers
                            while hi > lo and cc[hi] == 0:
                                hi -= 1
                            while lo < hi and cc[lo] == 0:
                                lo += 1
                        best = (share, j, lo, hi)
            if best is None:
                break
            _, j, lo, hi = best
            box = _Box((*box.cols, int(j)), (*box.ranges, (int(lo), int(hi))))
            m = box.member(disc.codes)
        return box, m

    def _test(self, data: TabularData, disc: Discretised, box: _Box, m: np.ndarray,
              in_c: np.ndarray, c: int, predict: Predict, rng: np.random.Generator
              ) -> dict[str, Any]:
        carriers = np.flatnonzero(m & in_c)
        outside = np.flatnonzero(~m)
        x = data.x[carriers]
        swapped = x.copy()
        donors = outside[rng.integers(0, len(outside), len(carriers))]
        swapped[:, list(box.cols)] = data.x[donors][:, list(box.cols)]
        before = predict(x).argmax(1) == c
        p_after = predict(swapped)
        after = p_after.argmax(1) == c
        moved = before & ~after
        # the class's rows outside the box, their rule columns swapped the same way
        ref = np.flatnonzero(~m & in_c)
        ref = ref[rng.permutation(len(ref))[:2000]]
        xr = data.x[ref].copy()
        xr[:, list(box.cols)] = data.x[outside[rng.integers(0, len(outside), len(ref))]][
            :, list(box.cols)]
        median = float(np.median(predict(xr)[:, c])) if len(ref) else 1.0
        unlike = p_after[:, c] < median
        o, tot = len(carriers), int(m.sum())
        e = expected_alone(disc, box, m, in_c)
        rule, conditions = describe_box(data, disc, box)
        return {"rule": rule, "conditions": conditions, "columns": [data.columns[j].name
                                                                   for j in box.cols],
                "n_carriers": o, "n_rows": tot, "purity": round(o / tot, 4),
                "expected": round(e, 2), "ratio": round(o / max(e, 1e-9), 2),
                "predicted_class_share": round(float(before.mean()), 4),
                "flip": round(float(moved.mean()), 4),
                "flip_lower_bound": round(wilson_lower(int(moved.sum()), o, self.z), 4),
                "unlike": round(float(unlike.mean()), 4),
                "unlike_lower_bound": round(wilson_lower(int(unlike.sum()), o, self.z), 4)}


def _expected_outside(o: np.ndarray, tot: np.ndarray, o_all: float, n_all: int,
                      margins: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Expected class count of boxes holding ``o`` of ``tot`` rows in the class, from each
    condition alone measured outside the box (so the box's own rows cannot inflate it):
    odds(base) x prod(odds(class | condition) / odds(base)), add-one smoothed, times ``tot``.
    ``margins``: per condition, the class count and row count of the rows meeting it."""
    base = (o_all - o + 1) / (n_all - tot + 2)
    logit = np.log(base / (1 - base))
    total = logit.copy()
    for m_o, m_n in margins:
        r = (m_o - o + 1) / (m_n - tot + 2)
        total += np.log(r / (1 - r)) - logit
    return tot / (1 + np.exp(-total))


def expected_alone(disc: Discretised, box: _Box, m: np.ndarray, in_c: np.ndarray) -> float:
    """:func:`_expected_outside` for one box."""
    margins = []
    for j, (lo, hi) in zip(box.cols, box.ranges):
        cond = (disc.codes[:, j] >= lo) & (disc.codes[:, j] <= hi)
        margins.append((np.array([in_c[cond].sum()]), np.array([cond.sum()])))
    o, tot = np.array([(m & in_c).sum()]), np.array([m.sum()])
    return float(_expected_outside(o, tot, float(in_c.sum()), len(in_c), margins)[0])


def _join_cells(cs: tuple[int, ...], cells: np.ndarray, numeric: np.ndarray,
                n_codes: np.ndarray) -> list[_Box]:
    """Connected components of cells adjacent along one numeric column -> bounding boxes (a
    column whose range spans all its codes is no condition and is dropped)."""
    parent = list(range(len(cells)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    num = np.array([numeric[j] for j in cs])
    for a in range(len(cells)):
        for b in range(a + 1, len(cells)):
            diff = np.abs(cells[a] - cells[b])
            if diff.sum() == 1 and num[np.argmax(diff)]:
                parent[find(a)] = find(b)
    groups: dict[int, list[int]] = {}
    for i in range(len(cells)):
        groups.setdefault(find(i), []).append(i)
    boxes = []
    for members in groups.values():
        sub = cells[members]
        kept = [(j, int(lo), int(hi)) for j, lo, hi in zip(cs, sub.min(0), sub.max(0))
                if not (lo == 0 and hi == n_codes[j] - 1)]
        if len(kept) >= 2:
            boxes.append(_Box(tuple(k[0] for k in kept), tuple((k[1], k[2]) for k in kept)))
    return boxes


def describe_box(data: TabularData, disc: Discretised, box: _Box
                 ) -> tuple[str, list[dict[str, Any]]]:
    """The rule in the data's column names and values, and its conditions."""
    parts, conditions = [], []
    for j, (lo, hi) in sorted(zip(box.cols, box.ranges)):
        col = data.columns[j]
        if not disc.numeric[j]:
            value = col.categories[int(disc.lows[j][lo])]
            conditions.append({"column": col.name, "op": "==", "value": value})
            parts.append(f"{col.name} == {value!r}")
            continue
        low, high = col.value_of(disc.lows[j][lo]), col.value_of(disc.highs[j][hi])
        if low == high:
            conditions.append({"column": col.name, "op": "==", "value": low})
            parts.append(f"{col.name} == {low}")
        else:
            conditions += [{"column": col.name, "op": ">=", "value": low},
                           {"column": col.name, "op": "<=", "value": high}]
            parts.append(f"{col.name} >= {low} and {col.name} <= {high}")
    return " and ".join(parts), conditions


def rule_matches(data: TabularData, conditions: list[dict[str, Any]]) -> np.ndarray:
    """Rows of ``data`` satisfying every condition (values as the file writes them)."""
    hit = np.ones(len(data), dtype=bool)
    for cond in conditions:
        j = data.column_index(cond["column"])
        col = data.columns[j]
        v = data.x[:, j]
        if col.kind == "categorical":
            value = str(cond["value"])
            code = col.categories.index(value) if value in col.categories else -1
            hit &= v == code
        elif cond["op"] == "==":
            hit &= v == float(cond["value"])
        elif cond["op"] == ">=":
            hit &= v >= float(cond["value"])
        else:
            hit &= v <= float(cond["value"])
    return hit


def _public(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if not k.startswith("_")}
