"""Model-audit benchmark: a zoo of small models (half clean, half backdoored), each audited with
at most 500 clean samples: Neural Cleanse detection, fine-pruning, unlearning and ANP repairs,
and the speed of all-class reverse-engineering on a CIFAR-10-sized model.

    python benchmarks/model_audit.py                 # train the zoo (cached), audit, repair
    python benchmarks/model_audit.py --train-only    # only build benchmarks/cache/model_zoo/
    python benchmarks/model_audit.py --speed-only    # re-measure the CIFAR NC timing only
    python benchmarks/model_audit.py --repairs-only  # rerun only the repairs (reuses each
                                                     # model's cached triggers.npz and the
                                                     # detection fields already in the JSON)
    python benchmarks/model_audit.py --detect-only   # rerun only the detection; the repair
                                                     # fields already in the JSON are kept,
                                                     # with the commit they ran on
    python benchmarks/model_audit.py --out DIR ...   # read/write DIR/model_audit.json/.md and
                                                     # DIR/triggers/ (experiments), not results/

Zoo models are cached under benchmarks/cache/model_zoo/ (git-ignored), so reruns skip training.
Results: benchmarks/results/model_audit.json and .md (written atomically). Each record notes
the code version its detection (``detect_code``) and its repairs (``repair_code``) ran on.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent.parent / "shared" / "datasets"
RESULTS = ROOT / "results"
ZOO = ROOT / "cache" / "model_zoo"
TRIGGERS = ZOO  # reversed triggers: TRIGGERS/<name>/triggers.npz
N_AUDIT = 500

# dataset -> (train subset size, epochs)
TRAINING = {"mnist": (12000, 2), "fashion_mnist": (12000, 3), "cifar10": (10000, 4)}
BACKDOORS = {
    "mnist": [("badnets", 0, {"size": 3, "position": "bottom-right"}),
              ("badnets", 3, {"size": 4, "position": "top-left"}),
              ("badnets", 7, {"size": 5, "position": "top-right"}),
              ("blended", 5, {"alpha": 0.15})],
    "fashion_mnist": [("badnets", 2, {"size": 3, "position": "bottom-left"}),
                      ("badnets", 9, {"size": 4, "position": "top-right"}),
                      ("badnets", 4, {"size": 5, "position": "bottom-right"}),
                      ("blended", 6, {"alpha": 0.2})],
    "cifar10": [("badnets", 1, {"size": 3, "position": "bottom-right"}),
                ("badnets", 8, {"size": 4, "position": "top-left"}),
                ("badnets", 5, {"size": 5, "position": "bottom-left"}),
                ("blended", 3, {"alpha": 0.2})],
}


# a held-out set (other targets, positions, seeds; --holdout) for checking settings chosen on
# the zoo above: one clean model per dataset (for the ASR floors) and backdoored ones
HOLDOUT_BACKDOORS = {
    "mnist": [("badnets", 9, {"size": 4, "position": "bottom-left"}),
              ("blended", 2, {"alpha": 0.2})],
    "fashion_mnist": [("badnets", 1, {"size": 4, "position": "top-left"}),
                      ("blended", 8, {"alpha": 0.15})],
    "cifar10": [("badnets", 6, {"size": 4, "position": "top-right"})],
}
SPEC_SET = "zoo"


def zoo_specs() -> list[dict[str, Any]]:
    """The models of the current set: the zoo, or with ``--holdout`` the held-out set."""
    if SPEC_SET == "holdout":
        return holdout_specs()
    return _model_specs("", range(4), BACKDOORS, first_seed=10)


def holdout_specs() -> list[dict[str, Any]]:
    return _model_specs("holdout-", [4], HOLDOUT_BACKDOORS, first_seed=20)


def _model_specs(prefix: str, clean_seeds: Any, backdoors: dict[str, list[Any]],
                 first_seed: int) -> list[dict[str, Any]]:
    """Per dataset: clean models with ``clean_seeds``, then one backdoored model per entry of
    ``backdoors`` (seeds ``first_seed``, ``first_seed + 1``, ...), 10% poisoned."""
    specs = []
    for ds, entries in backdoors.items():
        for seed in clean_seeds:
            specs.append({"name": f"{prefix}{ds}-clean-s{seed}", "dataset": ds, "seed": seed,
                          "attack": None})
        for i, (attack, target, kw) in enumerate(entries):
            tag = f"{attack}-t{target}" + (f"-{kw['size']}px" if "size" in kw else
                                           f"-a{kw['alpha']}")
            specs.append({"name": f"{prefix}{ds}-{tag}", "dataset": ds,
                          "seed": first_seed + i,
                          "attack": {"name": attack, "target": target, "rate": 0.1, **kw}})
    return specs


@functools.cache
def dataset(name: str) -> tuple[Any, Any, Any]:
    """(train, audit clean set of N_AUDIT test samples, held-out evaluation test set)."""
    from poisonguard.data import load_shared

    train = load_shared(name, SHARED, "train")
    test = load_shared(name, SHARED, "test")
    order = np.random.default_rng(123).permutation(len(test))
    return train, test.subset(np.sort(order[:N_AUDIT])), test.subset(np.sort(order[N_AUDIT:]))


def poisoned_for(spec: dict[str, Any]) -> tuple[Any, Any]:
    """(training set, triggered held-out test set or None) of a zoo entry, deterministic."""
    from poisonguard.attacks import make_attack

    train, _, evaluation = dataset(spec["dataset"])
    n, _ = TRAINING[spec["dataset"]]
    sub = train.subset(np.sort(np.random.default_rng(spec["seed"]).choice(len(train), n,
                                                                         replace=False)))
    if spec["attack"] is None:
        return sub, None
    kw = dict(spec["attack"])
    name = kw.pop("name")
    poisoned = make_attack(name, sub, seed=spec["seed"], test=evaluation, **kw)
    return poisoned.data, poisoned.test_triggered


def train_zoo(specs: list[dict[str, Any]]) -> None:
    import torch

    from poisonguard.metrics import accuracy
    from poisonguard.models.io import save_model
    from poisonguard.models.training import TrainConfig, train_classifier

    torch.set_num_threads(1)
    for spec in specs:
        folder = ZOO / spec["name"]
        if (folder / "zoo.json").exists():
            continue
        t0 = time.perf_counter()
        data, triggered = poisoned_for(spec)
        _, _, evaluation = dataset(spec["dataset"])
        _, epochs = TRAINING[spec["dataset"]]
        res = train_classifier(data, TrainConfig(epochs=epochs, seed=spec["seed"]))
        clf = res.classifier
        info = {"spec": spec, "train_s": round(time.perf_counter() - t0, 1),
                "clean_acc": accuracy(clf.predict(evaluation.x), evaluation.y),
                "asr": (accuracy(clf.predict(triggered.x), triggered.y)
                        if triggered is not None else None)}
        save_model(folder, clf.model, res.arch, res.arch_kwargs, clf.input_spec,
                   data.n_classes, clf.layer, extra={"zoo": info})
        from poisonguard.io import atomic_write_json

        atomic_write_json(folder / "zoo.json", info)
        print(f"trained {spec['name']}: acc {info['clean_acc']:.4f} asr {info['asr']} "
              f"({info['train_s']} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-only", action="store_true")
    p.add_argument("--speed-only", action="store_true")
    p.add_argument("--only", default=None, help="comma-separated zoo names (default: all)")
    p.add_argument("--repairs-only", action="store_true",
                   help="rerun only the repairs, with each model's cached reversed triggers "
                        "(cache/model_zoo/<name>/triggers.npz; computed once if absent)")
    p.add_argument("--speed-threads", default="1,2",
                   help="comma-separated torch thread counts the speed is measured with "
                        "(default 1,2; use 1 on a machine whose other core is busy)")
    p.add_argument("--detect-only", action="store_true",
                   help="rerun only the detection (the repair fields already in the JSON are "
                        "kept, with the code version they ran on)")
    p.add_argument("--out", default=None,
                   help="results folder (default benchmarks/results); with it the reversed "
                        "triggers are cached under OUT/triggers/ instead of the model zoo")
    p.add_argument("--repair-seeds", default=None,
                   help="comma-separated repair seeds: rerun fine-pruning and unlearning of "
                        "every model with each (cached triggers) into "
                        "model_audit_repair_seeds.{json,md}")
    p.add_argument("--holdout", action="store_true",
                   help="the held-out set of models instead of the zoo (results in "
                        "results/model_audit_holdout/ unless --out is given)")
    p.add_argument("--summarise-only", action="store_true",
                   help="recompute the clean-model ASR floors, summary and .md from the JSON")
    args = p.parse_args(argv)
    if args.repairs_only and args.detect_only:
        p.error("--repairs-only and --detect-only exclude each other")
    global RESULTS, TRIGGERS, SPEC_SET
    if args.holdout:
        SPEC_SET = "holdout"
        if not args.out:
            RESULTS = RESULTS / "model_audit_holdout"
    if args.out:
        RESULTS = Path(args.out)
        TRIGGERS = RESULTS / "triggers"
    if args.summarise_only:
        path = RESULTS / "model_audit.json"
        results = json.loads(path.read_text())
        add_floors(results["models"])
        results["summary"] = summarise(results["models"])
        write_results(results)
        return 0
    specs = zoo_specs()
    if args.only:
        keep = set(args.only.split(","))
        specs = [s for s in specs if s["name"] in keep]
    if not args.speed_only:
        train_zoo(specs)
    if args.train_only:
        return 0
    if args.repair_seeds:
        return repair_seeds(specs, [int(v) for v in args.repair_seeds.split(",")])
    threads = tuple(int(t) for t in args.speed_threads.split(","))
    return run_audits(specs, speed_only=args.speed_only, repairs_only=args.repairs_only,
                      detect_only=args.detect_only, speed_threads=threads)


N_EVAL = 5000
METHODS = ("fine-prune", "unlearn", "anp")
ACC_BUDGET = {"fine-prune": 0.01, "unlearn": 0.02, "anp": 0.01}
SPEED_MODEL = "cifar10-badnets-t1-3px"


@functools.cache
def code_version() -> str:
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "src/poisonguard/audit"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _eval(model: Any, evaluation: Any, triggered: Any) -> dict[str, float | None]:
    from poisonguard.metrics import accuracy

    ev = evaluation.subset(np.arange(min(N_EVAL, len(evaluation))))
    out: dict[str, float | None] = {"clean_acc": accuracy(model.classifier.predict(ev.x), ev.y),
                                    "asr": None}
    if triggered is not None:
        tr = triggered.subset(np.arange(min(N_EVAL, len(triggered))))
        out["asr"] = accuracy(model.classifier.predict(tr.x), tr.y)
    return out


def audit_one(spec: dict[str, Any], previous: dict[str, Any] | None = None,
              repairs_only: bool = False, detect_only: bool = False,
              previous_code: str | None = None) -> dict[str, Any]:
    """Audit and repair one zoo model. With ``repairs_only`` and ``previous`` (its record from
    an earlier run) only the repairs are rerun, with the reversed triggers cached from that run;
    with ``detect_only`` only the detection, keeping ``previous``'s repair fields (and the code
    version they ran on: theirs, else ``previous_code``)."""
    from poisonguard.audit import audit_model, load_audit_model
    from poisonguard.audit.core import load_triggers, save_triggers

    info = json.loads((ZOO / spec["name"] / "zoo.json").read_text())
    _, clean, evaluation = dataset(spec["dataset"])
    _, triggered = poisoned_for(spec)
    model = load_audit_model(ZOO / spec["name"])
    cached = TRIGGERS / spec["name"] / "triggers.npz"
    if repairs_only and previous is not None and cached.exists():
        nc = load_triggers(cached)
        rec = {k: v for k, v in previous.items() if k not in ("before", *METHODS)}
        rec.setdefault("detect_code", previous_code)
        return repair_one(spec, rec, nc, clean, evaluation, triggered)
    result = audit_model(model, clean)
    nc = result.cleanse
    cached.parent.mkdir(parents=True, exist_ok=True)
    save_triggers(cached, nc)
    v = result.verdict
    target = spec["attack"]["target"] if spec["attack"] else None
    rec: dict[str, Any] = {
        "name": spec["name"], "dataset": spec["dataset"], "attack": spec["attack"],
        "backdoored": spec["attack"] is not None, "true_target": target,
        "train": {"clean_acc": info["clean_acc"], "asr": info["asr"]},
        "verdict": {k: v[k] for k in ("backdoored", "target_class", "confidence")},
        "correct": (v["backdoored"] and v["target_class"] == target) if target is not None
        else not v["backdoored"],
        "anomaly_index_max": round(float(nc.anomaly.max()), 3),
        "anomaly_index_target": (round(float(nc.anomaly[target]), 3) if target is not None
                                 else None),
        "mask_l1": [round(float(x), 2) for x in nc.norms],
        "flagged": list(nc.flagged), "mask_flagged": list(nc.mask_flagged),
        "nc_s": round(nc.runtime_s, 2), "dormant_units": len(result.dormant.units)
        if result.dormant else None, "n_clean": len(clean), "detect_code": code_version(),
    }
    if nc.add_norms is not None and nc.add_anomaly is not None:
        rec.update({
            "additive_flagged": list(nc.add_flagged),
            "additive_anomaly_max": round(float(nc.add_anomaly.max()), 3),
            "additive_anomaly_target": (round(float(nc.add_anomaly[target]), 3)
                                        if target is not None else None),
            "additive_l2": [round(float(x), 3) for x in nc.add_norms],
            "score": [round(float(x), 3) for x in nc.score]})
    if detect_only:
        kept = {k: previous[k] for k in ("before", *METHODS, "repair_code",
                                          "clean_model_asr_floor")
                if previous is not None and k in previous}
        if kept and "repair_code" not in kept:
            kept["repair_code"] = previous_code
        rec.update(kept)
        print(f"{spec['name']}: verdict {rec['verdict']} correct {rec['correct']} flagged "
              f"{rec['flagged']} (mask {rec['mask_flagged']}, additive "
              f"{rec.get('additive_flagged')}) AI {rec['anomaly_index_max']} additive AI "
              f"{rec.get('additive_anomaly_max')} nc {rec['nc_s']} s", flush=True)
        return rec
    return repair_one(spec, rec, nc, clean, evaluation, triggered)


def _repair(method: str, model: Any, nc: Any, clean: Any, config: Any = None
            ) -> dict[str, Any] | None:
    """Repair ``model`` in place with ``method`` as the benchmark runs it: ANP on every model,
    fine-pruning with the flagged classes' triggers (plain when none), unlearning of the
    flagged classes (None when there are none: the model stays as it is)."""
    from poisonguard.audit import anp_prune, fine_prune, unlearn

    if method == "anp":  # needs no trigger
        return anp_prune(model, clean)
    if method == "fine-prune":
        return fine_prune(model, clean, config, nc=nc if nc.flagged else None,
                          trigger_classes=list(nc.flagged))
    if not nc.flagged:
        return None
    return unlearn(model, clean, nc, list(nc.flagged), config)


def repair_one(spec: dict[str, Any], rec: dict[str, Any], nc: Any, clean: Any, evaluation: Any,
               triggered: Any) -> dict[str, Any]:
    from poisonguard.audit import load_audit_model

    model = load_audit_model(ZOO / spec["name"])
    rec["before"] = _eval(model, evaluation, triggered)
    rec["repair_code"] = code_version()
    for method in METHODS:
        m = load_audit_model(ZOO / spec["name"])
        t0 = time.perf_counter()
        det = _repair(method, m, nc, clean)
        if det is None:
            rec[method] = {**rec["before"], "skipped": "no class flagged"}
            continue
        if method == "anp":
            extra = {"n_pruned": det["n_pruned"], "n_channels": det["n_neurons"],
                     "mask_quantiles": det["mask_quantiles"]}
        elif method == "fine-prune":
            extra = {"n_pruned": det["n_pruned"], "n_channels": det["n_channels"],
                     "units": det["units"]}
        else:
            extra = {"classes": det["classes"]}
        rec[method] = {**_eval(m, evaluation, triggered), **extra,
                       "chosen_epoch": det["finetune"]["chosen_epoch"] if "finetune" in det
                       else None, "skipped": None,
                       "repair_s": round(time.perf_counter() - t0, 2)}
    print(f"{spec['name']}: verdict {rec['verdict']} correct {rec['correct']} "
          f"AI {rec['anomaly_index_max']} nc {rec['nc_s']} s | before {rec['before']} | "
          f"FP {rec['fine-prune']} | UL {rec['unlearn']} | ANP {rec['anp']}", flush=True)
    return rec


def repair_seeds(specs: list[dict[str, Any]], seeds: list[int]) -> int:
    """Fine-pruning and unlearning of every zoo model with each repair seed (the fine-tuning's
    sample order, held-out split and stamps), with the cached reversed triggers; results in
    ``model_audit_repair_seeds.{json,md}``. The main table uses seed 0 only."""
    import torch

    from poisonguard.audit import load_audit_model
    from poisonguard.audit.core import load_triggers
    from poisonguard.audit.repair import RepairConfig
    from poisonguard.io import atomic_write_json, atomic_write_text

    torch.set_num_threads(1)
    rows = []
    for spec in specs:
        cached = TRIGGERS / spec["name"] / "triggers.npz"
        if not cached.exists():
            raise SystemExit(f"{cached} is missing: run the audit first")
        nc = load_triggers(cached)
        _, clean, evaluation = dataset(spec["dataset"])
        _, triggered = poisoned_for(spec)
        before = _eval(load_audit_model(ZOO / spec["name"]), evaluation, triggered)
        for seed in seeds:
            cfg = RepairConfig(seed=seed)
            row: dict[str, Any] = {"name": spec["name"], "seed": seed,
                                   "backdoored": spec["attack"] is not None, "before": before}
            m = load_audit_model(ZOO / spec["name"])
            _repair("fine-prune", m, nc, clean, cfg)
            row["fine-prune"] = _eval(m, evaluation, triggered)
            m = load_audit_model(ZOO / spec["name"])
            det = _repair("unlearn", m, nc, clean, cfg)
            row["unlearn"] = ({**before, "unchanged": True} if det is None else
                              {**_eval(m, evaluation, triggered), "unchanged": det["unchanged"]})
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = {"code_version": code_version(), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
           "seeds": seeds, "rows": rows}
    atomic_write_json(RESULTS / "model_audit_repair_seeds.json", out)
    lines = ["# Model audit: repairs with several repair seeds", "",
             f"Code {out['code_version']}, {out['created']}. Generated by "
             "`benchmarks/model_audit.py --repair-seeds " + ",".join(map(str, seeds)) + "`; "
             "the reversed triggers are the cached ones of the main run. 'both' = ASR <= 2% "
             "and clean accuracy within the method's budget (fine-pruning 1 point, unlearning "
             "2); clean models: the largest accuracy cost.", "",
             "| seed | fine-prune: both (ASR <= 2%) | unlearn: both (ASR <= 2%) | unlearn: "
             "unchanged | clean models, worst cost FP / UL (points) |", "|---|---|---|---|---|"]
    for seed in seeds:
        sel = [r for r in rows if r["seed"] == seed]
        bd = [r for r in sel if r["backdoored"]]
        cells = []
        for method in ("fine-prune", "unlearn"):
            ok_asr = [r for r in bd if r[method]["asr"] <= 0.02]
            both = [r for r in ok_asr if r["before"]["clean_acc"] - r[method]["clean_acc"]
                    <= ACC_BUDGET[method] + 1e-9]
            cells.append(f"{len(both)} of {len(bd)} ({len(ok_asr)})")
        cost = [max((r["before"]["clean_acc"] - r[m]["clean_acc"]) * 100
                    for r in sel if not r["backdoored"]) for m in ("fine-prune", "unlearn")]
        lines.append(f"| {seed} | {cells[0]} | {cells[1]} | "
                     f"{sum(r['unlearn']['unchanged'] for r in bd)} | "
                     f"{cost[0]:.2f} / {cost[1]:.2f} |")
    lines += ["", "| model | seed | fine-prune ASR / acc cost | unlearn ASR / acc cost |",
              "|---|---|---|---|"]
    for r in rows:
        if r["backdoored"]:
            cost = {m: 100 * (r["before"]["clean_acc"] - r[m]["clean_acc"])
                    for m in ("fine-prune", "unlearn")}
            lines.append(f"| {r['name']} | {r['seed']} | " + " | ".join(
                f"{100 * r[m]['asr']:.2f}% / {cost[m]:.2f}" for m in cost) + " |")
    atomic_write_text(RESULTS / "model_audit_repair_seeds.md", "\n".join(lines) + "\n")
    return 0


def measure_speed(repeats: int = 2, threads_list: tuple[int, ...] = (1, 2)) -> dict[str, Any]:
    """All-class reverse engineering (Neural Cleanse's mask search and, with the default
    config, the additive search) on one CIFAR-10 model, timed with 1 and with 2 torch threads
    (on a machine shared with other jobs, one thread is often faster: two threads contend)."""
    import torch

    from poisonguard.audit import load_audit_model, neural_cleanse

    spec = next(s for s in zoo_specs() if s["name"] == SPEED_MODEL)
    _, clean, _ = dataset(spec["dataset"])
    runs = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        for _ in range(repeats):
            model = load_audit_model(ZOO / SPEED_MODEL)
            load_before = os.getloadavg()
            nc = neural_cleanse(model, clean, 10)
            runs.append({"torch_threads": threads, "seconds": round(nc.runtime_s, 2),
                         "flagged": nc.flagged, "steps_per_class": [int(v) for v in nc.steps],
                         "additive": nc.add_norms is not None,
                         "loadavg_before": [round(x, 2) for x in load_before],
                         "loadavg_after": [round(x, 2) for x in os.getloadavg()]})
            print(f"speed: {runs[-1]}", flush=True)
    torch.set_num_threads(1)
    best = min(runs, key=lambda r: r["seconds"])
    return {"model": SPEED_MODEL, "input": [32, 32, 3], "classes": 10, "clean_samples": N_AUDIT,
            "cpu_count": os.cpu_count(), "runs": runs, "best_s": best["seconds"],
            "searches": "mask and additive" if runs and runs[0]["additive"] else "mask",
            "best_threads": best["torch_threads"],
            "created": time.strftime("%Y-%m-%d %H:%M:%S")}


def add_floors(records: list[dict[str, Any]]) -> None:
    """For each backdoored model: how often the clean models of its dataset (same recipe, no
    poison) already send its triggered test inputs to the target: the floor an ASR can reach."""
    import torch

    from poisonguard.audit import load_audit_model

    torch.set_num_threads(1)
    specs = {s["name"]: s for s in zoo_specs()}
    for r in records:
        if not r["backdoored"]:
            continue
        _, triggered = poisoned_for(specs[r["name"]])
        floors = []
        for c in records:
            if c["dataset"] == r["dataset"] and not c["backdoored"]:
                m = load_audit_model(ZOO / c["name"])
                floors.append(_eval(m, triggered, None)["clean_acc"])
        r["clean_model_asr_floor"] = round(float(np.mean(floors)), 4) if floors else None


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    bd = [r for r in records if r["backdoored"]]
    cl = [r for r in records if not r["backdoored"]]

    def mean(vals: list[float]) -> float | None:
        vals = [v for v in vals if v is not None]
        return round(float(np.mean(vals)), 4) if vals else None

    out: dict[str, Any] = {
        "n_models": len(records), "n_backdoored": len(bd), "n_clean": len(cl),
        "backdoored_flagged_right_target": sum(r["correct"] for r in bd),
        "clean_flagged": sum(r["verdict"]["backdoored"] for r in cl),
        "nc_s_mean": mean([r["nc_s"] for r in records]),
    }
    def near_floor(r: dict[str, Any], method: str) -> bool:
        floor = r.get("clean_model_asr_floor")
        return floor is not None and (r[method]["asr"] or 0) <= floor + 0.02 + 1e-9

    for method in METHODS:
        if any(method not in r for r in records):  # a partial rerun: summarised when complete
            continue
        out[method] = {
            "backdoored_asr_le_2pct": sum((r[method]["asr"] or 0) <= 0.02 for r in bd),
            "backdoored_asr_le_floor_plus_2": sum(near_floor(r, method) for r in bd),
            "backdoored_acc_within": sum(r["before"]["clean_acc"] - r[method]["clean_acc"]
                                         <= ACC_BUDGET[method] + 1e-9 for r in bd),
            "backdoored_both": sum((r[method]["asr"] or 0) <= 0.02 and
                                   r["before"]["clean_acc"] - r[method]["clean_acc"]
                                   <= ACC_BUDGET[method] + 1e-9 for r in bd),
            "backdoored_mean_asr_before": mean([r["before"]["asr"] for r in bd]),
            "backdoored_mean_asr_after": mean([r[method]["asr"] for r in bd]),
            "backdoored_mean_acc_drop": mean([r["before"]["clean_acc"] - r[method]["clean_acc"]
                                              for r in bd]),
            "clean_mean_acc_drop": mean([r["before"]["clean_acc"] - r[method]["clean_acc"]
                                         for r in cl]),
            "clean_max_acc_drop": (round(max(r["before"]["clean_acc"] - r[method]["clean_acc"]
                                             for r in cl), 4) if cl else None),
        }
        out[method]["by_dataset"] = {
            ds: {"asr_le_2pct": sum((r[method]["asr"] or 0) <= 0.02 for r in bd
                                    if r["dataset"] == ds),
                 "asr_le_floor_plus_2": sum(near_floor(r, method) for r in bd
                                            if r["dataset"] == ds),
                 "n_backdoored": sum(r["dataset"] == ds for r in bd),
                 "mean_asr_after": mean([r[method]["asr"] for r in bd if r["dataset"] == ds]),
                 "mean_acc_drop": mean([r["before"]["clean_acc"] - r[method]["clean_acc"]
                                        for r in bd if r["dataset"] == ds]),
                 "clean_mean_acc_drop": mean([r["before"]["clean_acc"] - r[method]["clean_acc"]
                                              for r in cl if r["dataset"] == ds])}
            for ds in dict.fromkeys(r["dataset"] for r in records)}
    return out


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def write_results(results: dict[str, Any]) -> None:
    from poisonguard.io import atomic_write_json, atomic_write_text

    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / "model_audit.json", results)
    s = results.get("summary") or {}
    lines = ["# Model audit benchmark", "",
             f"Code {results.get('code_version')}, {results.get('created')}. "
             f"{s.get('n_models')} models ({s.get('n_backdoored')} backdoored, "
             f"{s.get('n_clean')} clean), each audited with {N_AUDIT} clean test samples; "
             "accuracy and ASR on the held-out rest of the test set (at most "
             f"{N_EVAL} samples each). Generated by `benchmarks/model_audit.py`.", ""]
    models = results.get("models", [])
    parts, seen = [], set()
    for key, what in (("detect_code", "detection"), ("repair_code", "repairs")):
        codes = sorted({str(r.get(key)) for r in models if key in r})
        seen.update(codes)
        if codes:
            parts.append(f"{what} on {', '.join(codes)}")
    if parts:
        lines += ["Code version per part: " + "; ".join(parts) + (
            " (a `--detect-only` rerun keeps the repair columns of the run before it; "
            "`--repairs-only` keeps the detection columns)." if len(seen) > 1 else "."), ""]
    if s:
        lines += [f"- Detection: **{s['backdoored_flagged_right_target']} of "
                  f"{s['n_backdoored']}** backdoored models flagged with the right target; "
                  f"**{s['clean_flagged']} of {s['n_clean']}** clean models flagged "
                  "(a class is flagged by the mask search or by the additive search: anomaly "
                  "index > 2 on log norms and a norm at most a given share of the median; the "
                  "target is the flagged class with the largest summed anomaly index).",
                  "- Reverse-engineering (mask + additive searches) mean time per model: "
                  f"{s['nc_s_mean']} s (1 torch thread, shared machine)."]
        for method in METHODS:
            m = s.get(method)
            if m is None:
                continue
            lines.append(f"- {method}: ASR <= 2% on {m['backdoored_asr_le_2pct']} of "
                         f"{s['n_backdoored']} backdoored models (within 2 points of the "
                         f"clean-model floor on {m.get('backdoored_asr_le_floor_plus_2')}; mean "
                         f"ASR {_pct(m['backdoored_mean_asr_before'])}% -> "
                         f"{_pct(m['backdoored_mean_asr_after'])}%), clean accuracy within "
                         f"{round(100 * ACC_BUDGET[method])} point(s) on "
                         f"{m['backdoored_acc_within']}, both on {m.get('backdoored_both')}; "
                         "mean accuracy cost "
                         f"{_pct(m['backdoored_mean_acc_drop'])} points (backdoored), "
                         f"{_pct(m['clean_mean_acc_drop'])} (clean models, worst "
                         f"{_pct(m['clean_max_acc_drop'])}).")
            for ds, d in (m.get("by_dataset") or {}).items():
                lines.append(f"  - {ds}: ASR <= 2% on {d['asr_le_2pct']} of "
                             f"{d['n_backdoored']} (within 2 points of the floor on "
                             f"{d.get('asr_le_floor_plus_2')}), mean ASR after "
                             f"{_pct(d['mean_asr_after'])}%,"
                             f" accuracy cost {_pct(d['mean_acc_drop'])} points (clean models "
                             f"{_pct(d['clean_mean_acc_drop'])}).")
        rc = results.get("repair_config")
        if rc:
            lines.append(f"- Repair settings: fine-tuning ({rc.get('tune', 'all')} layers) "
                         f"{rc['epochs']} epochs, learning rate "
                         f"{rc['trigger_lr']} with a reversed trigger stamped (retried at a third"
                         f" of it while no epoch keeps accuracy in budget), {rc['lr']} without "
                         "(after fine-pruning); cosine decay; the reversed trigger is that of the "
                         "search(es) that flagged the class (mask and pattern; additive "
                         "perturbation at a random strength "
                         f"{'-'.join(str(v) for v in rc.get('add_strengths', (1.0, 1.0)))}x; "
                         "half each when both did); fine-pruning: the reversed "
                         "trigger's units first (mean-filled) until it stops responding, else "
                         f"the least active units within {100 * rc['prune_budget']:.1f} points "
                         f"(drop plus {rc.get('prune_z', 0)} standard error(s)); unlearning: "
                         "stamped samples of other classes also pushed from the flagged class, "
                         f"-log(1 - p) with weight {rc.get('suppress', 0)}; the weights of "
                         f"{rc.get('soup', 1)} run(s) with consecutive seeds averaged.")
        ac = results.get("anp_config")
        if ac:
            lines.append(f"- ANP settings: eps {ac['eps']}, alpha {ac['alpha']}, "
                         f"{ac['iterations']} mask iterations of {ac['batch_size']} samples, "
                         f"prune masks below {ac['threshold']} within "
                         f"{100 * ac['acc_budget']:.1f} points (trusted set), at most "
                         f"{100 * ac['max_fraction']:.0f}% of the neurons.")
    sp = results.get("speed")
    if sp:
        lines += [f"- Speed: all-class reverse engineering ({sp.get('searches', 'mask')} "
                  f"search(es)) on `{sp['model']}` (32x32x3, 10 classes, "
                  f"{sp['clean_samples']} clean samples, {sp['cpu_count']} cores shared with "
                  f"other jobs): best **{sp['best_s']} s** ({sp.get('best_threads', 2)} torch "
                  "thread(s)); runs: "
                  + "; ".join(f"{r['seconds']} s with {r.get('torch_threads', 2)} thread(s) "
                              f"(1-min load average {r['loadavg_before'][0]} before, "
                              f"{r['loadavg_after'][0]} after)" for r in sp["runs"]) + "."]
    lines += ["", "ASR floor = share of the triggered test inputs that the clean models of the "
              "same dataset (no poison) already send to the target.", "",
              "AI = anomaly index of the mask search (max over classes / of the true target), "
              "add. AI = the additive search's; flagged = classes flagged by mask / additive.",
              "",
              "| model | train ASR | ASR floor | verdict | target (true) | AI max | AI target "
              "| add. AI max | add. AI target | flagged (mask / add.) | NC s "
              "| acc before | ASR before | FP acc | FP ASR | FP pruned | UL acc | UL ASR "
              "| ANP acc | ANP ASR | ANP pruned |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
              "---|---|"]
    missing = {"clean_acc": None, "asr": None, "n_pruned": "—", "n_channels": "—"}

    def _v(x: Any) -> str:
        return "—" if x is None else str(x)

    for r in models:
        v = r["verdict"]
        fp = r.get("fine-prune") or missing
        ul = r.get("unlearn") or {**missing, "skipped": "not run"}
        an = r.get("anp") or missing
        before = r.get("before") or missing
        flags = (f"{r.get('mask_flagged', r.get('flagged', '—'))} / "
                 f"{r.get('additive_flagged', '—')}")
        lines.append(
            f"| {r['name']} | {_pct(r['train']['asr'])} | "
            f"{_pct(r.get('clean_model_asr_floor'))} | "
            f"{'backdoored' if v['backdoored'] else 'clean'}{'' if r['correct'] else ' ✗'} | "
            f"{v['target_class'] if v['target_class'] is not None else '—'} "
            f"({r['true_target'] if r['true_target'] is not None else '—'}) | "
            f"{r['anomaly_index_max']} | {_v(r.get('anomaly_index_target'))} | "
            f"{_v(r.get('additive_anomaly_max'))} | {_v(r.get('additive_anomaly_target'))} | "
            f"{flags} | {r['nc_s']} | {_pct(before['clean_acc'])} | "
            f"{_pct(before['asr'])} | {_pct(fp['clean_acc'])} | {_pct(fp['asr'])} | "
            f"{fp['n_pruned']}/{fp['n_channels']} | "
            f"{'skipped' if ul.get('skipped') else _pct(ul['clean_acc'])} | "
            f"{'—' if ul.get('skipped') else _pct(ul['asr'])} | {_pct(an['clean_acc'])} | "
            f"{_pct(an['asr'])} | {an['n_pruned']}/{an['n_channels']} |")
    atomic_write_text(RESULTS / "model_audit.md", "\n".join(lines) + "\n")


def run_audits(specs: list[dict[str, Any]], speed_only: bool = False,
               repairs_only: bool = False, detect_only: bool = False,
               speed_threads: tuple[int, ...] = (1, 2)) -> int:
    import torch

    path = RESULTS / "model_audit.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    if speed_only:
        results["speed"] = measure_speed(threads_list=speed_threads)
        write_results(results)
        return 0
    torch.set_num_threads(1)
    previous_code = results.get("code_version")
    done = {r["name"]: r for r in results.get("models", [])}
    for spec in specs:
        done[spec["name"]] = audit_one(spec, done.get(spec["name"]), repairs_only=repairs_only,
                                       detect_only=detect_only, previous_code=previous_code)
        order = [s["name"] for s in zoo_specs()]
        results["models"] = sorted(done.values(), key=lambda r: order.index(r["name"]))
        results["code_version"] = code_version()
        from dataclasses import asdict

        from poisonguard.audit.anp import ANPConfig
        from poisonguard.audit.neural_cleanse import CleanseConfig
        from poisonguard.audit.repair import RepairConfig

        results["cleanse_config"] = asdict(CleanseConfig())
        if not detect_only or "repair_config" not in results:
            results["repair_config"] = asdict(RepairConfig())
            results["anp_config"] = asdict(ANPConfig())
        results["created"] = time.strftime("%Y-%m-%d %H:%M:%S")
        results["summary"] = summarise(results["models"])
        write_results(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
