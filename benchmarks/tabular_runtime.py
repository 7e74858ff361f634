"""The tabular runtime filter (issue 19, item 5) on bank marketing: a HistGradientBoosting
model trained on the poisoned rows (the user's deployed model), screened with
:class:`~poisonguard.modalities.tabular.runtime.RowFilter` calibrated on half of the held-out
clean test rows; triggered rows are the other half's non-``yes`` rows with the trigger
stamped. Two filters: value swapping alone (STRIP-style), and value swapping plus the rule the
scan reported for that run and seed in ``results/tabular.json`` (run ``benchmarks/tabular.py``
first). Per filter: the share of triggered rows flagged and of clean rows flagged.

    OMP_NUM_THREADS=1 python benchmarks/tabular_runtime.py     # -> results/tabular_runtime.json
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
from tabular import RESULTS, RUNS, TARGET, TRIGGERS, code_commit, hgb, load_bank

from poisonguard.io import atomic_write_json
from poisonguard.modalities.tabular import parse_rule, tabular_attack
from poisonguard.modalities.tabular.runtime import RowFilter


def one(run: str, seed: int, scan: dict[str, Any]) -> dict[str, Any]:
    kind, rate = RUNS[run]
    train, test = load_bank()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(test))
    calib, held = test.subset(order[::2]), test.subset(order[1::2])
    p = tabular_attack(train, TRIGGERS[kind], rate=rate, target=TARGET, seed=seed, test=held)
    model = hgb(p.data, seed)
    triggers = [{"class": TARGET, "rule": r, "conditions": parse_rule(r)}
                for r in scan.get("rules", [])]
    rec: dict[str, Any] = {"run": run, "seed": seed, "code_commit": code_commit(),
                           "trigger": TRIGGERS[kind], "scan_rules": scan.get("rules", []),
                           "n_calibration": len(calib), "n_clean": len(held),
                           "n_triggered": len(p.test_triggered)}
    for name, trig in (("swap_only", []), ("swap_and_rules", triggers)):
        t0 = time.perf_counter()
        filt = RowFilter.calibrate(model.predict_proba, calib, trig, seed=seed)
        hit = filt.screen(p.test_triggered.x)["suspicious"]
        clean = filt.screen(held.x)["suspicious"]
        rec[name] = {"triggered_flagged": round(float(hit.mean()), 4),
                     "clean_flagged": round(float(clean.mean()), 4),
                     "seconds": round(time.perf_counter() - t0, 1)}
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", nargs="+", default=["2col-1", "2col-0.3", "3col-1", "3col-0.3"])
    args = ap.parse_args()
    scans = json.loads((RESULTS / "tabular.json").read_text())
    out: dict[str, Any] = {}
    for seed in args.seeds:
        for run in args.runs:
            key = f"{run}/{seed}"
            if key not in scans:
                print(f"skip {key}: not in tabular.json")
                continue
            out[key] = one(run, seed, scans[key])
            print(json.dumps(out[key]), flush=True)
            atomic_write_json(RESULTS / "tabular_runtime.json", out)


if __name__ == "__main__":
    main()
