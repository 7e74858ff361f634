import numpy as np
import pytest
import torch

from poisonguard.attacks import badnets
from poisonguard.errors import ConfigError, DataError
from poisonguard.models import TrainConfig
from poisonguard.train import GradientNormMonitor, GuardConfig, train_guarded
from poisonguard.train.guarded import _unlearn, isolate_lowest

CFG = TrainConfig(epochs=4, batch_size=64, seed=0)


@pytest.fixture(scope="module")
def poisoned(digits):
    train, test = digits
    return badnets(train.subset(np.arange(500)), rate=0.1, target=0, seed=0, test=test, size=3)


def test_trim_drops_and_records(poisoned) -> None:
    r = train_guarded(poisoned.data, GuardConfig(defense="trim", trim_fraction=0.2), CFG)
    # 20% of every post-warm-up batch is dropped: 3 epochs x about 100 samples per epoch
    assert r.drop_counts.sum() == pytest.approx(3 * 0.2 * len(poisoned.data), rel=0.1)
    est = train_guarded(poisoned.data, GuardConfig(defense="trim"), CFG)
    assert est.trim_fraction is not None and 0 <= est.trim_fraction < 0.5


def test_abl_isolates_without_poison_rate(poisoned) -> None:
    r = train_guarded(poisoned.data, GuardConfig(defense="abl", abl_isolation_epochs=2), CFG)
    assert r.isolated.shape == (len(poisoned.data),)
    assert r.info["n_isolated_initial"] == round(0.01 * len(poisoned.data))
    assert "isolation_rule" in r.info and "reverted" in r.info["unlearning"]
    assert (r.classifier.predict(poisoned.data.x) == poisoned.data.y).mean() > 0.5


def test_isolate_lowest_takes_fixed_share() -> None:
    losses = np.array([0.5, 0.01, 0.3, 0.02, 0.9] * 20)
    mask = isolate_lowest(losses, 0.1)
    assert mask.sum() == 10 and (losses[mask] <= 0.02).all()


def test_unlearning_reverted_when_it_erases_a_class(digits) -> None:
    train, _ = digits
    data = train
    clf = train_guarded(data, GuardConfig(), CFG).classifier
    losses = clf.per_sample_loss(data.x, data.y)
    iso = np.zeros(len(data), dtype=bool)
    iso[np.flatnonzero(data.y == 3)[:40]] = True  # ordinary members of class 3, no trigger
    before = {k: v.clone() for k, v in clf.model.state_dict().items()}
    info = _unlearn(clf.model, data, iso, clf, GuardConfig(defense="abl", abl_unlearn_lr=5e-2,
                                                           abl_max_class_loss=0.05), CFG,
                    losses=losses)
    assert info["reverted"], info
    last = info["attempts"][-1]["claimed_classes"][3]  # stopped by the probe, or after the stop
    assert last.get("probe_accuracy_drop", last.get("held_accuracy_drop")) > 0.05
    assert all(torch.equal(before[k], v) for k, v in clf.model.state_dict().items())


def test_gradient_monitor_history(poisoned) -> None:
    r = train_guarded(poisoned.data, GuardConfig(monitor_gradients=True), CFG)
    assert r.grad_history.shape == (CFG.epochs, len(poisoned.data))
    assert r.monitor.scores.shape == (len(poisoned.data),) and r.monitor.scores.min() >= 0


def test_monitor_flags_planted_outliers() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 100)
    hist = rng.lognormal(0, 0.2, (3, 400))
    hist[:, :8] *= 50
    r = GradientNormMonitor().detect(hist, y)
    assert r.flags[:8].all() and r.flags[8:].mean() < 0.02
    with pytest.raises(DataError, match="history"):
        GradientNormMonitor().detect(hist[:, :10], y)


@pytest.mark.parametrize("kwargs,match", [
    ({"defense": "magic"}, "unknown defense"),
    ({"defense": "trim", "trim_fraction": 0.5}, r"\[0, 0.5\)"),
    ({"defense": "trim", "trim_fraction": -0.1}, r"\[0, 0.5\)"),
    ({"defense": "abl", "abl_isolation_rate": 0.0}, "abl_isolation_rate"),
    ({"defense": "abl", "abl_relabel": "magic"}, "abl_relabel"),
])
def test_guard_config_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        GuardConfig(**kwargs)


def test_too_small_for_batch(poisoned) -> None:
    with pytest.raises(DataError, match="too few"):
        train_guarded(poisoned.data.subset(np.arange(10)), GuardConfig(defense="trim"),
                      TrainConfig(batch_size=128))


def test_monitor_result_joins_cross_reference() -> None:
    from poisonguard.detect.crossref import cross_reference

    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(4), 100)
    hist = rng.lognormal(0, 0.2, (3, 400))
    hist[:, :30] *= 50  # 30 of class 0's samples stand out
    mon = GradientNormMonitor().detect(hist, y)
    cross = cross_reference([mon, mon], y)
    assert cross.flags[:30].all() and cross.flags[30:].sum() == 0
    assert 0 in cross.suspicious_classes


def test_abl_relabels_a_complete_isolated_set_during_training(digits, monkeypatch) -> None:
    """Once the isolated set is the whole poison population (the seed expansion is stubbed here
    with the ground truth, to test the mechanism alone), training on with soft targets removes
    the backdoor that plain training learns."""
    import poisonguard.train.guarded as guarded
    from poisonguard.metrics import accuracy

    train, test = digits
    p = badnets(train, rate=0.1, target=0, seed=0, test=test, size=3)
    truth = p.is_poison

    def expand(_x, _y, _reps, _losses, seed):  # noqa: ANN001, ANN202
        return truth & ~seed, {"classes": {"0": {"accepted": True}}}

    monkeypatch.setattr(guarded, "expand_from_seed", expand)
    cfg = TrainConfig(epochs=8, batch_size=64, seed=0)
    plain = train_guarded(p.data, GuardConfig(), cfg).classifier
    r = train_guarded(p.data, GuardConfig(defense="abl"), cfg)
    assert r.info["unlearning"]["relabelled_in_training"] is True
    assert (r.isolated >= truth).all()
    asr_plain = accuracy(plain.predict(p.test_triggered.x), p.test_triggered.y)
    asr_abl = accuracy(r.classifier.predict(p.test_triggered.x), p.test_triggered.y)
    assert asr_plain > 0.9 and asr_abl < 0.1, (asr_plain, asr_abl)
    assert accuracy(r.classifier.predict(test.x), test.y) > 0.9


@pytest.mark.parametrize("defense", ["none", "abl"])
def test_user_model_is_trained_and_a_mismatched_one_refused(poisoned, defense: str) -> None:
    from torch import nn

    x = poisoned.data.x
    flat = int(np.prod(x.shape[1:]))
    model = nn.Sequential(nn.Flatten(), nn.Linear(flat, 10))
    r = train_guarded(poisoned.data, GuardConfig(defense=defense), CFG, model=model)
    assert r.classifier.model is model
    assert r.classifier.predict(x[:5]).shape == (5,)
    wrong = nn.Sequential(nn.Flatten(), nn.Linear(flat, 3))  # 3 outputs for 10 classes
    with pytest.raises(DataError, match="does not match 10 classes"):
        train_guarded(poisoned.data, GuardConfig(defense=defense), CFG, model=wrong)
