"""`poisonguard audit` standard against paranoid on the quarantine benchmark's poisoned rows.

    python benchmarks/paranoid_rows.py --dataset mnist --seeds 0 \
        --scenarios badnets1 badnets10 blended10

Each row is built as ``benchmarks/quarantine.py`` builds it (the shared training set, BadNets
3x3 or blended alpha 0.2, target ``(3 * seed + 1) % 10``), then audited through the Python API
with the data alone (the quarantine layer: no model, clean set or manifest) under each profile.
Recorded per profile: recall and the share of clean samples flagged (from the report's flags
against the ground truth), the classes called, the re-check's confirmation rates (paranoid)
and the wall time. The figure (issue 16): paranoid's false positives at most standard's, with
recall no lower. Results: benchmarks/results/paranoid_rows.{json,md} (rows merge by dataset,
scenario and seed).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from quarantine import SHARED, poison_for
from versioning import code_version

import poisonguard
from poisonguard.data import load_shared
from poisonguard.io import atomic_write_json, atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"


_CAPTURED: dict[str, Any] = {}


def _capture_votes() -> None:
    """Wrap the audit's seed vote so that each seed's flags and classes, and the re-check's
    confirmations, land in ``_CAPTURED`` for ``--dump`` (a diagnostic: the audit itself is
    unchanged)."""
    import poisonguard.full_audit as fa

    if getattr(fa._vote_seeds, "captures", False):
        return
    inner = fa._vote_seeds

    def wrapped(results: list[Any], confirmed: np.ndarray | None = None) -> Any:
        _CAPTURED["seed_flags"] = np.stack([r.flags for r in results])
        _CAPTURED["seed_classes"] = np.array(json.dumps(
            [sorted(set(map(int, r.poisoned_classes))) for r in results]))
        if confirmed is not None:
            _CAPTURED["confirmed"] = confirmed.copy()
        return inner(results, confirmed)

    wrapped.captures = True  # type: ignore[attr-defined]
    fa._vote_seeds = wrapped


def audit_row(data: Any, truth: np.ndarray, profile: str, seed: int,
              dump: dict[str, Any] | None = None) -> dict[str, Any]:
    _CAPTURED.clear()
    if dump is not None:
        _capture_votes()
    t0 = time.perf_counter()
    outcome = poisonguard.audit(data=data, profile=profile, seed=seed)
    wall = time.perf_counter() - t0
    flags = np.zeros(len(truth), bool)
    flags[np.asarray(outcome.report["samples"]["flagged"], dtype=bool)] = True
    if dump is not None:
        dump[f"{profile}_flags"] = flags
        for k, v in _CAPTURED.items():
            dump[f"{profile}_{k}"] = v
    q = outcome.report["layers"]["quarantine"]
    rec: dict[str, Any] = {
        "profile": profile, "wall_s": round(wall, 1), "n_flagged": int(flags.sum()),
        "recall": round(float(flags[truth].mean()), 4) if truth.any() else None,
        "fp_rate": round(float(flags[~truth].mean()), 5),
        "n_false": int((flags & ~truth).sum()),
        "classes": outcome.report["verdict"].get("poisoned_classes"),
        "status": outcome.layers["quarantine"]["status"]}
    recheck = q.get("independent_recheck")
    if recheck:
        rec["recheck"] = {k: recheck.get(k) for k in (
            "n_checked", "n_flagged", "n_confirmed", "n_left_out_by_vote",
            "left_out_confirmed_share", "rounds")}
        rec["dirty_label_classes"] = q.get("seed_vote", {}).get("dirty_label_classes")
        if "checked_index" in recheck:   # over every sample some seed flags, before any rule
            checked = np.zeros(len(truth), bool)
            checked[recheck["checked_index"]] = True
            conf = np.zeros(len(truth), bool)
            conf[recheck["confirmed_index"]] = True
            for name, part in (("true", checked & truth), ("false", checked & ~truth)):
                rec["recheck"][f"confirms_{name}"] = (round(float(conf[part].mean()), 4)
                                                      if part.any() else None)
    return rec


def write(records: list[dict[str, Any]], path: Path) -> None:
    atomic_write_json(path.with_suffix(".json"), records)
    lines = ["# `audit --profile standard` against `paranoid`: the quarantine rows", "",
             "`python benchmarks/paranoid_rows.py` (data alone, no model: the quarantine "
             "layer). Recall and clean samples flagged against the ground truth.", "",
             "| dataset | scenario | seed | code | profile | classes | recall | clean flagged "
             "| false flags | flags left out by the vote | re-check confirms true / false | wall s "
             "| load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        for p in r["profiles"]:
            rc = p.get("recheck") or {}
            moved = rc.get("n_left_out_by_vote", "-")
            rates = (f"{rc['confirms_true']} / {rc['confirms_false']}"
                     if "confirms_true" in rc else "-")
            lines.append(f"| {r['dataset']} | {r['scenario']} | {r['seed']} | {r['code']} | "
                         f"{p['profile']} | {p['classes']} | {p['recall']} | "
                         f"{100 * p['fp_rate']:.3f}% | {p['n_false']} | {moved} | {rates} | "
                         f"{p['wall_s']} | {r['load_avg']} |")
    lines += ["", "Paranoid meets the figure on a row when its clean flagged share is at most "
              "standard's and its recall is no lower. The re-check's confirmation rates are "
              "over every sample some seed flags (before the vote), where recorded."]
    atomic_write_text(path.with_suffix(".md"), "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--scenarios", nargs="+", default=["badnets1", "badnets10", "blended10"])
    ap.add_argument("--profiles", nargs="+", default=["standard", "paranoid"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "paranoid_rows.json"))
    ap.add_argument("--dump", help="folder for each row's per-sample flags, seed flags and "
                    "re-check confirmations (.npz; a diagnostic, not committed)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    code = code_version()
    out = Path(args.out)
    records = json.loads(out.read_text()) if out.exists() else []
    train = load_shared(args.dataset, SHARED)
    test = load_shared(args.dataset, SHARED, split="test")
    for seed in args.seeds:
        for scenario in args.scenarios:
            poisoned = poison_for(scenario, seed, train, test)
            assert poisoned is not None, scenario
            rec = {"dataset": args.dataset, "scenario": scenario, "seed": seed, "code": code,
                   "threads": args.threads, "n_train": len(poisoned.data),
                   "n_poison": int(poisoned.is_poison.sum()), "profiles": []}
            dump: dict[str, Any] | None = None if args.dump is None else {
                "truth": poisoned.is_poison.astype(bool), "y": poisoned.data.y}
            for profile in args.profiles:
                row = audit_row(poisoned.data, poisoned.is_poison.astype(bool), profile, seed,
                                dump)
                print(json.dumps({"scenario": scenario, "seed": seed, **row}), flush=True)
                rec["profiles"].append(row)
            rec["load_avg"] = round(os.getloadavg()[0], 1)
            if dump is not None:
                Path(args.dump).mkdir(parents=True, exist_ok=True)
                np.savez_compressed(Path(args.dump) / f"{args.dataset}_{scenario}_s{seed}.npz",
                                    **dump)
            records = [r for r in records if (r["dataset"], r["scenario"], r["seed"])
                       != (args.dataset, scenario, seed)] + [rec]
            write(records, out)


if __name__ == "__main__":
    main()
