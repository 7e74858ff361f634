"""The weight-based meta-classifier (``poisonguard meta``, issue 22) on a zoo of scikit-learn
digits models, and the built-in meta model it ships.

Zoo: the built-in digits CNN (8x8, the demo's architecture) trained 30 epochs (seeded) on a
random 90% of the digits training split (1,347 images; the draw is the model's seed). Clean
models c0..c27; backdoored models: seven attacks x four seeds, each with a seeded random
target and poison rate (recipes below). A backdoored model enters the zoo only when its ASR on
the triggered test split is >= 50% (the others are listed as not learned).

Evaluation (features of every model computed once; the meta-classifier is refit per split):

- leave-one-attack-out: for each attack A and each half of the clean models, fit on the
  backdoored models of the other attacks and the other clean half; score A's models (mean of
  the two fits) and the held-out clean half. AUROC per attack against every clean model's
  held-out score, and the detection rate at the fit's own threshold (set from the training
  clean models' out-of-fold scores, 5% false positives intended);
- held-out seeds: fit on backdoored seeds 0-1 and even clean models, test on seeds 2-3 and odd
  clean models;
- feature families: the leave-one-attack-out AUROC with each family alone (both zoos);
- controls (never in the zoo): clean models whose training draw has one class oversampled
  (duplicates, as many as a 10% dirty-label poison adds to its target) and clean models with
  10% symmetric label noise (random other classes, no target). They hold no backdoor; the meta
  model fit on the whole zoo scores them, to show whether it keys on the backdoor or on the
  class imbalance / label noise that dirty-label poisoning also brings;
- the zoo with hard negatives: twelve more clean models (six with an oversampled class, six
  with label noise, other seeds than the controls') labelled clean, evaluated the same way and
  scored on the controls. This is the zoo the shipped meta model is fit on.

Finally the meta model fit on the whole zoo is written to the package
(src/poisonguard/audit/meta_models/digits-cnn), which ``poisonguard meta predict digits-cnn``
and ``audit --meta digits-cnn`` use.

    python benchmarks/meta.py [--threads 1] [--no-ship]

Results: benchmarks/results/meta.{json,md}; models cached in benchmarks/cache/meta (ignored).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from versioning import code_version

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
CACHE = ROOT / "cache" / "meta"
SHIP = ROOT.parent / "src" / "poisonguard" / "audit" / "meta_models" / "digits-cnn"
EPOCHS, SUBSET, MIN_ASR, N_CLEAN, SEEDS = 30, 0.9, 0.5, 28, 4
# attack -> (kwargs, poison rates drawn per seed)
ATTACKS: dict[str, tuple[dict[str, Any], tuple[float, ...]]] = {
    "badnets": ({"size": 2}, (0.05, 0.1)),
    "blended": ({}, (0.05, 0.1)),
    "wanet": ({"s": 1.0}, (0.1, 0.15)),
    "trojan": ({"size": 4}, (0.05, 0.1)),
    "low-frequency": ({"eps": 0.2}, (0.1, 0.15)),
    "adaptive-blend": ({}, (0.03, 0.05)),
    "badnets-random": ({}, (0.05, 0.1)),
}
FAMILY_SETS = {"all": ("weights", "projection", "queries"), "weights": ("weights",),
               "projection": ("projection",), "queries": ("queries",),
               "weights+queries": ("weights", "queries")}


def plan() -> list[dict[str, Any]]:
    """Every zoo model's recipe (name, attack, seed, target, rate)."""
    out = [{"folder": f"clean-c{i}", "backdoored": False, "attack": None, "seed": i,
            "train_seed": 100 + i} for i in range(N_CLEAN)]
    for j, (attack, (_, rates)) in enumerate(ATTACKS.items()):
        for s in range(SEEDS):
            rng = np.random.default_rng(1000 * j + s)
            out.append({"folder": f"{attack}-s{s}", "backdoored": True, "attack": attack,
                        "seed": s, "target": int(rng.integers(0, 10)),
                        "rate": float(rates[s % len(rates)]), "train_seed": 200 + 10 * j + s})
    return out


