"""Text quarantine (issue 17): data-side recall, clean posts flagged and whether the trigger is
named exactly, on SST-2 (and HSOL) with the built-in text model; plus the scan's wall time and
the sacrificial model's ASR on the triggered test posts (did the backdoor take).

    OMP_NUM_THREADS=1 python benchmarks/text.py --dataset sst2 --seeds 0 \
        --runs clean rare-token-1 emoji-1 addsent-5 rare-token-0.5 emoji-0.5
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

from poisonguard.io import atomic_write_json, atomic_write_text
from poisonguard.metrics import attack_success_rate, detection_metrics
from poisonguard.modalities.text.attacks import text_attack
from poisonguard.modalities.text.data import TextData, load_text
from poisonguard.modalities.text.scan import TEXT_DETECTORS, TOKEN_SPEC, scan_text
from poisonguard.modalities.text.tokenizer import tokenize
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


def load(dataset: str) -> tuple[TextData, TextData]:
    """Training posts and test posts (SST-2: its test split; HSOL: a seeded 20% held out)."""
    if dataset == "sst2":
        train = load_text(SHARED / "sst2_train.csv.gz")
        return train, load_text(SHARED / "sst2_test.csv.gz", label_map=train.label_map)
    data = load_text(SHARED / "hsol.csv.gz")
    order = np.random.default_rng(0).permutation(len(data))
    cut = int(0.8 * len(data))
    return data.subset(np.sort(order[:cut])), data.subset(np.sort(order[cut:]))


def run_one(dataset: str, train: TextData, test: TextData, name: str, seed: int
            ) -> dict[str, Any]:
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
            rec = run_one(args.dataset, train, test, name, seed)
            print(json.dumps({k: rec[k] for k in ("run", "seed", "recall", "clean_flagged",
                                                  "poisoned_classes", "scan_s")}
                             | {"named": rec.get("trigger_named"),
                                "asr": rec.get("asr_sacrificial")}), flush=True)
            key = (rec["dataset"], rec["n_train"], rec["run"], rec["seed"])
            records = [r for r in records
                       if (r["dataset"], r["n_train"], r["run"], r["seed"]) != key] + [rec]
            atomic_write_json(path, records)
            atomic_write_text(RESULTS / f"{args.results}.md", render_md(records))


if __name__ == "__main__":
    main()
