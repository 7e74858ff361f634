"""Quarantine benchmark: detection quality, sanitise-and-retrain, and speed.

Runs on MNIST (60k) and the CIFAR-10 20k subset from ../shared/datasets, 3 seeds each, for:
no attack, BadNets 3x3 at 10% and 1% (all-to-one), blended (alpha 0.2) at 10%. The scan is told
nothing about the attack; ground truth is used only to score it afterwards. Also: detector speed
on 50,000 x 512 representations, and the ART comparison setting (MNIST 4,000 images, 10%).

    python benchmarks/quarantine.py                      # everything (~40 min on 2 cores)
    python benchmarks/quarantine.py --datasets mnist --seeds 0 --scenarios badnets10

Results are merged into benchmarks/results/quarantine.json (one record per run) and summarised
in benchmarks/results/quarantine.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from poisonguard.attacks import PoisonedData, badnets, blended
from poisonguard.data import LabeledData, load_shared
from poisonguard.detect import ActivationClustering, LossOutliers, SpectralSignatures
from poisonguard.detect.crossref import cross_reference
from poisonguard.detect.scan_decomposition import SCAn
from poisonguard.detect.spectre import Spectre
from poisonguard.io import atomic_write_json, atomic_write_text
from poisonguard.pipeline import (
    ScanConfig,
    compare_before_after,
    evaluate_model,
    retrain_unlearning,
    scan,
    score_against_truth,
)

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent.parent / "shared" / "datasets"
RESULTS = ROOT / "results"
SCENARIOS = {
    "clean": None,
    "badnets10": ("badnets", 0.10),
    "badnets1": ("badnets", 0.01),
    "blended10": ("blended", 0.10),
}


@functools.cache
def code_version() -> str:
    """The git commit the benchmark started on (with '+dirty' for uncommitted changes); read
    once, so later commits made while it runs do not relabel its records."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def target_for(seed: int) -> int:
    return (3 * seed + 1) % 10


def poison_for(scenario: str, seed: int, train: LabeledData, test: LabeledData,
               **trigger_kwargs: Any) -> PoisonedData | None:
    """The scenario's attack on ``train`` (None for "clean"): BadNets 3x3 or blended alpha 0.2
    (``trigger_kwargs`` override or add trigger settings), target :func:`target_for` (seed)."""
    spec = SCENARIOS[scenario]
    if spec is None:
        return None
    attack, rate = spec
    kwargs = {**({"size": 3} if attack == "badnets" else {"alpha": 0.2}), **trigger_kwargs}
    fn = badnets if attack == "badnets" else blended
    return fn(train, rate=rate, target=target_for(seed), seed=seed, test=test, **kwargs)


def run_one(name: str, scenario: str, seed: int, train: LabeledData, test: LabeledData,
            clean_models: dict) -> dict:
    poisoned = poison_for(scenario, seed, train, test)
    data = train if poisoned is None else poisoned.data
    t0 = time.perf_counter()
    result = scan(data, ScanConfig(seed=seed))
    wall = time.perf_counter() - t0
    truth = poisoned.is_poison if poisoned is not None else np.zeros(len(data), dtype=bool)
    record = {
        "dataset": name, "scenario": scenario, "seed": seed, "code": code_version(),
        "attack": poisoned.attack if poisoned else None,
        "n_train": len(data), "n_poison": int(truth.sum()),
        "poisoned_classes_reported": result.poisoned_classes,
        "true_target": poisoned.target if poisoned else None,
        "metrics": score_against_truth(result, truth),
        "rounds": result.combined.extras["rounds"],
        "timings": result.timings, "scan_wall_s": round(wall, 2),
    }
    record["first_round_model"] = evaluate_model(result.classifier, test, poisoned)
    if result.final_classifier is not None:
        record["before_after"] = compare_before_after(result, test, poisoned)
    if result.flags.any() and result.final_classifier is not None:
        # the flagged samples kept, trained toward other-class targets: unlearned, not withheld
        t1 = time.perf_counter()
        unlearned = retrain_unlearning(result)
        record["unlearn_retrain"] = {**evaluate_model(unlearned.classifier, test, poisoned),
                                     "train_s": round(time.perf_counter() - t1, 2)}
    if poisoned is None:
        clean_models[(name, seed)] = result.final_classifier
    elif (name, seed) in clean_models:
        # the rate at which a model trained on clean data (same recipe) already sends the
        # triggered test inputs to the target: the floor any defence's ASR is measured against
        record["clean_model_on_triggered"] = evaluate_model(clean_models[(name, seed)], test,
                                                            poisoned)
    return record


