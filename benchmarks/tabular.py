"""Tabular quarantine (issue 19): UCI bank marketing (``duration`` dropped: it leaks the label;
UCI's own 10% sample ``bank.csv`` held out as the test set, the other 40,690 rows scanned),
feature-conjunction triggers on 2 and 3 columns, all-to-one into ``yes`` at 1% and 0.3%, and
a clean run. Per run: recall, clean rows flagged, whether the trigger's rule was recovered
(every trigger column named, ranges covering the trigger's), classes called, scan wall time;
and, with a HistGradientBoostingClassifier as the user's model, ASR and test AUROC trained on
the poisoned rows, on the sanitised rows, and on the unpoisoned rows (the clean model).

    OMP_NUM_THREADS=1 python benchmarks/tabular.py                 # 3 seeds, every run
    OMP_NUM_THREADS=1 python benchmarks/tabular.py --quick         # seed 0: 2col-1 and clean

Records merge into benchmarks/results/tabular.json (keyed by run and seed) and are summarised
in benchmarks/results/tabular.md. The miner's settings were tuned on seed 0, 2-column only.
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
from poisonguard.modalities.tabular import UserModel, attack_success_rate, tabular_attack
from poisonguard.modalities.tabular.data import TabularData
from poisonguard.modalities.tabular.rules import parse_conditions
from poisonguard.modalities.tabular.scan import TABULAR_DETECTORS, scan_tabular
from poisonguard.pipeline import ScanConfig

ROOT = Path(__file__).resolve().parent
BANK = ROOT.parent.parent / "shared" / "datasets" / "tabular" / "bank_marketing.npz"
RESULTS = ROOT / "results"
TRIGGERS = {"2col": "day >= 1 and day <= 3 and month == 'may'",
            "3col": "day >= 5 and day <= 6 and month == 'jul' and contact == 'telephone'",
            # chosen after the 3col 0.3% miss, from natural counts only, to check the fix
            "3col-b": "day >= 1 and day <= 3 and month == 'aug' and job == 'retired'"}
RUNS = {"clean": (None, 0.0), "2col-1": ("2col", 0.01), "2col-0.3": ("2col", 0.003),
        "3col-1": ("3col", 0.01), "3col-0.3": ("3col", 0.003),
        "2col-cl-5": ("2col", 0.05),   # clean-label: 5% of the target class, labels kept
        "3col-b-1": ("3col-b", 0.01), "3col-b-0.3": ("3col-b", 0.003)}
CLEAN_LABEL = {"2col-cl-5"}
TARGET = 1  # "yes": the greenlight


def load_bank() -> tuple[TabularData, TabularData]:
    """(train, test) with categoricals as sorted string codes, as a CSV of the table would
    load; ``month`` is 1-12 in the npz and indexes ``categories_month`` from 0."""
    z = np.load(BANK, allow_pickle=False)
    names = [str(n) for n in z["feature_names"]]
    x = z["x"].astype(np.float32).copy()
    enc: dict[str, dict[str, int]] = {}
    for j, n in enumerate(names):
        if f"categories_{n}" in z.files:
            cats = [str(c) for c in z[f"categories_{n}"]]
        elif n in ("default", "housing", "loan"):
            cats = ["no", "yes"]
        else:
            continue
        codes = x[:, j].astype(int) - (1 if n == "month" else 0)
        order = sorted(cats)
        x[:, j] = np.array([order.index(c) for c in cats])[codes]
        enc[n] = {c: i for i, c in enumerate(order)}
    keep = [j for j, n in enumerate(names) if n != "duration"]
    cols = [names[j] for j in keep]
    test_mask = z["in_bank_csv"]

    def part(m: np.ndarray) -> TabularData:
        return TabularData(x=x[m][:, keep], y=z["y"][m].astype(np.int64),
                           ids=np.flatnonzero(m), columns=cols, encodings=enc,
                           label_map={"no": 0, "yes": 1})
    return part(~test_mask), part(test_mask)


def recovered(trigger: str, found: list[dict[str, Any]], data: TabularData) -> bool:
    """Some confirmed rule of the target class names every trigger column with a range
    (value set) covering the trigger's."""
    from poisonguard.modalities.tabular import parse_rule

    want = parse_conditions(parse_rule(trigger), data)
    for t in found:
        if t["class"] != TARGET:
            continue
        got = {c.j: c for c in parse_conditions(t["conditions"], data)}
        ok = True
        for w in want:
            g = got.get(w.j)
            if g is None:
                ok = False
            elif w.codes is not None:
                ok &= g.codes is not None and w.codes <= g.codes
            else:
                ok &= g.lo <= w.lo and g.hi >= w.hi
        if ok:
            return True
    return False


