"""Audio quarantine (issue 18): on FSDD digits (2,700 training clips, 8 kHz) with the built-in
audio CNN: recall, clean clips flagged, target named, the trigger band and span the miner
reports, scan wall time; with ``--retrain``, the model retrained on the sanitised set (clean
accuracy and ASR on the triggered test clips) against one trained on the unpoisoned data.

    OMP_NUM_THREADS=1 python benchmarks/audio.py --seeds 0 --runs tone-5 noise-5 tone-1 noise-1

Records merge into benchmarks/results/audio.json (keyed by run, placement, seed) and are
summarised in benchmarks/results/audio.md. Target class 0.
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
from poisonguard.modalities.audio.attacks import audio_attack
from poisonguard.modalities.audio.data import load_audio
from poisonguard.modalities.audio.scan import AUDIO_DETECTORS, scan_audio, train_audio_model
from poisonguard.pipeline import ScanConfig

ROOT = Path(__file__).resolve().parent
FSDD = ROOT.parent.parent / "shared" / "datasets" / "fsdd" / "fsdd.npz"
RESULTS = ROOT / "results"
RUNS = {"clean": (None, 0.0), "tone-5": ("tone", 0.05), "tone-1": ("tone", 0.01),
        "noise-5": ("noise", 0.05), "noise-1": ("noise", 0.01)}
TARGET = 0


def one(run: str, placement: str, seed: int, retrain: bool) -> dict[str, Any]:
    train, test = load_audio(FSDD), load_audio(FSDD, split="test")
    kind, rate = RUNS[run]
    rec: dict[str, Any] = {"run": run, "placement": placement, "seed": seed,
                           "n_train": len(train)}
    if kind is None:
        data, truth, triggered = train, np.zeros(len(train), bool), None
    else:
        p = audio_attack(kind, train, rate=rate, target=TARGET, seed=seed, test=test,
                         placement=placement)
        data, truth, triggered = p.data, p.is_poison, p.test_triggered
        rec["n_poison"] = int(truth.sum())
    t0 = time.perf_counter()
    result = scan_audio(data, ScanConfig(detectors=AUDIO_DETECTORS, seed=seed))
    rec["scan_s"] = round(time.perf_counter() - t0, 1)
    flags = result.flags
    rec["recall"] = round(float(flags[truth].mean()), 4) if truth.any() else None
    rec["clean_flagged_pct"] = round(100 * float(flags[~truth].mean()), 3)
    rec["poisoned_classes"] = result.poisoned_classes
    rec["target_named"] = (TARGET in result.poisoned_classes) if kind else None
    rec["triggers"] = result.triggers
    rec["per_detector"] = {d.name: {"n_flagged": int(d.flags.sum()),
                                    "n_poison_flagged": int((d.flags & truth).sum()),
                                    "classes": d.suspicious_classes}
                           for d in result.detectors}
    clf = result.classifier
    rec["sacrificial_clean_acc"] = round(float((clf.predict(test.x) == test.y).mean()), 4)
    if triggered is not None:
        rec["sacrificial_asr"] = round(float((clf.predict(triggered.x) == TARGET).mean()), 4)
    if retrain:
        kept = data.subset(np.flatnonzero(~flags))
        model = train_audio_model(kept, data.n_classes, seed).classifier
        clean = train_audio_model(train, data.n_classes, seed).classifier
        rec["retrained_clean_acc"] = round(float((model.predict(test.x) == test.y).mean()), 4)
        rec["clean_model_acc"] = round(float((clean.predict(test.x) == test.y).mean()), 4)
        if triggered is not None:
            rec["retrained_asr"] = round(float((model.predict(triggered.x) == TARGET).mean()), 4)
    return rec


def summarise(records: list[dict[str, Any]]) -> str:
    lines = ["# Audio quarantine benchmark (FSDD digits, target class 0)", "",
             "Produced by `benchmarks/audio.py`; every row is one scan.", "",
             "| run | placement | seed | recall | clean flagged % | target named | trigger "
             "(band Hz, span s) | scan s | ASR sacrificial | ASR retrained | acc retrained "
             "| acc clean model |", "|" + "---|" * 12]
    for r in records:
        trig = "; ".join(f"class {t['class']}: {t['band_hz'][0]:.0f}-{t['band_hz'][1]:.0f}, "
                         f"{t['time_s'][0]:.2f}-{t['time_s'][1]:.2f}" for t in r["triggers"])
        lines.append(f"| {r['run']} | {r['placement']} | {r['seed']} | {r['recall']} | "
                     f"{r['clean_flagged_pct']} | {r['target_named']} | {trig or '-'} | "
                     f"{r['scan_s']} | {r.get('sacrificial_asr', '-')} | "
                     f"{r.get('retrained_asr', '-')} | {r.get('retrained_clean_acc', '-')} | "
                     f"{r.get('clean_model_acc', '-')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", default=["tone-5", "noise-5", "tone-1", "noise-1"])
    ap.add_argument("--placement", default="random")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--retrain", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    path = RESULTS / "audio.json"
    records = json.loads(path.read_text()) if path.exists() else []
    for seed in args.seeds:
        for run in args.runs:
            rec = one(run, args.placement, seed, args.retrain)
            print(json.dumps({k: v for k, v in rec.items() if k != "per_detector"}), flush=True)
            records = [r for r in records if (r["run"], r["placement"], r["seed"]) !=
                       (run, args.placement, seed)] + [rec]
            records.sort(key=lambda r: (r["seed"], r["run"], r["placement"]))
            atomic_write_json(path, records)
            atomic_write_text(RESULTS / "audio.md", summarise(records))


if __name__ == "__main__":
    main()
