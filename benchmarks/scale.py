"""Scale benchmark: ``poisonguard scan-features`` on planted feature sets of 1M-10M rows, and
the streamed vs in-memory agreement on MNIST representations.

Planted sets (``--sizes``): 64 float32 features, 10 classes (anisotropic Gaussian clouds, each
with its own rotation); classes 1, 3 and 7 hold a poison cluster of 10%, 3% and 1% of the class
(shifted by ``--shift`` along a random direction, half the spread); the other 7 are clean.
Written to Parquet in row groups (never whole in memory) under ``--tmp`` and deleted after.
Each is scanned by the CLI with the local engine (one process) and a 2-worker LocalCluster;
wall time, peak RSS of the whole process tree (psutil, summed over the process and all its
descendants every 0.1 s), recall and false-positive rate from flagged.csv.

MNIST (``--mnist N``): a sacrificial model trained on N MNIST images with BadNets 3x3 at 10%
(target 1, as the quarantine benchmark's seed 0); its representations are scanned in memory
(one chunk), streamed from Parquet (local and Dask engines), and by the repository's in-memory
activation clustering + spectral signatures (cross-referenced, no losses): flag Jaccard.

    python benchmarks/scale.py --sizes 1000000 3000000 10000000 --mnist 10000 \
        --sweep 6 8 10 12 16

Results: benchmarks/results/scale.json and scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent.parent / "shared" / "datasets"
RESULTS = ROOT / "results"
K, D = 10, 64
POISON = {1: 0.10, 3: 0.03, 7: 0.01}
GROUP_ROWS = 262_144


def _code_version() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Planted:
    """The fixed class geometry of the planted sets (seeded)."""

    def __init__(self, shift: float, seed: int = 12345) -> None:
        rng = np.random.default_rng(seed)
        self.means = rng.normal(0, 2, (K, D))
        self.spectrum = 1.0 + np.exp(-np.arange(D) / 6)
        self.rots = [np.linalg.qr(rng.normal(size=(D, D)))[0] for _ in range(K)]
        self.shifts = {}
        for c in POISON:
            v = rng.normal(size=D)
            self.shifts[c] = shift * v / np.linalg.norm(v)

    def group(self, g: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row group ``g``: (features float32, labels, is_poison), seeded by ``g``."""
        rng = np.random.default_rng([7, g])
        y = rng.integers(0, K, n)
        x = np.empty((n, D))
        poison = np.zeros(n, dtype=bool)
        for c in range(K):
            idx = np.flatnonzero(y == c)
            x[idx] = self.means[c] + (rng.normal(size=(len(idx), D)) * self.spectrum) @ self.rots[c]
            if c in POISON:
                p = idx[rng.random(len(idx)) < POISON[c]]
                noise = 0.5 * (rng.normal(size=(len(p), D)) * self.spectrum) @ self.rots[c]
                x[p] = self.means[c] + self.shifts[c] + noise
                poison[p] = True
        return x.astype(np.float32), y, poison