def build(rec: dict[str, Any], train: Any, test: Any) -> dict[str, Any]:
    """Train (or reuse) one zoo model; its clean accuracy and ASR."""
    from poisonguard.attacks import make_attack
    from poisonguard.models.io import describe_inputs, load_model, save_model
    from poisonguard.models.training import TrainConfig, train_classifier

    folder = CACHE / "zoo" / rec["folder"]
    info = folder / "record.json"
    if info.exists():
        return json.loads(info.read_text())
    seed = rec["train_seed"]
    rng = np.random.default_rng(seed)
    draw = train.subset(np.sort(rng.choice(len(train), int(SUBSET * len(train)),
                                           replace=False)))
    data, poisoned = draw, None
    if rec["backdoored"]:
        kwargs = ATTACKS[rec["attack"]][0]
        poisoned = make_attack(rec["attack"], draw, rate=rec["rate"], target=rec["target"],
                               seed=seed, test=test, **kwargs)
        data = poisoned.data
    t0 = time.perf_counter()
    result = train_classifier(data, TrainConfig(epochs=EPOCHS, seed=seed))
    clf = result.classifier
    save_model(folder, clf.model, result.arch, result.arch_kwargs, clf.input_spec, 10,
               clf.layer, extra={"attack": poisoned.attack if poisoned else None},
               inputs=describe_inputs(train.x))
    clf = load_model(folder)
    out = {**rec, "train_s": round(time.perf_counter() - t0, 1),
           "clean_accuracy": round(float(np.mean(clf.predict(test.x) == test.y)), 4)}
    if poisoned is not None:
        trig = poisoned.test_triggered
        out["asr"] = round(float(np.mean(clf.predict(trig.x) == trig.y)), 4)
    info.write_text(json.dumps(out, indent=1) + "\n")
    return out


N_CONTROLS = 6


def build_control(kind: str, i: int, train: Any, test: Any, where: str = "controls"
                  ) -> dict[str, Any]:
    """A clean control model: ``imbalanced`` (one class oversampled) or ``noisy`` (10%
    symmetric label noise), in ``CACHE/where``."""
    from poisonguard.data import LabeledData
    from poisonguard.models.io import describe_inputs, load_model, save_model
    from poisonguard.models.training import TrainConfig, train_classifier

    name = f"{kind}-{i}"
    folder = CACHE / where / name
    info = folder / "record.json"
    if info.exists():
        return json.loads(info.read_text())
    seed = (600 if where == "zoo" else 500) + 10 * (kind == "noisy") + i
    rng = np.random.default_rng(seed)
    draw = train.subset(np.sort(rng.choice(len(train), int(SUBSET * len(train)),
                                           replace=False)))
    cls = int(rng.integers(0, 10))
    rec: dict[str, Any] = {"folder": name, "backdoored": False, "attack": None, "seed": i,
                           "kind": kind, "train_seed": seed}
    if kind == "imbalanced":
        pool = np.flatnonzero(draw.y == cls)
        extra = rng.choice(pool, int(0.1 * len(draw)), replace=True)
        idx = np.concatenate([np.arange(len(draw)), extra])
        data = LabeledData(x=draw.x[idx], y=draw.y[idx], ids=np.arange(len(idx)))
        rec["oversampled_class"] = cls
    else:
        y = draw.y.copy()
        flip = rng.random(len(y)) < 0.1
        y[flip] = (y[flip] + rng.integers(1, 10, int(flip.sum()))) % 10
        data = LabeledData(x=draw.x, y=y, ids=draw.ids)
        rec["noisy_share"] = round(float(flip.mean()), 4)
    result = train_classifier(data, TrainConfig(epochs=EPOCHS, seed=seed))
    clf = result.classifier
    save_model(folder, clf.model, result.arch, result.arch_kwargs, clf.input_spec, 10,
               clf.layer, inputs=describe_inputs(train.x))
    clf = load_model(folder)
    rec["clean_accuracy"] = round(float(np.mean(clf.predict(test.x) == test.y)), 4)
    info.write_text(json.dumps(rec, indent=1) + "\n")
    return rec


