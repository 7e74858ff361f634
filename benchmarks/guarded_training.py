"""Guarded-training benchmark: ABL, trimmed loss at several fractions, gradient monitor.

MNIST and the CIFAR-10 20k subset from ../shared/datasets; BadNets 3x3 at 10% and blended
(alpha 0.2) at 10%, plus clean data; seeds 0-2 by default. Every run records clean accuracy, ASR,
what the defence singled out (precision/recall against the poison mask), and wall time relative
to plain training on the same data.

    python benchmarks/guarded_training.py --datasets mnist --seeds 0

Records go to benchmarks/results/guarded_training_<dataset>.json (so that one process per
dataset can run side by side) and are summarised together in guarded_training.md.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import time
from pathlib import Path

import numpy as np

from poisonguard.attacks import badnets, blended
from poisonguard.data import load_shared
from poisonguard.io import atomic_write_json, atomic_write_text
from poisonguard.metrics import accuracy, detection_metrics
from poisonguard.models.training import TrainConfig
from poisonguard.pipeline import auto_epochs
from poisonguard.train import GuardConfig, train_guarded

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent.parent / "shared" / "datasets"
RESULTS = ROOT / "results"
COMMIT = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                        capture_output=True, text=True).stdout.strip() or None
MODES = {
    "plain": GuardConfig(),
    "trim0.05": GuardConfig(defense="trim", trim_fraction=0.05),
    "trim0.1": GuardConfig(defense="trim", trim_fraction=0.1),
    "trim0.2": GuardConfig(defense="trim", trim_fraction=0.2),
    "trim-auto": GuardConfig(defense="trim"),
    "abl": GuardConfig(defense="abl"),
    "monitor": GuardConfig(monitor_gradients=True),
    "noise": GuardConfig(defense="noise"),
    "adv": GuardConfig(defense="adv"),
    "adv0.3": GuardConfig(defense="adv", adv_epsilon=0.3),
    "adv0.3-ramp": GuardConfig(defense="adv", adv_epsilon=0.3, adv_warmup=0.5),
}
ROBUST_EPS = (8 / 255, 0.3)  # PGD-10 test budgets recorded for plain and adv runs
ROBUST_N = 1000


def robust_accuracy(clf, train, test) -> dict[str, float]:
    """Accuracy on the first ``ROBUST_N`` test inputs under L-inf PGD-10 at each of
    ``ROBUST_EPS`` (fractions of the input range): does adversarial training take hold?"""
    import torch

    from poisonguard.train.guarded import input_range, pgd_attack

    spec = clf.input_spec
    lo, hi = input_range(train, spec)
    out = {}
    for eps in ROBUST_EPS:
        gen = torch.Generator().manual_seed(0)
        right = 0
        for start in range(0, min(ROBUST_N, len(test)), 250):
            x = spec.prepare(test.x[start:start + 250])
            y = torch.from_numpy(test.y[start:start + 250])
            adv = pgd_attack(clf.model, x, y, eps * (hi - lo), 10, lo, hi, generator=gen)
            with torch.no_grad():
                right += int((clf.model(adv).argmax(1) == y).sum())
        out[f"{eps:.4g}"] = right / min(ROBUST_N, len(test))
    return out


def run(name: str, scenario: str, mode: str, seed: int, train, test, plain_cost: dict) -> dict:
    poisoned = None
    data = train
    if scenario != "clean":
        fn = badnets if scenario == "badnets10" else blended
        kwargs = {"size": 3} if scenario == "badnets10" else {"alpha": 0.2}
        poisoned = fn(train, rate=0.1, target=(3 * seed + 1) % 10, seed=seed, test=test,
                      **kwargs)
        data = poisoned.data
    config = TrainConfig(epochs=auto_epochs(len(data)), seed=seed)
    cpu0 = time.process_time()
    res = train_guarded(data, MODES[mode], config)
    cpu_s = time.process_time() - cpu0
    clf = res.classifier
    rec = {"dataset": name, "scenario": scenario, "mode": mode, "seed": seed, "commit": COMMIT,
           "clean_accuracy": accuracy(clf.predict(test.x), test.y),
           "asr": (accuracy(clf.predict(poisoned.test_triggered.x), poisoned.test_triggered.y)
                   if poisoned else None),
           "wall_s": round(res.wall_s, 2), "cpu_s": round(cpu_s, 2), "info": res.info,
           "trim_fraction": res.trim_fraction}
    if mode == "plain" or mode.startswith("adv"):
        rec["robust_accuracy_pgd10"] = robust_accuracy(clf, train, test)
    key = (name, scenario, seed)
    if mode == "plain":
        plain_cost[key] = (res.wall_s, cpu_s)
    if key in plain_cost:
        wall, cpu = plain_cost[key]
        rec["wall_vs_plain"] = round(res.wall_s / wall, 3)
        rec["cpu_vs_plain"] = round(cpu_s / cpu, 3)
    if poisoned is not None:
        truth = poisoned.is_poison
        if res.isolated is not None:
            rec["isolation"] = detection_metrics(res.isolated, truth)
            rec["isolation_initial"] = detection_metrics(res.isolated_initial, truth)
        if res.monitor is not None:
            rec["monitor"] = detection_metrics(res.monitor.flags, truth, res.monitor.scores)
        if res.drop_counts is not None:
            rec["trim_drops"] = detection_metrics(res.drop_counts > 0, truth,
                                                  res.drop_counts.astype(float))
    return rec


def aggregate(records: list[dict], history: list[dict] | None = None) -> list[str]:
    """One row per dataset, scenario and mode over seeds; accuracy is compared with plain
    training on the clean data of the same seed, the run among ``history`` (every record ever
    written) on the commit nearest to the compared run's (training code changes between
    commits shift accuracy by a few tenths), else the latest."""
    latest = {(r["dataset"], r["seed"]): r["clean_accuracy"] for r in records
              if r["scenario"] == "clean" and r["mode"] == "plain"}
    plain_runs = [r for r in history or records
                  if r["scenario"] == "clean" and r["mode"] == "plain"]
    order = _commit_order()

    def reference(r: dict) -> float | None:
        """The clean-data plain run of the same seed on the nearest commit (older on a tie)."""
        pos = order.get(str(r.get("commit")))
        cands = [c for c in plain_runs if (c["dataset"], c["seed"]) == (r["dataset"], r["seed"])
                 and order.get(str(c.get("commit"))) is not None]
        if pos is None or not cands:
            return latest.get((r["dataset"], r["seed"]))
        best = min(cands, key=lambda c: (abs(order[str(c["commit"])] - pos),
                                         order[str(c["commit"])] > pos))
        return best["clean_accuracy"]

    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["dataset"], r["scenario"], r["mode"]), []).append(r)
    lines = ["| dataset | scenario | mode | seeds | clean acc % mean | vs plain on clean data, "
             "points: worst | ASR % max | wall x plain: mean (max) | CPU x plain: mean (max) | "
             "singled out: precision min / recall min | code |", "|" + "---|" * 11]
    for key in sorted(groups):
        rs = sorted(groups[key], key=lambda r: r["seed"])
        diffs = [100 * (r["clean_accuracy"] - reference(r)) for r in rs
                 if reference(r) is not None]
        asrs = [r["asr"] for r in rs if r["asr"] is not None]
        walls = [r["wall_vs_plain"] for r in rs if "wall_vs_plain" in r]
        cpus = [r["cpu_vs_plain"] for r in rs if "cpu_vs_plain" in r]
        dets = [r.get("isolation") or r.get("monitor") or r.get("trim_drops") for r in rs]
        dets = [d for d in dets if d]
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {','.join(str(r['seed']) for r in rs)} | "
            f"{100 * np.mean([r['clean_accuracy'] for r in rs]):.2f} | "
            f"{f'{min(diffs):+.2f}' if diffs else '-'} | "
            f"{f'{100 * max(asrs):.2f}' if asrs else '-'} | "
            f"{f'{np.mean(walls):.2f} ({max(walls):.2f})' if walls else '-'} | "
            f"{f'{np.mean(cpus):.2f} ({max(cpus):.2f})' if cpus else '-'} | "
            + (f"{min(d['precision'] for d in dets):.3f} / {min(d['recall'] for d in dets):.3f}"
               if dets else "-") + " | "
            + ", ".join(sorted({str(r.get("commit")) for r in rs})) + " |")
    return lines


def summarise(records: list[dict], history: list[dict] | None = None) -> str:
    lines = ["# Guarded-training benchmark", "",
             "Generated by `python benchmarks/guarded_training.py`; raw records in "
             "guarded_training_<dataset>.json. BadNets 3x3 / blended alpha 0.2 at 10%, target "
             "(3*seed+1) mod 10; epochs as the quarantine's auto_epochs; ABL's 'singled out' = "
             "the final isolated set (the initial 1% is in the JSON). Wall time depends on what "
             "else shared the 2 cores; CPU time (the process's, 1 torch thread) does not, "
             "and is recorded in runs from commit 8bd6a60 on.", "",
             "## Summary over seeds", "", *aggregate(records, history), "", "## Every run", "",
             "| dataset | scenario | mode | seed | clean acc % | ASR % | wall s (x plain) | "
             "CPU s (x plain) | singled out: precision / recall / AUROC | "
             "PGD-10 acc % at eps 8/255 / 0.3 | code |",
             "|" + "---|" * 11]
    for r in sorted(records, key=lambda r: (r["dataset"], r["scenario"], r["seed"], r["mode"])):
        det = r.get("isolation") or r.get("monitor") or r.get("trim_drops")
        det_s = "-" if det is None else (f"{det['precision']:.3f} / {det['recall']:.3f} / "
                                         f"{det.get('auroc') or '-'}")
        asr = "-" if r["asr"] is None else f"{100 * r['asr']:.2f}"
        lines.append(f"| {r['dataset']} | {r['scenario']} | {r['mode']} | {r['seed']} | "
                     f"{100 * r['clean_accuracy']:.2f} | {asr} | {r['wall_s']} "
                     f"({r.get('wall_vs_plain', '-')}) | {r.get('cpu_s', '-')} "
                     f"({r.get('cpu_vs_plain', '-')}) | {det_s} | {_robust(r)} | "
                     f"{r.get('commit')} |")
    return "\n".join(lines) + "\n"


def _robust(r: dict) -> str:
    rob = r.get("robust_accuracy_pgd10")
    return "-" if not rob else " / ".join(f"{100 * v:.1f}" for v in rob.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["mnist", "cifar10"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--scenarios", nargs="+", default=["clean", "badnets10", "blended10"])
    ap.add_argument("--modes", nargs="+", default=list(MODES))
    ap.add_argument("--summarise-only", action="store_true")
    ap.add_argument("--tag", default="", help="suffix of the records file; records of a later "
                    "(tagged) file, in name order with numbers compared as numbers, replace "
                    "those of the same run in earlier ones")
    args = ap.parse_args()
    if args.summarise_only:
        write_summary()
        return
    plain_cost: dict = {}  # (dataset, scenario, seed) -> plain training's (wall s, CPU s)
    for name in args.datasets:
        out = RESULTS / f"guarded_training_{name}{args.tag}.json"
        records = json.loads(out.read_text()) if out.exists() else []
        train = load_shared(name, SHARED)
        test = load_shared(name, SHARED, split="test")
        for seed in args.seeds:
            for scenario in args.scenarios:
                for mode in ["plain"] + [m for m in args.modes if m != "plain"]:
                    rec = run(name, scenario, mode, seed, train, test, plain_cost)
                    print({k: rec.get(k) for k in ("dataset", "scenario", "mode", "seed",
                                                   "clean_accuracy", "asr", "wall_vs_plain")},
                          flush=True)
                    records[:] = [r for r in records if (r["dataset"], r["scenario"], r["mode"],
                                                         r["seed"]) != (name, scenario, mode,
                                                                        seed)]
                    records.append(rec)
                    atomic_write_json(out, records)
                    write_summary()


def _commit_order() -> dict[str, int]:
    """Short commit id -> position in the history of HEAD (oldest first); empty without git."""
    out = subprocess.run(["git", "-C", str(ROOT), "rev-list", "--reverse", "HEAD"],
                         capture_output=True, text=True).stdout.split()
    return {c[:n]: i for i, c in enumerate(out) for n in range(7, 13)}


def _natural(path: Path) -> list:
    """Sort key that orders tags by their numbers: _v9 before _v10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def write_summary() -> None:
    history = [r for f in sorted(RESULTS.glob("guarded_training_*.json"), key=_natural)
               for r in json.loads(f.read_text())]
    by_run = {(r["dataset"], r["scenario"], r["mode"], r["seed"]): r for r in history}
    records = list(by_run.values())
    atomic_write_text(RESULTS / "guarded_training.md", summarise(records, history))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
