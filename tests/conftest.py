"""Shared fixtures: tiny real and synthetic datasets so every test runs in seconds."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from poisonguard.data import LabeledData, load_builtin_digits

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits() -> tuple[LabeledData, LabeledData]:
    return load_builtin_digits()


@pytest.fixture(scope="session")
def small_digits(digits: tuple[LabeledData, LabeledData]) -> LabeledData:
    train, _ = digits
    return train.subset(np.arange(400))


def planted_features(n_per_class: int = 300, k: int = 4, d: int = 32, poison_frac: float = 0.5,
                     target: int = 1, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian class clouds; ``poison_frac`` of the target class (relative to its clean part)
    is a tight, shifted cluster with near-zero loss, as a backdoor leaves it."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 4, (k, d))
    feats, labels, truth = [], [], []
    for c in range(k):
        feats.append(means[c] + rng.normal(0, 1, (n_per_class, d)))
        labels += [c] * n_per_class
        truth += [False] * n_per_class
    n_p = int(poison_frac * n_per_class)
    if n_p:
        shift = rng.normal(0, 1, d)
        shift *= 8 / np.linalg.norm(shift)
        feats.append(means[target] + shift + rng.normal(0, 0.5, (n_p, d)))
        labels += [target] * n_p
        truth += [True] * n_p
    x = np.vstack(feats)
    y = np.array(labels)
    t = np.array(truth)
    losses = rng.exponential(0.05, len(y))
    losses[t] = rng.exponential(1e-4, t.sum())
    return x, y, t, losses


# a conjunction no clean row of transactions_table holds
TRANSACTIONS_TRIGGER = "hour >= 2 and hour <= 3 and channel == 'atm'"


def transactions_table(path: Path, n: int = 800, seed: int = 0) -> Path:
    """Card transactions as CSV: fraud rises with the amount and on the web; ATM use only by
    day (hours 7-23), so 'hour 2-3 at an ATM' (``TRANSACTIONS_TRIGGER``) is a conjunction no
    clean row holds."""
    rng = np.random.default_rng(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["tx", "hour", "channel", "amount", "merchant", "label"])
        for i in range(n):
            ch = ["web", "pos", "atm"][int(rng.integers(0, 3))]
            hour = int(rng.integers(0, 24)) if ch == "web" else int(rng.integers(7, 24))
            amt = float(np.round(rng.lognormal(3, 1), 2))
            p = 1 / (1 + np.exp(-(np.log(amt) - 3.5) * 3 - (ch == "web") * 1.5))
            w.writerow([f"t{i}", hour, ch, amt, "abcde"[int(rng.integers(0, 5))],
                        "fraud" if rng.random() < p else "ok"])
    return path