def hard_negatives(train: Any, test: Any) -> list[dict[str, Any]]:
    """Clean models with an oversampled class or label noise (seeds other than the
    controls'), labelled clean: the zoo variant that shows the meta model such models."""
    return [build_control(kind, i, train, test, where="zoo")
            for kind in ("imbalanced", "noisy") for i in range(N_CONTROLS, 2 * N_CONTROLS)]


def controls(train: Any, test: Any) -> dict[str, Any]:
    """The meta model fit on the whole zoo (as written to zoo.json) on the control models."""
    from poisonguard.audit.meta import ZOO_JSON, train_meta
    from poisonguard.models.io import load_model

    meta = train_meta(CACHE / "zoo")
    assert (CACHE / "zoo" / ZOO_JSON).exists()
    out: dict[str, Any] = {}
    for kind in ("imbalanced", "noisy"):
        recs = []
        for i in range(N_CONTROLS):
            r = build_control(kind, i, train, test)
            r.update(meta.predict(load_model(CACHE / "controls" / r["folder"])))
            print(json.dumps(r), flush=True)
            recs.append(r)
        out[kind] = {"n": len(recs), "flagged": sum(r["backdoored"] for r in recs),
                     "p_backdoored": [r["p_backdoored"] for r in recs], "records": recs}
    order = np.argsort(-np.abs(meta.coef))[:12]
    out["top_features"] = [[meta.feature_names[j], round(float(meta.coef[j]), 4)]
                           for j in order]
    return out


def features(zoo: list[dict[str, Any]]) -> tuple[dict[str, list[str]], np.ndarray, Any]:
    """Every model's features (all families), with each family's column names."""
    from poisonguard.audit.meta import (
        FeatureConfig,
        make_queries,
        projection_features,
        query_features,
        weight_features,
    )
    from poisonguard.models.io import load_model

    models = [load_model(CACHE / "zoo" / r["folder"]) for r in zoo]
    queries = make_queries(models[0].expected_inputs, 96, 0)
    cfg = FeatureConfig()
    rows, names = [], {}
    for clf in models:
        parts = {"weights": weight_features(clf.model),
                 "projection": projection_features(clf.model, cfg.projection_dim,
                                                   cfg.projection_seed),
                 "queries": query_features(clf, queries)}
        names = {k: v[0] for k, v in parts.items()}
        rows.append(np.concatenate([np.nan_to_num(v[1], nan=0.0, posinf=1e6, neginf=-1e6)
                                    for v in parts.values()]))
    return names, np.vstack(rows), queries


def columns(names: dict[str, list[str]], families: tuple[str, ...]) -> np.ndarray:
    idx, start = [], 0
    for fam, n in names.items():
        if fam in families:
            idx.extend(range(start, start + len(n)))
        start += len(n)
    return np.asarray(idx)


def fit_score(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray
              ) -> tuple[np.ndarray, float]:
    from poisonguard.audit.meta import FeatureConfig, fit_meta

    meta = fit_meta(x[train], y[train], [str(i) for i in range(x.shape[1])], FeatureConfig(),
                    [])
    return meta.score(x[test]), meta.threshold


def leave_one_attack_out(x: np.ndarray, zoo: list[dict[str, Any]]) -> dict[str, Any]:
    from poisonguard.metrics import auroc

    y = np.array([r["backdoored"] for r in zoo])
    attack = np.array([r["attack"] or "" for r in zoo])
    clean = np.flatnonzero(~y)
    halves = [clean[clean % 2 == 0], clean[clean % 2 == 1]]
    out = {}
    for a in ATTACKS:
        held = np.flatnonzero(attack == a)
        if not len(held):
            continue
        bd_scores, clean_scores = np.zeros(len(held)), np.zeros(len(y))
        hits, false = np.zeros(len(held)), 0
        for h in halves:
            train = np.setdiff1d(np.arange(len(y)), np.concatenate([held, h]))
            s, thr = fit_score(x, y, train, np.concatenate([held, h]))
            bd_scores += s[:len(held)] / len(halves)
            hits += (s[:len(held)] > thr) / len(halves)
            clean_scores[h] = s[len(held):]
            false += int((s[len(held):] > thr).sum())
        score = np.concatenate([bd_scores, clean_scores[clean]])
        truth = np.concatenate([np.ones(len(held), bool), np.zeros(len(clean), bool)])
        out[a] = {"n_backdoored": int(len(held)), "n_clean": int(len(clean)),
                  "auroc": round(float(auroc(score, truth)), 4),
                  "detected_at_threshold": round(float(hits.mean()), 4),
                  "clean_flagged_at_threshold": round(false / len(clean), 4),
                  "scores": [round(float(v), 4) for v in bd_scores]}
    return out


