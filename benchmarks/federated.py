"""Federated backdoor benchmark: every server-side defence against data poisoning and model
replacement, FedAvg without a defence beside them.

10 clients with IID shards (1000 MNIST samples each by default), 1 malicious from round 5 of
15, the built-in MLP, 1 local epoch of SGD; seeds 0-2. Per defence and attack: the share of
attack rounds in which the malicious client was named, the global ASR at the last round, clean
accuracy (mean of the last 3 rounds) and its cost against FedAvg with no attack on the same
seed, and the honest clients wrongly named. Settings were tuned on seed 0 only.

    OMP_NUM_THREADS=1 python benchmarks/federated.py                       # MNIST, seeds 0-2
    OMP_NUM_THREADS=1 python benchmarks/federated.py --datasets cifar10 --name federated_cifar10

Writes benchmarks/results/<name>.json and .md.
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from poisonguard.federated.server import DEFENSES
from poisonguard.federated.simulate import SimConfig, simulate
from poisonguard.io import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent.parent / "shared" / "datasets"
RESULTS = ROOT / "results"
COMMIT = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                        capture_output=True, text=True).stdout.strip() or None
ATTACKS = ("none", "data", "replace")
TARGETS = {"named_rate": 0.9, "asr": 0.05, "cost_points": 1.0}
PRESETS: dict[str, dict[str, Any]] = {
    "mnist": {},
    # reduced CIFAR-10: fewer, smaller shards and a narrow CNN so it fits the CPU budget
    "cifar10": {"model": "cnn", "cnn_width": 8, "samples_per_client": 500, "test_size": 2000,
                "local_lr": 0.02},
}


def run_one(dataset: str, seed: int, attack: str, defense: str, root: Path) -> dict[str, Any]:
    cfg = SimConfig(dataset=dataset, data_root=str(root), attack=attack, defense=defense,
                    malicious=0 if attack == "none" else 1, seed=seed, **PRESETS[dataset])
    rep = simulate(cfg)
    rounds = rep["rounds"]
    s = rep["summary"]
    return {"dataset": dataset, "seed": seed, "attack": attack, "defense": defense,
            "malicious": rep["malicious"], "target": rep["target"],
            "accuracy_last3": round(float(np.mean([r["accuracy"] for r in rounds[-3:]])), 4),
            "final_accuracy": s["final_accuracy"], "final_asr": s["final_asr"],
            "max_asr_after_start": s["max_asr_after_start"], "named_rate": s["named_rate"],
            "named_rounds": s["named_rounds"], "attack_rounds": s["attack_rounds"],
            "names_clients": s["names_clients"],
            "false_positives": sum(r["false_positives"] for r in rounds),
            "false_positive_rate": s["false_positive_rate"], "wall_s": s["wall_s"],
            "asr_by_round": [r["asr"] for r in rounds],
            "named_by_round": [r["named"] for r in rounds]}


def _fmt(v: float | None, pct: bool = True) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}" if pct else f"{v:.2f}"


def summarise(records: list[dict[str, Any]], dataset: str) -> tuple[list[dict], str]:
    """Per (defence, attack): means over seeds and the pass/fail of each target."""
    recs = [r for r in records if r["dataset"] == dataset]
    seeds = sorted({r["seed"] for r in recs})
    base = {r["seed"]: r["accuracy_last3"] for r in recs
            if r["defense"] == "fedavg" and r["attack"] == "none"}
    rows = []
    for attack in ATTACKS:
        for defense in DEFENSES:
            group = [r for r in recs if r["defense"] == defense and r["attack"] == attack]
            if not group:
                continue
            costs = [100 * (base[r["seed"]] - r["accuracy_last3"]) for r in group
                     if r["seed"] in base]
            named = [r["named_rate"] for r in group if r["named_rate"] is not None]
            names = group[0]["names_clients"]
            row = {"attack": attack, "defense": defense, "seeds": [r["seed"] for r in group],
                   "named_rate": float(np.mean(named)) if named and names else None,
                   "named_rounds": f"{sum(r['named_rounds'] for r in group)}/"
                                   f"{sum(r['attack_rounds'] for r in group)}"
                   if attack != "none" and names else "-",
                   "final_asr_mean": float(np.mean([r["final_asr"] for r in group])),
                   "final_asr_max": float(np.max([r["final_asr"] for r in group])),
                   "accuracy_mean": float(np.mean([r["accuracy_last3"] for r in group])),
                   "cost_points_mean": float(np.mean(costs)) if costs else None,
                   "cost_points_max": float(np.max(costs)) if costs else None,
                   "false_positive_rate": float(np.mean([r["false_positive_rate"]
                                                         for r in group])),
                   "wall_s": float(np.sum([r["wall_s"] for r in group]))}
            if attack != "none":
                row["meets"] = {
                    "named": names and row["named_rate"] is not None
                    and min(named) >= TARGETS["named_rate"],
                    "asr": row["final_asr_max"] <= TARGETS["asr"],
                    "cost": row["cost_points_max"] is not None
                    and row["cost_points_max"] <= TARGETS["cost_points"]}
            rows.append(row)
    lines = [f"### {dataset} (seeds {', '.join(map(str, seeds))})", "",
             "| attack | defence | malicious named (rounds) | final ASR % mean / max | "
             "clean acc % | cost vs FedAvg-no-attack, points mean / max | honest named % | "
             "meets named / ASR / cost |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        meets = ("-" if "meets" not in r else " / ".join(
            "yes" if r["meets"][k] else ("n/a" if k == "named" and r["named_rate"] is None
                                         else "no") for k in ("named", "asr", "cost")))
        named = ("-" if r["named_rate"] is None
                 else f"{100 * r['named_rate']:.0f}% ({r['named_rounds']})")
        cost = ("-" if r["cost_points_mean"] is None
                else f"{r['cost_points_mean']:+.2f} / {r['cost_points_max']:+.2f}")
        lines.append(f"| {r['attack']} | {r['defense']} | {named} | "
                     f"{_fmt(r['final_asr_mean'])} / {_fmt(r['final_asr_max'])} | "
                     f"{_fmt(r['accuracy_mean'])} | {cost} | "
                     f"{_fmt(r['false_positive_rate'])} | {meets} |")
    return rows, "\n".join(lines)


HEADER = """# Federated backdoor defences