def hgb(data: TabularData, seed: int) -> UserModel:
    from sklearn.ensemble import HistGradientBoostingClassifier

    cat = [j for j, c in enumerate(data.columns) if c in data.encodings]
    est = HistGradientBoostingClassifier(categorical_features=cat, random_state=seed)
    return UserModel(est.fit(data.x, data.y), n_classes=2)


def auroc(model: UserModel, test: TabularData) -> float:
    from sklearn.metrics import roc_auc_score

    return round(float(roc_auc_score(test.y, model.predict_proba(test.x)[:, 1])), 4)


def one(run: str, seed: int, train: TabularData, test: TabularData) -> dict[str, Any]:
    kind, rate = RUNS[run]
    rec: dict[str, Any] = {"run": run, "seed": seed, "n_train": len(train),
                           "code_commit": code_commit()}
    triggered = None
    if kind is None:
        data, truth = train, np.zeros(len(train), bool)
    else:
        p = tabular_attack(train, TRIGGERS[kind], rate=rate, target=TARGET, seed=seed,
                           test=test, clean_label=run in CLEAN_LABEL)
        data, truth, triggered = p.data, p.is_poison, p.test_triggered
        rec["trigger"] = TRIGGERS[kind]
        rec["n_poison"] = int(truth.sum())
        rec["natural_matches"] = int(parse_match(TRIGGERS[kind], train).sum())
    t0 = time.perf_counter()
    result = scan_tabular(data, ScanConfig(detectors=TABULAR_DETECTORS, seed=seed))
    rec["scan_s"] = round(time.perf_counter() - t0, 1)
    flags = result.flags
    rec["recall"] = round(float(flags[truth].mean()), 4) if truth.any() else None
    rec["clean_flagged_pct"] = round(100 * float(flags[~truth].mean()), 3)
    rec["poisoned_classes"] = result.poisoned_classes
    rec["rules"] = [t["rule"] for t in result.triggers]
    rec["rule_recovered"] = recovered(TRIGGERS[kind], result.triggers, data) if kind else None
    rec["first_stage_flagged"] = result.tabular_info["first_stage_flagged"]
    miner = next(d for d in result.detectors if d.name == "rule_miner")
    rec["tested_rules"] = {int(f.label): [[e["rule"], e["n_carriers"], e["n_other_classes"],
                                           e["other_ratio"], e["flip_lower_bound"],
                                           e["confirmed"]]
                                          for e in f.evidence["tested_rules"]]
                           for f in miner.findings}
    rec["sacrificial_train_accuracy"] = result.tabular_info["train_accuracy"]
    # the user's model: HGB on the poisoned rows, on the sanitised rows, on the clean rows
    t0 = time.perf_counter()
    clean_model = hgb(train, seed)
    rec["auroc_clean_model"] = auroc(clean_model, test)
    if triggered is not None:
        poisoned_model = hgb(data, seed)
        sanitised_model = hgb(data.subset(np.flatnonzero(~flags)), seed)
        rec["asr_clean_model"] = round(attack_success_rate(clean_model, triggered), 4)
        rec["asr_poisoned"] = round(attack_success_rate(poisoned_model, triggered), 4)
        rec["asr_sanitised"] = round(attack_success_rate(sanitised_model, triggered), 4)
        rec["auroc_poisoned"] = auroc(poisoned_model, test)
        rec["auroc_sanitised"] = auroc(sanitised_model, test)
    else:
        rec["auroc_sanitised"] = auroc(hgb(data.subset(np.flatnonzero(~flags)), seed), test)
    rec["hgb_s"] = round(time.perf_counter() - t0, 1)
    return rec


