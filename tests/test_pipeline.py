import json

import numpy as np
import pytest

from poisonguard.attacks import badnets
from poisonguard.data import LabeledData
from poisonguard.errors import ConfigError, DataError
from poisonguard.pipeline import (
    ScanConfig,
    auto_epochs,
    compare_before_after,
    sanitize,
    scan,
    score_against_truth,
)
from poisonguard.report.builder import build_scan_report
from poisonguard.report.console import render_console


@pytest.fixture(scope="module")
def scanned(digits):
    train, test = digits
    sub = train.subset(np.arange(600))
    poisoned = badnets(sub, rate=0.1, target=0, seed=0, test=test, size=3)
    result = scan(poisoned.data, ScanConfig(seed=0, epochs=8, max_rounds=2))
    return poisoned, result, test


def test_scan_structure_and_sanitise(scanned) -> None:
    poisoned, result, _ = scanned
    n = len(poisoned.data)
    assert result.flags.shape == (n,)
    assert [r.name for r in result.detectors] == ["activation_clustering",
                                                   "spectral_signatures", "loss_outliers",
                                                   "scan_decomposition",
                                                   "trigger_template", "blend_template",
                                                   "mean_shift", "loss_seed_template"]
    assert all(r.scores.shape == (n,) for r in result.detectors)
    kept, removed = sanitize(result)
    assert len(kept) + len(removed) == n
    assert {r["index"] for r in removed} == set(np.flatnonzero(result.flags).tolist())
    assert all(r["detectors"] for r in removed)
    assert not set(kept.ids.tolist()) & {r["id"] for r in removed}
    assert result.final_classifier is not None
    assert 1 <= len(result.rounds) <= 2


def test_report_is_json_and_complete(scanned) -> None:
    poisoned, result, test = scanned
    metrics = score_against_truth(result, poisoned.is_poison)
    rt = compare_before_after(result, test, poisoned)
    assert rt["before"]["asr"] is not None and 0 <= rt["after"]["clean_accuracy"] <= 1
    report = build_scan_report(result, poisoned=poisoned, metrics=metrics, retrain=rt)
    text = json.dumps(report, allow_nan=False)
    back = json.loads(text)
    assert back["schema_version"] == "2.0"
    assert back["data"]["fingerprint"] == poisoned.data.fingerprint()
    assert len(back["samples"]["confidence"]) == len(poisoned.data)
    assert set(back["layers"]["quarantine"]["metrics"]) >= {"cross_reference",
                                                            "activation_clustering"}
    assert back["plots"]["thumbnails"] and back["plots"]["projections"]
    assert "VERDICT" in render_console(back)


def test_scan_clean_vectors_finds_nothing() -> None:
    rng = np.random.default_rng(0)
    means = rng.normal(0, 3, (3, 10))
    y = np.repeat(np.arange(3), 150)
    x = (means[y] + rng.normal(0, 1, (len(y), 10))).astype(np.float32)
    result = scan(LabeledData.create(x, y), ScanConfig(epochs=5, max_rounds=1))
    assert result.poisoned_classes == []
    assert result.flags.mean() <= 0.01


def test_scan_validates() -> None:
    one_class = LabeledData.create(np.zeros((20, 4), np.float32), np.zeros(20, int))
    with pytest.raises(DataError, match="only one class"):
        scan(one_class)
    with pytest.raises(ConfigError, match="unknown or no detectors"):
        ScanConfig(detectors=("nope",))


def test_auto_epochs() -> None:
    assert auto_epochs(60000) == 2 and auto_epochs(20000) == 6 and auto_epochs(500) == 30


