"""Runtime-filter benchmark: STRIP detection (FAR at calibrated FRR), screening throughput and
HTTP latency through ``poisonguard serve``.

Detection: BadNets 3x3 (10%; a solid white patch, or checkered with --attacks badnets-checker)
and blended (alpha 0.2, 10%) models on MNIST (20k training subset)
and the CIFAR-10 20k subset from ../shared/datasets, trained with the built-in architecture.
STRIP is calibrated on 2,000 held-out clean test images (never on poisons; the blend pool is drawn
from them) at 1% target FRR and evaluated on the other 8,000 test images: FRR on their clean
versions, FAR on their triggered versions (true label != target). Trained models are cached
under benchmarks/cache/.

Speed: screened predictions per second with N = 20 blends (batched) on the MNIST CNN, and
single-request p50/p99 latency through the HTTP service (uvicorn subprocess on 127.0.0.1,
10,000 requests from benchmarks/loadgen.py in a second process), plus malformed requests.

    python benchmarks/runtime.py                    # everything
    python benchmarks/runtime.py --detection-only --datasets mnist --seeds 0
    python benchmarks/runtime.py --speed-only       # re-measure speed on a quiet machine

Results are merged into benchmarks/results/runtime.json and summarised in runtime.md.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from quarantine import poison_for

from poisonguard.attacks import PoisonedData
from poisonguard.data import LabeledData, load_shared
from poisonguard.io import atomic_write_json, atomic_write_text
from poisonguard.metrics import accuracy
from poisonguard.models.io import load_model, save_model
from poisonguard.models.training import TrainConfig, train_classifier

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent.parent / "shared" / "datasets"
CACHE = ROOT / "cache" / "runtime"
RESULTS = ROOT / "results"
N_CAL = 2000  # 1,000 before 2026-11-22: a 0.5% quantile per test rested on ~5 values
EPOCHS = {"mnist": 3, "cifar10": 12}
N_TRAIN = {"mnist": 20_000, "cifar10": 20_000}


@functools.cache
def code_version() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "src/poisonguard/runtime"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@functools.cache
def datasets(name: str) -> tuple[LabeledData, LabeledData]:
    train = load_shared(name, SHARED, "train")
    test = load_shared(name, SHARED, "test")
    if len(train) > N_TRAIN[name]:
        keep = np.sort(np.random.default_rng(0).choice(len(train), N_TRAIN[name], replace=False))
        train = train.subset(keep)
    return train, test


# attacks: the quarantine benchmark's BadNets (a solid white 3x3 patch) and blended (alpha 0.2),
# and BadNets with a black-and-white checkered 3x3 patch (ART's pattern backdoor is a similar
# checkerboard of white pixels only): a white patch barely shows on images whose corner is already
# bright (4-5% of CIFAR-10's test images)
ATTACKS = ("badnets", "badnets-checker", "blended")


def poison(name: str, attack: str, seed: int) -> PoisonedData:
    """The 10% attack on the training subset, target (3 * seed + 1) mod 10."""
    train, test = datasets(name)
    if attack == "badnets-checker":
        return poison_for("badnets10", seed, train, test, pattern="checker")
    return poison_for(f"{attack}10", seed, train, test)


# victim training recipes for CIFAR-10 (MNIST models train without augmentation): random crops
# and horizontal flips (the usual recipe; a flip moves a corner trigger to the other corner, so
# the backdoor is learnt less reliably: ASR about 92%), random crops only, or none (as MNIST)
AUGMENT = ("crop+flip", "crop", "none")


def augment_for(name: str, augment: str) -> str:
    return augment if name == "cifar10" else "none"


def trained_model(name: str, attack: str, seed: int, augment: str = "crop+flip"
                  ) -> dict[str, Any]:
    """Train (or load from the cache) a model on the poisoned set; its path, accuracy and ASR."""
    augment = augment_for(name, augment)
    suffix = {"crop": "_crop", "none": "_noaug"}.get(augment, "") if name == "cifar10" else ""
    folder = CACHE / f"{name}_{attack}10_s{seed}{suffix}"
    _, test = datasets(name)
    poisoned = poison(name, attack, seed)
    if not (folder / "model.json").exists():
        cfg = TrainConfig(epochs=EPOCHS[name], seed=seed, augment=augment != "none",
                          flip=augment == "crop+flip")
        t0 = time.perf_counter()
        result = train_classifier(poisoned.data, cfg)
        clf = result.classifier
        save_model(folder, clf.model, result.arch, result.arch_kwargs, clf.input_spec,
                   poisoned.data.n_classes, clf.layer,
                   extra={"attack": poisoned.attack, "train_config": cfg.to_dict(),
                          "train_wall_s": round(time.perf_counter() - t0, 1)})
    clf = load_model(folder)
    trig = poisoned.test_triggered
    return {"path": folder, "classifier": clf, "poisoned": poisoned, "augment": augment,
            "clean_accuracy": accuracy(clf.predict(test.x), test.y),
            "asr": accuracy(clf.predict(trig.x), trig.y)}


# 'add' and 'mix0.8' are the original STRIP entropy tests (the earlier defaults); 'cut+mix' the
# default: cut-and-paste (2N = 40 blends) and mix 0.8 (N = 20), mean log-odds of the own
# prediction, union of both at half the FRR each;
# 'cut+mix-v2' the previous default (N = 20 cut blends, mean log-odds)
BLENDS = {"add": {"blend": "add", "statistic": "entropy"},
          "mix0.8": {"blend": "mix", "alpha": 0.8, "statistic": "entropy"},
          "cut+mix": {"blend": "cut+mix", "alpha": 0.8, "cut_area": 0.75,
                      "statistic": "log-odds", "cut_blends": 40},
          "cut+mix-v2": {"blend": "cut+mix", "alpha": 0.8, "cut_area": 0.75,
                         "statistic": "log-odds", "cut_blends": 20}}


# bins of the stamp's mean absolute change (fraction of the value range) over the values the
# attack alters: a white patch on a corner that is already white changes next to nothing
STAMP_BINS = ((0.0, 0.1), (0.1, 0.2), (0.2, 1.01))


def stamp_change(triggered: np.ndarray, clean: np.ndarray) -> np.ndarray:
    """Per input: mean |triggered - clean| / max value over the positions the attack changed
    on any input (the patch for BadNets, the whole image for blended)."""
    diff = np.abs(triggered.astype(np.float64) - clean.astype(np.float64))
    region = (diff > 0).any(axis=0)
    top = 255.0 if np.issubdtype(clean.dtype, np.integer) else 1.0
    return diff[:, region].mean(axis=1) / top if region.any() else np.zeros(len(diff))


def split_test(test: LabeledData, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Test indices: N_CAL for calibration (blend pool + threshold), the rest for evaluation."""
    order = np.random.default_rng(1000 + seed).permutation(len(test))
    return np.sort(order[:N_CAL]), np.sort(order[N_CAL:])