`benchmarks/federated.py` (commit {commit}): {n_clients} clients with IID shards, 1 malicious
from round {start} of {rounds} attacking every round; settings tuned on seed 0 only. Attacks:
`data` = BadNets 3x3 patch on 50% of the malicious client's shard, relabelled to the target;
`replace` = model replacement (Bagdasaryan et al. 2020): the same poisoned training, 2 local
epochs, the delta scaled by clients / server lr = 10. "malicious named" = share of the attack
rounds in which the defence named (excluded) the malicious client, over all seeds; only
`krum` (multi-Krum with f = (n - 3) // 2 = 3, so it always excludes 3 clients) and `cluster`
name clients. Final ASR = the global model's attack success at the last round; clean
accuracy = mean of the last 3 rounds; cost = FedAvg-with-no-attack's accuracy minus this
row's, same seed, in points (negative = better). "honest named" = share of honest
client-rounds named. Targets (issue 22): named >= 90% of rounds, ASR <= 5%, cost <= 1 point;
"meets" checks the worst seed.

Settings: {settings}. Wall time {wall:.0f} s on 1 thread.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["mnist"], choices=sorted(PRESETS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--defenses", nargs="+", default=list(DEFENSES), choices=list(DEFENSES))
    ap.add_argument("--root", default=str(SHARED))
    ap.add_argument("--name", default="federated")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    records = []
    for dataset in args.datasets:
        for seed in args.seeds:
            for attack in ATTACKS:
                defenses = args.defenses
                if "fedavg" not in defenses:
                    defenses = ["fedavg", *defenses]
                for defense in defenses:
                    rec = run_one(dataset, seed, attack, defense, Path(args.root))
                    records.append(rec)
                    RESULTS.mkdir(exist_ok=True)  # partial records, in case the run is cut
                    atomic_write_json(RESULTS / f"{args.name}.partial.json", records)
                    print(f"{dataset} seed {seed} {attack:>7} {defense:>7}: acc "
                          f"{rec['accuracy_last3']:.4f} ASR {rec['final_asr']:.4f} named "
                          f"{rec['named_rate']} fp {rec['false_positives']} "
                          f"({rec['wall_s']:.1f} s)", flush=True)
    wall = time.perf_counter() - t0
    tables, summary = [], {}
    for dataset in args.datasets:
        rows, table = summarise(records, dataset)
        summary[dataset] = rows
        tables.append(table)
    cfg = SimConfig()
    settings = ", ".join(f"{d}: " + (", ".join(f"{k}={v}" for k, v in PRESETS[d].items())
                                      or "defaults") for d in args.datasets)
    settings += (f"; defaults: {cfg.samples_per_client} samples/client, model {cfg.model}, "
                 f"local lr {cfg.local_lr} (SGD, momentum 0.9, batch {cfg.batch_size}), "
                 f"{cfg.local_epochs} local epoch, test subset {cfg.test_size}, cluster z "
                 f"calibrated at alpha {cfg.alpha} (6.8 for 10 clients), trimmed fraction "
                 f"{cfg.trim_fraction}")
    out = {"benchmark": "federated", "commit": COMMIT, "seeds": args.seeds,
           "datasets": args.datasets, "presets": {d: PRESETS[d] for d in args.datasets},
           "defaults": cfg.to_dict(), "targets": TARGETS, "wall_s": round(wall, 1),
           "summary": summary, "records": records}
    RESULTS.mkdir(exist_ok=True)
    atomic_write_json(RESULTS / f"{args.name}.json", out)
    md = HEADER.format(commit=COMMIT, n_clients=cfg.clients, start=cfg.attack_start,
                       rounds=cfg.rounds, settings=settings, wall=wall)
    atomic_write_text(RESULTS / f"{args.name}.md", md + "\n" + "\n\n".join(tables) + "\n")
    (RESULTS / f"{args.name}.partial.json").unlink(missing_ok=True)
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