def generate(path: Path, n: int, shift: float) -> np.ndarray:
    """Write ``n`` planted rows to ``path`` one row group at a time; return the poison rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    planted = Planted(shift)
    schema = pa.schema([("label", pa.int64())] + [(f"f{i}", pa.float32()) for i in range(D)])
    poison_rows = []
    with pq.ParquetWriter(path, schema) as writer:
        for g, start in enumerate(range(0, n, GROUP_ROWS)):
            m = min(GROUP_ROWS, n - start)
            x, y, poison = planted.group(g, m)
            writer.write_table(pa.table({"label": y, **{f"f{i}": x[:, i] for i in range(D)}},
                                        schema=schema), row_group_size=GROUP_ROWS)
            poison_rows.append(np.flatnonzero(poison) + start)
    return np.concatenate(poison_rows)


def run_tracked(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd``; wall time and the peak summed RSS of it and all its descendants."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    peak: list[Any] = [0, 0, []]
    done = threading.Event()

    def sample() -> None:
        try:
            root = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            return
        while not done.is_set():
            sizes = []
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for p in procs:
                try:
                    sizes.append(p.memory_info().rss)
                except psutil.NoSuchProcess:
                    pass
            if sum(sizes) > peak[0]:
                peak[:] = [sum(sizes), len(sizes), sizes]
            time.sleep(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, err = proc.communicate()
    done.set()
    thread.join()
    return {"rc": proc.returncode, "wall_s": round(time.perf_counter() - t0, 2),
            "peak_rss_mb": round(peak[0] / 2**20, 1), "processes_at_peak": peak[1],
            "rss_per_process_at_peak_mb": [round(v / 2**20) for v in peak[2]],
            "stdout_tail": out[-600:], "stderr_tail": err[-600:]}


def flagged_rows(out: Path) -> np.ndarray:
    with open(out / "flagged.csv") as fh:
        next(fh)
        return np.array([int(line.split(",", 1)[0]) for line in fh], dtype=np.int64)


def score(flags: np.ndarray, truth: np.ndarray, n: int) -> dict[str, Any]:
    tp = int(np.isin(flags, truth, assume_unique=True).sum())
    fp = len(flags) - tp
    return {"n_flagged": int(len(flags)), "recall": round(tp / max(len(truth), 1), 4),
            "fp_rate": round(fp / max(n - len(truth), 1), 5)}


def scan_cli(path: Path, out: Path, engine: str, workers: int, memory_limit: str,
             chunk_rows: int) -> list[str]:
    return [sys.executable, "-m", "poisonguard", "scan-features", str(path),
            "--label-column", "label", "--engine", engine, "--workers", str(workers),
            "--memory-limit", memory_limit, "--chunk-rows", str(chunk_rows), "--quiet",
            "--out", str(out)]


def planted_run(n: int, tmp: Path, shift: float, engines: list[str], workers: int,
                memory_limit: str, chunk_rows: int) -> dict[str, Any]:
    path = tmp / f"planted_{n}.parquet"
    t0 = time.perf_counter()
    truth = generate(path, n, shift)
    rec: dict[str, Any] = {"kind": "planted", "n_rows": n, "n_features": D, "shift": shift,
                           "poison_share_of_class": {str(k): v for k, v in POISON.items()},
                           "n_poison": int(len(truth)),
                           "generate_s": round(time.perf_counter() - t0, 1),
                           "file_mb": round(path.stat().st_size / 2**20, 1),
                           "chunk_rows": chunk_rows, "code": _code_version()}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for engine in engines:
        out = tmp / f"out_{n}_{engine}"
        run = run_tracked(scan_cli(path, out, engine, workers, memory_limit, chunk_rows), env)
        if run["rc"] in (0, 1):
            run.update(score(flagged_rows(out), truth, n))
            summary = json.loads((out / "summary.json").read_text())
            run["poisoned_classes"] = summary["poisoned_classes"]
            run["timings"] = summary["timings"]
            run["engine"] = summary["engine"]
            run.pop("stdout_tail")
            run.pop("stderr_tail")
        rec[engine] = run
        print(n, engine, {k: v for k, v in run.items() if k != "timings"}, flush=True)
        shutil.rmtree(out, ignore_errors=True)
    path.unlink()
    return rec


def shift_sweep(shifts: list[float], n: int = 300_000) -> dict[str, Any]:
    """How far a cluster must sit for the detector to find it: the in-memory path on ``n``
    planted rows per shift (the shift's length; the class spread is about 1.1 along a random
    direction)."""
    from poisonguard.scale import detect_in_memory

    rows = []
    for shift in shifts:
        x, y, poison = Planted(shift).group(0, n)
        r = detect_in_memory(x.astype(np.float64), y)
        per_class = {str(c): round(float((r.flags & poison & (y == c)).sum()
                                         / max((poison & (y == c)).sum(), 1)), 3)
                     for c in POISON}
        rows.append({"shift": shift, **score(np.flatnonzero(r.flags), np.flatnonzero(poison),
                                             n),
                     "recall_by_class": per_class, "poisoned_classes": r.poisoned_classes})
        print("sweep", rows[-1], flush=True)
    return {"kind": "sweep", "n_rows": n, "rows": rows, "code": _code_version()}


def mnist_run(n: int, tmp: Path, chunk_rows: int) -> dict[str, Any]:
    """In-memory vs streamed flags on a sacrificial model's MNIST representations."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from poisonguard.attacks import badnets
    from poisonguard.data import load_shared
    from poisonguard.models.training import TrainConfig, train_classifier
    from poisonguard.pipeline import auto_epochs, run_detectors
    from poisonguard.scale import detect_in_memory

    torch.set_num_threads(1)
    train = load_shared("mnist", SHARED)
    idx = np.sort(np.random.default_rng(0).choice(len(train), n, replace=False))
    poisoned = badnets(train.subset(idx), rate=0.1, target=1, seed=0, size=3)
    data, truth = poisoned.data, np.flatnonzero(poisoned.is_poison)
    t0 = time.perf_counter()
    trained = train_classifier(data, TrainConfig(epochs=auto_epochs(n), seed=0))
    reps = trained.classifier.representations(data.x).astype(np.float32)
    rec: dict[str, Any] = {"kind": "mnist", "n_rows": n, "n_features": int(reps.shape[1]),
                           "attack": "badnets 3x3, 10%, target 1", "n_poison": int(len(truth)),
                           "train_s": round(time.perf_counter() - t0, 1),
                           "code": _code_version()}
    sets: dict[str, np.ndarray] = {}
    t = time.perf_counter()
    in_mem = detect_in_memory(reps.astype(np.float64), data.y)
    sets["in_memory"] = np.flatnonzero(in_mem.flags)
    rec["in_memory_s"] = round(time.perf_counter() - t, 2)
    path = tmp / "mnist_reps.parquet"
    pq.write_table(pa.table({"label": data.y, **{f"r{i}": reps[:, i]
                                                  for i in range(reps.shape[1])}}),
                   path, row_group_size=2000)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for engine in ("local", "dask"):
        out = tmp / f"mnist_out_{engine}"
        run = run_tracked(scan_cli(path, out, engine, 2, "2GiB", chunk_rows), env)
        sets[f"streamed_{engine}"] = flagged_rows(out) if run["rc"] in (0, 1) else np.zeros(0)
        rec[f"streamed_{engine}_wall_s"] = run["wall_s"]
        shutil.rmtree(out, ignore_errors=True)
    path.unlink()
    t = time.perf_counter()
    _, combined = run_detectors(reps, data.y, None,
                                names=("activation_clustering", "spectral_signatures"))
    sets["repo_in_memory_ac_ss"] = np.flatnonzero(combined.flags)
    rec["repo_in_memory_s"] = round(time.perf_counter() - t, 2)
    rec["flags"] = {k: score(v, truth, n) for k, v in sets.items()}

    def jac(a: np.ndarray, b: np.ndarray) -> float:
        u = len(np.union1d(a, b))
        return round(len(np.intersect1d(a, b)) / u, 4) if u else 1.0

    rec["jaccard"] = {f"in_memory vs {k}": jac(sets["in_memory"], v)
                      for k, v in sets.items() if k != "in_memory"}
    rec["target_class_evidence"] = next(f for f in in_mem.findings if f["label"] == 1)
    print("mnist", rec["flags"], rec["jaccard"], flush=True)
    return rec