def detection(name: str, attack: str, seed: int, blends: list[str], n_eval: int,
              augment: str = "crop+flip") -> list[dict]:
    from poisonguard.metrics import auroc
    from poisonguard.runtime.strip import StripConfig, StripFilter, evaluate

    m = trained_model(name, attack, seed, augment)
    _, test = datasets(name)
    poisoned, clf = m["poisoned"], m["classifier"]
    cal, ev = split_test(test, seed)
    rng = np.random.default_rng(seed)
    clean_idx = np.sort(rng.choice(ev, min(n_eval, len(ev)), replace=False))
    trig = poisoned.test_triggered
    pos = {int(i): k for k, i in enumerate(test.ids)}
    trig_ok = np.isin([pos[int(i)] for i in trig.ids], ev)
    trig_idx = np.sort(rng.choice(np.flatnonzero(trig_ok), min(n_eval, int(trig_ok.sum())),
                                  replace=False))
    xc, xt = test.x[clean_idx], trig.x[trig_idx]
    change = stamp_change(xt, test.x[[pos[int(i)] for i in trig.ids[trig_idx]]])
    records = []
    for blend in blends:
        t0 = time.perf_counter()
        filt = StripFilter.calibrate(clf, test.x[cal], StripConfig(n_blends=20, target_frr=0.01,
                                                                   seed=seed, **BLENDS[blend]))
        t_cal = time.perf_counter() - t0
        t1 = time.perf_counter()
        rc, rt = filt.screen(xc), filt.screen(xt)
        t_eval = time.perf_counter() - t1
        result = evaluate(rc, rt)
        hit = rt.prediction == poisoned.target
        scores = np.concatenate([rc.score, rt.score])
        truth = np.concatenate([np.zeros(len(rc), bool), np.ones(len(rt), bool)])
        rec = {
            "dataset": name, "attack": attack, "seed": seed, "blend": blend,
            "code": code_version(), "target": poisoned.target,
            "model": {"clean_accuracy": m["clean_accuracy"], "asr": m["asr"],
                      "epochs": EPOCHS[name], "n_train": len(poisoned.data),
                      "augment": m["augment"]},
            "calibration": {"n": filt.calibration.n_calibration, "n_blends": 20,
                            "pool": len(filt.pool), "n_test_images": len(cal),
                            "threshold": filt.threshold, "target_frr": 0.01,
                            "achieved_frr": filt.calibration.achieved_frr, **BLENDS[blend]},
            "far": result["far"], "frr": result["frr"],
            "far_on_successful_triggers": (float((~rt.suspicious[hit]).mean())
                                           if hit.any() else None),
            "n_successful_triggers": int(hit.sum()),
            "by_stamp_change": [
                {"range": [lo, hi], "n": int(sel.sum()),
                 "asr": float(hit[sel].mean()) if sel.any() else None,
                 "far": float((~rt.suspicious[sel]).mean()) if sel.any() else None}
                for lo, hi in STAMP_BINS for sel in [(change >= lo) & (change < hi)]],
            "auroc": auroc(scores, truth),
            "entropy_median": {"clean": float(np.median(rc.entropy)),
                               "triggered": float(np.median(rt.entropy))},
            "seed_role": "tuned" if seed == 0 else "held out",
            "n_clean": result["n_clean"], "n_triggered": result["n_triggered"],
            "histogram": result["histogram"],
            "timings": {"calibrate_s": round(t_cal, 2), "screen_s": round(t_eval, 2)},
            "loadavg": [round(v, 2) for v in os.getloadavg()],
        }
        print(f"{name} {attack} s{seed} {blend}: FAR {rec['far']:.4f} FRR {rec['frr']:.4f} "
              f"(acc {m['clean_accuracy']:.3f}, ASR {m['asr']:.3f}, AUROC {rec['auroc']:.4f})",
              flush=True)
        records.append(rec)
    return records


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str) -> tuple[int, dict]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def _post(port: int, body: bytes, ctype: str) -> tuple[int, str]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/predict", body=body, headers={"Content-Type": ctype})
        r = conn.getresponse()
        return r.status, r.read().decode(errors="replace")
    finally:
        conn.close()