def held_out_seeds(x: np.ndarray, zoo: list[dict[str, Any]]) -> dict[str, Any]:
    from poisonguard.metrics import auroc

    y = np.array([r["backdoored"] for r in zoo])
    seed = np.array([r["seed"] for r in zoo])
    test = np.where(y, seed >= 2, seed % 2 == 1)
    s, thr = fit_score(x, y, np.flatnonzero(~test), np.flatnonzero(test))
    yt = y[test]
    attack = np.array([r["attack"] or "" for r in zoo])[test]
    per = {a: round(float(auroc(np.concatenate([s[attack == a], s[~yt]]),
                                np.concatenate([np.ones((attack == a).sum(), bool),
                                                np.zeros((~yt).sum(), bool)]))), 4)
           for a in ATTACKS if (attack == a).any()}
    return {"n_train": int((~test).sum()), "n_test_backdoored": int(yt.sum()),
            "n_test_clean": int((~yt).sum()), "auroc": round(float(auroc(s, yt)), 4),
            "per_attack_auroc": per,
            "detected_at_threshold": round(float((s[yt] > thr).mean()), 4),
            "clean_flagged_at_threshold": round(float((s[~yt] > thr).mean()), 4)}


def write(results: dict[str, Any], out: Path) -> None:
    fam = results["families"]
    loao = fam["all"]["leave_one_attack_out"]
    lines = ["# Weight-based meta-classifier (scikit-learn digits zoo)", "",
             f"`python benchmarks/meta.py` (code {results['code']}, {results['threads']} "
             f"thread(s), {results['wall_s']:.0f} s). Method in the script's docstring: "
             f"{results['zoo']['n_clean']} clean and {results['zoo']['n_backdoored']} "
             "backdoored digits CNNs (ASR >= 50%), a logistic regression on weight statistics, "
             "a random projection and outputs on 96 fixed random queries.", "",
             "## Leave one attack out (all features)", "",
             "| held-out attack | backdoored | AUROC | detected at threshold | clean flagged |",
             "|---|---|---|---|---|"]
    for a, r in loao.items():
        lines.append(f"| {a} | {r['n_backdoored']} | {r['auroc']} | "
                     f"{r['detected_at_threshold']} | {r['clean_flagged_at_threshold']} |")
    lines += ["", f"Mean AUROC {fam['all']['mean_auroc']}, minimum {fam['all']['min_auroc']} "
              "(figure: >= 0.95 on every held-out attack).", "",
              "## Held-out seeds (all features)", ""]
    hs = results["held_out_seeds"]
    lines += [f"Trained on {hs['n_train']} models (backdoored seeds 0-1, even clean), tested "
              f"on {hs['n_test_backdoored']} backdoored and {hs['n_test_clean']} clean: AUROC "
              f"**{hs['auroc']}**; detected at threshold {hs['detected_at_threshold']}, clean "
              f"flagged {hs['clean_flagged_at_threshold']}. Per attack: "
              + ", ".join(f"{a} {v}" for a, v in hs["per_attack_auroc"].items()), "",
              "## Feature families (leave one attack out)", "",
              "| features | mean AUROC | min AUROC | " + " | ".join(ATTACKS) + " |",
              "|---|---|---|" + "---|" * len(ATTACKS)]
    for name, f in fam.items():
        per = f["leave_one_attack_out"]
        lines.append(f"| {name} | {f['mean_auroc']} | {f['min_auroc']} | "
                     + " | ".join(str(per[a]["auroc"]) if a in per else "-" for a in ATTACKS)
                     + " |")
    lines += ["", "## Zoo", "", "| model | attack | target | rate | ASR | clean acc | in zoo |",
              "|---|---|---|---|---|---|---|"]
    for r in results["records"]:
        lines.append(f"| {r['folder']} | {r['attack'] or '-'} | {r.get('target', '-')} | "
                     f"{r.get('rate', '-')} | {r.get('asr', '-')} | {r['clean_accuracy']} | "
                     f"{'yes' if r['in_zoo'] else 'no (ASR < 50%)'} |")
    c = results.get("controls")
    if c:
        lines += ["", "## Controls: clean models without a backdoor, outside the zoo", "",
                  "Scored by the meta model fit on the whole zoo:", "",
                  f"- one class oversampled by 10% of the data (duplicates): flagged "
                  f"**{c['imbalanced']['flagged']} of {c['imbalanced']['n']}**, P(backdoored) "
                  f"{c['imbalanced']['p_backdoored']}",
                  f"- 10% symmetric label noise: flagged **{c['noisy']['flagged']} of "
                  f"{c['noisy']['n']}**, P(backdoored) {c['noisy']['p_backdoored']}", "",
                  "Largest standardised coefficients of that fit: "
                  + ", ".join(f"`{n}` {w}" for n, w in c["top_features"])]
    h = results.get("hard_negatives")
    if h:
        hc, hs2 = h["controls"], h["held_out_seeds"]
        lines += ["", f"## With {h['n_hard_negatives']} hard negatives in the zoo (the shipped "
                  "meta model)", "",
                  "Clean models with an oversampled class or 10% label noise (other seeds "
                  "than the controls'), labelled clean, join the zoo; the held-out clean "
                  "models of each split include them.", "",
                  "| held-out attack | AUROC | detected at threshold | negatives flagged |",
                  "|---|---|---|---|"]
        for a, r in h["leave_one_attack_out"].items():
            lines.append(f"| {a} | {r['auroc']} | {r['detected_at_threshold']} | "
                         f"{r['clean_flagged_at_threshold']} |")
        lines += ["", f"Mean AUROC {h['mean_auroc']}, minimum {h['min_auroc']}. Held-out "
                  f"seeds: AUROC {hs2['auroc']}, detected {hs2['detected_at_threshold']}, "
                  f"negatives flagged {hs2['clean_flagged_at_threshold']}. Controls: "
                  f"oversampled class flagged {hc['imbalanced']['flagged']} of "
                  f"{hc['imbalanced']['n']}, label noise flagged {hc['noisy']['flagged']} of "
                  f"{hc['noisy']['n']} (P {hc['noisy']['p_backdoored']}). Largest "
                  "coefficients: " + ", ".join(f"`{n}` {w}" for n, w in hc["top_features"]),
                  "", "Leave one attack out with each feature family alone (this zoo):", "",
                  "| features | mean AUROC | " + " | ".join(ATTACKS) + " |",
                  "|---|---|" + "---|" * len(ATTACKS)]
        for name, per in h["families"].items():
            lines.append(f"| {name} | {np.mean(list(per.values())):.4f} | "
                         + " | ".join(str(per.get(a, "-")) for a in ATTACKS) + " |")
    if results.get("shipped"):
        s = results["shipped"]
        lines += ["", f"Shipped meta model: `{s['path']}` ({s['bytes']} bytes), trained on the "
                  f"whole zoo; cross-validated AUROC {s['cv_auroc']}, threshold "
                  f"{s['threshold']:.3f}."]
    out.mkdir(parents=True, exist_ok=True)
    for suffix, text in (("json", json.dumps(results, indent=1) + "\n"),
                         ("md", "\n".join(lines) + "\n")):
        tmp = out / f".meta.{suffix}.tmp"
        tmp.write_text(text)
        tmp.replace(out / f"meta.{suffix}")