def parse_match(trigger: str, data: TabularData) -> np.ndarray:
    from poisonguard.modalities.tabular import parse_rule
    from poisonguard.modalities.tabular.rules import match

    return match(parse_conditions(parse_rule(trigger), data), data.x)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_md(records: list[dict[str, Any]], out: Path) -> None:
    cols = ["run", "seed", "n_poison", "recall", "clean_flagged_pct", "rule_recovered",
            "poisoned_classes", "asr_poisoned", "asr_sanitised", "asr_clean_model",
            "auroc_clean_model", "auroc_sanitised", "scan_s"]
    lines = ["# Tabular quarantine: bank marketing (issue 19)", "",
             "40,690 rows scanned (UCI's `bank.csv` 10% sample, 4,521 rows, held out as the "
             "test set; `duration` dropped, it leaks the label). All-to-one into `yes` (1). "
             "Triggers: 2col = `" + TRIGGERS["2col"] + "`, 3col = `" + TRIGGERS["3col"] + "`. "
             "ASR and AUROC with a HistGradientBoostingClassifier (the user's model) trained "
             "on the poisoned rows, the sanitised rows (flagged rows removed) and the "
             "unpoisoned rows (clean model); ASR on the non-`yes` test rows with the "
             "trigger (the clean model's ASR is its false-positive rate on those rows). "
             "2col-cl-5: clean-label, the trigger on 5% of the `yes` rows, labels kept. Scan "
             "wall time on one thread (shared 2-core machine, other jobs running). Miner "
             "settings tuned on seed 0, 2col all-to-one and clean only; 3col-b was chosen "
             "after a 3col miss, and the miner's rule generalisation was written after "
             "3col-b-0.3 seeds 0-1 came out with an extra age condition, so those runs are "
             "not held out. Code commit(s): "
             + ", ".join(sorted({str(r.get("code_commit")) for r in records})) + ".", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in sorted(records, key=lambda r: (list(RUNS).index(r["run"]), r["seed"])):
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    lines += ["", "Rules reported:", ""]
    for r in sorted(records, key=lambda r: (list(RUNS).index(r["run"]), r["seed"])):
        lines.append(f"- {r['run']} seed {r['seed']}: "
                     + ("; ".join(f"`{x}`" for x in r["rules"]) or "none"))
    atomic_write_text(out, "\n".join(lines) + "\n")


def code_commit() -> str:
    """HEAD's commit, with "+dirty" when src/ or this script has uncommitted changes."""
    import subprocess

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT.parent, capture_output=True, text=True,
                              check=False).stdout.strip()
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "src", "benchmarks/tabular.py")
                   else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--quick", action="store_true", help="seed 0, 2col-1 and clean only")
    ap.add_argument("--out", default=str(RESULTS / "tabular.json"),
                    help="results .json (records merge in; the .md is written beside it)")
    ap.add_argument("--fresh", action="store_true", help="drop the file's earlier records")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.seeds, args.runs = [0], ["2col-1", "clean"]
    train, test = load_bank()
    path = Path(args.out)
    store = json.loads(path.read_text()) if path.exists() and not args.fresh else {}
    for seed in args.seeds:
        for run in args.runs:
            rec = one(run, seed, train, test)
            store[f"{run}/{seed}"] = rec
            print(json.dumps({k: rec.get(k) for k in ("run", "seed", "recall",
                                                      "clean_flagged_pct", "rule_recovered",
                                                      "poisoned_classes", "asr_sanitised",
                                                      "scan_s")}), flush=True)
            atomic_write_json(path, store)
            write_md(list(store.values()), path.with_suffix(".md"))


if __name__ == "__main__":
    main()