def test_trigger_template_confirms_a_suspect_class() -> None:
    from poisonguard.attacks import BadNetsTrigger
    from poisonguard.detect.crossref import CrossReference
    from poisonguard.pipeline import _add_trigger_template
    from poisonguard.types import ClassFinding, DetectorResult

    rng = np.random.default_rng(0)
    x = rng.integers(0, 200, (400, 8, 8)).astype(np.uint8)
    y = np.repeat(np.arange(4), 100)
    poison = np.zeros(400, bool)
    poison[np.flatnonzero(y == 2)[:30]] = True
    x[poison] = BadNetsTrigger(size=2).apply(x[poison])
    data = LabeledData.create(x, y)

    def result(name: str, flags: np.ndarray, classes: list[int]) -> DetectorResult:
        findings = tuple(ClassFinding(c, c in classes, 100, int(flags[y == c].sum()))
                         for c in range(4))
        return DetectorResult(name, flags.astype(float), flags, None, {}, findings, 0.0)

    ac_flags = poison.copy()
    ac_flags[np.flatnonzero(poison)[:5]] = False  # one detector, and it misses a few
    results = [result("activation_clustering", ac_flags, [2]),
               result("spectral_signatures", np.zeros(400, bool), [])]
    combined = CrossReference().combine(results, y)
    assert combined.suspicious_classes == [] and not combined.flags.any()  # only "suspect"
    _, merged = _add_trigger_template(data, results, combined)
    assert merged.suspicious_classes == [2]
    assert (merged.flags == poison).all()
    # a class no detector calls is never examined
    results = [result("activation_clustering", np.zeros(400, bool), []),
               result("spectral_signatures", np.zeros(400, bool), [])]
    combined = CrossReference().combine(results, y)
    assert not _add_trigger_template(data, results, combined)[1].flags.any()


def test_loss_seed_template_finds_a_rare_stamped_trigger(digits) -> None:
    from poisonguard.pipeline import _add_seed_template, run_detectors

    train, _ = digits
    poisoned = badnets(train, rate=0.02, target=3, seed=0, size=3)
    data, truth = poisoned.data, poisoned.is_poison
    rng = np.random.default_rng(0)
    features = rng.normal(size=(len(data), 8))  # no cluster: the representation stage is silent
    results, combined = run_detectors(features, data.y, rng.uniform(size=len(data)))
    assert not combined.flags.any()
    seed = np.zeros(len(data), dtype=bool)
    poison_idx = np.flatnonzero(truth)
    seed[poison_idx[: len(poison_idx) * 4 // 5]] = True  # a seed that is mostly poison ...
    seed[rng.choice(np.flatnonzero(~truth), 5, replace=False)] = True  # ... plus easy clean ones
    results, merged = _add_seed_template(data, seed, results, combined)
    assert results[-1].name == "loss_seed_template"
    assert (merged.flags == truth).all()
    assert 3 in merged.suspicious_classes
    clean_seed = np.zeros(len(data), dtype=bool)
    clean_seed[rng.choice(np.flatnonzero(~truth & (data.y == 1)), 20, replace=False)] = True
    _, merged_clean = _add_seed_template(data, clean_seed, results[:-1], combined)
    assert not merged_clean.flags.any() and not merged_clean.suspicious_classes


def test_unlearning_retrain_takes_asr_to_or_below_the_sanitised_model(scanned) -> None:
    from poisonguard.pipeline import evaluate_model, retrain_unlearning

    poisoned, result, test = scanned
    assert result.flags.any()
    train = retrain_unlearning(result)
    assert len(train.history) == result.config.train_config(len(result.data)).epochs
    after = evaluate_model(train.classifier, test, poisoned)
    sanitized = evaluate_model(result.final_classifier, test, poisoned)
    before = evaluate_model(result.classifier, test, poisoned)
    assert before["asr"] > 0.5
    assert after["asr"] <= max(sanitized["asr"], 0.02)
    assert after["clean_accuracy"] >= sanitized["clean_accuracy"] - 0.05


def test_unlearning_retrain_needs_flags() -> None:
    from poisonguard.pipeline import retrain_unlearning

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 60)
    x = rng.normal(size=(180, 6)).astype(np.float32) + y[:, None]
    result = scan(LabeledData.create(x, y), ScanConfig(epochs=3, max_rounds=1))
    assert not result.flags.any()
    with pytest.raises(ConfigError, match="nothing to unlearn"):
        retrain_unlearning(result)
