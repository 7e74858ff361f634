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
import subprocess
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from poisonguard.attacks import badnets, blended
from poisonguard.data import load_shared
from poisonguard.io import atomic_write_json
from poisonguard.metrics import accuracy, attack_success_rate
from poisonguard.models.training import train_classifier
from poisonguard.pipeline import ScanConfig, scan
from poisonguard.train.relabel import relabelled_batches

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent.parent / "shared" / "datasets"
OUT = ROOT / "results" / "unlearn_temperature.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenario", choices=["badnets10", "blended10"])
    ap.add_argument("seed", type=int)
    ap.add_argument("variants", nargs="+", help="T<temperature> or 'removal'")
    args = ap.parse_args()
    train = load_shared("cifar10", SHARED)
    test = load_shared("cifar10", SHARED, split="test")
    target = (3 * args.seed + 1) % 10  # as in benchmarks/quarantine.py
    attack = blended if args.scenario == "blended10" else badnets
    kw = {"alpha": 0.2} if args.scenario == "blended10" else {"size": 3}
    p = attack(train, rate=0.1, target=target, seed=args.seed, test=test, **kw)
    result = scan(p.data, ScanConfig(seed=args.seed))
    teacher, data, flags = result.final_classifier, p.data, result.flags
    labels = torch.from_numpy(np.asarray(data.y, dtype=np.int64))
    with torch.no_grad():
        logits = torch.cat([teacher.model.eval()(teacher.input_spec.prepare(data.x[s:s + 512]))
                            for s in range(0, len(data), 512)])
    logits[torch.arange(len(data)), labels] = -torch.inf
    idx = np.flatnonzero(flags)
    source = np.asarray(train.y)[idx]  # the flagged images' own classes
    code = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=ROOT).stdout.strip()
    records = json.loads(OUT.read_text()) if OUT.exists() else []
    cfg = result.config.train_config(len(data))
    for variant in args.variants:
        if variant == "removal":
            res = train_classifier(data.subset(np.flatnonzero(~flags)), cfg,
                                   n_classes=data.n_classes)
            best_other = None
        else:
            soft = F.softmax(logits / float(variant[1:]), dim=1)
            res = train_classifier(data, cfg, n_classes=data.n_classes,
                                   batch_targets=relabelled_batches(flags, labels, soft))
            best_other = float((soft[idx].argmax(1).numpy() == source).mean())
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
