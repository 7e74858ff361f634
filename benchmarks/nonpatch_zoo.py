"""Issue 21's zoo: MNIST models backdoored with patch and non-patch attacks (BadNets, blended,
WaNet, low-frequency, adaptive blend, SIG), each with two targets, plus clean twins; the
data-free audit (MM-BD), the audit with 500 clean samples (Neural Cleanse + MM-BD) and the
runtime filters (STRIP, SCALE-UP) on every model.

Victims: the built-in MNIST CNN trained 3 epochs (seeded) on a 20k training subset (drawn with
the model's seed), poisoned with the attack's recipe below. Models are split in two halves:
``dev`` (the seed-0 backdoored models and clean twins c0-c3), on which settings were chosen,
and ``held-out`` (the rest), reported separately. Only models with ASR >= 50% are scored.

    python benchmarks/nonpatch_zoo.py --train-only      # build benchmarks/cache/nonpatch_zoo/
    python benchmarks/nonpatch_zoo.py [--models NAME ...] [--skip-clean-audit]

Writes benchmarks/results/nonpatch_zoo.{json,md}; models are cached (git-ignored).
"""

from __future__ import annotations

import argparse
import json
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
}
CLEAN = {f"clean-c{i}": i for i in range(12)}
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


def half(name: str) -> str:
    if name in BACKDOORED:
        return "dev" if BACKDOORED[name][3] == 0 else "held-out"
    return "dev" if CLEAN[name] < 4 else "held-out"


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(BACKDOORED) + list(CLEAN))
    p.add_argument("--train-only", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.train_only:
        for name in args.models:
            build(name, splits(dataset(name))["eval"])
        return
    raise SystemExit("evaluation not written yet")


if __name__ == "__main__":
    json.dumps({})
    main()