def malformed_requests(port: int, shape: tuple[int, ...]) -> list[dict]:
    import io

    nan = np.zeros(shape)
    nan[0, 0] = np.nan
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    cases = [
        ("empty body", b"", "application/json"),
        ("not JSON", b"{this is not json", "application/json"),
        ("wrong shape", json.dumps(np.zeros((2, 27, 28)).tolist()).encode(), "application/json"),
        ("strings", json.dumps([["x"] * shape[1]] * shape[0]).encode(), "application/json"),
        ("NaN", json.dumps(nan.tolist()).encode(), "application/json"),
        ("oversized (9 MiB)", b"[" + b"0," * (9 << 19) + b"0]", "application/json"),
        ("too many inputs", json.dumps(np.zeros((600, *shape), int).tolist()).encode(),
         "application/json"),
        ("pickled .npy", buf.getvalue(), "application/octet-stream"),
        ("wrong content type", b"hello", "text/plain"),
    ]
    out = []
    for name, body, ctype in cases:
        status, text = _post(port, body, ctype)
        health, _ = _get(port, "/health")
        try:
            reason = json.loads(text).get("error")
        except ValueError:
            reason = text[:200]
        out.append({"case": name, "status": status, "reason": reason,
                    "health_after": health})
    return out


def speed(threads: int, n_requests: int, server_threads: int = 1) -> dict:
    """Screened predictions/s (N = 20, batched) on the MNIST CNN, then HTTP latency."""
    from poisonguard.runtime.strip import StripConfig, StripFilter

    m = trained_model("mnist", "badnets", 0)
    _, test = datasets("mnist")
    cal, ev = split_test(test, 0)
    filt = StripFilter.calibrate(m["classifier"], test.x[cal], StripConfig(n_blends=20))
    print(f"speed: default filter {filt.config.blend} / {filt.config.statistic}", flush=True)
    x = test.x[ev[:2000]]
    per_threads = {}
    for n_threads in sorted({1, threads}):
        torch.set_num_threads(n_threads)
        filt.screen(x[:200])
        runs = []
        load = os.getloadavg()
        for _ in range(3):
            t0 = time.perf_counter()
            filt.screen(x)
            runs.append(len(x) / (time.perf_counter() - t0))
        per_threads[n_threads] = {
            "torch_threads": n_threads, "screened_per_s_runs": [round(r, 1) for r in runs],
            "screened_per_s": round(max(runs), 1),
            "forward_passes_per_s": round(max(runs) * 21, 1),
            "loadavg_before": [round(v, 2) for v in load],
            "loadavg_after": [round(v, 2) for v in os.getloadavg()]}
        print(f"throughput, {n_threads} thread(s): {max(runs):.1f} screened/s (load "
              f"{load[0]:.2f})", flush=True)
    best = max(per_threads.values(), key=lambda r: r["screened_per_s"])
    throughput = {"n_inputs": len(x), "n_blends": 20, "chunk": filt.config.chunk,
                  "accelerated": filt._fast is not None, **best,
                  "by_threads": list(per_threads.values())}
    # the service, in its own process
    cal_dir = CACHE / "strip_mnist_badnets10_s0"
    filt.save(cal_dir)
    inputs = CACHE / "loadgen_inputs.npy"
    np.save(inputs, np.concatenate([test.x[ev[2000:2400]],
                                    m["poisoned"].test_triggered.x[:100]]))
    port = _free_port()
    server_log = open(CACHE / "serve.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [sys.executable, "-m", "poisonguard", "serve", str(m["path"]), "--calibration",
         str(cal_dir), "--port", str(port), "--threads", str(server_threads)],
        stdout=server_log, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(300):
            try:
                if _get(port, "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        gen = subprocess.run([sys.executable, str(ROOT / "loadgen.py"), "--port", str(port),
                              "--inputs", str(inputs), "--requests", str(n_requests)],
                             capture_output=True, text=True, check=True)
        latency = json.loads(gen.stdout)
        print(f"latency: p50 {latency['latency_ms']['p50']} ms, p99 "
              f"{latency['latency_ms']['p99']} ms, errors {latency['errors']}", flush=True)
        bad = malformed_requests(port, tuple(test.x.shape[1:]))
        status, metrics = _get(port, "/metrics")
        health, _ = _get(port, "/health")
        alive = server.poll() is None
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        server_log.close()
    with open(CACHE / "serve.log") as fh:
        flagged_lines = sum("suspicious input" in line for line in fh)
    return {"throughput": throughput,
            "http": {"requests": n_requests, "client": "benchmarks/loadgen.py (http.client, "
                     "keep-alive, sequential, separate process)", **latency,
                     "server_threads": server_threads},
            "malformed_requests": bad, "server_alive_after": alive,
            "server_log_suspicious_lines": flagged_lines,
            "health_after_malformed": health, "server_metrics": metrics,
            "cpu_count": os.cpu_count()}