def write_zoo(zoo: list[dict[str, Any]]) -> None:
    """``CACHE/zoo/zoo.json``: the zoo as ``poisonguard meta train`` reads it."""
    from poisonguard.audit.meta import ZOO_FORMAT, ZOO_JSON

    (CACHE / "zoo" / ZOO_JSON).write_text(json.dumps(
        {"format": ZOO_FORMAT, "description": "benchmarks/meta.py: digits CNNs",
         "models": zoo}, indent=1) + "\n")


def ship(zoo: list[dict[str, Any]]) -> dict[str, Any]:
    """Fit on the whole zoo through the library's own path and write the package's copy."""
    from poisonguard.audit.meta import save_meta, train_meta

    meta = train_meta(CACHE / "zoo")
    meta.zoo["source"] = "benchmarks/meta.py (benchmarks/cache/meta/zoo)"
    save_meta(SHIP, meta)
    size = sum(p.stat().st_size for p in SHIP.iterdir())
    shown = SHIP.relative_to(ROOT.parent) if SHIP.is_relative_to(ROOT.parent) else SHIP
    return {"path": str(shown), "bytes": size,
            "cv_auroc": meta.info["cv_auroc"], "threshold": meta.threshold}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-ship", action="store_true", help="do not rewrite the shipped model")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    import torch

    from poisonguard.data import load_builtin_digits

    torch.set_num_threads(args.threads)
    code = code_version()   # at the start: the commit the zoo is judged with
    t0 = time.perf_counter()
    train, test = load_builtin_digits()
    records = []
    for rec in plan():
        r = build(rec, train, test)
        r["in_zoo"] = (not r["backdoored"]) or r.get("asr", 0.0) >= MIN_ASR
        print(json.dumps(r), flush=True)
        records.append(r)
    zoo = [{k: v for k, v in r.items() if k not in ("in_zoo", "train_s")}
           for r in records if r["in_zoo"]]
    names, x, _ = features(zoo)
    fams = {}
    for name, families in FAMILY_SETS.items():
        loao = leave_one_attack_out(x[:, columns(names, families)], zoo)
        aucs = [r["auroc"] for r in loao.values()]
        fams[name] = {"leave_one_attack_out": loao, "mean_auroc": round(float(np.mean(aucs)), 4),
                      "min_auroc": round(float(np.min(aucs)), 4)}
        print(name, fams[name]["mean_auroc"], {a: r["auroc"] for a, r in loao.items()},
              flush=True)
    hs = held_out_seeds(x, zoo)
    results: dict[str, Any] = {
        "code": code, "threads": args.threads, "families": fams, "held_out_seeds": hs,
        "zoo": {"n_clean": sum(not r["backdoored"] for r in zoo),
                "n_backdoored": sum(r["backdoored"] for r in zoo),
                "n_not_learned": sum(not r["in_zoo"] for r in records)},
        "records": records}
    write_zoo(zoo)
    results["controls"] = controls(train, test)
    # the zoo with hard negatives: clean models with an oversampled class or label noise
    hard = zoo + hard_negatives(train, test)
    names, xh, _ = features(hard)
    loao = leave_one_attack_out(xh, hard)
    aucs = [r["auroc"] for r in loao.values()]
    results["hard_negatives"] = {
        "n_hard_negatives": len(hard) - len(zoo), "leave_one_attack_out": loao,
        "mean_auroc": round(float(np.mean(aucs)), 4), "min_auroc": round(float(np.min(aucs)), 4),
        "held_out_seeds": held_out_seeds(xh, hard),
        "families": {name: {a: r["auroc"] for a, r in leave_one_attack_out(
            xh[:, columns(names, fams_)], hard).items()}
            for name, fams_ in FAMILY_SETS.items() if name != "all"}}
    print("hard negatives", results["hard_negatives"]["mean_auroc"],
          {a: r["auroc"] for a, r in loao.items()}, flush=True)
    write_zoo(hard)
    results["hard_negatives"]["controls"] = controls(train, test)
    if not args.no_ship:
        results["shipped"] = ship(hard)
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    write(results, Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