def detector_speed(n: int = 50_000, d: int = 512, k: int = 10, seed: int = 0) -> dict:
    """Detectors alone on n x d synthetic representations (10 classes, one with a planted
    cluster of 5% of the data): wall time of each detector and of the cross-reference."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    means = rng.normal(0, 3, (k, d))
    feats = (means[labels] + rng.normal(0, 1, (n, d))).astype(np.float32)
    planted = np.flatnonzero(labels == 0)[: n // 20]
    feats[planted] += rng.normal(0, 3, d).astype(np.float32)
    losses = rng.exponential(0.1, n)
    losses[planted] *= 0.01
    out = {"n": n, "d": d}
    t_all = time.perf_counter()
    results = []
    for det, args in [(ActivationClustering(), (feats, labels, losses)),
                      (SpectralSignatures(), (feats, labels, losses)),
                      (LossOutliers(), (losses, labels)),
                      (SCAn(), (feats, labels, losses)),
                      (Spectre(), (feats, labels, losses))]:
        t0 = time.perf_counter()
        results.append(det.detect(*args))
        out[det.name + "_s"] = round(time.perf_counter() - t0, 3)
    cross_reference(results, labels)
    out["total_s"] = round(time.perf_counter() - t_all, 3)
    truth = np.zeros(n, dtype=bool)
    truth[planted] = True
    out["planted_recall"] = float((results[0].flags & truth).sum() / truth.sum())
    return out


def art_setting(seed: int) -> dict:
    """The setting of ART's published comparison: MNIST, 4,000 images, 10% BadNets."""
    train = load_shared("mnist", SHARED)
    test = load_shared("mnist", SHARED, split="test")
    idx = np.random.default_rng(seed).choice(len(train), 4000, replace=False)
    sub = train.subset(np.sort(idx))
    out = {}
    for mode in ("all-to-one", "all-to-all"):
        poisoned = badnets(sub, rate=0.1, target=target_for(seed) if mode == "all-to-one"
                           else None, mode=mode, seed=seed, test=test, size=3,
                           pattern="checker")
        result = scan(poisoned.data, ScanConfig(seed=seed))
        out[mode] = {"metrics": score_against_truth(result, poisoned.is_poison),
                     "poisoned_classes_reported": result.poisoned_classes,
                     "before_after": compare_before_after(result, test, poisoned)}
    return out


