"""Issue 21's zoo: MNIST models backdoored with patch and non-patch attacks (BadNets, blended,
WaNet, low-frequency, adaptive blend, SIG), each with two targets, plus clean twins; the
data-free audit (MM-BD), the audit with 500 clean samples (Neural Cleanse + MM-BD) and the
runtime filters (STRIP, SCALE-UP) on every model.

Victims: the built-in MNIST CNN trained 3 epochs (seeded) on a 20k training subset (drawn with
the model's seed), poisoned with the attack's recipe below. Models are split in two halves:
``dev`` (the seed-0 backdoored models and clean twins c0-c3), on which settings were chosen,
and ``held-out`` (the rest), reported separately. Only models with ASR >= 50% are scored.

    python benchmarks/nonpatch_zoo.py --train-only      # build benchmarks/cache/nonpatch_zoo/
    python benchmarks/nonpatch_zoo.py [--models NAME ...] [--parts audit_free audit_clean
                                      runtime repair] [--reuse-nc]
    python benchmarks/nonpatch_zoo.py --speed-only      # data-free audit on a CIFAR-sized CNN

Parts: ``audit_free`` (``audit-model`` without --clean), ``audit_clean`` (with the 500 trusted
test images; ``--reuse-nc`` recombines the Neural Cleanse verdict already in the JSON with the
new data-free one instead of rerunning NC), ``runtime`` (STRIP, scale-up, ibd-psc and feature
filters, backdoored models), ``repair`` (ANP). The results of 2026-12-03 were made with
``--parts audit_free`` and ``--parts audit_clean --reuse-nc`` over the 36 MNIST models after
the last setting change, ``--parts runtime`` over the 18 backdoored ones, ``--parts
audit_clean`` (full) over the 12 dev and held-out backdoored ones and ``--parts repair`` over
the three WaNet models. Of the CIFAR-10 entries (half ``cifar-10``, never used to choose a
setting) SIG, WaNet, blended and two clean twins were trained, with ``--parts audit_free`` and
``--parts runtime`` only (CPU time).

Writes benchmarks/results/nonpatch_zoo.{json,md}; models are cached (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent.parent / "shared" / "datasets"
CACHE = ROOT / "cache" / "nonpatch_zoo"
RESULTS = ROOT / "results"
N_TRAIN, EPOCHS, MIN_ASR = 20_000, 3, 0.5

# name -> (attack, kwargs, target, seed); seed 0 = dev half, seed 1 = held-out half
BACKDOORED: dict[str, tuple[str, dict[str, Any], int, int]] = {
    "badnets-t1": ("badnets", {"rate": 0.1, "size": 3}, 1, 0),
    "blended-t2": ("blended", {"rate": 0.1}, 2, 0),
    "wanet-t3": ("wanet", {"rate": 0.1}, 3, 0),
    "lowfreq-t4": ("low-frequency", {"rate": 0.1}, 4, 0),
    "adablend-t5": ("adaptive-blend", {"rate": 0.01}, 5, 0),
    "sig-t6": ("sig", {"rate": 0.8, "delta": 60.0}, 6, 0),
    "badnets-t7": ("badnets", {"rate": 0.05, "size": 4}, 7, 1),
    "blended-t8": ("blended", {"rate": 0.05}, 8, 1),
    "wanet-t9": ("wanet", {"rate": 0.1}, 9, 1),
    "lowfreq-t0": ("low-frequency", {"rate": 0.05}, 0, 1),
    "adablend-t1": ("adaptive-blend", {"rate": 0.01}, 1, 1),
    "sig-t2": ("sig", {"rate": 0.8, "delta": 60.0}, 2, 1),
    # trained after the first held-out round (see HALVES): the fresh confirmation set
    "badnets-t4": ("badnets", {"rate": 0.1, "size": 3}, 4, 2),
    "blended-t6": ("blended", {"rate": 0.1}, 6, 2),
    "wanet-t0": ("wanet", {"rate": 0.1}, 0, 2),
    "lowfreq-t8": ("low-frequency", {"rate": 0.1}, 8, 2),
    "adablend-t2": ("adaptive-blend", {"rate": 0.01}, 2, 2),
    "sig-t9": ("sig", {"rate": 0.8, "delta": 80.0}, 9, 2),
}
CLEAN = {f"clean-c{i}": i for i in range(18)}
# CIFAR-10 (20k JPEG-decoded training images, 4 epochs): a smaller second zoo, all held-out
CIFAR_BACKDOORED: dict[str, tuple[str, dict[str, Any], int, int]] = {
    "cifar-badnets-t0": ("badnets", {"rate": 0.1, "size": 3}, 0, 1),
    "cifar-blended-t5": ("blended", {"rate": 0.1}, 5, 1),
    "cifar-sig-t7": ("sig", {"rate": 0.8}, 7, 1),
    "cifar-wanet-t3": ("wanet", {"rate": 0.1}, 3, 1),
}
CIFAR_CLEAN = {"cifar-clean-c0": 0, "cifar-clean-c1": 1}
BACKDOORED.update(CIFAR_BACKDOORED)
CLEAN.update(CIFAR_CLEAN)
CIFAR_EPOCHS = 4


def dataset(name: str) -> str:
    return "cifar10" if name.startswith("cifar") else "mnist"


HALVES = ("dev", "held-out", "fresh")


def half(name: str) -> str:
    """``dev`` (seed 0, clean c0-c3): settings chosen here; ``held-out`` (seed 1, c4-c11): the
    first confirmation, which the prior weight 10 failed (6 of 8 clean flagged) and which
    then informed the weight 100; ``fresh`` (seed 2, c12-c17, trained after that change):
    the confirmation of the final settings."""
    if name.startswith("cifar"):
        return "cifar-10"
    if name in BACKDOORED:
        return HALVES[BACKDOORED[name][3]]
    i = CLEAN[name]
    return "dev" if i < 4 else ("held-out" if i < 12 else "fresh")


def splits(ds: str = "mnist", seed: int = 0) -> dict[str, Any]:
    """The shared test-set split: trusted (500, the audit's clean set), calibration (2,000),
    evaluation (2,000)."""
    from poisonguard.data import load_shared

    test = load_shared(ds, SHARED, split="test")
    order = np.random.default_rng(seed).permutation(len(test))
    return {"trusted": test.subset(np.sort(order[:500])),
            "cal": test.subset(np.sort(order[500:2500])),
            "eval": test.subset(np.sort(order[2500:4500]))}


def build(name: str, ev: Any) -> tuple[Path, Any]:
    """Train (or reuse) the model ``name``; return its folder and the poisoned data (None for
    clean twins)."""
    from poisonguard.attacks import make_attack
    from poisonguard.data import load_shared
    from poisonguard.models.io import save_model
    from poisonguard.models.training import TrainConfig, train_classifier

    seed = BACKDOORED[name][3] if name in BACKDOORED else CLEAN[name]
    full = load_shared(dataset(name), SHARED)
    rng = np.random.default_rng(1000 + seed)
    n = min(N_TRAIN, len(full))
    train = full.subset(np.sort(rng.choice(len(full), n, replace=False)))
    poisoned = None
    data = train
    if name in BACKDOORED:
        attack, kwargs, target, _ = BACKDOORED[name]
        poisoned = make_attack(attack, train, seed=seed, test=ev, target=target, **kwargs)
        data = poisoned.data
    folder = CACHE / name
    if not (folder / "model.json").exists():
        from poisonguard.models.io import describe_inputs

        t0 = time.perf_counter()
        cifar = dataset(name) == "cifar10"
        cfg = TrainConfig(epochs=CIFAR_EPOCHS if cifar else EPOCHS, seed=seed)
        result = train_classifier(data, cfg)
        clf = result.classifier
        save_model(folder, clf.model, result.arch, result.arch_kwargs, clf.input_spec,
                   data.n_classes, clf.layer,
                   extra={"attack": poisoned.attack if poisoned else None},
                   inputs=describe_inputs(data.x))
        print(f"trained {name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return folder, poisoned


def victim(name: str, folder: Path, poisoned: Any, ev: Any) -> dict[str, Any]:
    from poisonguard.metrics import accuracy
    from poisonguard.models.io import load_model

    clf = load_model(folder)
    rec: dict[str, Any] = {"model": name, "dataset": dataset(name), "half": half(name),
                           "backdoored": name in BACKDOORED,
                           "clean_accuracy": round(accuracy(clf.predict(ev.x), ev.y), 4)}
    if name in BACKDOORED:
        attack, kwargs, target, seed = BACKDOORED[name]
        trig = poisoned.test_triggered
        rec.update({"attack": attack, "params": kwargs, "target": target, "seed": seed,
                    "asr": round(accuracy(clf.predict(trig.x), trig.y), 4)})
        rec["scored"] = rec["asr"] >= MIN_ASR
    else:
        rec.update({"attack": None, "target": None, "seed": CLEAN[name], "scored": True})
    return rec


def audit_free(folder: Path) -> dict[str, Any]:
    from poisonguard.audit.combined import audit_with_optional_clean
    from poisonguard.audit.mmbd import MarginConfig, infer_domain
    from poisonguard.audit.model import load_audit_model

    model = load_audit_model(folder)
    t0 = time.perf_counter()
    v = audit_with_optional_clean(model, infer_domain(model))
    ev = v["evidence"]
    return {"backdoored": v["backdoored"], "target_class": v["target_class"],
            "prior": MarginConfig().prior,
            "top": ev["most_anomalous_class"], "p_value": ev["p_value"],
            "margin_anomaly_index": ev["margin_anomaly_index"],
            "seconds": round(time.perf_counter() - t0, 1)}


def audit_clean(folder: Path, trusted: Any) -> dict[str, Any]:
    from poisonguard.audit.combined import combined_audit
    from poisonguard.audit.mmbd import infer_domain
    from poisonguard.audit.model import load_audit_model

    model = load_audit_model(folder)
    t0 = time.perf_counter()
    result, _ = combined_audit(model, trusted, None, None, infer_domain(model, None, None,
                                                                          trusted.x))
    seconds = time.perf_counter() - t0
    v = result.verdict
    nc = v["evidence"]["detectors"]["neural_cleanse"]
    return {"backdoored": v["backdoored"], "target_class": v["target_class"],
            "decided_by": v["decided_by"], "nc_backdoored": nc["backdoored"],
            "nc_target": nc["target_class"],
            "nc_most_anomalous": nc["evidence"]["most_anomalous_class"],
            "nc_guard": {k: nc["evidence"].get(k) for k in (
                "anomaly_index", "mask_ratio_to_median", "additive_anomaly_index",
                "additive_ratio_to_median")},
            "seconds": round(seconds, 1),
            "nc_seconds": round(seconds - result.timings["max_margin_s"], 1)}


RUNTIME_FRR = 0.02
N_RUNTIME = 500
N_CAL = 1000
STRIP = {"blend": "cut+mix", "alpha": 0.8, "cut_area": 0.75, "statistic": "log-odds",
         "cut_blends": 40, "n_blends": 20}


def runtime_part(folder: Path, poisoned: Any, sp: dict[str, Any], rec: dict[str, Any],
                 methods: tuple[str, ...] = ("strip", "scale-up", "ibd-psc", "feature")
                 ) -> dict[str, Any]:
    """Per method: FAR on (at most :data:`N_RUNTIME` of) the successful triggered inputs, FRR
    on :data:`N_RUNTIME` clean evaluation inputs, screened inputs per second (calibrated on
    the first :data:`N_CAL` of ``sp['cal']`` at :data:`RUNTIME_FRR`)."""
    from poisonguard.models.io import load_model
    from poisonguard.runtime.consistency import ConsistencyConfig, ConsistencyFilter
    from poisonguard.runtime.feature import FeatureConfig, FeatureFilter
    from poisonguard.runtime.strip import StripConfig, StripFilter

    clf = load_model(folder)
    cal_x = sp["cal"].x[:N_CAL]
    ev = sp["eval"].subset(np.arange(N_RUNTIME))
    trig = poisoned.test_triggered if poisoned is not None else None
    hit = None
    if trig is not None:
        hit = clf.predict(trig.x) == trig.y
        hit &= np.cumsum(hit) <= N_RUNTIME
    out: dict[str, Any] = {}
    for meth in methods:
        if meth == "strip":
            filt = StripFilter.calibrate(clf, cal_x, StripConfig(
                target_frr=RUNTIME_FRR, seed=0, **STRIP))
        elif meth == "feature":
            filt = FeatureFilter.calibrate(clf, cal_x, FeatureConfig(
                target_frr=RUNTIME_FRR))
        else:
            filt = ConsistencyFilter.calibrate(clf, cal_x, ConsistencyConfig(
                method=meth, target_frr=RUNTIME_FRR))
        t0 = time.perf_counter()
        rc = filt.screen(ev.x)
        per_s = len(ev.x) / (time.perf_counter() - t0)
        m: dict[str, Any] = {"frr": round(float(rc.suspicious.mean()), 4),
                             "per_second": round(per_s, 1), "far_successful": None}
        if trig is not None and hit is not None and hit.any():
            rt = filt.screen(trig.x[hit])
            m["far_successful"] = round(float((~rt.suspicious).mean()), 4)
            m["n_successful"] = int(hit.sum())
            m["flagged_scores"] = {"clean": rc.score, "triggered": rt.score}
        out[meth] = m
    for m in out.values():
        m.pop("flagged_scores", None)
    return out


def recombine(prev: dict[str, Any], free: dict[str, Any]) -> dict[str, Any]:
    """The with-clean verdict from an earlier run's Neural Cleanse verdict (``prev``, same
    seeds and NC code) and this run's max-margin one (``free``), through the audit's own
    :func:`~poisonguard.audit.combined.combine_verdicts`; seconds: the earlier run's total (an
    upper bound on NC's share) plus the new max-margin time."""
    from poisonguard.audit.combined import combine_verdicts

    nc = {"backdoored": prev["nc_backdoored"], "target_class": prev["nc_target"],
          "confidence": 0.0, "summary": "", "evidence": {}}
    mm = {"backdoored": free["backdoored"], "target_class": free["target_class"],
          "confidence": 0.0, "summary": "", "evidence": {}}
    v = combine_verdicts(nc, mm)
    nc_s = prev.get("nc_seconds", prev["seconds"])  # round 1 kept no split: an upper bound
    return {**prev, "backdoored": v["backdoored"], "target_class": v["target_class"],
            "decided_by": v["decided_by"], "nc_reused": True, "nc_seconds": nc_s,
            "seconds": round(nc_s + free["seconds"], 1)}