def mnist_clean_run(n: int) -> dict[str, Any]:
    """False positives on clean data: the scale detector (in memory) on the representations
    of a sacrificial model trained on the same ``n`` MNIST images without poison."""
    import torch

    from poisonguard.data import load_shared
    from poisonguard.models.training import TrainConfig, train_classifier
    from poisonguard.pipeline import auto_epochs
    from poisonguard.scale import detect_in_memory

    torch.set_num_threads(1)
    train = load_shared("mnist", SHARED)
    data = train.subset(np.sort(np.random.default_rng(0).choice(len(train), n, replace=False)))
    trained = train_classifier(data, TrainConfig(epochs=auto_epochs(n), seed=0))
    reps = trained.classifier.representations(data.x).astype(np.float64)
    r = detect_in_memory(reps, data.y)
    rec = {"kind": "mnist_clean", "n_rows": n, "n_features": int(reps.shape[1]),
           "poisoned_classes": r.poisoned_classes, "n_flagged": int(r.flags.sum()),
           "flagged_share": round(float(r.flags.mean()), 5),
           "max_separation": {
               "spectral": max(f["spectral"]["separation"] for f in r.findings),
               "clustering": max(f["clustering"]["separation"] for f in r.findings)},
           "code": _code_version()}
    print("mnist clean", rec, flush=True)
    return rec


