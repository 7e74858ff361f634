"""Confusion training: a backdoored model, confused against trusted digits, keeps fitting only
the poisons; without a trusted set the scan says the detector was skipped."""

import numpy as np
import pytest

from poisonguard.attacks import badnets
from poisonguard.data import LabeledData
from poisonguard.detect.confusion_training import ConfusionTraining
from poisonguard.errors import DataError
from poisonguard.models.training import TrainConfig, train_classifier
from poisonguard.pipeline import ScanConfig, skipped_detectors


@pytest.fixture(scope="module")
def backdoored(digits):
    train, _ = digits
    data, trusted = train.subset(np.arange(900)), train.subset(np.arange(900, 1300))
    poisoned = badnets(data, rate=0.1, target=2, seed=0, size=2)
    model = train_classifier(poisoned.data, TrainConfig(epochs=15, seed=0), n_classes=10)
    return poisoned, trusted, model.classifier


def test_confusion_training_finds_target_and_poisons(backdoored) -> None:
    poisoned, trusted, clf = backdoored
    result = ConfusionTraining(seed=0).detect(clf, poisoned.data, trusted)
    assert result.suspicious_classes == [2]
    truth = poisoned.is_poison
    assert result.flags[truth].mean() >= 0.8
    assert result.flags[~truth].mean() <= 0.05
    assert result.extras["clean_rate"] <= 0.05
    finding = next(f for f in result.findings if f.label == 2)
    assert "held-out trusted samples" in finding.evidence["reason"]
    assert finding.evidence["clean_rate"] < finding.evidence["confident_fraction"]
    history = result.extras["calibration_history"]
    assert history and all(h["step"] % 25 == 0 for h in history)


def test_confusion_training_needs_trusted(backdoored) -> None:
    poisoned, trusted, clf = backdoored
    with pytest.raises(DataError, match="trusted"):
        ConfusionTraining().detect(clf, poisoned.data, trusted.subset(np.arange(5)))


def test_scan_says_confusion_training_was_skipped(digits) -> None:
    train, _ = digits
    assert "trusted" in skipped_detectors(ScanConfig())["confusion_training"]
    assert "2000 scanned samples" in skipped_detectors(ScanConfig(), 1797)["confusion_training"]
    assert skipped_detectors(ScanConfig(), 5000) == {}
    few = LabeledData.create(train.x[:10], train.y[:10])
    assert "20" in skipped_detectors(ScanConfig(trusted=few))["confusion_training"]
    assert skipped_detectors(ScanConfig(trusted=train)) == {}


def test_stamped_flip_rate_separates_a_trigger_from_a_natural_feature(backdoored) -> None:
    from poisonguard.detect.trigger_template import TriggerTemplate
    from poisonguard.pipeline import stamped_flip_rate

    poisoned, _, clf = backdoored
    data = poisoned.data
    tt = TriggerTemplate().detect(data.x, data.y, poisoned.is_poison, [2])
    mask, values = tt.extras["templates"][2]
    assert stamped_flip_rate(clf, data, 2, mask, values) >= 0.5
    # the brightest pixels shared by clean zeros: a class feature, not a trigger
    zeros = data.x[(data.y == 0) & ~poisoned.is_poison].reshape(-1, data.x[0].size)
    natural = np.zeros(zeros.shape[1], dtype=bool)
    natural[np.argsort(zeros.mean(0))[-5:]] = True
    assert stamped_flip_rate(clf, data, 0, natural, zeros.mean(0)[natural]) < 0.5


def _confused_probabilities(rng: np.random.Generator, widths: list[float], n: int = 500
                            ) -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.arange(len(widths)), n)
    logits = np.concatenate([rng.normal(0.0, w, n) for w in widths])
    return 1 / (1 + np.exp(-logits)), labels


