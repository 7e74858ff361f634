import numpy as np
import pytest

from poisonguard.detect import (
    ActivationClustering,
    LossOutliers,
    SpectralSignatures,
    cross_reference,
)
from poisonguard.detect.common import choose_poison_group, split_1d
from poisonguard.errors import DataError
from poisonguard.metrics import auroc, detection_metrics
from tests.conftest import planted_features


@pytest.mark.parametrize("frac", [0.5, 0.1])
@pytest.mark.parametrize("det", [ActivationClustering(), SpectralSignatures()])
def test_planted_cluster_found(det, frac: float) -> None:
    x, y, truth, losses = planted_features(poison_frac=frac)
    r = det.detect(x, y, losses)
    assert r.suspicious_classes == [1]
    m = detection_metrics(r.flags, truth, r.scores)
    assert m["recall"] >= 0.98 and m["fpr"] <= 0.01
    assert m["auroc"] >= 0.99  # quality floor on planted data
    assert r.threshold_rule["rule"] and r.scores.shape == y.shape


@pytest.mark.parametrize("det", [ActivationClustering(), SpectralSignatures()])
def test_clean_gaussian_classes_not_flagged(det) -> None:
    x, y, truth, losses = planted_features(poison_frac=0.0, seed=3)
    r = det.detect(x, y, losses)
    assert r.suspicious_classes == [] and r.flags.sum() == 0


def test_poison_group_chosen_by_loss_not_size() -> None:
    losses = np.r_[np.full(60, 1e-3), np.full(40, 1e-9)]
    assert choose_poison_group([np.arange(60), np.arange(60, 100)], losses)[0] == 1
    losses = np.r_[np.full(60, 1e-9), np.full(40, 1e-3)]
    assert choose_poison_group([np.arange(60), np.arange(60, 100)], losses)[0] == 0
    assert choose_poison_group([np.arange(60), np.arange(60, 100)], None)[0] == 1


def test_split_1d() -> None:
    v = np.r_[np.random.default_rng(0).normal(0, 1, 500), np.random.default_rng(1).normal(
        20, 1, 50)]
    cut, sep = split_1d(v)
    assert 3 < cut < 17 and sep > 10
    _, sep_null = split_1d(np.random.default_rng(2).normal(0, 1, 2000))
    assert 2.0 < sep_null < 3.5


def test_loss_outliers_find_flipped_labels() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(5), 200)
    losses = rng.exponential(0.02, len(y))
    flipped = rng.choice(len(y), 20, replace=False)
    losses[flipped] = rng.uniform(3, 6, 20)
    r = LossOutliers().detect(losses, y)
    truth = np.zeros(len(y), bool)
    truth[flipped] = True
    m = detection_metrics(r.flags, truth)
    assert m["recall"] >= 0.95 and m["precision"] >= 0.9


def test_cross_reference_rules() -> None:
    x, y, truth, losses = planted_features(poison_frac=0.3)
    ac = ActivationClustering().detect(x, y, losses)
    ss = SpectralSignatures().detect(x, y, losses)
    lo = LossOutliers().detect(losses, y)
    cr = cross_reference([ac, ss, lo], y)
    assert cr.suspicious_classes == [1]
    verdicts = {f.label: f.evidence["verdict"] for f in cr.findings}
    assert verdicts[1] == "poisoned" and verdicts[0] == "clean"
    assert set(np.unique(cr.scores)) <= {0, 1 / 3, 2 / 3, 1}
    assert detection_metrics(cr.flags, truth)["recall"] >= 0.98
    single = cross_reference([ac], y)  # one detector: its own calls stand
    assert single.suspicious_classes == [1]


def test_detector_input_errors() -> None:
    x, y, _, losses = planted_features()
    with pytest.raises(DataError, match="NaN"):
        ActivationClustering().detect(np.where(x > 5, np.nan, x), y)
    with pytest.raises(DataError, match="feature rows"):
        SpectralSignatures().detect(x[:-1], y)
    with pytest.raises(DataError, match="2-D"):
        SpectralSignatures().detect(x[:, 0], y)
    with pytest.raises(DataError, match="losses"):
        LossOutliers().detect(losses[:-2], y)