def summarise(records: list[dict[str, Any]]) -> str:
    lines = ["# Scale benchmark (`benchmarks/scale.py`)", "",
             "`poisonguard scan-features FILE.parquet --label-column label --engine E` on "
             "planted 64-feature sets (10 classes; poison clusters of 10%, 3% and 1% of "
             "classes 1, 3, 7; 7 clean classes), 2-core machine, `OMP_NUM_THREADS=1`. Peak "
             "RSS: summed over the CLI process and all its descendants (Dask scheduler in the "
             "client process, nannies, workers), sampled every 0.1 s.", "",
             "| rows | engine | wall s | s per M rows | peak RSS MB (processes) | recall | "
             "FP rate | flagged | poisoned classes |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in records if r["kind"] == "planted"), key=lambda r: r["n_rows"]):
        for engine in ("local", "dask"):
            e = r.get(engine)
            if not e:
                continue
            if "recall" not in e:
                lines.append(f"| {r['n_rows']:,} | {engine} | failed (rc {e['rc']}) | | "
                             f"{e['peak_rss_mb']} | | | | |")
                continue
            lines.append(
                f"| {r['n_rows']:,} | {engine}"
                f"{' (' + str(e['engine']['workers']) + ' workers)' if engine == 'dask' else ''}"
                f" | {e['wall_s']} | {e['wall_s'] / r['n_rows'] * 1e6:.1f} | "
                f"{e['peak_rss_mb']:.0f} ({e['processes_at_peak']}) | {e['recall']} | "
                f"{e['fp_rate']} | {e['n_flagged']:,} | {e['poisoned_classes']} |")
    for r in (r for r in records if r["kind"] == "mnist"):
        lines += ["", f"## MNIST representations ({r['n_rows']:,} images, {r['attack']}, "
                      f"{r['n_features']} features)", "",
                  "| flag set | flagged | recall | FP rate |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['n_flagged']} | {v['recall']} | {v['fp_rate']} |"
                  for k, v in r["flags"].items()]
        lines += ["", "| Jaccard | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in r["jaccard"].items()]
    for r in (r for r in records if r["kind"] == "mnist_clean"):
        lines += ["", f"## Clean MNIST representations ({r['n_rows']:,} images, no poison)", "",
                  f"Scale detector in memory: poisoned classes {r['poisoned_classes']}, "
                  f"{r['n_flagged']} flagged ({r['flagged_share']:.2%}); largest separation "
                  f"over the classes: spectral {r['max_separation']['spectral']}, 2-means "
                  f"{r['max_separation']['clustering']} (threshold 4)."]
    for r in (r for r in records if r["kind"] == "sweep"):
        lines += ["", f"## Separation needed (in memory, {r['n_rows']:,} planted rows)", "",
                  "Length of the poison clusters' shift (the class spread along a random "
                  "direction is about 1.1; the poison cluster's half that).", "",
                  "| shift | recall | FP rate | recall 10% / 3% / 1% class | poisoned classes |",
                  "|---|---|---|---|---|"]
        lines += [f"| {x['shift']:g} | {x['recall']} | {x['fp_rate']} | "
                  f"{' / '.join(str(x['recall_by_class'][str(c)]) for c in POISON)} | "
                  f"{x['poisoned_classes']} |" for x in r["rows"]]
    lines += ["", "Code (commit of `src`) per record: " + "; ".join(
        f"{r['kind']} {r.get('n_rows', '')}: {r.get('code', 'unknown')}" for r in records
        if r["kind"] != "note") + "."]
    notes = [r for r in records if r["kind"] == "note"]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {r['text']}" for r in notes]
    return "\n".join(lines) + "\n"


def main() -> None:
    from poisonguard.io import atomic_write_json, atomic_write_text

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="*", type=int, default=[1_000_000, 3_000_000])
    ap.add_argument("--engines", nargs="+", default=["local", "dask"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory-limit", default="1.5GiB")
    ap.add_argument("--chunk-rows", type=int, default=131_072)
    ap.add_argument("--shift", type=float, default=10.0)
    ap.add_argument("--mnist", type=int, default=0, help="MNIST images (0: skip)")
    ap.add_argument("--sweep", nargs="*", type=float, default=[],
                    help="shifts for the in-memory separation sweep (none: skip)")
    ap.add_argument("--tmp", default="/tmp/poisonguard-scale-bench")
    ap.add_argument("--out", default=str(RESULTS / "scale.json"))
    ap.add_argument("--summarise-only", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    records = json.loads(out.read_text()) if out.exists() else []

    def save(rec: dict[str, Any]) -> None:
        key = (rec["kind"], rec.get("n_rows"))
        records[:] = [r for r in records if (r["kind"], r.get("n_rows")) != key]
        records.append(rec)
        atomic_write_json(out, records)
        atomic_write_text(out.with_suffix(".md"), summarise(records))

    if args.summarise_only:
        atomic_write_text(out.with_suffix(".md"), summarise(records))
        return
    tmp = Path(args.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        for n in args.sizes:
            save(planted_run(n, tmp, args.shift, args.engines, args.workers,
                             args.memory_limit, args.chunk_rows))
        if args.sweep:
            save(shift_sweep(args.sweep))
        if args.mnist:
            save(mnist_run(args.mnist, tmp, 2000))
            save(mnist_clean_run(args.mnist))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
