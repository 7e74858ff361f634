"""`poisonguard compare` on fine-tune pairs (issue 22): is the planted class named in backdoored
fine-tunes of a trusted model, and are clean fine-tunes passed?

A base model (the built-in CNN) is trained on MNIST training images 0..19,999. Each pair
fine-tunes a copy of it on 10,000 other training images (20,000..59,999, a random draw per
pair) for 2 epochs at lr 1e-3: the backdoored pairs on a poisoned copy of that draw (10% of it,
each pair its own attack and target), the clean pairs on the draw as it is. Every pair is
judged through the CLI, ``poisonguard compare BASE TUNED --clean CLEAN.npz`` with 500 MNIST test
images; ASR is measured on triggered test images 500..9,999 whose true class is not the target.

The compare rule (a reversed trigger of TUNED that moves >= 50% more clean samples in TUNED
than in BASE) was written on scikit-learn digits (one BadNets and one blended fine-tune, two
clean ones); nothing here was tuned on MNIST. Models are cached in benchmarks/cache/compare.

    python benchmarks/compare.py [--pairs NAME ...] [--threads 1]

Results: benchmarks/results/compare.{json,md} (written atomically).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from versioning import code_version

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
CACHE = ROOT / "cache" / "compare"
MNIST = ROOT.parent.parent / "shared" / "datasets" / "mnist" / "mnist.npz"

# name: (attack, target, kwargs); None = a clean fine-tune
PAIRS: dict[str, tuple[str, int, dict[str, Any]] | None] = {
    "badnets-t0": ("badnets", 0, {}),
    "badnets-t9-4px-tl": ("badnets", 9, {"size": 4, "position": "top-left"}),
    "blended-t2": ("blended", 2, {}),
    "blended-t4": ("blended", 4, {"alpha": 0.1}),
    "trojan-t5": ("trojan", 5, {}),
    "adaptive-blend-t1": ("adaptive-blend", 1, {}),
    "low-frequency-t6": ("low-frequency", 6, {}),
    "wanet-t8": ("wanet", 8, {}),
    "badnets-random-t7": ("badnets-random", 7, {}),
    "trojan-t3": ("trojan", 3, {}),
    **{f"clean-{i}": None for i in range(10)},
}


def _save(folder: Path, result: Any, arch: str, arch_kwargs: dict[str, Any]) -> Path:
    from poisonguard.models.io import save_model

    clf = result.classifier
    return save_model(folder, clf.model, arch, arch_kwargs, clf.input_spec, 10, clf.layer)


def build(name: str, spec: tuple[str, int, dict[str, Any]] | None, train: Any, test: Any,
          index: int) -> dict[str, Any]:
    """Train (or load from the cache) the base and one fine-tune; its ASR on the test set."""
    from poisonguard.attacks import make_attack
    from poisonguard.models.io import load_model
    from poisonguard.models.training import TrainConfig, train_classifier

    base_dir = CACHE / "base"
    first = train.subset(np.arange(20000))
    if not (base_dir / "model.json").exists():
        base = train_classifier(first, TrainConfig(epochs=3, seed=0))
        _save(base_dir, base, base.arch, base.arch_kwargs)
    folder = CACHE / name
    meta_path = folder / "pair.json"
    if meta_path.exists():
        return json.loads(meta_path.read_text())
    base_clf = load_model(base_dir)
    base_meta = json.loads((base_dir / "model.json").read_text())
    rng = np.random.default_rng(1000 + index)
    draw = train.subset(np.sort(rng.choice(np.arange(20000, len(train)), 10000,
                                           replace=False)))
    rec: dict[str, Any] = {"pair": name, "backdoored": spec is not None}
    poisoned = None
    if spec is not None:
        attack, target, kw = spec
        poisoned = make_attack(attack, draw, rate=0.1, target=target, seed=index,
                               test=test.subset(np.arange(500, len(test))), **kw)
        draw = poisoned.data
        rec.update(attack=attack, target=target, attack_kwargs=kw)
    t0 = time.perf_counter()
    tuned = train_classifier(draw, TrainConfig(epochs=2, seed=index + 1, lr=1e-3),
                             model=copy.deepcopy(base_clf.model),
                             input_spec=base_clf.input_spec, arch=base_meta["arch"],
                             n_classes=10)
    rec["finetune_s"] = round(time.perf_counter() - t0, 1)
    _save(folder, tuned, base_meta["arch"], base_meta["arch_kwargs"])
    held = test.subset(np.arange(500, len(test)))
    rec["accuracy_tuned"] = round(float(np.mean(tuned.classifier.predict(held.x) == held.y)), 4)
    rec["accuracy_base"] = round(float(np.mean(base_clf.predict(held.x) == held.y)), 4)
    if poisoned is not None and poisoned.test_triggered is not None:
        trig = poisoned.test_triggered
        rec["asr"] = round(float(np.mean(tuned.classifier.predict(trig.x) == trig.y)), 4)
        rec["asr_base"] = round(float(np.mean(base_clf.predict(trig.x) == trig.y)), 4)
    meta_path.write_text(json.dumps(rec, indent=2) + "\n")
    return rec


def judge(rec: dict[str, Any], clean_npz: Path, threads: int, work: Path) -> dict[str, Any]:
    out = work / rec["pair"]
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "poisonguard", "compare", str(CACHE / "base"),
                        str(CACHE / rec["pair"]), "--clean", str(clean_npz), "--quiet",
                        "--threads", str(threads), "--out", str(out)],
                       capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    rec = {**rec, "exit": p.returncode, "compare_s": round(time.perf_counter() - t0, 1)}
    if p.returncode not in (0, 1):
        rec["error"] = (p.stderr.strip().splitlines() or [""])[-1]
        return rec
    v = json.loads((out / "report.json").read_text())["verdict"]
    rec.update(flagged=v["backdoored"], named=v["target_class"],
               planted=v["planted_classes"], max_differential=v["max_differential_success"],
               changed=v["changed_classes"])
    if rec["backdoored"]:
        rec["right_class"] = v["target_class"] == rec["target"]
    return rec


def write(results: dict[str, Any], out: Path) -> None:
    recs = results["records"]
    bd = [r for r in recs if r["backdoored"]]
    learned = [r for r in bd if r.get("asr", 0) >= 0.5]
    cl = [r for r in recs if not r["backdoored"]]
    named = sum(bool(r.get("right_class")) for r in learned)
    false = sum(bool(r.get("flagged")) for r in cl)
    lines = ["# `poisonguard compare` on fine-tune pairs (MNIST)", "",
             f"`python benchmarks/compare.py` (code {results['code']}, {results['threads']} "
             "thread(s)). Method in the script's docstring: a base CNN on 20k MNIST images, each "
             "pair a 2-epoch fine-tune on 10k other images (10% poisoned for backdoored pairs), "
             "judged with 500 clean test images. The rule was written on digits; every MNIST "
             "pair is held out.", "",
             f"- backdoored pairs whose backdoor was learned (ASR >= 50%): {len(learned)} of "
             f"{len(bd)}; planted class named: **{named} of {len(learned)}** (target >= 9 of 10)",
             f"- clean pairs flagged: **{false} of {len(cl)}** (target <= 1 of 10)", "",
             *([results["note"], ""] if results.get("note") else []),
             "| pair | attack | target | ASR tuned | ASR base | acc base | acc tuned | exit | "
             "named | all planted classes | max differential | compare s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        lines.append(
            f"| {r['pair']} | {r.get('attack', '-')} | {r.get('target', '-')} | "
            f"{r.get('asr', '-')} | {r.get('asr_base', '-')} | {r['accuracy_base']} | "
            f"{r['accuracy_tuned']} | {r.get('exit')} | {r.get('named', r.get('error'))} | "
            f"{r.get('planted', '-')} | "
            f"{r.get('max_differential', '-')} | {r.get('compare_s', '-')} |")
    out.mkdir(parents=True, exist_ok=True)
    for suffix, text in (("json", json.dumps(results, indent=2) + "\n"),
                         ("md", "\n".join(lines) + "\n")):
        tmp = out / f".compare.{suffix}.tmp"
        tmp.write_text(text)
        tmp.replace(out / f"compare.{suffix}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    import torch

    from poisonguard.data import LabeledData

    torch.set_num_threads(args.threads)
    code = code_version()   # at the start: the commit the pairs are judged with
    with np.load(MNIST) as d:
        train = LabeledData.create(d["x_train"], d["y_train"], name="mnist_train")
        test = LabeledData.create(d["x_test"], d["y_test"], name="mnist_test")
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        clean_npz = work / "clean.npz"
        np.savez(clean_npz, x=test.x[:500], y=test.y[:500])
        for i, name in enumerate(PAIRS):
            if name not in args.pairs:
                continue
            rec = judge(build(name, PAIRS[name], train, test, i), clean_npz, args.threads,
                        work)
            print(json.dumps(rec), flush=True)
            records.append(rec)
    write({"code": code, "threads": args.threads, "records": records},
          Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
