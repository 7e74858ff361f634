"""Quarantine on attacks it was not tuned on (issue 15): each attack's ASR on the sacrificial
model trained on the poisoned set, the scan's recall / clean samples flagged / classes named,
with and without a 500-sample trusted set (drawn from the test split, disjoint from the
evaluation images), and ASR / clean accuracy after sanitising.

    python benchmarks/agnostic.py --dataset mnist --n-train 10000 --seeds 0 \
        --attacks badnets-a2a wanet sig adaptive-blend
    python benchmarks/agnostic.py --attacks badnets10 --columns trusted --results agn_t && \
        python benchmarks/agnostic.py --merge agn_t

Results are merged into benchmarks/results/agnostic.json (one record per run) and summarised in
benchmarks/results/agnostic.md. An attack whose ASR on the poisoned-set model is < 50% is
reported, not scored (the issue's rule).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from poisonguard.attacks import make_attack
from poisonguard.attacks.base import PoisonedData
from poisonguard.data import LabeledData, load_shared
from poisonguard.io import atomic_write_json, atomic_write_text
from poisonguard.metrics import detection_metrics
from poisonguard.pipeline import ScanConfig, evaluate_model, retrain_unlearning, scan

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent.parent / "shared" / "datasets"
RESULTS = ROOT / "results"
# name -> (attack, kwargs); targets follow the seed as in quarantine.py
SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "badnets10": ("badnets", {"rate": 0.1, "size": 3}),
    "blended10": ("blended", {"rate": 0.1, "alpha": 0.2}),
    "badnets-a2a": ("badnets", {"rate": 0.1, "mode": "all-to-all", "target": None, "size": 3}),
    "badnets-random": ("badnets-random", {"rate": 0.005}),
    "wanet": ("wanet", {"rate": 0.1}),
    "sig": ("sig", {"rate": 0.8}),
    "adaptive-blend": ("adaptive-blend", {"rate": 0.01}),
    "adaptive-patch": ("adaptive-patch", {"rate": 0.01}),
    "trojan": ("trojan", {"rate": 0.1}),
    "low-frequency": ("low-frequency", {"rate": 0.1}),
    "label-consistent": ("label-consistent", {"rate": 0.5}),
    "clean": ("clean", {}),
}


def target_for(seed: int) -> int:
    return (3 * seed + 1) % 10


def run_one(attack: str, seed: int, train: LabeledData, test: LabeledData,
            trusted: LabeledData, epochs: int | None,
            columns: tuple[bool, ...] = (False, True), unlearn: bool = False) -> list[dict]:
    name, kwargs = SPECS[attack]
    if name == "clean":  # no poison: the false-positive floor
        poisoned = PoisonedData(train, np.zeros(len(train), dtype=bool), train.y.copy(),
                                {"name": "clean"}, None)
    else:
        kwargs = {"target": target_for(seed), **kwargs}
        poisoned = make_attack(name, train, seed=seed, test=test, **kwargs)
    truth = poisoned.is_poison
    out = []
    for use_trusted in columns:
        t0 = time.perf_counter()
        result = scan(poisoned.data, ScanConfig(seed=seed, epochs=epochs,
                                                trusted=trusted if use_trusted else None))
        before = evaluate_model(result.classifier, test, poisoned)
        after = (evaluate_model(result.final_classifier, test, poisoned)
                 if result.final_classifier is not None else None)
        unlearned = None
        if unlearn and result.flags.any():
            unlearned = evaluate_model(retrain_unlearning(result).classifier, test, poisoned)
        wide = [r.name for r in result.detectors if r.extras.get("dataset_wide")]
        out.append({
            "attack": attack, "params": poisoned.attack, "seed": seed,
            "trusted": use_trusted, "n_train": len(train), "n_poison": int(truth.sum()),
            "target": poisoned.target, "reported": result.poisoned_classes,
            "dataset_wide": wide, "detection": detection_metrics(result.flags, truth,
                                                                 result.combined.scores),
            "per_detector_recall": {r.name: round(float(r.flags[truth].mean()), 4)
                                    if truth.any() else None for r in result.detectors},
            "per_detector_classes": {r.name: r.suspicious_classes for r in result.detectors},
            "before": before, "after": after, "unlearn_retrain": unlearned,
            "scan_wall_s": round(time.perf_counter() - t0, 1),
        })
        print(json.dumps({k: out[-1][k] for k in ("attack", "trusted", "reported",
                                                  "dataset_wide", "before", "after")}),
              flush=True)
    return out


def summarise(records: list[dict]) -> str:
    lines = ["# Quarantine on attacks it was not tuned on", "",
             "Written by `benchmarks/agnostic.py`. ASR before = the sacrificial model trained on "
             "the poisoned set; after = the model trained on the sanitised set. `T` = with a "
             "500-sample trusted set.", "",
             "| dataset | attack | seed | T | ASR before | scored | recall | clean flagged | "
             "target | reported | dataset-wide | ASR after | acc before / after | "
             "unlearning retrain: ASR / acc |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        d, b, a = r["detection"], r["before"], r["after"] or {}
        u = r.get("unlearn_retrain") or {}
        asr_b = b.get("asr")
        scored = asr_b is not None and asr_b >= 0.5
        fmt = lambda v: "–" if v is None else f"{100 * v:.1f}%"  # noqa: E731
        rec = "–" if d["recall"] is None else f"{d['recall']:.3f}"
        status = ("clean data" if r["attack"] == "clean"
                  else "yes" if scored else "no (ASR < 50%)")
        lines.append(
            f"| {r['dataset']} | {r['attack']} | {r['seed']} | {'T' if r['trusted'] else '-'} | "
            f"{fmt(asr_b)} | {status} | {rec} | "
            f"{fmt(d['fpr'])} | {r['target']} | {r['reported']} | "
            f"{', '.join(r['dataset_wide']) or '-'} | {fmt(a.get('asr'))} | "
            f"{fmt(b.get('clean_accuracy'))} / {fmt(a.get('clean_accuracy'))} | "
            f"{fmt(u.get('asr'))} / {fmt(u.get('clean_accuracy'))} |")
    return "\n".join(lines) + "\n"


def _key(rec: dict) -> tuple:
    return rec["dataset"], rec["attack"], rec["seed"], rec["trusted"], rec["n_train"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion_mnist", "cifar10"])
    p.add_argument("--n-train", type=int, default=10_000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--attacks", nargs="+", default=list(SPECS), choices=list(SPECS))
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--unlearn", action="store_true",
                   help="also train with the flagged samples toward other-class targets "
                        "(retrain_unlearning) and report its ASR and accuracy")
    p.add_argument("--columns", choices=["both", "plain", "trusted"], default="both",
                   help="run without the trusted set, with it, or both (records are merged)")
    p.add_argument("--results", default="agnostic",
                   help="results file stem under benchmarks/results (one per concurrent run)")
    p.add_argument("--merge", nargs="+", metavar="STEM", default=None,
                   help="merge these results stems into --results (later stems win) and stop")
    args = p.parse_args()
    if args.merge:
        merged: dict[tuple, dict] = {}
        for stem in [args.results, *args.merge]:
            path = RESULTS / f"{stem}.json"
            for rec in json.loads(path.read_text()) if path.exists() else []:
                merged[_key(rec)] = rec
        records = sorted(merged.values(), key=lambda r: (r["dataset"], r["attack"],
                                                          r["seed"], r["trusted"]))
        atomic_write_json(RESULTS / f"{args.results}.json", records)
        atomic_write_text(RESULTS / f"{args.results}.md", summarise(records))
        return
    torch.set_num_threads(args.threads)
    full = load_shared(args.dataset, SHARED)
    test_all = load_shared(args.dataset, SHARED, split="test")
    path = RESULTS / f"{args.results}.json"
    records = json.loads(path.read_text()) if path.exists() else []
    for seed in args.seeds:
        rng = np.random.default_rng(seed)
        train = full.subset(np.sort(rng.choice(len(full), args.n_train, replace=False)))
        order = rng.permutation(len(test_all))
        trusted, test = test_all.subset(np.sort(order[:500])), test_all.subset(np.sort(order[500:]))
        for attack in args.attacks:
            columns = {"both": (False, True), "plain": (False,),
                       "trusted": (True,)}[args.columns]
            for rec in run_one(attack, seed, train, test, trusted, args.epochs, columns,
                               args.unlearn):
                rec["dataset"] = args.dataset
                records = [r for r in records if _key(r) != _key(rec)] + [rec]
                atomic_write_json(path, records)
                atomic_write_text(RESULTS / f"{args.results}.md", summarise(records))


if __name__ == "__main__":
    main()