def load_results() -> dict:
    path = RESULTS / "runtime.json"
    if path.exists():
        return json.loads(path.read_text())
    return {"detection": [], "speed": None}


def victim(rec: dict) -> str:
    """A record's victim training recipe (records before the option existed: the default)."""
    return rec["model"].get("augment") or augment_for(rec["dataset"], "crop+flip")


def record_key(rec: dict) -> tuple:
    return rec["dataset"], rec["attack"], victim(rec), rec["blend"], rec["seed"]


@contextlib.contextmanager
def results_lock() -> Iterator[None]:
    """An exclusive lock for a read-merge-write of the results."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "results.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_results(res: dict) -> None:
    res["detection"].sort(key=record_key)
    atomic_write_json(RESULTS / "runtime.json", res)
    atomic_write_text(RESULTS / "runtime.md", summarise(res))


def stamp_change_table(records: list[dict]) -> list[str]:
    """Markdown: share, ASR and FAR of the triggered inputs by how much the stamp changed them
    (records that carry the breakdown)."""
    rows = [r for r in records if r.get("by_stamp_change") and r["attack"] != "blended"]
    if not rows:
        return []
    head = " | ".join(f"change {lo:.1f}-{min(hi, 1):.1f}: share / ASR / FAR"
                      for lo, hi in STAMP_BINS)
    lines = ["", "### BadNets triggered inputs by how much the stamp changes them", "",
             "Stamp change = mean |triggered - clean| over the patch's values, as a fraction of "
             "the value range. A solid white patch changes next to nothing on an image whose "
             "corner is already white; a checkered patch (black and white) always shows.", "",
             f"| dataset | attack | aug | blend | seed | {head} |",
             "|---|---|---|---|---|" + "---|" * len(STAMP_BINS)]

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    for r in rows:
        n = sum(b["n"] for b in r["by_stamp_change"])
        cells = " | ".join(f"{pct(b['n'] / n)} / {pct(b['asr'])} / {pct(b['far'])}"
                           for b in r["by_stamp_change"])
        lines.append(f"| {r['dataset']} | {r['attack']} 10% | {victim(r)} | {r['blend']} | "
                     f"{r['seed']} | {cells} |")
    return lines


def summarise(res: dict) -> str:
    lines = ["# Runtime filter (STRIP) benchmark", "",
             "Generated by `benchmarks/runtime.py`; raw records in `runtime.json`.", "",
             "## Detection (N = 20 blends per test, thresholds at 1% FRR on held-out clean test "
             "images)", "",
             "FAR = triggered test inputs (true label != target) NOT flagged; FRR = clean test "
             "inputs flagged. 'FAR (successful)' counts only triggered inputs the model sends "
             "to the target. 'cal' = clean test images held out for calibration (blend pool "
             "included; never evaluated): 2,000 since the `cut+mix` / `cut+mix-v2` re-runs, "
             "1,000 in older rows.", "",
             "Blends: `add` (saturating sum) and `mix0.8` (0.8 x + 0.2 clean) with STRIP's mean "
             "entropy (the first default was `add`); `cut+mix` (the default): a random "
             "rectangle covering 75% of the input replaced by a clean image (2N = 40 blends) and "
             "mix 0.8 (N = 20), each scored by the mean log-odds of the input's own prediction "
             "over its blends and calibrated at 0.5% FRR (split-conformal), flagged when either "
             "fires; "
             "`cut+mix-v2` (the previous default): the same with 20 cut blends. Both "
             "defaults were chosen on seed-0 models only (role 'tuned'); seeds 1 "
             "and 2 are held-out confirmation.", "",
             "Victim training ('aug'): MNIST models without augmentation; CIFAR-10 models with "
             "random crops and horizontal flips (`crop+flip`, the usual recipe: a flip moves the "
             "corner trigger to the other corner and the backdoor is learnt less reliably) or "
             "random crops only (`crop`) or without augmentation (`none`). A triggered input "
             "the model does not send to the target behaves like a clean one, so FAR can not "
             "fall below about 1 - ASR.", "",
             "Attacks: `badnets` is a solid white 3x3 patch (the quarantine benchmark's); "
             "`badnets-checker` a black-and-white checkered 3x3 patch at the same place (ART's "
             "pattern backdoor is a similar checkerboard of white pixels only), which shows on "
             "any background.", "",
             "| dataset | attack | aug | blend | seed (role) | clean acc | ASR | FAR | FRR | "
             "FAR (successful) | AUROC | n clean / triggered | cal |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["detection"]:
        fs = r["far_on_successful_triggers"]
        role = "tuned" if r["seed"] == 0 else "held out"
        n_cal = r["calibration"].get("n_test_images", 1000)
        lines.append(f"| {r['dataset']} | {r['attack']} 10% | {victim(r)} | {r['blend']} | "
                     f"{r['seed']} "
                     f"({role}) | "
                     f"{r['model']['clean_accuracy']:.4f} | {r['model']['asr']:.4f} | "
                     f"{r['far']:.4f} | {r['frr']:.4f} | "
                     f"{'-' if fs is None else f'{fs:.4f}'} | {r['auroc']:.4f} | "
                     f"{r['n_clean']} / {r['n_triggered']} | {n_cal} |")
    lines += stamp_change_table(res["detection"])
    sp = res.get("speed")
    if sp:
        t, h = sp["throughput"], sp["http"]
        lines += ["", "## Speed (MNIST CNN, N = 20)", "",
                  f"- Screened predictions per second, batched: **{t['screened_per_s']}** "
                  f"({t['forward_passes_per_s']} forward passes/s; runs "
                  f"{t['screened_per_s_runs']}; {t['torch_threads']} torch thread(s) on "
                  f"{sp['cpu_count']} cores, {t['chunk']} blended samples per forward pass; "
                  f"load average before {t['loadavg_before']}). By threads: "
                  + ", ".join(f"{r['torch_threads']}: {r['screened_per_s']}/s (load "
                              f"{r['loadavg_before'][0]})" for r in t.get("by_threads", []))
                  + ".",
                  f"- HTTP, single-input requests ({h['requests']}, {h['client']}): p50 "
                  f"**{h['latency_ms']['p50']} ms**, p99 **{h['latency_ms']['p99']} ms**, "
                  f"{h['requests_per_s']} requests/s, **{h['errors']} errors** (server: "
                  f"{h.get('server_threads')} torch thread); load average "
                  f"before {h['loadavg_before']}, after {h['loadavg_after']}.",
                  "- Malformed requests (the service answered /health 200 after each):", "",
                  "| case | status | reason |", "|---|---|---|"]
        for b in sp["malformed_requests"]:
            reason = str(b["reason"]).replace("|", "/")[:110]
            lines.append(f"| {b['case']} | {b['status']} | {reason} |")
        lines.append(f"\nServer alive after all requests: {sp['server_alive_after']}; "
                     f"{h.get('suspicious_answers')} answers flagged suspicious (the load mixes "
                     "400 clean and 100 triggered MNIST test images), "
                     f"{sp.get('server_log_suspicious_lines')} 'suspicious input' log lines "
                     "with ids.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["mnist", "cifar10"])
    ap.add_argument("--attacks", nargs="+", default=["badnets", "blended"], choices=ATTACKS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--blends", nargs="+", default=["cut+mix"], choices=list(BLENDS))
    ap.add_argument("--cifar-augment", default="crop+flip", choices=AUGMENT,
                    help="CIFAR-10 victim training: random crops and flips, crops only, or none")
    ap.add_argument("--n-eval", type=int, default=2000,
                    help="clean and triggered evaluation inputs per model (default 2000)")
    ap.add_argument("--detection-only", action="store_true")
    ap.add_argument("--speed-only", action="store_true")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch threads for the throughput run (1 is also measured)")
    ap.add_argument("--server-threads", type=int, default=1)
    ap.add_argument("--requests", type=int, default=10_000)
    args = ap.parse_args()
    if not args.speed_only:
        torch.set_num_threads(1 if os.environ.get("OMP_NUM_THREADS") == "1" else args.threads)
        for name in args.datasets:
            for attack in args.attacks:
                for seed in args.seeds:
                    recs = detection(name, attack, seed, args.blends, args.n_eval,
                                     args.cifar_augment)
                    with results_lock():  # runs on other models may merge at the same time
                        res = load_results()
                        keys = {record_key(r) for r in recs}
                        res["detection"] = [r for r in res["detection"]
                                            if record_key(r) not in keys] + recs
                        write_results(res)
    if not args.detection_only:
        sp = speed(args.threads, args.requests, args.server_threads)
        with results_lock():
            res = load_results()
            res["speed"] = {"code": code_version(), **sp}
            write_results(res)


if __name__ == "__main__":
    main()
