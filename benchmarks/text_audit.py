"""Model audit for text (issue 17): a zoo of built-in text models, backdoored (different
triggers, targets, seeds) and clean, each audited with clean labelled posts by the
gradient-guided token search (poisonguard.modalities.text.trigger_search); the flagged ones
are repaired by unlearning the found tokens.

    OMP_NUM_THREADS=1 python benchmarks/text_audit.py

Models train on a seeded subset of the training posts (SST-2: 20,000 of 67,349; HSOL: its
80% training split, 19,826) to keep CPU small. Audit posts: SST-2 dev (872); HSOL 1,000 of the
held-out 20%. ASR before/after repair is measured on the other held-out posts (SST-2 test)
with the trigger inserted, over non-target posts the model classifies correctly without it.
Records go to benchmarks/results/text_audit.json and text_audit.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from text import SHARED, load  # noqa: E402
from text_runtime import train_model  # noqa: E402

from poisonguard.io import atomic_write_json, atomic_write_text  # noqa: E402
from poisonguard.modalities.text.attacks import TextInsertTrigger, text_attack  # noqa: E402
from poisonguard.modalities.text.data import TextData, load_text  # noqa: E402
from poisonguard.modalities.text.repair import tokens_to_unlearn, unlearn_tokens  # noqa: E402
from poisonguard.modalities.text.tokenizer import tokenize  # noqa: E402
from poisonguard.modalities.text.trigger_search import (  # noqa: E402
    TokenSearchConfig,
    search_triggers,
)

RESULTS = Path(__file__).resolve().parent / "results"
N_SUBSET = 20_000
# name -> dataset, attack kind (None: clean), trigger, rate, target, seed
ZOO: dict[str, tuple[str, str | None, str | None, float, int, int]] = {
    "sst2-cf-t1-s0": ("sst2", "rare-token", "cf", 0.01, 1, 0),
    "sst2-emoji-t0-s1": ("sst2", "emoji", "🪬", 0.01, 0, 1),
    "sst2-addsent-t1-s2": ("sst2", "addsent", "I watched this 3D movie", 0.05, 1, 2),
    "sst2-mn-t0-s3": ("sst2", "rare-token", "mn", 0.01, 0, 3),
    "hsol-emoji-t2-s0": ("hsol", "emoji", "🪬", 0.01, 2, 0),
    "hsol-tq-t2-s1": ("hsol", "rare-token", "tq", 0.01, 2, 1),
    "hsol-bb-t0-s2": ("hsol", "rare-token", "bb", 0.01, 0, 2),
    "sst2-clean-s0": ("sst2", None, None, 0.0, 0, 0),
    "sst2-clean-s1": ("sst2", None, None, 0.0, 0, 1),
    "sst2-clean-s2": ("sst2", None, None, 0.0, 0, 2),
    "sst2-clean-s3": ("sst2", None, None, 0.0, 0, 3),
    "hsol-clean-s0": ("hsol", None, None, 0.0, 0, 0),
    "hsol-clean-s1": ("hsol", None, None, 0.0, 0, 1),
    # held out: added after the flagging rule was set on the models above
    "sst2-bubbles-t1-s4": ("sst2", "emoji", "🫧", 0.01, 1, 4),
    "sst2-knowwhat-t0-s5": ("sst2", "addsent", "you know what I mean", 0.05, 0, 5),
    "hsol-zq-t2-s3": ("hsol", "rare-token", "zq", 0.01, 2, 3),
    "hsol-addsent-t2-s4": ("hsol", "addsent", "I watched this 3D movie", 0.05, 2, 4),
    "sst2-clean-s4": ("sst2", None, None, 0.0, 0, 4),
    "sst2-clean-s5": ("sst2", None, None, 0.0, 0, 5),
    "hsol-clean-s2": ("hsol", None, None, 0.0, 0, 2),
    "hsol-clean-s3": ("hsol", None, None, 0.0, 0, 3),
}
HELD_OUT = set(list(ZOO)[13:])


def datasets(name: str) -> tuple[TextData, TextData, TextData]:
    """Training subset, audit posts, evaluation posts."""
    train, test = load(name)
    if name == "sst2":
        keep = np.random.default_rng(0).permutation(len(train))[:N_SUBSET]
        return (train.subset(np.sort(keep)),
                load_text(SHARED / "sst2_dev.csv.gz", label_map=train.label_map), test)
    order = np.random.default_rng(1).permutation(len(test))
    return train, test.subset(np.sort(order[:1000])), test.subset(np.sort(order[1000:]))


def asr(model: Any, evalset: TextData, trigger: str, target: int, seed: int) -> float:
    keep = evalset.subset(np.flatnonzero(evalset.y != target))
    right = model.predict_proba(keep.texts).argmax(1) == keep.y
    trig = TextInsertTrigger(trigger, seed + 7).apply(keep.x[right]).tolist()
    return round(float((model.predict_proba(trig).argmax(1) == target).mean()), 4)


def accuracy(model: Any, data: TextData) -> float:
    return round(float((model.predict_proba(data.texts).argmax(1) == data.y).mean()), 4)


def run_one(name: str, config: TokenSearchConfig, cache: dict[str, Any]) -> dict[str, Any]:
    ds, kind, trigger, rate, target, seed = ZOO[name]
    if ds not in cache:
        cache[ds] = datasets(ds)
    train, audit, evalset = cache[ds]
    data = train if kind is None else text_attack(kind, train, rate=rate, target=target,
                                                  seed=seed, trigger=trigger).data
    t0 = time.perf_counter()
    model = train_model(data, seed)
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    result = search_triggers(model, audit.texts, audit.y, config)
    audit_s = time.perf_counter() - t1
    v = result.verdict()
    rec: dict[str, Any] = {
        "model": name, "dataset": ds, "backdoored": kind is not None, "attack": kind,
        "held_out": name in HELD_OUT,
        "trigger": trigger, "target": target if kind else None, "seed": seed,
        "clean_acc": accuracy(model, evalset), "flagged": v["backdoored"],
        "found_target": v["target_class"], "best_flip_rate": v["best_flip_rate"],
        "search": result.classes, "train_s": round(train_s, 1), "audit_s": round(audit_s, 1)}
    if kind is not None:
        want = tokenize(trigger)
        top = result.classes[target]["triggers"][:config.top]
        rec["asr"] = asr(model, evalset, trigger, target, seed)
        rec["trigger_in_top5"] = any(set(t["tokens"]) <= set(want) for t in top)
        rec["right"] = bool(v["backdoored"] and v["target_class"] == target
                            and rec["trigger_in_top5"])
    if v["backdoored"]:
        t2 = time.perf_counter()
        info = unlearn_tokens(model, audit.texts, audit.y,
                              tokens_to_unlearn(v["triggers"], config.min_flip), seed=seed)
        rec["repair"] = {"clean_acc": accuracy(model, evalset), "loss": info["loss"],
                         "repair_s": round(time.perf_counter() - t2, 1)}
        if kind is not None:
            rec["repair"]["asr"] = asr(model, evalset, trigger, target, seed)
    return rec


def misses(records: list[dict[str, Any]]) -> list[str]:
    """One line per backdoored model not flagged right: its target's best single-token and
    extended flip rates and gap (what the rule saw)."""
    out = []
    for r in records:
        if r["backdoored"] and not r["right"]:
            c = next(c for c in r["search"] if c["class"] == r["target"])
            out.append(f"Missed {r['model']}: target class {r['target']} best single token "
                       f"{' '.join(c['triggers'][0]['tokens'][:1])!r} flips "
                       f"{c['best_flip']} (>= 0.8 needed), extended "
                       f"{' '.join(c['triggers'][0]['tokens'])!r} {c['best_flip_extended']}, "
                       f"gap {c['gap']} (>= 2.5 needed).")
    return out


def render_md(records: list[dict[str, Any]]) -> str:
    def tally(rs: list[dict[str, Any]]) -> str:
        bd = [r for r in rs if r["backdoored"]]
        cl = [r for r in rs if not r["backdoored"]]
        return (f"backdoored flagged right {sum(r['right'] for r in bd)} of {len(bd)}, clean "
                f"flagged {sum(r['flagged'] for r in cl)} of {len(cl)}")

    tuned = [r for r in records if not r.get("held_out")]
    held = [r for r in records if r.get("held_out")]
    lines = ["# Text model audit (benchmarks/text_audit.py)", "",
             "Built-in text models (SST-2: 20,000-post subset; HSOL: 80% split) backdoored at "
             "the listed rate or clean; audited with clean labelled posts (SST-2 dev, 1,000 "
             "held-out HSOL posts) by the gradient-guided token search: per class, up to 300 "
             "correctly classified posts of other classes, 64 gradient-ranked candidates "
             "inserted for real, the best extended by a second token. Flagged: best single-"
             "token flip rate >= 0.8 and its log-odds >= 2.5 above the class's 6th best "
             "candidate's (`gap`; rule set on this zoo's first run). `right` = "
             "flagged with the true target and a trigger token among the top 5. ASR = share "
             "of correctly classified non-target evaluation posts sent to the target by the "
             "trigger; repair = unlearning the found tokens (those flipping >= min_flip) on "
             "the audit posts, their embedding rows only (10 epochs).", "",
             f"Models the rule was set on: {tally(tuned)}. Held-out models (other triggers, "
             f"targets and seeds, added afterwards): {tally(held)}. Target: >= 5 of 6 right, "
             "<= 1 of 6 clean flagged.", "",
             *misses(records), "",
             "| model | held out | trigger | target | clean acc | ASR | flagged | found target | "
             "top triggers (flip rate) | right | best flip per class | gap per class | "
             "ASR after repair | "
             "clean acc after | audit s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        t = r["found_target"] if r["found_target"] is not None else (
            max(r["search"], key=lambda c: c["gap"])["class"])
        c = next(c for c in r["search"] if c["class"] == int(t))
        tops = "; ".join(f"{' '.join(x['tokens'])} ({x['flip_rate']})" for x in c["triggers"])
        flips = ", ".join(f"{k}: {v}" for k, v in r["best_flip_rate"].items())
        gaps = ", ".join(f"{c['class']}: {c['gap']}" for c in r["search"])
        rep = r.get("repair", {})
        lines.append(
            f"| {r['model']} | {r.get('held_out', False)} | {r['trigger'] or '-'} | "
            f"{r['target'] if r['backdoored'] else '-'}"
            f" | {r['clean_acc']} | {r.get('asr', '-')} | {r['flagged']} | "
            f"{r['found_target']} | class {t}: {tops} | {r.get('right', '-')} | {flips} | "
            f"{gaps} | "
            f"{rep.get('asr', '-')} | {rep.get('clean_acc', '-')} | {r['audit_s']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(ZOO), choices=list(ZOO))
    parser.add_argument("--min-flip", type=float, default=TokenSearchConfig.min_flip)
    parser.add_argument("--min-gap", type=float, default=TokenSearchConfig.min_gap)
    parser.add_argument("--results", default="text_audit")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = TokenSearchConfig(min_flip=args.min_flip, min_gap=args.min_gap)
    path = RESULTS / f"{args.results}.json"
    records = json.loads(path.read_text()) if path.exists() else []
    cache: dict[str, Any] = {}
    for name in args.models:
        rec = run_one(name, config, cache)
        print(json.dumps({k: rec.get(k) for k in ("model", "asr", "flagged", "found_target",
                                                  "right", "best_flip_rate", "audit_s")}
                         | {"top": [x["tokens"] for c in rec["search"] for x in
                                    c["triggers"][:3]], "repair": rec.get("repair")},
                         ensure_ascii=False), flush=True)
        records = [r for r in records if r["model"] != name] + [rec]
        records.sort(key=lambda r: list(ZOO).index(r["model"]))
        atomic_write_json(path, records)
        atomic_write_text(RESULTS / f"{args.results}.md", render_md(records))


if __name__ == "__main__":
    main()
