"""Seeded expansion of ABL's isolated set (train/seeded.py)."""

from __future__ import annotations

import numpy as np

from poisonguard.train.seeded import expand_from_seed


def _data(poisoned: bool, n: int = 300, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], n)
    x = rng.uniform(0.0, 0.6, size=(2 * n, 8, 8)).astype(np.float32)
    reps = rng.normal(size=(2 * n, 16))
    losses = rng.uniform(0.1, 1.0, size=2 * n)
    truth = np.zeros(2 * n, dtype=bool)
    if poisoned:
        truth[:n // 3] = True                # a third of class 0 carries the trigger
        x[truth, :2, :2] = 1.0               # a stamped 2x2 patch
        reps[truth] += 6.0                   # and forms its own cluster
        losses[truth] = rng.uniform(1e-4, 1e-3, size=truth.sum())
    seed_mask = np.zeros(2 * n, dtype=bool)
    seed_mask[np.argsort(losses)[:20]] = True
    return x, labels, reps, losses, seed_mask, truth


def test_expansion_recovers_the_poison_cluster_from_a_pure_seed() -> None:
    x, labels, reps, losses, seed_mask, truth = _data(poisoned=True)
    assert truth[seed_mask].all()
    added, evidence = expand_from_seed(x, labels, reps, losses, seed_mask)
    grown = added | seed_mask
    assert evidence["claimed_classes"] == [0]
    assert evidence["classes"]["0"]["accepted"]
    assert (grown == truth).all()
    assert not (added & seed_mask).any()


def test_expansion_adds_nothing_to_a_clean_class() -> None:
    x, labels, reps, losses, seed_mask, _ = _data(poisoned=False)
    added, evidence = expand_from_seed(x, labels, reps, losses, seed_mask)
    assert not added.any()
    assert evidence["n_added"] == 0
    assert not any(v["accepted"] for v in evidence["classes"].values())
