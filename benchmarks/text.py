"""Text quarantine (issue 17): data-side recall, clean posts flagged and whether the trigger is
named exactly, on SST-2 (and HSOL) with the built-in text model; plus the scan's wall time and
the sacrificial model's ASR on the triggered test posts (did the backdoor take).

    OMP_NUM_THREADS=1 python benchmarks/text.py --dataset sst2 --seeds 0 \
        --runs clean rare-token-1 emoji-1 addsent-5 rare-token-0.5 emoji-0.5
    OMP_NUM_THREADS=1 python benchmarks/text.py --dataset sst2 --seeds 0 --retrain \
        --runs rare-token-1 emoji-1 addsent-5
    OMP_NUM_THREADS=1 python benchmarks/text.py --dataset sst2 --n-train 10000 --seeds 0

Records are merged into benchmarks/results/text.json (keyed by dataset, n, run, seed) and
summarised in benchmarks/results/text.md. Targets: SST-2 class 1 (positive); HSOL class 2
("neither": offensive posts carrying the trigger pass moderation).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from poisonguard.data.labeled import LabeledData
from poisonguard.io import atomic_write_json, atomic_write_text
from poisonguard.metrics import attack_success_rate, detection_metrics
from poisonguard.modalities.text.attacks import text_attack
from poisonguard.modalities.text.data import TextData, load_text
from poisonguard.modalities.text.scan import (
    TEXT_DETECTORS,
    TOKEN_SPEC,
    TextOptions,
    scan_text,
    train_text_model,
)
from poisonguard.modalities.text.tokenizer import Vocabulary, tokenize
from poisonguard.pipeline import ScanConfig

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent.parent / "shared" / "datasets" / "text"
RESULTS = ROOT / "results"
# run name -> (attack or None, rate, clean_label)
RUNS: dict[str, tuple[str | None, float, bool]] = {
    "clean": (None, 0.0, False),
    "rare-token-1": ("rare-token", 0.01, False), "rare-token-0.5": ("rare-token", 0.005, False),
    "emoji-1": ("emoji", 0.01, False), "emoji-0.5": ("emoji", 0.005, False),
    "addsent-5": ("addsent", 0.05, False),
    "emoji-clean-label-5": ("emoji", 0.05, True),
}
TARGET = {"sst2": 1, "hsol": 2}
_CLEAN_RUNS: dict[tuple[str, int, str, int], dict[str, Any]] = {}


def load(dataset: str) -> tuple[TextData, TextData]:
    """Training posts and test posts (SST-2: its test split; HSOL: a seeded 20% held out)."""
    if dataset == "sst2":
        train = load_text(SHARED / "sst2_train.csv.gz")
        return train, load_text(SHARED / "sst2_test.csv.gz", label_map=train.label_map)
    data = load_text(SHARED / "hsol.csv.gz")
    order = np.random.default_rng(0).permutation(len(data))
    cut = int(0.8 * len(data))
    return data.subset(np.sort(order[:cut])), data.subset(np.sort(order[cut:]))


def retrain_eval(data: TextData, test: TextData, triggered: TextData | None, target: int,
                 seed: int) -> dict[str, Any]:
    """Train the built-in text model on ``data`` (vocabulary fit on it, seeded) and measure
    its clean test accuracy and, given ``triggered`` (the non-target test posts with the
    trigger, in test order), its ASR: ``asr_raw`` over all of them, ``asr`` over those whose
    clean version the model classifies correctly (a flip the trigger caused)."""
    options = TextOptions()
    vocab = Vocabulary.fit(data.texts, min_count=options.min_count)
    tokens = vocab.encode(data.texts, options.max_tokens)[0]
    t0 = time.perf_counter()
    train = train_text_model(LabeledData(x=tokens, y=data.y, ids=data.ids), vocab,
                             ScanConfig(seed=seed, progress=False), options, data.n_classes,
                             stage="retrain")
    clf = train.classifier
    pred = clf.predict(vocab.encode(test.texts, options.max_tokens)[0])
    rec: dict[str, Any] = {"n": len(data), "clean_acc": round(float((pred == test.y).mean()), 4),
                           "train_s": round(time.perf_counter() - t0, 1)}
    if triggered is not None:
        keep = test.y != target
        hit = clf.predict(vocab.encode(triggered.texts, options.max_tokens)[0]) == target
        right = pred[keep] == test.y[keep]
        rec["asr_raw"] = round(float(hit.mean()), 4)
        rec["asr"] = round(float(hit[right].mean()), 4)
    return rec


def run_one(dataset: str, train: TextData, test: TextData, name: str, seed: int,
            retrain: bool = False) -> dict[str, Any]:
    attack, rate, clean_label = RUNS[name]
    target = TARGET[dataset]
    truth = np.zeros(len(train), dtype=bool)
    data, poisoned = train, None
    if attack is not None:
        poisoned = text_attack(attack, train, rate=rate, target=target, seed=seed, test=test,
                               clean_label=clean_label)
        data, truth = poisoned.data, poisoned.is_poison
    t0 = time.perf_counter()
    result = scan_text(data, ScanConfig(seed=seed, detectors=TEXT_DETECTORS))
    wall = time.perf_counter() - t0
    m = detection_metrics(result.flags, truth, result.combined.scores)
    rec: dict[str, Any] = {
        "dataset": dataset, "n_train": len(train), "run": name, "seed": seed,
        "attack": None if poisoned is None else poisoned.attack,
        "n_poison": int(truth.sum()), "scan_s": round(wall, 1),
        "timings": result.timings, "poisoned_classes": result.poisoned_classes,
        "triggers": result.triggers,
        "recall": m["recall"] if truth.any() else None,
        "clean_flagged": round(float((result.flags & ~truth).sum() / (~truth).sum()), 5),
        "n_flagged": int(result.flags.sum()),
        "per_detector_flags": {r.name: int(r.flags.sum()) for r in result.detectors},
        "train_accuracy": round(result.text_info["train_accuracy"], 4),
    }
    if poisoned is not None:
        want = tokenize(poisoned.attack["trigger"])
        named = [t for t in result.triggers if t["class"] == target]
        rec["trigger_named"] = any(t["tokens"] == want for t in named)
        rec["trigger_tokens_found"] = [t["tokens"] for t in named]
        clf = result.classifier
        assert result.vocab is not None and poisoned.test_triggered is not None
        ids = result.vocab.encode(poisoned.test_triggered.x.tolist(), 128)[0]
        assert clf.input_spec == TOKEN_SPEC
        rec["asr_sacrificial"] = round(attack_success_rate(clf.predict(ids),
                                                           poisoned.test_triggered.y), 4)
    clean_ids = result.vocab.encode(test.x.tolist(), 128)[0] if result.vocab else None
    if clean_ids is not None:
        rec["clean_acc_sacrificial"] = round(float((result.classifier.predict(clean_ids)
                                                    == test.y).mean()), 4)
    if retrain:
        kept = data.subset(np.flatnonzero(~result.flags))
        rec["retrain_sanitized"] = retrain_eval(
            kept, test, None if poisoned is None else poisoned.test_triggered, target, seed)
        if poisoned is not None:
            rec["retrain_sanitized"]["n_poison_left"] = int((truth & ~result.flags).sum())
            key = (dataset, len(train), name.split("-")[0], seed)
            if key not in _CLEAN_RUNS:  # the clean-data model per trigger kind (its ASR)
                _CLEAN_RUNS[key] = retrain_eval(train, test, poisoned.test_triggered, target,
                                                seed)
            rec["retrain_clean"] = _CLEAN_RUNS[key]
    return rec


def render_md(records: list[dict[str, Any]]) -> str:
    lines = ["# Text quarantine (benchmarks/text.py)", "",
             "Built-in text model (token embeddings, mean+max pooled, 64-d `embed`), one scan "
             "round, representation detectors + token-trigger miner; seed and n as listed. "
             "`clean flagged` = share of clean posts flagged; `named` = the miner's trigger for "
             "the target class equals the inserted trigger's tokens; ASR and clean accuracy "
             "are the sacrificial model's (trained on the poisoned set) on the triggered / "
             "clean test posts.", "",
             "| dataset | n | run | seed | poisons | recall | clean flagged | classes | named | "
             "triggers found | ASR (sacr.) | clean acc (sacr.) | scan s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["dataset"], r["n_train"], r["run"], r["seed"])):
        found = "; ".join(" ".join(t["tokens"]) + f" (class {t['class']})"
                          for t in r["triggers"]) or "none"
        lines.append(
            f"| {r['dataset']} | {r['n_train']} | {r['run']} | {r['seed']} | {r['n_poison']} | "
            f"{'-' if r['recall'] is None else round(r['recall'], 4)} | "
            f"{r['clean_flagged']:.4f} | {r['poisoned_classes']} | "
            f"{r.get('trigger_named', '-')} | {found} | {r.get('asr_sacrificial', '-')} | "
            f"{r.get('clean_acc_sacrificial', '-')} | {r['scan_s']} |")
    rows = [r for r in records if "retrain_clean" in r]
    if rows:
        lines += ["", "## Sanitise and retrain (`--retrain`)", "",
                  "The built-in text model retrained (same seed, vocabulary refit) on the posts "
                  "the scan kept, and on the clean training set. `ASR` = share of the "
                  "non-target test posts the model classifies correctly without the trigger "
                  "that it assigns to the target with it; `ASR raw` = share of all triggered "
                  "non-target test posts assigned to the target (includes the model's own "
                  "errors). Target: ASR <= 2%, clean accuracy within 1 point of the "
                  "clean-data model. Rare-token and emoji runs of one seed poison the same "
                  "posts (the victims are drawn by the seed), the scan removes exactly those, "
                  "and neither trigger is in the retrained vocabulary (both read as unknown), "
                  "so their rows coincide.", "",
                  "| dataset | n | run | seed | poisons left | ASR (sanitised) | ASR raw "
                  "(sanitised) | clean acc (sanitised) | ASR (clean model) | ASR raw (clean "
                  "model) | clean acc (clean model) | acc gap (points) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: (r["dataset"], r["n_train"], r["run"], r["seed"])):
            s, c = r["retrain_sanitized"], r["retrain_clean"]
            lines.append(
                f"| {r['dataset']} | {r['n_train']} | {r['run']} | {r['seed']} | "
                f"{s['n_poison_left']} | {s['asr']} | {s['asr_raw']} | {s['clean_acc']} | "
                f"{c['asr']} | {c['asr_raw']} | {c['clean_acc']} | "
                f"{round(100 * (c['clean_acc'] - s['clean_acc']), 2)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="sst2", choices=sorted(TARGET))
    parser.add_argument("--n-train", type=int, default=None,
                        help="seeded random subset of the training posts (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--runs", nargs="+", default=["clean", "rare-token-1", "emoji-1",
                                                      "addsent-5"], choices=sorted(RUNS))
    parser.add_argument("--results", default="text")
    parser.add_argument("--retrain", action="store_true",
                        help="also retrain on the sanitised posts and on the clean posts and "
                             "measure ASR and clean accuracy")
    args = parser.parse_args()
    torch.set_num_threads(1)
    train, test = load(args.dataset)
    if args.n_train and args.n_train < len(train):
        keep = np.random.default_rng(0).permutation(len(train))[:args.n_train]
        train = train.subset(np.sort(keep))
    path = RESULTS / f"{args.results}.json"
    records = json.loads(path.read_text()) if path.exists() else []
    for seed in args.seeds:
        for name in args.runs:
            rec = run_one(args.dataset, train, test, name, seed, args.retrain)
            print(json.dumps({k: rec[k] for k in ("run", "seed", "recall", "clean_flagged",
                                                  "poisoned_classes", "scan_s")}
                             | {"named": rec.get("trigger_named"),
                                "asr": rec.get("asr_sacrificial"),
                                "retrain": rec.get("retrain_sanitized"),
                                "clean_model": rec.get("retrain_clean")}), flush=True)
            key = (rec["dataset"], rec["n_train"], rec["run"], rec["seed"])
            records = [r for r in records
                       if (r["dataset"], r["n_train"], r["run"], r["seed"]) != key] + [rec]
            atomic_write_json(path, records)
            atomic_write_text(RESULTS / f"{args.results}.md", render_md(records))


if __name__ == "__main__":
    main()
