"""The token-trigger miner: the text modality's input-space stage (BKI's and CUBE's ideas,
without a poison-rate input).

In each class, candidate triggers are words and word pairs (bigrams) that at least
``max(min_count, min_share * N)`` posts of the class carry (a floor on the size of a backdoor,
not a poison rate: on SST-2's phrase-level data 19 overlapping sub-phrases of one review share
"barely shocking") and that are rare in the other classes (their share of posts there at most
``max_other_ratio`` of their share in the class); candidates whose posts are mostly a confirmed
trigger's (``the cf``) are skipped. Candidates carried by the
same posts (Jaccard >= ``group_jaccard``: the words of an inserted sentence) form one group.

A group is confirmed as a trigger when removing its words from the class's posts that carry it
moves the sacrificial model's prediction off the class for a share of them whose Wilson lower
bound (``z`` = 3 standard errors) is at least ``min_flip``, so a handful of short posts cannot
confirm a group by chance. An all-to-one trigger was stamped on posts of other classes, so
without it the rest of the post argues for another class; a word merely typical of the class
(``masterpiece`` in positive reviews) leaves a post that still reads as the class.

Every post of the class carrying all of a confirmed group's features is flagged. The share of
the first stage's flags among a group's carriers is reported as evidence but not needed (at
0.5% poisoning the representation detectors may flag nothing).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from poisonguard.modalities.text.tokenizer import UNK, Vocabulary
from poisonguard.types import ClassFinding, DetectorResult

Predict = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class _Features:
    """Each post's distinct unigrams and bigrams, as (doc, feature) pairs."""

    doc: np.ndarray          # pair -> post
    feat: np.ndarray         # pair -> compact feature index
    keys: np.ndarray         # compact feature -> key (token id, or V + a * V + b)
    vocab_size: int

    def tokens_of(self, f: int) -> tuple[int, ...]:
        key = int(self.keys[f])
        v = self.vocab_size
        return (key,) if key < v else ((key - v) // v, (key - v) % v)


def _features(tokens: np.ndarray, vocab_size: int) -> _Features:
    n, width = tokens.shape
    v = np.int64(vocab_size)
    docs = np.repeat(np.arange(n, dtype=np.int64), width)
    uni = tokens.reshape(-1)
    keep = uni > UNK
    keys = [uni[keep]]
    dlist = [docs[keep]]
    if width > 1:
        a, b = tokens[:, :-1].reshape(-1), tokens[:, 1:].reshape(-1)
        ok = (a > UNK) & (b > UNK)
        keys.append(v + a[ok] * v + b[ok])
        dlist.append(np.repeat(np.arange(n, dtype=np.int64), width - 1)[ok])
    key = np.concatenate(keys)
    doc = np.concatenate(dlist)
    ukeys, inv = np.unique(key, return_inverse=True)
    pair = np.unique(doc * np.int64(len(ukeys)) + inv)
    return _Features(pair // len(ukeys), pair % len(ukeys), ukeys, vocab_size)


@dataclass(frozen=True)
class TokenTriggerMiner:
    min_count: int = 5
    min_share: float = 0.0005
    max_other_ratio: float = 0.1
    group_jaccard: float = 0.7
    min_flip: float = 0.5
    z: float = 3.0
    max_candidates: int = 1500
    name: str = "token_trigger"

    def detect(self, tokens: np.ndarray, labels: np.ndarray, flags: np.ndarray,
               classes: list[int], predict: Predict, vocab: Vocabulary) -> DetectorResult:
        """``tokens`` (N, L) ids; ``flags`` the first stage's; ``predict`` maps ids to class
        probabilities (the sacrificial model)."""
        t0 = time.perf_counter()
        feats = _features(tokens, len(vocab))
        k = int(labels.max()) + 1
        n_f = len(feats.keys)
        counts = np.bincount(feats.feat + n_f * labels[feats.doc],
                             minlength=k * n_f).reshape(k, n_f)
        order = np.argsort(feats.feat, kind="stable")
        f_ptr = np.searchsorted(feats.feat[order], np.arange(n_f + 1))
        docs_by_feat = feats.doc[order]
        d_order = np.argsort(feats.doc, kind="stable")
        d_ptr = np.searchsorted(feats.doc[d_order], np.arange(len(tokens) + 1))
        feats_by_doc = feats.feat[d_order]
        class_n = np.bincount(labels, minlength=k)
        scores = np.zeros(len(labels))
        out = np.zeros(len(labels), dtype=bool)
        findings = []
        for c in classes:
            in_c = labels == c
            n_c, n_o = counts[c], counts.sum(0) - counts[c]
            rate_c = n_c / max(class_n[c], 1)
            rate_o = n_o / max(len(labels) - class_n[c], 1)
            floor = max(self.min_count, int(np.ceil(self.min_share * len(labels))))
            cand = np.flatnonzero((n_c >= floor) & (rate_o <= self.max_other_ratio * rate_c))
            cand = cand[np.argsort(-n_c[cand], kind="stable")][:self.max_candidates]
            is_cand = np.zeros(n_f, dtype=bool)
            is_cand[cand] = True
            tested: list[dict[str, Any]] = []
            confirmed: list[dict[str, Any]] = []
            taken = np.zeros(n_f, dtype=bool)
            covered = np.zeros(len(labels), dtype=bool)
            for f in cand:
                if taken[f]:
                    continue
                carriers = docs_by_feat[f_ptr[f]:f_ptr[f + 1]]
                carriers = carriers[in_c[carriers]]
                if covered[carriers].mean() >= 0.5:  # mostly a confirmed trigger's posts
                    taken[f] = True
                    continue
                sub = np.concatenate([feats_by_doc[d_ptr[d]:d_ptr[d + 1]] for d in carriers])
                overlap = np.bincount(sub, minlength=n_f)
                jac = overlap / np.maximum(n_c + len(carriers) - overlap, 1)
                group = np.flatnonzero(is_cand & ~taken & (jac >= self.group_jaccard))
                group = group if f in group else np.append(group, f)
                taken[group] = True
                ids = sorted({t for g in group for t in feats.tokens_of(int(g))})
                mod = tokens[carriers].copy()
                mod[np.isin(mod, ids)] = 0
                emptied = (mod == 0).all(1)
                mod[emptied, 0] = UNK
                moved = (predict(mod).argmax(1) != c) & ~emptied
                flip = float(moved.mean())
                bound = wilson_lower(int(moved.sum()), len(moved), self.z)
                entry = {"tokens": _ordered(tokens[carriers[0]], ids, vocab),
                         "n_carriers": int(len(carriers)),
                         "n_other_classes": int(n_o[group].max()),
                         "flip": round(flip, 4), "flip_lower_bound": round(bound, 4),
                         "flagged_share": round(float(flags[carriers].mean()), 4),
                         "_group": group}
                tested.append(entry)
                if bound >= self.min_flip:
                    confirmed.append(entry)
                    covered[carriers] = True
            hits = np.zeros(len(labels), dtype=bool)
            for e in confirmed:
                has = np.ones(len(labels), dtype=bool)
                for g in e["_group"]:
                    mark = np.zeros(len(labels), dtype=bool)
                    mark[docs_by_feat[f_ptr[g]:f_ptr[g + 1]]] = True
                    has &= mark
                has &= in_c
                hits |= has
                scores[has] = np.maximum(scores[has], e["flip_lower_bound"])
            out |= hits
            top = sorted(tested, key=lambda e: -e["flip_lower_bound"])[:5]
            evidence: dict[str, Any] = {
                "n_candidates": int(len(cand)), "n_groups_tested": len(tested),
                "top_groups": [_public(e) for e in top],
                "triggers": [{"class": int(c), "modality": "text", "tokens": e["tokens"],
                              "n_carriers": e["n_carriers"], "flip": e["flip"],
                              "flip_lower_bound": e["flip_lower_bound"]}
                             for e in confirmed]}
            if confirmed:
                evidence["reason"] = ("removing " + ", ".join(" ".join(e["tokens"])
                                                              for e in confirmed)
                                      + " moves the model's prediction off the class for "
                                      + ", ".join(f"{e['flip']:.0%}" for e in confirmed)
                                      + " of the posts carrying it")
            findings.append(ClassFinding(int(c), bool(confirmed), int(in_c.sum()),
                                         int(hits.sum()), evidence))
        rule = {"rule": "words/bigrams carried by >= max(min_count, min_share x N) posts of the "
                        "class, not mostly a confirmed trigger's carriers, rare in the "
                        "others (rate <= max_other_ratio x the class's), grouped by shared "
                        "carriers (Jaccard >= group_jaccard); a group is a trigger when "
                        "removing it moves its carriers' predictions off the class for a "
                        "share whose Wilson lower bound (z) is >= min_flip (a post left empty "
                        "counts as not moved)",
                "z": self.z,
                "min_count": self.min_count, "min_share": self.min_share,
                "max_other_ratio": self.max_other_ratio,
                "group_jaccard": self.group_jaccard, "min_flip": self.min_flip}
        return DetectorResult(self.name, scores, out, self.min_flip, rule, tuple(findings),
                              time.perf_counter() - t0)


def wilson_lower(k: int, n: int, z: float) -> float:
    """Wilson score lower bound of a proportion k/n at ``z`` standard errors."""
    if n == 0:
        return 0.0
    p = k / n
    denom = 1 + z * z / n
    centre = p + z * z / (2 * n)
    return float((centre - z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / denom)


def _ordered(row: np.ndarray, ids: list[int], vocab: Vocabulary) -> list[str]:
    """The group's tokens in the order they appear in one carrier post."""
    seen: list[int] = []
    for t in row.tolist():
        if t in ids and t not in seen:
            seen.append(t)
    seen += [t for t in ids if t not in seen]
    return [vocab.tokens[t] for t in seen]


def _public(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if not k.startswith("_")}
