"""Model audit on models poisonguard did not write: the TorchScript zoo of foreign_zoo.py.

Every model-side command runs through the CLI, as a user would run it, on each of the 12 models
(6 backdoored, 6 clean; four architectures that are not built-ins): ``audit-model`` (detection,
target class), ``repair --method fine-prune`` and ``--method unlearn`` (reusing the audit's
triggers), ``predict`` of each repaired folder on clean and triggered test images (accuracy,
ASR), ``filter`` and ``scan --model``. Each command's exit status is recorded: 0 or 1 is a
result, anything else (2 on these valid inputs, or a traceback) is a failure of the tool.

    python benchmarks/foreign_zoo.py              # train the zoo (once; about 2 minutes)
    python benchmarks/foreign_audit.py [--only NAME,...]

Results: benchmarks/results/foreign_audit.json and .md (written atomically).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent
ZOO = ROOT / "cache" / "foreign_zoo"
RESULTS = ROOT / "results"
CLI = [sys.executable, "-m", "poisonguard"]


def run(args: list[str]) -> tuple[int, float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(CLI + args + ["--quiet"] if args[0] not in ("predict",) else CLI + args,
                       capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS",
                                                                            "1")})
    tail = (p.stderr.strip().splitlines() or [""])[-1]
    return p.returncode, round(time.perf_counter() - t0, 1), tail


def predictions(path: Path) -> np.ndarray:
    with path.open() as fh:
        return np.array([int(r["prediction"]) for r in csv.DictReader(fh)])


def rates(model: Path, name: str, target: int | None, work: Path, tag: str,
          statuses: dict[str, Any]) -> dict[str, float | None]:
    """Clean accuracy and ASR of ``model`` (a file or a repaired folder) through ``predict``."""
    out: dict[str, float | None] = {"acc": None, "asr": None}
    sets = [("test", None)] + ([(f"{name}_triggered", target)] if target is not None else [])
    for data, tgt in sets:
        csv_path = work / f"{tag}_{data}.csv"
        rc, _s, tail = run(["predict", str(model), str(ZOO / f"{data}.npz"), "--out",
                            str(csv_path)])
        statuses[f"predict_{tag}"] = rc if rc != 0 else statuses.get(f"predict_{tag}", 0)
        if rc != 0:
            statuses[f"predict_{tag}_error"] = tail
            continue
        pred = predictions(csv_path)
        with np.load(ZOO / f"{data}.npz") as d:
            y = d["y"]
        if tgt is None:
            out["acc"] = float(np.mean(pred == y))
        else:
            out["asr"] = float(np.mean(pred == tgt))
    return out


def audit_one(rec: dict[str, Any], work: Path) -> dict[str, Any]:
    name, target = rec["name"], rec["target"]
    model = ZOO / f"{name}.pt"
    clean = ZOO / "clean.npz"
    res: dict[str, Any] = {"name": name, "arch": rec["arch"], "attack": rec["attack"],
                           "target": target, "status": {}, "seconds": {}}
    st = res["status"]
    res["before"] = rates(model, name, target, work, "before", st)
    audit_dir = work / f"{name}_audit"
    rc, sec, tail = run(["audit-model", str(model), "--clean", str(clean), "--out",
                         str(audit_dir)])
    st["audit-model"], res["seconds"]["audit-model"] = rc, sec
    if rc in (0, 1):
        verdict = json.loads((audit_dir / "report.json").read_text())["verdict"]
        res["detected"] = bool(verdict.get("backdoored"))
        res["called_class"] = verdict.get("target_class")
    else:
        st["audit-model_error"] = tail
    triggers = audit_dir / "triggers.npz"
    for method in ("fine-prune", "unlearn"):
        if target is None:
            continue
        out = work / f"{name}_{method}"
        args = ["repair", str(model), "--clean", str(clean), "--method", method, "--out",
                str(out)]
        if triggers.exists():
            args += ["--triggers", str(triggers)]
        rc, sec, tail = run(args)
        st[f"repair_{method}"], res["seconds"][f"repair_{method}"] = rc, sec
        if rc in (0, 1):
            res[method] = rates(out, name, target, work, method, st)
        else:
            st[f"repair_{method}_error"] = tail
    probe = work / "probe.npz"   # 300 test images: the filter's exit status and speed
    if not probe.exists():
        with np.load(ZOO / "test.npz") as d:
            np.savez(probe, x=d["x"][:300], y=d["y"][:300])
    rc, sec, tail = run(["filter", str(model), str(probe), "--clean", str(clean),
                         "--out", str(work / f"{name}_filter")])
    st["filter"], res["seconds"]["filter"] = rc, sec
    if rc not in (0, 1):
        st["filter_error"] = tail
    rc, sec, tail = run(["scan", str(ZOO / "clean.npz"), "--model", str(model), "--out",
                         str(work / f"{name}_scan")])
    st["scan --model"], res["seconds"]["scan --model"] = rc, sec
    if rc not in (0, 1):
        st["scan --model_error"] = tail
    return res


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    bad = [r for r in records if r["target"] is not None]
    good = [r for r in records if r["target"] is None]

    def held(r: dict[str, Any], method: str, asr_max: float) -> bool:
        m, b = r.get(method) or {}, r["before"]
        return (m.get("asr") is not None and m["asr"] <= asr_max
                and b["acc"] - m["acc"] <= 0.02)

    failures = [f"{r['name']}: {k}={v}" for r in records for k, v in r["status"].items()
                if not k.endswith("_error") and v not in (0, 1)]
    return {
        "detected_right_target": sum(bool(r.get("detected")) and r.get("called_class")
                                     == r["target"] for r in bad),
        "n_backdoored": len(bad),
        "clean_flagged": sum(bool(r.get("detected")) for r in good),
        "n_clean": len(good),
        "unlearn_held": sum(held(r, "unlearn", 0.02) for r in bad),
        "fine_prune_held": sum(held(r, "fine-prune", 0.05) for r in bad),
        "command_failures": failures,
    }


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def write(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    s = results["summary"]
    lines = ["# Model audit on foreign TorchScript models", "",
             "Produced by `python benchmarks/foreign_zoo.py && python benchmarks/foreign_audit.py`"
             f" (code {results['code']}). Models: MNIST, four architectures that are not "
             "poisonguard's (see foreign_zoo.py), trained by a script that does not import "
             "poisonguard; 500 trusted clean test images; ASR and accuracy on 2000 other test "
             "images through `poisonguard predict`.", "",
             f"- Detection with the right target: **{s['detected_right_target']} of "
             f"{s['n_backdoored']}** backdoored; clean models flagged: **{s['clean_flagged']} of "
             f"{s['n_clean']}** (targets: >= 5 of 6, <= 1 of 6).",
             f"- Unlearning ASR <= 2% within 2 points: **{s['unlearn_held']} of "
             f"{s['n_backdoored']}**; fine-pruning ASR <= 5% within 2 points: "
             f"**{s['fine_prune_held']} of {s['n_backdoored']}** (target: >= 5 of 6 each).",
             f"- Commands that exited other than 0/1: {s['command_failures'] or 'none'}.", "",
             "| model | arch | attack | target | detected (class) | acc / ASR before | "
             "fine-prune acc / ASR | unlearn acc / ASR | audit s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["records"]:
        fp, ul, b = r.get("fine-prune") or {}, r.get("unlearn") or {}, r["before"]
        lines.append(
            f"| {r['name']} | {r['arch']} | {r['attack'] or 'clean'} | {r['target']} | "
            f"{r.get('detected')} ({r.get('called_class')}) | {_pct(b['acc'])} / "
            f"{_pct(b['asr'])} | {_pct(fp.get('acc'))} / {_pct(fp.get('asr'))} | "
            f"{_pct(ul.get('acc'))} / {_pct(ul.get('asr'))} | "
            f"{r['seconds'].get('audit-model')} |")
    for suffix, text in (("json", json.dumps(results, indent=2) + "\n"),
                         ("md", "\n".join(lines) + "\n")):
        tmp = out / f".foreign_audit.{suffix}.tmp"
        tmp.write_text(text)
        tmp.replace(out / f"foreign_audit.{suffix}")


def code_version() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=ROOT, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=None, help="comma-separated model names")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if not (ZOO / "zoo.json").exists():
        print(f"no zoo at {ZOO}: run benchmarks/foreign_zoo.py first", file=sys.stderr)
        return 2
    zoo = json.loads((ZOO / "zoo.json").read_text())
    wanted = set(args.only.split(",")) if args.only else None
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for rec in zoo["models"]:
            if wanted and rec["name"] not in wanted:
                continue
            r = audit_one(rec, Path(tmp))
            print(json.dumps(r), flush=True)
            records.append(r)
    results = {"code": code_version(), "zoo": {k: v for k, v in zoo.items() if k != "models"},
               "zoo_models": zoo["models"], "records": records, "summary": summarise(records)}
    write(results, Path(args.out))
    print(json.dumps(results["summary"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