def test_within_class_test_finds_a_weakly_fitted_group() -> None:
    """A group fitted at p 0.71-0.79 (never above ``confident``) in a class fitted at p ~0.5 is
    called by the within-class test; classes that are merely wider than others are not."""
    rng = np.random.default_rng(0)
    widths = [0.3, 0.3, 0.9, 0.3, 0.6, 0.3, 0.3, 1.2, 0.3, 0.3]
    p, labels = _confused_probabilities(rng, widths)
    p_cal, cal_labels = _confused_probabilities(rng, widths, n=25)
    poison = np.zeros(len(p), dtype=bool)
    poison[np.flatnonzero(labels == 3)[:25]] = True
    p[poison] = 1 / (1 + np.exp(-rng.uniform(0.9, 1.35, poison.sum())))
    assert p[poison].max() < ConfusionTraining().confident
    ct = ConfusionTraining()
    classes = np.arange(10)
    look = (25, *ct._within_class(p, p_cal, labels, cal_labels, classes))
    called, z, evidence, steps = ct._strongest_looks([look], labels, classes)
    assert np.flatnonzero(called).tolist() == [3]
    flags = (z > ct.flag_z) & (labels == 3)
    assert flags[poison].mean() >= 0.9 and flags[~poison].mean() <= 0.01
    assert evidence["p"][3] < 1e-6 and evidence["counts"][3] >= 10 and steps[3] == 25
    # nine looks at clean data: the Bonferroni correction covers the looks too
    looks = [(s, *ct._within_class(_confused_probabilities(rng, widths)[0], p_cal, labels,
                                   cal_labels, classes)) for s in range(9)]
    assert not ct._strongest_looks(looks, labels, classes)[0].any()
    # a strong look among weak ones is found, with its step
    called, _, _, steps = ct._strongest_looks([*looks[:4], look, *looks[4:]], labels, classes)
    assert np.flatnonzero(called).tolist() == [3] and steps[3] == 25


def test_a_confusion_training_call_is_one_vote() -> None:
    """Confusion training's call alone leaves a class suspect; a second detector makes it
    poisoned."""
    from poisonguard.detect.crossref import CrossReference
    from poisonguard.types import ClassFinding, DetectorResult

    labels = np.repeat([0, 1], 10)
    flags = np.zeros(20, dtype=bool)
    flags[:3] = True

    def result(name: str, calls: bool) -> DetectorResult:
        called = flags if calls else np.zeros(20, dtype=bool)
        return DetectorResult(name, called.astype(float), called, 0.5, {}, (
            ClassFinding(0, calls, 10, int(called.sum()), {}),
            ClassFinding(1, False, 10, 0, {})), 0.0)

    for second, expected in ((False, "suspect"), (True, "poisoned")):
        combined = CrossReference().combine([result("confusion_training", True),
                                             result("spectral_signatures", second)], labels)
        assert combined.findings[0].evidence["verdict"] == expected
        assert combined.findings[1].evidence["verdict"] == "clean"


def test_self_confusion_flags_only_fill_gaps() -> None:
    """Without a trusted set, confusion training's flags are dropped in a class two other
    detectors already call, and kept where it is the class's only representation vote."""
    from poisonguard.detect.crossref import CrossReference
    from poisonguard.types import ClassFinding, DetectorResult

    labels = np.repeat([0, 1], 10)
    ct_flags = np.zeros(20, dtype=bool)
    ct_flags[[0, 1, 10, 11]] = True
    other_flags = np.zeros(20, dtype=bool)
    other_flags[[2, 3]] = True

    def result(name: str, flags: np.ndarray, classes: list[int], filler: bool = False
               ) -> DetectorResult:
        return DetectorResult(name, flags.astype(float), flags, 0.5, {}, tuple(
            ClassFinding(c, c in classes, 10, 0, {}) for c in (0, 1)), 0.0,
            extras={"gap_filler": filler})

    combined = CrossReference().combine([result("confusion_training", ct_flags, [0, 1], True),
                                         result("activation_clustering", other_flags, [0]),
                                         result("spectral_signatures", other_flags, [0])],
                                        labels)
    assert np.flatnonzero(combined.flags).tolist() == [2, 3]
    assert not combined.extras["detector_flags"]["confusion_training"][:10].any()
    assert combined.extras["detector_flags"]["confusion_training"][10:12].all()
