"""The rule miner: the tabular modality's input-space second stage.

In each class holding at least ``max(min_count, min_share x N)`` of the first stage's flags, a
shallow decision tree (depth ``max_depth``; categorical columns of at most ``max_onehot``
values one-hot encoded, so ``month == 'may'`` is one split) separates the flagged rows of the
class from the rest of it. Each leaf where flagged rows are at least ``min_leaf_precision`` of
the leaf gives a candidate rule, the conjunction of the conditions on its path, which is then

* pruned: a condition whose removal grows the rule's matches over the whole table by less than
  ``prune_growth`` is dropped (it does not make the rule rare);
* tightened: numeric bounds to the range of the class's matching rows, value sets to the values
  they hold;
* extended: a column on which at least ``extend_share`` of the matching rows share one value
  (or a narrow interval) that at most ``extend_max_class_share`` of the class holds joins the
  rule (the third column of a 3-column trigger, when the search stopped after two); or, when
  the rule also matches at least ``selective_min_others`` rows of other classes, one that
  ``selective_share`` of the class's matching rows share and whose share among the other
  classes' matches is at most ``selective_ratio`` times that (natural rows of the class that
  match the two columns dilute the first test; the other classes' matches show which column
  the trigger adds).

A confirmed rule is then generalised: a condition is dropped while the rule without it still
passes both tests below and the rows it admits are rare outside the class themselves.

Candidates also come from an interval search that needs no flags (:func:`contrast_cells`):
cells of two columns' bins dense in the class and rare in the others.

A rule is confirmed as a trigger by two tests that do not use the flags: it is rare outside
the class (its matches per row in the other classes, one row added to their count, at most
``max_other_ratio`` times those in the class), and replacing the rule's columns of its
matching rows by those of random rows that do not match it moves the sacrificial model's
prediction off the class for a share whose Wilson lower bound (``z`` = 3) is at least
``min_flip``. An all-to-one trigger was stamped on rows of other classes, so without it the
row argues for another class; a natural pattern of the class (a previous campaign's success)
is common enough in the other classes, or leaves rows that still read as the class. Every
row of the class matching a confirmed rule is flagged; no confirmed rule, no class called.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from poisonguard.modalities.tabular.data import TabularData
from poisonguard.modalities.tabular.rules import (
    Condition,
    Rule,
    conditions,
    match,
    rule_text,
)
from poisonguard.modalities.text.miner import wilson_lower
from poisonguard.types import ClassFinding, DetectorResult

Predict = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class RuleMiner:
    max_depth: int = 3
    min_count: int = 10
    min_share: float = 0.0005
    min_leaf_precision: float = 0.3
    prune_growth: float = 0.1
    extend_share: float = 0.95
    extend_max_class_share: float = 0.2
    selective_share: float = 0.8
    selective_ratio: float = 0.5
    selective_min_others: int = 3
    max_other_ratio: float = 0.05
    min_flip: float = 0.6
    z: float = 3.0
    max_onehot: int = 32
    max_rules: int = 16
    n_bins: int = 32
    cell_ratio: float = 0.05
    max_cells: int = 12
    seed: int = 0
    name: str = "rule_miner"

    def detect(self, data: TabularData, flags: np.ndarray | dict[str, np.ndarray],
               classes: list[int], predict: Predict) -> DetectorResult:
        """``flags`` the first stage's (one mask, or several by name: each is a target the
        tree separates); ``predict`` maps encoded rows to class probabilities (the
        sacrificial model, or a user's estimator)."""
        t0 = time.perf_counter()
        targets = flags if isinstance(flags, dict) else {"first_stage": flags}
        flags = np.zeros(len(data), dtype=bool)
        for f in targets.values():
            flags |= f
        x, labels = data.x, data.y
        n = len(labels)
        floor = max(self.min_count, int(np.ceil(self.min_share * n)))
        feats, owners = _tree_features(data, self.max_onehot)
        bins = _Bins.of(data, self.n_bins)
        rng = np.random.default_rng(self.seed)
        scores = np.zeros(n)
        out = np.zeros(n, dtype=bool)
        findings = []
        for c in classes:
            in_c = labels == c
            evidence: dict[str, Any] = {
                "n_flagged_first_stage": {k: int((f & in_c).sum()) for k, f in targets.items()},
                "triggers": [], "tested_rules": []}
            mined = [k for k, f in targets.items() if (f & in_c).sum() >= floor]
            if in_c.all():
                evidence["reason_not_mined"] = f"fewer first-stage flags than the floor of {floor}"
                findings.append(ClassFinding(int(c), False, int(in_c.sum()), 0, evidence))
                continue
            tested: list[dict[str, Any]] = []
            confirmed: list[dict[str, Any]] = []
            seen: list[np.ndarray] = []
            candidates = [*contrast_cells(bins, in_c, floor, self.cell_ratio,
                                          self.max_cells),
                          *(r for k in mined
                            for r in self._candidates(feats, owners, x, in_c,
                                                      targets[k] & in_c, floor))]
            for rule in candidates:
                rule = self._refine(rule, data, in_c)
                carriers = in_c & match(rule, x)
                if carriers.sum() < floor or not rule:
                    continue
                if any((carriers & s).sum() >= 0.5 * min(carriers.sum(), s.sum())
                       for s in seen):
                    continue
                seen.append(carriers)
                entry = self._test(rule, data, c, in_c, carriers, flags, predict, rng)
                if entry["confirmed"]:
                    entry = self._generalise(entry, data, c, in_c, flags, predict)
                tested.append(entry)
                if entry["confirmed"]:
                    confirmed.append(entry)
                if len(tested) >= self.max_rules:
                    break
            hits = np.zeros(n, dtype=bool)
            for e in confirmed:
                hits |= e["_carriers"]
                scores[e["_carriers"]] = np.maximum(scores[e["_carriers"]],
                                                    e["flip_lower_bound"])
            out |= hits
            evidence["tested_rules"] = [_public(e) for e in tested]
            evidence["triggers"] = [{"class": int(c), "label": data.original_label(c),
                                     "modality": "tabular", **_public(e)} for e in confirmed]
            if confirmed:
                evidence["reason"] = "; ".join(
                    f"{e['rule']}: {e['n_carriers']} rows of the class, {e['n_other_classes']} "
                    f"elsewhere; replacing those columns moves the model off the class for "
                    f"{e['flip']:.0%} of them" for e in confirmed)
            findings.append(ClassFinding(int(c), bool(confirmed), int(in_c.sum()),
                                         int(hits.sum()), evidence))
        rule = {"rule": "a depth-max_depth tree separating a class's first-stage flags from the "
                        "rest of the class; each leaf with >= min_leaf_precision flagged a "
                        "candidate conjunction, pruned, tightened and extended; confirmed when "
                        "its rate in the other classes is <= max_other_ratio x its rate in the "
                        "class and replacing its columns flips the model for a share whose "
                        "Wilson lower bound (z) is >= min_flip",
                "max_depth": self.max_depth, "floor": floor,
                "min_leaf_precision": self.min_leaf_precision,
                "max_other_ratio": self.max_other_ratio, "min_flip": self.min_flip,
                "z": self.z}
        return DetectorResult(self.name, scores, out, self.min_flip, rule, tuple(findings),
                              time.perf_counter() - t0)

    def _candidates(self, feats: np.ndarray, owners: list[tuple[int, int | None]],
                    x: np.ndarray, in_c: np.ndarray, f_c: np.ndarray, floor: int) -> list[Rule]:
        from sklearn.tree import DecisionTreeClassifier

        rows = np.flatnonzero(in_c)
        target = f_c[rows]
        tree = DecisionTreeClassifier(max_depth=self.max_depth, min_samples_leaf=floor,
                                      class_weight="balanced", random_state=self.seed)
        tree.fit(feats[rows], target)
        t = tree.tree_
        leaves: list[tuple[int, Rule]] = []

        def walk(node: int, path: list[tuple[int, bool, float]]) -> None:
            if t.children_left[node] == -1:
                idx = rows[tree.apply(feats[rows]) == node]
                n_flag = int(f_c[idx].sum())
                if n_flag >= floor and n_flag >= self.min_leaf_precision * len(idx):
                    leaves.append((n_flag, _path_rule(path, owners, x)))
                return
            f, thr = int(t.feature[node]), float(t.threshold[node])
            walk(int(t.children_left[node]), [*path, (f, True, thr)])
            walk(int(t.children_right[node]), [*path, (f, False, thr)])

        walk(0, [])
        leaves.sort(key=lambda e: -e[0])
        return [r for _, r in leaves]

    def _refine(self, rule: Rule, data: TabularData, in_c: np.ndarray) -> Rule:
        x = data.x
        # prune: conditions that do not make the rule rare over the whole table
        changed = True
        while changed and len(rule) > 1:
            changed = False
            base = int(match(rule, x).sum())
            growth = []
            for i in range(len(rule)):
                rest = rule[:i] + rule[i + 1:]
                growth.append(int(match(rest, x).sum()) - base)
            i = int(np.argmin(growth))
            if growth[i] < self.prune_growth * max(base, 1):
                rule = rule[:i] + rule[i + 1:]
                changed = True
        rule = _tighten(rule, x, in_c)
        # extend: columns on which nearly all matching rows of the class agree
        matched = match(rule, x)
        carriers = in_c & matched
        others = ~in_c & matched
        used = {cond.j for cond in rule}
        extra = []
        if carriers.sum():
            for j in range(x.shape[1]):
                if j in used:
                    continue
                cond = _shared(j, data, carriers, in_c, self.extend_share,
                               self.extend_max_class_share)
                if cond is None and others.sum() >= self.selective_min_others:
                    # natural rows of the class dilute the share: a column that most carriers
                    # share and that the other classes' matches mostly lack is the trigger's
                    cond = _shared(j, data, carriers, in_c, self.selective_share,
                                   self.extend_max_class_share)
                    if cond is not None:
                        kept_c = float(cond.match(x[carriers]).mean())
                        kept_o = float(cond.match(x[others]).mean())
                        cond = cond if kept_o <= self.selective_ratio * kept_c else None
                if cond is not None:
                    extra.append(cond)
        if extra:
            rule = _tighten(tuple(sorted((*rule, *extra), key=lambda c: c.j)), x, in_c)
        return rule

    def _generalise(self, entry: dict[str, Any], data: TabularData, c: int,
                    in_c: np.ndarray, flags: np.ndarray, predict: Predict) -> dict[str, Any]:
        """A confirmed rule without the conditions it does not need: while dropping one
        leaves a rule that still passes both tests and admits rows of the class that are
        themselves rare in the other classes, the one matching most replaces it. A cell of
        two columns can seed a rule with a condition the trigger lacks (the ages of the rows
        it was stamped on, rare for its job value) that only some carriers meet; pruning,
        before the extension, keeps it because it makes the rule rare. Own random stream:
        the main search is unchanged."""
        rng = np.random.default_rng(self.seed + 1)
        while len(entry["_rule"]) > 1:
            best = None
            for i in range(len(entry["_rule"])):
                rest = _tighten(entry["_rule"][:i] + entry["_rule"][i + 1:], data.x, in_c)
                matched = match(rest, data.x)
                carriers = in_c & matched
                added = matched & ~match(entry["_rule"], data.x)
                n_add_c = int((added & in_c).sum())
                if carriers.sum() <= entry["n_carriers"] or not n_add_c:
                    continue
                # the rows the drop admits must be rare outside the class themselves: the
                # trigger's other carriers, not the natural rows of the looser pattern
                rate_o = (int((added & ~in_c).sum()) + 1) / max(int((~in_c).sum()), 1)
                if rate_o > self.max_other_ratio * n_add_c / max(int(in_c.sum()), 1):
                    continue
                e = self._test(rest, data, c, in_c, carriers, flags, predict, rng)
                if e["confirmed"] and (best is None or e["n_carriers"] > best["n_carriers"]):
                    best = e
            if best is None:
                break
            entry = best
        return entry

    def _test(self, rule: Rule, data: TabularData, c: int, in_c: np.ndarray,
              carriers: np.ndarray, flags: np.ndarray, predict: Predict,
              rng: np.random.Generator) -> dict[str, Any]:
        x = data.x
        matched = match(rule, x)
        n_c, n_o = int(carriers.sum()), int((matched & ~in_c).sum())
        rate_c = n_c / max(int(in_c.sum()), 1)
        rate_o = (n_o + 1) / max(int((~in_c).sum()), 1)   # one row added: 0 of few is weak
        rare = rate_o <= self.max_other_ratio * rate_c
        donors = np.flatnonzero(~matched)
        rows = np.flatnonzero(carriers)
        swapped = x[rows].copy()
        pick = donors[rng.integers(0, len(donors), len(rows))]
        cols = [cond.j for cond in rule]
        swapped[:, cols] = x[pick][:, cols]
        moved = predict(swapped).argmax(1) != c
        flip = float(moved.mean())
        bound = wilson_lower(int(moved.sum()), len(moved), self.z)
        conds = conditions(rule, data)
        return {"rule": rule_text(conds), "conditions": conds, "n_carriers": n_c,
                "n_other_classes": n_o, "other_ratio": round(rate_o / max(rate_c, 1e-12), 4),
                "flip": round(flip, 4), "flip_lower_bound": round(bound, 4),
                "flagged_share": round(float(flags[carriers].mean()), 4),
                "confirmed": bool(rare and bound >= self.min_flip), "_carriers": carriers,
                "_rule": rule}


def _tree_features(data: TabularData, max_onehot: int
                   ) -> tuple[np.ndarray, list[tuple[int, int | None]]]:
    """The tree's inputs: numeric columns (and wide categoricals' codes) as they are,
    narrow categoricals one-hot; ``owners[f]`` = (column, code or None)."""
    cols, owners = [], []
    for j, name in enumerate(data.columns):
        v = data.x[:, j]
        if name in data.encodings and data.cardinality(j) <= max_onehot:
            for code in range(data.cardinality(j)):
                cols.append((np.round(v) == code).astype(np.float32))
                owners.append((j, code))
        else:
            cols.append(v)
            owners.append((j, None))
    return np.stack(cols, axis=1), owners


def _path_rule(path: list[tuple[int, bool, float]], owners: list[tuple[int, int | None]],
               x: np.ndarray) -> Rule:
    """A tree path as one condition per column."""
    lo: dict[int, float] = {}
    hi: dict[int, float] = {}
    eq: dict[int, int] = {}
    ne: dict[int, set[int]] = {}
    for f, left, thr in path:
        j, code = owners[f]
        if code is not None:
            if left:      # one-hot <= 0.5: not this value
                ne.setdefault(j, set()).add(code)
            else:
                eq[j] = code
        elif left:        # x <= thr
            hi[j] = min(hi.get(j, np.inf), thr)
        else:
            lo[j] = max(lo.get(j, -np.inf), np.nextafter(thr, np.inf))
    rule = []
    for j in sorted(set(lo) | set(hi) | set(eq) | set(ne)):
        if j in eq:
            rule.append(Condition(j, codes=frozenset({eq[j]})))
        elif j in ne:
            present = set(np.unique(np.round(x[:, j]).astype(np.int64)).tolist())
            rule.append(Condition(j, codes=frozenset(present - ne[j])))
        else:
            rule.append(Condition(j, lo.get(j, -np.inf), hi.get(j, np.inf)))
    return tuple(rule)


def _tighten(rule: Rule, x: np.ndarray, in_c: np.ndarray) -> Rule:
    """Numeric bounds to the range of the class's matching rows; value sets to their values."""
    carriers = in_c & match(rule, x)
    if not carriers.any():
        return rule
    out = []
    for cond in rule:
        v = x[carriers, cond.j]
        if cond.codes is not None:
            out.append(Condition(cond.j, codes=frozenset(
                np.unique(np.round(v).astype(np.int64)).tolist())))
        else:
            out.append(Condition(cond.j, float(v.min()), float(v.max())))
    return tuple(out)


def _shared(j: int, data: TabularData, carriers: np.ndarray, in_c: np.ndarray,
            share: float, max_class_share: float) -> Condition | None:
    """A condition on column ``j`` that ``share`` of the carriers meet and at most
    ``max_class_share`` of the class does, or None."""
    v = data.x[carriers, j]
    vc = data.x[in_c, j]
    if data.columns[j] in data.encodings:
        codes, counts = np.unique(np.round(v).astype(np.int64), return_counts=True)
        top = int(codes[np.argmax(counts)])
        if counts.max() >= share * len(v) and (np.round(vc) == top).mean() <= max_class_share:
            return Condition(j, codes=frozenset({top}))
        return None
    s = np.sort(v)
    k = int(np.ceil(share * len(s)))
    if k < 1:
        return None
    widths = s[k - 1:] - s[:len(s) - k + 1]
    i = int(np.argmin(widths))
    lo, hi = float(s[i]), float(s[i + k - 1])
    if ((vc >= lo) & (vc <= hi)).mean() <= max_class_share:
        return Condition(j, lo, hi)
    return None


def _public(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if not k.startswith("_")}


@dataclass(frozen=True)
class _Bins:
    """Each column discretised: codes for categoricals and columns of <= ``n`` distinct
    values, else ``n`` quantile bins; ``lo``/``hi`` each bin's value range."""

    index: np.ndarray                    # (N, F) int bin of each cell
    lo: list[np.ndarray]
    hi: list[np.ndarray]
    categorical: list[bool]

    @classmethod
    def of(cls, data: TabularData, n: int) -> _Bins:
        cols, los, his, cats = [], [], [], []
        for j, name in enumerate(data.columns):
            v = data.x[:, j]
            u = np.unique(v)
            if name in data.encodings or len(u) <= n:
                b = np.searchsorted(u, v)
                lo = hi = u
            else:
                edges = np.unique(np.quantile(v, np.linspace(0, 1, n + 1)[1:-1]))
                b = np.searchsorted(edges, v, side="right")
                lo = np.array([v[b == i].min() if (b == i).any() else np.nan
                               for i in range(len(edges) + 1)])
                hi = np.array([v[b == i].max() if (b == i).any() else np.nan
                               for i in range(len(edges) + 1)])
            cols.append(b.astype(np.int64))
            los.append(np.asarray(lo, dtype=np.float64))
            his.append(np.asarray(hi, dtype=np.float64))
            cats.append(name in data.encodings)
        return cls(np.stack(cols, axis=1), los, his, cats)

    def condition(self, j: int, bins: np.ndarray) -> Condition:
        if self.categorical[j]:
            return Condition(j, codes=frozenset(int(round(self.lo[j][b])) for b in bins))
        return Condition(j, float(np.nanmin(self.lo[j][bins])), float(np.nanmax(self.hi[j][bins])))


def contrast_cells(bins: _Bins, in_c: np.ndarray, floor: int, ratio: float,
                   limit: int, marginal: float = 3.0) -> list[Rule]:
    """Interval search over column pairs: cells (one bin of each column) holding at least
    ``floor`` rows of the class and, per row, at most ``ratio`` times as many in the other
    classes, while neither column's range on its own is that rare (more than ``marginal`` x
    ``ratio``: a range that alone separates the class is not a conjunction, and a strong
    single feature would otherwise fill the list); neighbouring numeric bins of a candidate
    cell merge (a window of days). The ``limit`` rarest elsewhere (then largest), as
    two-condition rules."""
    idx = bins.index
    n_f = idx.shape[1]
    n_c, n_o = max(int(in_c.sum()), 1), max(int((~in_c).sum()), 1)
    found: list[tuple[float, int, Rule]] = []
    marg_c = [np.bincount(idx[in_c, j], minlength=int(idx[:, j].max()) + 1) for j in range(n_f)]
    marg_o = [np.bincount(idx[~in_c, j], minlength=int(idx[:, j].max()) + 1)
              for j in range(n_f)]

    def alone(j: int, sel: list[int]) -> float:
        """The other classes' rate over the class's of one column's range on its own."""
        c = marg_c[j][sel].sum()
        return float((marg_o[j][sel].sum() / n_o) / (c / n_c)) if c else np.inf

    for j in range(n_f):
        for k in range(j + 1, n_f):
            wj, wk = int(idx[:, j].max()) + 1, int(idx[:, k].max()) + 1
            cell = idx[:, j] * wk + idx[:, k]
            cc = np.bincount(cell[in_c], minlength=wj * wk).reshape(wj, wk)
            co = np.bincount(cell[~in_c], minlength=wj * wk).reshape(wj, wk)
            hot = (cc >= 1) & (co / n_o <= ratio * cc / n_c)
            for a, b in zip(*np.nonzero(hot & (cc >= max(2, floor // 4)))):
                ja, kb = [int(a)], [int(b)]
                for axis, keep in ((0, ja), (1, kb)):
                    if bins.categorical[j if axis == 0 else k]:
                        continue
                    line = hot[:, b] if axis == 0 else hot[a, :]
                    start = stop = int(a if axis == 0 else b)
                    while start > 0 and line[start - 1]:
                        start -= 1
                    while stop < len(line) - 1 and line[stop + 1]:
                        stop += 1
                    keep[:] = list(range(start, stop + 1))
                total = int(cc[np.ix_(ja, kb)].sum())
                r = (co[np.ix_(ja, kb)].sum() / n_o) / (total / n_c)
                # a conjunction: neither column's range is rare elsewhere on its own
                if (total >= floor and r <= ratio and alone(j, ja) > marginal * ratio
                        and alone(k, kb) > marginal * ratio):
                    found.append((round(float(r), 3), -total,
                                  (bins.condition(j, np.array(ja)),
                                   bins.condition(k, np.array(kb)))))
    found.sort(key=lambda e: e[:2])
    out: list[Rule] = []
    for *_, r in found:
        if r not in out:
            out.append(r)
        if len(out) >= limit:
            break
    return out
