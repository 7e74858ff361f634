"""The mean-shift check: the flagged-minus-rest mean input of a class moves other-class samples
to it when the flagged samples carry a trigger, and not when they are a natural half."""

import numpy as np
import pytest
from sklearn.cluster import KMeans

from poisonguard.attacks import blended
from poisonguard.models.training import TrainConfig, train_classifier
from poisonguard.pipeline import MEAN_SHIFT_MIN_FLIP, shifted_flip_rate


@pytest.fixture(scope="module")
def backdoored(digits):
    train, _ = digits
    poisoned = blended(train.subset(np.arange(1200)), rate=0.1, target=3, seed=0, alpha=0.2)
    model = train_classifier(poisoned.data, TrainConfig(epochs=15, seed=0), n_classes=10)
    return poisoned, model.classifier


def _delta(x: np.ndarray, group: np.ndarray, rest: np.ndarray) -> np.ndarray:
    return x[group].astype(np.float64).mean(0) - x[rest].astype(np.float64).mean(0)


def test_trigger_group_moves_other_classes(backdoored) -> None:
    poisoned, clf = backdoored
    data, truth = poisoned.data, poisoned.is_poison
    in_class = data.y == 3
    delta = _delta(data.x, truth, in_class & ~truth)
    assert shifted_flip_rate(clf, data, 3, delta) >= MEAN_SHIFT_MIN_FLIP
    assert shifted_flip_rate(clf, data, 3, -delta) < MEAN_SHIFT_MIN_FLIP


def test_natural_halves_do_not(backdoored) -> None:
    poisoned, clf = backdoored
    data, truth = poisoned.data, poisoned.is_poison
    rates = []
    for c in (0, 1, 5, 7):
        idx = np.flatnonzero((data.y == c) & ~truth)
        flat = data.x[idx].reshape(len(idx), -1).astype(np.float64)
        half = KMeans(2, n_init=3, random_state=0).fit(flat).labels_ == 0
        group, rest = np.zeros(len(data), bool), np.zeros(len(data), bool)
        group[idx[half]], rest[idx[~half]] = True, True
        for sign in (1.0, -1.0):
            rates.append(shifted_flip_rate(clf, data, c, sign * _delta(data.x, group, rest)))
    assert max(rates) < MEAN_SHIFT_MIN_FLIP, rates


def test_shifted_inputs_stay_in_range(backdoored) -> None:
    poisoned, clf = backdoored
    huge = np.full(poisoned.data.x.shape[1:], 1e6)
    assert -1.0 <= shifted_flip_rate(clf, poisoned.data, 3, huge) <= 1.0
