"""Which other-class targets the quarantine's unlearning retrain should use (CIFAR-10 20k subset).

Scans one poisoned CIFAR-10 set (the quarantine benchmark's attack and seed), then retrains on
every sample with the flagged ones toward the sanitised model's distribution over their other
classes at several temperatures (and, for reference, with them removed). Prints and appends one
JSON record per variant to ``results/unlearn_temperature.json``.

    OMP_NUM_THREADS=1 python benchmarks/unlearn_temperature.py blended10 2 T1 T2 T4 T1000 removal
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from quarantine import SCENARIOS, code_version, poison_for

from poisonguard.data import load_shared
from poisonguard.io import atomic_write_json
from poisonguard.metrics import accuracy, attack_success_rate
from poisonguard.models.training import train_classifier
from poisonguard.pipeline import ScanConfig, scan
from poisonguard.train.relabel import other_class_targets, relabelled_batches

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent.parent / "shared" / "datasets"
OUT = ROOT / "results" / "unlearn_temperature.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenario", choices=[s for s, spec in SCENARIOS.items() if spec])
    ap.add_argument("seed", type=int)
    ap.add_argument("variants", nargs="+", help="T<temperature> or 'removal'")
    args = ap.parse_args()
    train = load_shared("cifar10", SHARED)
    test = load_shared("cifar10", SHARED, split="test")
    p = poison_for(args.scenario, args.seed, train, test)
    result = scan(p.data, ScanConfig(seed=args.seed))
    teacher, data, flags = result.final_classifier, p.data, result.flags
    labels = torch.from_numpy(np.asarray(data.y, dtype=np.int64))
    idx = np.flatnonzero(flags)
    source = np.asarray(train.y)[idx]  # the flagged images' own classes
    code = code_version()
    records = json.loads(OUT.read_text()) if OUT.exists() else []
    cfg = result.config.train_config(len(data))
    for variant in args.variants:
        if variant == "removal":
            res = train_classifier(data.subset(np.flatnonzero(~flags)), cfg,
                                   n_classes=data.n_classes)
            best_other = None
        else:
            targets = other_class_targets(teacher.model.eval(), teacher.input_spec,
                                          data.x[idx], labels[idx],
                                          temperature=float(variant[1:]))
            res = train_classifier(data, cfg, n_classes=data.n_classes,
                                   batch_targets=relabelled_batches(flags, labels, targets))
            best_other = float((targets.argmax(1).numpy() == source).mean())
        clf = res.classifier
        rec = {"code": code, "scenario": args.scenario, "seed": args.seed, "variant": variant,
               "clean_accuracy": accuracy(clf.predict(test.x), test.y),
               "asr": attack_success_rate(clf.predict(p.test_triggered.x), p.test_triggered.y),
               "n_flagged": int(flags.sum()),
               "teacher_best_other_is_source": best_other, "train_s": round(res.wall_s, 1)}
        print(json.dumps(rec), flush=True)
        records.append(rec)
        atomic_write_json(OUT, records)


if __name__ == "__main__":
    main()
