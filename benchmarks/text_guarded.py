"""Guarded training on text (issue 17): ``train --defense trim|abl`` on poisoned SST-2 / HSOL
with the built-in text model; ASR (over the non-target test posts the model classifies
correctly without the trigger), clean accuracy, and for ABL the isolation's recall.

    OMP_NUM_THREADS=1 python benchmarks/text_guarded.py --dataset sst2 \
        --runs rare-token-1 addsent-5 --defenses trim abl

The clean-data model's accuracy (benchmarks/text.py --retrain, same seed) is the reference.
Records merge into benchmarks/results/text_guarded.json, summarised in text_guarded.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from text import RUNS, TARGET, load  # noqa: E402

from poisonguard.io import atomic_write_json, atomic_write_text  # noqa: E402
from poisonguard.modalities.text.attacks import text_attack  # noqa: E402
from poisonguard.modalities.text.io import TextModel  # noqa: E402
from poisonguard.modalities.text.train_cli import train_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def run_one(dataset: str, name: str, defense: str, seed: int) -> dict[str, Any]:
    attack, rate, clean_label = RUNS[name]
    assert attack is not None
    train, test = load(dataset)
    target = TARGET[dataset]
    p = text_attack(attack, train, rate=rate, target=target, seed=seed, test=test,
                    clean_label=clean_label)
    t0 = time.perf_counter()
    result, vocab, _ = train_text(p.data, defense, seed=seed)
    wall = time.perf_counter() - t0
    model = TextModel(result.classifier, vocab)
    pred = model.predict_proba(test.texts).argmax(1)
    keep = test.y != target
    assert p.test_triggered is not None
    hit = model.predict_proba(p.test_triggered.texts).argmax(1) == target
    right = pred[keep] == test.y[keep]
    rec: dict[str, Any] = {"dataset": dataset, "run": name, "defense": defense, "seed": seed,
                           "clean_acc": round(float((pred == test.y).mean()), 4),
                           "asr": round(float(hit[right].mean()), 4),
                           "asr_raw": round(float(hit.mean()), 4), "train_s": round(wall, 1),
                           "trim_fraction": result.trim_fraction}
    if result.isolated is not None:
        iso = result.isolated
        rec["n_isolated"] = int(iso.sum())
        rec["isolated_recall"] = round(float(iso[p.is_poison].mean()), 4)
        rec["isolated_precision"] = round(float(p.is_poison[iso].mean()), 4) if iso.any() else None
    return rec


def render_md(records: list[dict[str, Any]]) -> str:
    lines = ["# Guarded training on text (benchmarks/text_guarded.py)", "",
             "The built-in text model trained on the poisoned posts with `--defense trim` "
             "(per-batch trimming of the highest losses, fraction estimated after warm-up) or "
             "`abl` (anti-backdoor learning: isolation of the lowest-loss posts after local "
             "gradient ascent, then unlearning them). ASR over the non-target test posts the "
             "model classifies correctly without the trigger. Target: ASR <= 2% with clean "
             "accuracy within 1 point of the clean-data model (benchmarks/results/text.md, "
             "second table).", "",
             "| dataset | run | defense | seed | clean acc | ASR | ASR raw | isolated | "
             "isolated recall | isolated precision | trim fraction | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["dataset"], r["run"], r["defense"], r["seed"])):
        lines.append(f"| {r['dataset']} | {r['run']} | {r['defense']} | {r['seed']} | "
                     f"{r['clean_acc']} | {r['asr']} | {r['asr_raw']} | "
                     f"{r.get('n_isolated', '-')} | {r.get('isolated_recall', '-')} | "
                     f"{r.get('isolated_precision', '-')} | {r['trim_fraction']} | "
                     f"{r['train_s']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="sst2", choices=sorted(TARGET))
    parser.add_argument("--runs", nargs="+", default=["rare-token-1", "addsent-5"],
                        choices=[r for r in RUNS if r != "clean"])
    parser.add_argument("--defenses", nargs="+", default=["trim", "abl"],
                        choices=["none", "trim", "abl"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = RESULTS / "text_guarded.json"
    records = json.loads(path.read_text()) if path.exists() else []
    for seed in args.seeds:
        for name in args.runs:
            for defense in args.defenses:
                rec = run_one(args.dataset, name, defense, seed)
                print(json.dumps(rec), flush=True)
                key = (rec["dataset"], rec["run"], rec["defense"], rec["seed"])
                records = [r for r in records
                           if (r["dataset"], r["run"], r["defense"], r["seed"]) != key] + [rec]
                atomic_write_json(path, records)
                atomic_write_text(RESULTS / "text_guarded.md", render_md(records))


if __name__ == "__main__":
    main()