def test_metrics() -> None:
    truth = np.array([1, 1, 0, 0, 0], bool)
    m = detection_metrics(np.array([1, 0, 1, 0, 0], bool), truth, np.array([5, 1, 4, 0, 0]))
    assert m["precision"] == 0.5 and m["recall"] == 0.5 and m["fpr"] == pytest.approx(1 / 3)
    assert auroc(np.array([3.0, 2, 1, 0]), np.array([1, 1, 0, 0], bool)) == 1.0
    assert auroc(np.array([1.0, 1.0]), np.array([1, 0], bool)) == 0.5
    assert auroc(np.ones(3), np.zeros(3, bool)) is None


def test_trigger_template_recovers_unlearned_poisons() -> None:
    from poisonguard.attacks import BadNetsTrigger
    from poisonguard.detect.trigger_template import TriggerTemplate

    rng = np.random.default_rng(0)
    x = rng.integers(0, 200, (400, 8, 8)).astype(np.uint8)
    y = np.repeat(np.arange(4), 100)
    poison = np.zeros(400, bool)
    poison[np.flatnonzero(y == 2)[:40]] = True
    clean = x.copy()
    x[poison] = BadNetsTrigger(size=2).apply(x[poison])
    first = poison.copy()
    first[np.flatnonzero(poison)[:10]] = False  # the first stage missed 10 poisons
    first[np.flatnonzero((y == 2) & ~poison)[:5]] = True  # and flagged 5 clean samples
    r = TriggerTemplate().detect(x, y, first, [2])
    assert r.flags[poison].all() and r.flags[~poison].sum() <= 1
    assert r.findings[0].evidence["template_size"] == 4
    # a blended-style trigger has no constant values: nothing is added
    xb = clean.copy()
    xb[poison] = (0.8 * clean[poison] + 0.2 * rng.integers(0, 255, (8, 8))).astype(np.uint8)
    assert not TriggerTemplate().detect(xb, y, first, [2]).flags.any()


def _smooth_images(rng: np.random.Generator, n: int) -> np.ndarray:
    """Low-frequency 32x32 RGB images (8x8 blocks upsampled) with a little pixel noise."""
    coarse = rng.uniform(0, 200, (n, 8, 8, 3))
    x = np.kron(coarse, np.ones((1, 4, 4, 1))) + rng.normal(0, 4, (n, 32, 32, 3))
    return np.clip(x, 0, 255).astype(np.uint8)


def test_blend_template_recovers_blended_poisons_the_first_stage_missed() -> None:
    from poisonguard.detect.blend_template import BlendTemplate

    rng = np.random.default_rng(0)
    x = _smooth_images(rng, 400)
    y = np.repeat(np.arange(4), 100)
    poison = np.zeros(400, bool)
    poison[np.flatnonzero(y == 2)[:40]] = True
    pattern = rng.integers(0, 256, (32, 32, 3))
    x[poison] = (0.8 * x[poison] + 0.2 * pattern).astype(np.uint8)
    first = poison.copy()
    first[np.flatnonzero(poison)[:10]] = False  # the first stage missed 10 poisons
    first[np.flatnonzero((y == 2) & ~poison)[:5]] = True  # and flagged 5 clean samples
    r = BlendTemplate().detect(x, y, first, [2])
    assert r.findings[0].suspicious
    assert r.flags[poison].all() and r.flags[~poison].sum() <= 1
    assert r.scores[poison].min() > r.scores[(y == 2) & ~poison].max()


def test_blend_template_rejects_a_clean_subgroup_and_abstains_on_vectors() -> None:
    from poisonguard.detect.blend_template import BlendTemplate

    rng = np.random.default_rng(1)
    x = _smooth_images(rng, 400)
    y = np.repeat(np.arange(4), 100)
    first = np.zeros(400, bool)
    first[np.flatnonzero(y == 1)[:30]] = True  # clean samples flagged by mistake
    r = BlendTemplate().detect(x, y, first, [1])
    assert not r.flags.any() and not r.findings[0].suspicious
    assert "additive pattern" in r.findings[0].evidence["reason"]
    v = BlendTemplate().detect(rng.normal(size=(400, 12)), y, first, [1])
    assert not v.flags.any() and v.findings[0].evidence["reason"] == "not images"
    with pytest.raises(DataError, match="same length"):
        BlendTemplate().detect(x[:10], y, first, [1])
