"""Runtime filter for posts (issue 17): FAR on successful triggered posts at the FRR the
thresholds were calibrated for, with the built-in text model backdoored by each trigger.

    OMP_NUM_THREADS=1 python benchmarks/text_runtime.py --dataset sst2 \
        --runs rare-token-1 emoji-1 addsent-5
    OMP_NUM_THREADS=1 python benchmarks/text_runtime.py --dataset hsol --runs emoji-1

The model is trained on the poisoned training set (seeded). Clean posts not seen in training
are split three ways: calibration (half word pool and language model, half thresholds), and
evaluation: FRR on clean evaluation posts, FAR on the non-target evaluation posts with the
trigger that the backdoored model assigns to the target while classifying their clean version
as another class (successful triggers). SST-2 calibrates on its dev split and evaluates on its
test split; HSOL holds out a seeded 20% (as benchmarks/text.py) and halves it. Records merge
into benchmarks/results/text_runtime.json, summarised in text_runtime.md.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from text import RUNS, SHARED, TARGET, load  # noqa: E402

from poisonguard.data.labeled import LabeledData  # noqa: E402
from poisonguard.io import atomic_write_json, atomic_write_text  # noqa: E402
from poisonguard.modalities.text.attacks import text_attack  # noqa: E402
from poisonguard.modalities.text.data import TextData, load_text  # noqa: E402
from poisonguard.modalities.text.io import TextModel  # noqa: E402
from poisonguard.modalities.text.runtime import (  # noqa: E402
    TextFilter,
    TextFilterConfig,
    evaluate,
)
from poisonguard.modalities.text.scan import TextOptions, train_text_model  # noqa: E402
from poisonguard.modalities.text.tokenizer import Vocabulary  # noqa: E402
from poisonguard.pipeline import ScanConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def train_model(data: TextData, seed: int) -> TextModel:
    """The built-in text model on ``data`` (vocabulary fit on it, seeded)."""
    options = TextOptions()
    vocab = Vocabulary.fit(data.texts, min_count=options.min_count)
    tokens = vocab.encode(data.texts, options.max_tokens)[0]
    train = train_text_model(LabeledData(x=tokens, y=data.y, ids=data.ids), vocab,
                             ScanConfig(seed=seed), options, data.n_classes, stage="victim")
    return TextModel(train.classifier, vocab, options.max_tokens, data.label_map)


def splits(dataset: str, train: TextData, test: TextData) -> tuple[TextData, TextData]:
    """Calibration and evaluation posts, both unseen in training."""
    if dataset == "sst2":
        return load_text(SHARED / "sst2_dev.csv.gz", label_map=train.label_map), test
    order = np.random.default_rng(1).permutation(len(test))
    half = len(test) // 2
    return test.subset(np.sort(order[:half])), test.subset(np.sort(order[half:]))


def run_one(dataset: str, name: str, seed: int, config: TextFilterConfig) -> dict[str, Any]:
    attack, rate, clean_label = RUNS[name]
    assert attack is not None
    train, test = load(dataset)
    calib, evalset = splits(dataset, train, test)
    target = TARGET[dataset]
    poisoned = text_attack(attack, train, rate=rate, target=target, seed=seed, test=evalset,
                           clean_label=clean_label)
    t0 = time.perf_counter()
    model = train_model(poisoned.data, seed)
    train_s = time.perf_counter() - t0
    assert poisoned.test_triggered is not None
    trig = poisoned.test_triggered.texts
    src = evalset.subset(np.flatnonzero(evalset.y != target))
    p_trig = model.predict_proba(trig).argmax(1)
    p_src = model.predict_proba(src.texts).argmax(1)
    ok = (p_trig == target) & (p_src != target)
    t1 = time.perf_counter()
    filt = TextFilter.calibrate(model.predict_proba, calib.texts, config)
    cal_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    res_clean = filt.screen(evalset.texts)
    res_trig = filt.screen([t for t, k in zip(trig, ok) if k])
    screen_s = time.perf_counter() - t2
    ev = evaluate(res_clean, res_trig)
    return {"dataset": dataset, "run": name, "seed": seed, "attack": poisoned.attack,
            "config": filt.describe()["config"], "thresholds": filt.thresholds,
            "clean_acc": round(float((model.predict_proba(evalset.texts).argmax(1)
                                      == evalset.y).mean()), 4),
            "asr_raw": round(float((p_trig == target).mean()), 4),
            "n_successful": int(ok.sum()), "n_calibration": len(calib),
            **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in ev.items()},
            "train_s": round(train_s, 1), "calibrate_s": round(cal_s, 1),
            "screen_s": round(screen_s, 1),
            "screen_ms_per_post": round(1000 * screen_s / (len(evalset) + int(ok.sum())), 2)}


def render_md(records: list[dict[str, Any]]) -> str:
    lines = ["# Text runtime filter (benchmarks/text_runtime.py)", "",
             "Built-in text model trained on the poisoned training set; `filter` tests "
             "calibrated on clean posts unseen in training at the target FRR (split between "
             "the tests). FAR = share of successful triggered posts (non-target posts the "
             "backdoored model sends to the target with the trigger, not without) not "
             "flagged; FRR = share of clean evaluation posts flagged. Per-test columns: the "
             "test alone (at its share of the FRR). Target: FAR <= 2% at FRR <= 2%.", "",
             "Tuning: the `loo` statistic (log-odds, not probability, drop) was chosen on SST-2 "
             "rare-token-1 and addsent-5, seed 0, after STRIP and ONION failed there (the "
             "strip+onion+loo rows); SST-2 emoji-1, every HSOL run and seeds 1-2 were not "
             "looked at before. `max span` 5 (removing runs of up to 5 words) was tried after "
             "HSOL addsent-5 failed at span 1, so that row is tuned, as are the `loo+span` "
             "rows (single words and runs of 2-5 words as two tests), tried after it.", "",
             "| dataset | run | seed | tests | max span | statistic | share | target FRR | "
             "clean acc | "
             "ASR raw | successful | FAR | FRR | FAR strip | FAR onion | FAR loo | FAR span | "
             "FRR strip | FRR onion | FRR loo | FRR span | ms/post |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
             "---|"]
    for r in sorted(records, key=lambda r: (r["dataset"], r["run"], r["seed"],
                                            "+".join(r["config"]["tests"]),
                                            r["config"]["statistic"], r["config"]["share"],
                                            r["config"].get("max_span", 1))):
        c = r["config"]
        lines.append(
            f"| {r['dataset']} | {r['run']} | {r['seed']} | {'+'.join(c['tests'])} | "
            f"{c.get('max_span', 1)} | "
            f"{c['statistic']} | {c['share']} | {c['frr']} | {r['clean_acc']} | "
            f"{r['asr_raw']} | {r['n_successful']} | {r['far']} | {r['frr']} | "
            f"{r.get('far_strip', '-')} | {r.get('far_onion', '-')} | "
            f"{r.get('far_loo', '-')} | {r.get('far_span', '-')} | {r.get('frr_strip', '-')} | "
            f"{r.get('frr_onion', '-')} | {r.get('frr_loo', '-')} | {r.get('frr_span', '-')} | "
            f"{r['screen_ms_per_post']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="sst2", choices=sorted(TARGET))
    parser.add_argument("--runs", nargs="+", default=["rare-token-1", "emoji-1", "addsent-5"],
                        choices=[r for r in RUNS if r != "clean"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--tests", nargs="+", default=["loo"],
                        choices=["strip", "onion", "loo", "span"])
    parser.add_argument("--statistic", default="entropy", choices=["entropy", "probability"])
    parser.add_argument("--share", type=float, default=0.3)
    parser.add_argument("--n-copies", type=int, default=20)
    parser.add_argument("--frr", type=float, default=0.02)
    parser.add_argument("--max-span", type=int, default=1,
                        help="loo: remove runs of up to this many words (default 1)")
    parser.add_argument("--results", default="text_runtime")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = TextFilterConfig(tests=tuple(args.tests), share=args.share,
                              n_copies=args.n_copies, frr=args.frr, statistic=args.statistic,
                              max_span=args.max_span)
    path = RESULTS / f"{args.results}.json"
    records = json.loads(path.read_text()) if path.exists() else []

    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        c = r["config"]
        return (r["dataset"], r["run"], r["seed"], tuple(c["tests"]), c["statistic"],
                c["share"], c["n_copies"], c["frr"], c.get("max_span", 1))

    for seed in args.seeds:
        for name in args.runs:
            rec = run_one(args.dataset, name, seed, config)
            print(json.dumps({k: rec[k] for k in ("run", "seed", "clean_acc", "n_successful",
                                                  "far", "frr")}
                             | {k: rec.get(k) for k in ("far_loo", "far_span", "frr_loo",
                                                        "frr_span")}),
                  flush=True)
            records = [r for r in records if key(r) != key(rec)] + [rec]
            atomic_write_json(path, records)
            atomic_write_text(RESULTS / f"{args.results}.md", render_md(records))


if __name__ == "__main__":
    main()