def right(rec: dict[str, Any], part: str) -> bool | None:
    r = rec.get(part)
    if r is None:
        return None
    if rec["backdoored"]:
        return bool(r["backdoored"] and r["target_class"] == rec["target"])
    return bool(r["backdoored"])


def tally(records: list[dict[str, Any]], part: str, halfname: str | None) -> str:
    rows = [r for r in records if r.get(part) is not None and r["scored"]
            and (halfname is None or r["half"] == halfname)]
    bd = [r for r in rows if r["backdoored"]]
    cl = [r for r in rows if not r["backdoored"]]
    hit = sum(bool(right(r, part)) for r in bd)
    fp = sum(bool(right(r, part)) for r in cl)
    return (f"{hit} of {len(bd)} backdoored flagged with the right target, {fp} of {len(cl)} "
            "clean flagged")


def _cell(r: dict[str, Any] | None, keys: tuple[str, ...]) -> str:
    if r is None:
        return "–"
    tgt = r["target_class"] if r["backdoored"] else "no"
    return f"{tgt} ({', '.join(f'{r[k]}' for k in keys)})"


def summarise(records: list[dict[str, Any]]) -> str:
    from poisonguard.audit.mmbd import MarginConfig

    mc = MarginConfig()
    lines = ["# Issue 21 zoo: data-free audit, audit with clean data, runtime filters", "",
             "Written by `benchmarks/nonpatch_zoo.py` (recipe and the three halves in its "
             f"docstring). Max-margin settings: prior weight {mc.prior:g}, {mc.restarts} starts "
             f"x {mc.steps} steps, alpha {mc.alpha:g}. Only models with ASR >= 50% are "
             "scored.", "",
             "## Totals", "", "| part | MNIST dev | MNIST held-out | MNIST fresh | CIFAR-10 "
             "(not used for any setting) | all |", "|---|---|---|---|---|---|"]
    for part, label in (("audit_free", "data-free audit (MM-BD + prior)"),
                        ("audit_clean", "with 500 clean samples (NC + MM-BD)")):
        cells = [tally(records, part, h) for h in (*HALVES, "cifar-10", None)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    at05 = [{**r, "audit_free_05": {"backdoored": r["audit_free"]["p_value"] < 0.05,
                                    "target_class": r["audit_free"]["top"]}}
            for r in records if r.get("audit_free")]
    cells = [tally(at05, "audit_free_05", h) for h in (*HALVES, "cifar-10", None)]
    lines.append("| data-free at MM-BD's alpha 0.05 (from the p-values above) | "
                 + " | ".join(cells) + " |")
    sp = RESULTS / "nonpatch_zoo_speed.json"
    if sp.exists():
        v = json.loads(sp.read_text())
        lines += ["", f"Speed (`--speed-only`): the data-free audit took {v['data_free_seconds']}"
                  f" s on a {v['model']}, {v['threads']} thread(s), on the shared 2-core "
                  "machine."]
    svc = RESULTS / "nonpatch_zoo_service.json"
    if svc.exists():
        v = json.loads(svc.read_text())
        lines += ["", f"Service (`--service-speed`, {v['model']}, {v['requests']} sequential "
                  "single-input requests through `poisonguard serve`, one torch thread): "
                  + "; ".join(f"{m}: {v[m]['requests_per_s']} screened predictions/s, p50 "
                              f"{v[m]['latency_ms']['p50']} ms, {v[m]['errors']} errors"
                              for m in ("feature", "both") if m in v) + "."]
    lines += ["", "## Per model", "",
              "| model | half | clean acc | ASR | scored | data-free: flagged class (p, "
              "s) | with clean: flagged class (by, NC's, s) |",
              "|---|---|---|---|---|---|---|"]
    for r in records:
        asr = "–" if r.get("asr") is None else f"{r['asr']:.1%}"
        free = _cell(r.get("audit_free"), ("p_value", "seconds"))
        cl = r.get("audit_clean")
        cln = "–" if cl is None else (
            f"{cl['target_class'] if cl['backdoored'] else 'no'} "
            f"({'+'.join(cl['decided_by']) or '-'}, NC {cl['nc_target']}, {cl['seconds']})")
        lines.append(f"| {r['model']} (target {r['target']}) | {r['half']} | "
                     f"{r['clean_accuracy']:.1%} | {asr} | {r['scored']} | {free} | {cln} |")
    guard = [r for r in records if (r.get("audit_clean") or {}).get("nc_guard")]
    if guard:
        lines += ["", "## Neural Cleanse's norm-ratio guards (item 4)", "",
                  "Neural Cleanse flags a class when its anomaly index is > 2 in the mask or "
                  "the additive search AND its norm is at most 0.33 (mask) / 0.4 (additive) "
                  "of the median class's. Per model, NC's most anomalous class with both "
                  "searches' anomaly index and norm ratio:", "",
                  "| model | target | NC most anomalous | mask AI / ratio | additive AI / "
                  "ratio | NC flagged |", "|---|---|---|---|---|---|"]
        for r in guard:
            c, g = r["audit_clean"], r["audit_clean"]["nc_guard"]
            lines.append(f"| {r['model']} | {r['target']} | {c['nc_most_anomalous']} | "
                         f"{g['anomaly_index']} / {g['mask_ratio_to_median']} | "
                         f"{g['additive_anomaly_index']} / {g['additive_ratio_to_median']} | "
                         f"{c['nc_target'] if c['nc_backdoored'] else 'no'} |")
    rep = [r for r in records if r.get("repair")]
    if rep:
        lines += ["", "## Repair of the models only the max-margin search found", "",
                  "ANP (`repair --method anp` defaults: trigger-free, 500 trusted samples, "
                  "1-point accuracy budget on them); evaluation split before -> after.", "",
                  "| model | clean acc | ASR | units pruned | s |", "|---|---|---|---|---|"]
        for r in rep:
            b, a = r["repair"]["before"], r["repair"]["after"]
            lines.append(f"| {r['model']} | {b['clean_accuracy']:.1%} -> "
                         f"{a['clean_accuracy']:.1%} | {b['asr']:.1%} -> {a['asr']:.1%} | "
                         f"{r['repair']['n_pruned']} | {r['repair']['seconds']} |")
    rt = [r for r in records if r.get("runtime")]
    if rt:
        lines += ["", "## Runtime filters", "",
                  f"Calibrated on {N_CAL:,} clean test images at a {RUNTIME_FRR:.0%} target "
                  f"FRR; FAR on (at most {N_RUNTIME}) successful triggered inputs (triggered "
                  "evaluation images the model sends to the target), FRR on "
                  f"{N_RUNTIME} other clean images; speed = screened inputs per second, one "
                  "thread, in-process (not through the HTTP service).", ""]
        scored = [r for r in rt if r["scored"]]
        for meth in rt[0]["runtime"]:
            fars = [r["runtime"][meth]["far_successful"] for r in scored
                    if r["runtime"].get(meth, {}).get("far_successful") is not None]
            frrs = [r["runtime"][meth]["frr"] for r in rt if meth in r["runtime"]]
            ok = sum(f <= 0.05 for f in fars)
            lines.append(f"- {meth}: FAR <= 5% on {ok} of {len(fars)} scored models (worst "
                         f"{max(fars):.1%}); FRR {min(frrs):.1%}-{max(frrs):.1%} over "
                         f"{len(frrs)} models")
        lines += ["", "| model | method | FAR (successful triggers) | FRR | inputs/s |",
                  "|---|---|---|---|---|"]
        for r in rt:
            for meth, m in r["runtime"].items():
                far = m.get("far_successful")
                lines.append(f"| {r['model']} | {meth} | "
                             f"{'–' if far is None else f'{far:.1%}'} | {m['frr']:.1%} | "
                             f"{m['per_second']:.0f} |")
    return "\n".join(lines) + "\n"


def repair_part(folder: Path, poisoned: Any, sp: dict[str, Any]) -> dict[str, Any]:
    """ANP (the trigger-free repair, ``repair --method anp`` defaults) with the 500 trusted
    samples; clean accuracy and ASR on the evaluation split before and after."""
    from poisonguard.audit.anp import ANPConfig, anp_prune
    from poisonguard.audit.model import load_audit_model
    from poisonguard.metrics import accuracy

    model = load_audit_model(folder)
    ev, trig = sp["eval"], poisoned.test_triggered

    def score() -> dict[str, float]:
        clf = model.classifier
        return {"clean_accuracy": round(accuracy(clf.predict(ev.x), ev.y), 4),
                "asr": round(accuracy(clf.predict(trig.x), trig.y), 4)}

    before = score()
    t0 = time.perf_counter()
    info = anp_prune(model, sp["trusted"], ANPConfig(seed=0))
    return {"method": "anp", "before": before, "after": score(),
            "n_pruned": info["n_pruned"], "seconds": round(time.perf_counter() - t0, 1)}


def service_speed(name: str = "wanet-t3", n_requests: int = 2000) -> dict[str, Any]:
    """Single-input POST /predict requests per second through ``poisonguard serve`` (a
    uvicorn subprocess, one torch thread) for the feature filter and for ``both``
    (strip+feature), sent by benchmarks/loadgen.py from a second process."""
    import socket
    import subprocess
    import tempfile
    import urllib.request

    from poisonguard.models.io import load_model
    from poisonguard.runtime.feature import FeatureConfig, FeatureFilter
    from poisonguard.runtime.strip import StripConfig, StripFilter
    from poisonguard.runtime.union import UnionFilter

    sp = splits(dataset(name))
    folder, poisoned = build(name, sp["eval"])
    clf = load_model(folder)
    cal_x = sp["cal"].x[:N_CAL]
    out: dict[str, Any] = {"model": name, "requests": n_requests}
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "inputs.npy"
        np.save(inputs, np.concatenate([sp["eval"].x[:400], poisoned.test_triggered.x[:100]]))
        for meth in ("feature", "both"):
            feat = FeatureFilter.calibrate(clf, cal_x, FeatureConfig(
                target_frr=RUNTIME_FRR / (2 if meth == "both" else 1)))
            filt: Any = feat if meth == "feature" else UnionFilter([StripFilter.calibrate(
                clf, cal_x, StripConfig(target_frr=RUNTIME_FRR / 2, **STRIP)), feat])
            cal_dir = Path(tmp) / meth
            cal_dir.mkdir()
            filt.save(cal_dir)
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            server = subprocess.Popen(
                [sys.executable, "-m", "poisonguard", "serve", str(folder), "--calibration",
                 str(cal_dir), "--port", str(port), "--threads", "1"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                for _ in range(300):
                    try:
                        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                        break
                    except OSError:
                        time.sleep(0.2)
                gen = subprocess.run([sys.executable, str(ROOT / "loadgen.py"), "--port",
                                      str(port), "--inputs", str(inputs), "--requests",
                                      str(n_requests)], capture_output=True, text=True,
                                     check=True)
                res = json.loads(gen.stdout)
            finally:
                server.terminate()
                server.wait(timeout=20)
            out[meth] = {k: res[k] for k in ("requests_per_s", "latency_ms", "errors",
                                             "suspicious_answers", "loadavg_before")}
            print(meth, out[meth], flush=True)
    return out


def speed() -> dict[str, Any]:
    """Seconds of the data-free audit (``audit-model`` without --clean, default settings) on a
    CIFAR-10-sized built-in CNN (3x32x32, width 32; seeded random weights: the cost does not
    depend on what the weights learned), one thread."""
    import tempfile

    from poisonguard.audit.combined import audit_with_optional_clean
    from poisonguard.audit.mmbd import infer_domain
    from poisonguard.audit.model import load_audit_model
    from poisonguard.models.adapter import InputSpec
    from poisonguard.models.architectures import build_model
    from poisonguard.models.io import save_model

    torch.manual_seed(0)
    kw = {"in_channels": 3, "n_classes": 10, "width": 32, "pools": 2}
    with tempfile.TemporaryDirectory() as tmp:
        save_model(tmp, build_model("cnn", **kw).eval(), "cnn", kw, InputSpec(), 10, "embed",
                   inputs={"sample_shape": [32, 32, 3], "dtype": "uint8",
                           "value_range": [0, 255]})
        model = load_audit_model(tmp)
        t0 = time.perf_counter()
        audit_with_optional_clean(model, infer_domain(model))
        return {"model": "cifar10-sized cnn (width 32)", "threads": torch.get_num_threads(),
                "data_free_seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    from poisonguard.io import atomic_write_json, atomic_write_text

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(BACKDOORED) + list(CLEAN))
    p.add_argument("--parts", nargs="+", default=["audit_free", "audit_clean", "runtime"],
                   choices=["audit_free", "audit_clean", "runtime", "repair"],
                   help="repair (not in the default): ANP on the backdoored models named")
    p.add_argument("--train-only", action="store_true")
    p.add_argument("--reuse-nc", action="store_true",
                   help="audit_clean: reuse the Neural Cleanse verdict already in the JSON "
                        "(unchanged NC code and seeds) and recombine it with this run's "
                        "data-free verdict, instead of rerunning NC")
    p.add_argument("--summary-only", action="store_true",
                   help="rewrite nonpatch_zoo.md from the JSON files")
    p.add_argument("--service-speed", action="store_true",
                   help="requests per second through `poisonguard serve` (feature, both)")
    p.add_argument("--speed-only", action="store_true",
                   help="time the data-free audit on a CIFAR-10-sized CNN only")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    unknown = sorted(set(args.models) - set(BACKDOORED) - set(CLEAN))
    problem = (f"unknown model(s) {unknown}" if unknown else
               "a zoo of one model cannot be split into halves or scored; name at least two"
               if len(set(args.models)) < 2
               and not (args.train_only or args.speed_only or args.service_speed
                        or args.summary_only)
               else None)
    if problem:
        print(f"nonpatch_zoo.py: error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    torch.set_num_threads(args.threads)
    if args.summary_only:
        recs = json.loads((RESULTS / "nonpatch_zoo.json").read_text())
        atomic_write_text(RESULTS / "nonpatch_zoo.md", summarise(recs))
        return
    if args.service_speed:
        rec = service_speed()
        atomic_write_json(RESULTS / "nonpatch_zoo_service.json", rec)
        return
    if args.speed_only:
        rec = speed()
        print(rec)
        atomic_write_json(RESULTS / "nonpatch_zoo_speed.json", rec)
        return
    if args.train_only:
        for name in args.models:
            build(name, splits(dataset(name))["eval"])
        return
    path = RESULTS / "nonpatch_zoo.json"
    records = {r["model"]: r for r in (json.loads(path.read_text()) if path.exists() else [])}
    for name in args.models:
        sp = splits(dataset(name))
        folder, poisoned = build(name, sp["eval"])
        rec = {**records.get(name, {}), **victim(name, folder, poisoned, sp["eval"])}
        if "audit_free" in args.parts:
            rec["audit_free"] = audit_free(folder)
        if "audit_clean" in args.parts:
            prev = rec.get("audit_clean")
            if args.reuse_nc and prev and rec.get("audit_free"):
                rec["audit_clean"] = recombine(prev, rec["audit_free"])
            else:
                rec["audit_clean"] = audit_clean(folder, sp["trusted"])
        if "repair" in args.parts and name in BACKDOORED:
            rec["repair"] = repair_part(folder, poisoned, sp)
        if "runtime" in args.parts and name in BACKDOORED:  # FRR: measured on every one
            rec["runtime"] = runtime_part(folder, poisoned, sp, rec)
        print(json.dumps(rec), flush=True)
        records[name] = rec
        order = [n for n in list(BACKDOORED) + list(CLEAN) if n in records]
        atomic_write_json(path, [records[n] for n in order])
        atomic_write_text(RESULTS / "nonpatch_zoo.md", summarise([records[n] for n in order]))


if __name__ == "__main__":
    main()