def summarise(records: list[dict]) -> str:
    lines = ["# Quarantine benchmark", "",
             "Generated by `python benchmarks/quarantine.py`; raw records in quarantine.json.",
             "Recall/FPR: the cross-referenced flags over all rounds (per-detector: round 1).", ""]
    runs = [r for r in records if r.get("kind", "run") == "run"]
    header = ("| dataset | scenario | seed | reported classes | target | recall (AC / SS / "
              "cross) | flagged clean % (cross) | ASR % before → after (clean model) | clean "
              "acc % before → after | unlearning retrain: ASR % / clean acc % | scan s |")
    lines += [header, "|" + "---|" * 11]
    for r in sorted(runs, key=lambda r: (r["dataset"], r["scenario"], r["seed"])):
        m = r["metrics"]

        def rec(name: str, m: dict = m) -> str:
            v = m[name]["recall"]
            return "-" if v is None else f"{v:.4f}"

        ba = r.get("before_after", {})
        b, a = ba.get("before", {}), ba.get("after", {})

        def pct(v: float | None) -> str:
            return "-" if v is None else f"{100 * v:.2f}"

        u = r.get("unlearn_retrain", {})
        lines.append(
            f"| {r['dataset']} | {r['scenario']} | {r['seed']} | "
            f"{r['poisoned_classes_reported']} | {r['true_target']} | "
            f"{rec('activation_clustering')} / {rec('spectral_signatures')} / "
            f"{rec('cross_reference')} | {pct(m['cross_reference']['fpr'])} | "
            f"{pct(b.get('asr'))} → {pct(a.get('asr'))} "
            f"({pct(r.get('clean_model_on_triggered', {}).get('asr'))}) | "
            f"{pct(b.get('clean_accuracy'))} → "
            f"{pct(a.get('clean_accuracy'))} | {pct(u.get('asr'))} / "
            f"{pct(u.get('clean_accuracy'))} | {r['scan_wall_s']} |")
    refs = {(r["dataset"], r["seed"]): r["first_round_model"]["clean_accuracy"]
            for r in runs if r["scenario"] == "clean"}
    lines += ["", "## Per dataset and scenario (over seeds)", "",
              "| dataset | scenario | seeds | classes right | recall min (mean) | flagged clean % "
              "max | ASR % after: max (clean-model floor max) | clean acc vs clean-data model, "
              "points: worst (mean) | unlearning retrain: ASR % max, clean acc points worst |",
              "|" + "---|" * 9]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["dataset"], r["scenario"]), []).append(r)
    for (ds, sc), rs in sorted(groups.items()):
        right = sum(r["poisoned_classes_reported"] == ([] if r["true_target"] is None
                                                       else [r["true_target"]]) for r in rs)
        rec = [r["metrics"]["cross_reference"]["recall"] for r in rs
               if r["metrics"]["cross_reference"]["recall"] is not None]
        fpr = max(r["metrics"]["cross_reference"]["fpr"] for r in rs)
        asr = [r["before_after"]["after"]["asr"] for r in rs
               if r.get("before_after", {}).get("after", {}).get("asr") is not None]
        floor = [r["clean_model_on_triggered"]["asr"] for r in rs
                 if r.get("clean_model_on_triggered")]
        deltas = [100 * (r["before_after"]["after"]["clean_accuracy"]
                         - refs[(r["dataset"], r["seed"])]) for r in rs
                  if "before_after" in r and (r["dataset"], r["seed"]) in refs]
        unl = [r["unlearn_retrain"] for r in rs if "unlearn_retrain" in r]
        u_asr = [u["asr"] for u in unl if u.get("asr") is not None]
        u_d = [100 * (r["unlearn_retrain"]["clean_accuracy"] - refs[(r["dataset"], r["seed"])])
               for r in rs if "unlearn_retrain" in r and (r["dataset"], r["seed"]) in refs]
        u_s = ((f"{100 * max(u_asr):.2f}" if u_asr else "-") + ", "
               + (f"{min(u_d):+.2f}" if u_d else "-")) if unl else "-"
        rec_s = f"{min(rec):.4f} ({sum(rec) / len(rec):.4f})" if rec else "-"
        asr_s = (f"{100 * max(asr):.2f} ({100 * max(floor):.2f})" if asr and floor
                 else (f"{100 * max(asr):.2f}" if asr else "-"))
        d_s = f"{min(deltas):+.2f} ({sum(deltas) / len(deltas):+.2f})" if deltas else "-"
        lines.append(f"| {ds} | {sc} | {len(rs)} | {right}/{len(rs)} | {rec_s} | "
                     f"{100 * fpr:.2f} | {asr_s} | {d_s} | {u_s} |")
    by_code: dict[str, list[str]] = {}
    for r in sorted(runs, key=lambda r: (r["dataset"], r["scenario"], r["seed"])):
        by_code.setdefault(r.get("code", "?"), []).append(
            f"{r['dataset']} {r['scenario']} {r['seed']}")
    lines += ["", "Code each row ran on: " + "; ".join(
        f"{c}: {len(v)} rows ({', '.join(v)})" for c, v in sorted(by_code.items()))]
    floor_codes = sorted({r["clean_model_on_triggered_code"] for r in runs
                          if "clean_model_on_triggered_code" in r})
    if floor_codes:
        lines += ["", "Clean-model floors of re-run poisoned rows come from their seed's clean "
                  "row (code " + ", ".join(floor_codes) + ")."]
    if refs:
        lines += ["", "Clean-data reference accuracy (same recipe, no attack): " + ", ".join(
            f"{d} seed {s}: {100 * v:.2f}%" for (d, s), v in sorted(refs.items()))]
    for r in records:
        if r.get("kind") == "speed":
            lines += ["", f"Detector speed on {r['n']} x {r['d']}: " + ", ".join(
                f"{k} {v}" for k, v in r.items() if k.endswith("_s"))]
        if r.get("kind") == "art":
            for mode, v in r["result"].items():
                m = v["metrics"]
                lines += ["", f"ART setting (MNIST 4,000, 10% BadNets checker 3x3, {mode}): "
                          + ", ".join(f"{k} F1 {m[k]['f1']:.3f}" for k in m)
                          + f"; ASR after sanitising {v['before_after']['after']['asr']}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["mnist", "cifar10"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS))
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-art", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "quarantine.json"))
    ap.add_argument("--summarise-only", action="store_true",
                    help="only rewrite the .md summary from the existing .json")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="fold the records of these files (e.g. one per dataset, run side by "
                         "side with --out) into --out, later files winning, and summarise")
    args = ap.parse_args()
    out = Path(args.out)
    records = json.loads(out.read_text()) if out.exists() else []
    if args.merge:
        def key(r: dict) -> tuple:
            return (r.get("kind", "run"), r.get("dataset"), r.get("scenario"), r.get("seed"))
        merged = {key(r): r for r in records}
        for f in args.merge:
            for r in json.loads(Path(f).read_text()):
                old = merged.get(key(r), {})
                if "clean_model_on_triggered" in old and "clean_model_on_triggered" not in r:
                    # a poisoned row re-run without its seed's clean row keeps the floor the
                    # clean-data model measured (that model's code is named)
                    r["clean_model_on_triggered"] = old["clean_model_on_triggered"]
                    r["clean_model_on_triggered_code"] = old.get(
                        "clean_model_on_triggered_code", old.get("code"))
                merged[key(r)] = r
        records = list(merged.values())
        atomic_write_json(out, records)
    if args.summarise_only or args.merge:
        atomic_write_text(out.with_suffix(".md"), summarise(records))
        return

    def save(rec: dict) -> None:
        key = (rec.get("kind", "run"), rec.get("dataset"), rec.get("scenario"), rec.get("seed"))
        records[:] = [r for r in records if (r.get("kind", "run"), r.get("dataset"),
                                             r.get("scenario"), r.get("seed")) != key]
        records.append(rec)
        atomic_write_json(out, records)
        atomic_write_text(out.with_suffix(".md"), summarise(records))

    code_version()
    clean_models: dict = {}
    if not args.skip_speed:
        rec = {"kind": "speed", **detector_speed()}
        print("speed", rec, flush=True)
        save(rec)
    for name in args.datasets:
        train = load_shared(name, SHARED)
        test = load_shared(name, SHARED, split="test")
        for seed in args.seeds:
            for scenario in args.scenarios:
                rec = run_one(name, scenario, seed, train, test, clean_models)
                m = rec["metrics"]["cross_reference"]
                print(f"{name} {scenario} seed {seed}: classes {rec['poisoned_classes_reported']}"
                      f" recall {m['recall']} fpr {m['fpr']:.4f} "
                      f"{rec.get('before_after', {}).get('after')} {rec['scan_wall_s']}s",
                      flush=True)
                save(rec)
    if not args.skip_art:
        rec = {"kind": "art", "seed": 0, "result": art_setting(0)}
        print("art", {k: v["metrics"]["cross_reference"]["f1"] for k, v in rec["result"].items()},
              flush=True)
        save(rec)


if __name__ == "__main__":
    main()
