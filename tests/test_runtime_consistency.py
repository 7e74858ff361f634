"""Runtime consistency filters (scale-up, ibd-psc), unions with STRIP and ``filter --method``,
on a tiny CNN trained on scikit-learn's 8x8 digits with a BadNets backdoor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from poisonguard.attacks import make_attack
from poisonguard.cli import main
from poisonguard.data import LabeledData
from poisonguard.errors import ConfigError, ModelError
from poisonguard.models.adapter import InputSpec, TorchClassifier
from poisonguard.models.architectures import build_model
from poisonguard.models.io import load_model, save_model
from poisonguard.models.training import TrainConfig, train_classifier
from poisonguard.runtime.consistency import ConsistencyConfig, ConsistencyFilter, _score
from poisonguard.runtime.strip import StripConfig, StripFilter
from poisonguard.runtime.union import UnionFilter, load_filter, parse_methods


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, digits: tuple[LabeledData, LabeledData]
          ) -> dict[str, object]:
    train, test = digits
    root = tmp_path_factory.mktemp("consistency")
    poisoned = make_attack("badnets", train, rate=0.1, target=3, seed=0, test=test, size=2,
                           position="bottom-right")
    res = train_classifier(poisoned.data, TrainConfig(epochs=5, seed=0))
    clf = res.classifier
    save_model(root / "bd", clf.model, res.arch, res.arch_kwargs, clf.input_spec, 10, clf.layer)
    return {"model": root / "bd", "cal": test.x[:300], "clean": test.x[300:],
            "triggered": poisoned.test_triggered.x, "root": root}


def test_score_is_two_sided() -> None:
    s = _score(np.array([0.0, 5.0, 11.0, -3.0]), {"high": 10.0, "low": -2.0})
    assert (s > 0).tolist() == [False, False, True, True]
    assert (_score(np.array([-3.0]), {"high": 10.0}) > 0).tolist() == [False]


@pytest.mark.parametrize("method", ["scale-up", "ibd-psc"])
def test_calibrate_screen_save_load(setup: dict, tmp_path: Path, method: str) -> None:
    clf = load_model(setup["model"])
    filt = ConsistencyFilter.calibrate(clf, setup["cal"],
                                       ConsistencyConfig(method=method, target_frr=0.1))
    cal = filt.calibration
    assert set(cal.thresholds) == {"high", "low"} and cal.achieved_frr <= 0.1
    res = filt.screen(setup["clean"])
    assert res.suspicious.mean() < 0.25 and res.score.shape == (len(setup["clean"]),)
    assert np.array_equal(res.suspicious, res.score > 0)
    filt.save(tmp_path)
    again = load_filter(tmp_path, clf)
    assert isinstance(again, ConsistencyFilter) and again.threshold == filt.threshold
    np.testing.assert_allclose(again.screen(setup["clean"][:50]).score, res.score[:50],
                               atol=1e-4)


def test_one_sided_and_bad_configs(setup: dict) -> None:
    clf = load_model(setup["model"])
    filt = ConsistencyFilter.calibrate(clf, setup["cal"], ConsistencyConfig(tails="high",
                                                                            target_frr=0.1))
    assert set(filt.threshold) == {"high"}
    for kw in ({"method": "nope"}, {"factors": (0.5,)}, {"tails": "low"}, {"psc_factor": 1.0}):
        with pytest.raises(ConfigError):
            ConsistencyConfig(**kw)
    mlp = TorchClassifier(build_model("mlp", in_features=64, n_classes=10),
                          InputSpec(layout="flat", scale=1.0))
    with pytest.raises(ModelError, match="batch-norm"):
        ConsistencyFilter(mlp, ConsistencyConfig(method="ibd-psc"), (0, 1), (64,), "float32")


def test_union_flags_what_any_part_flags(setup: dict, tmp_path: Path) -> None:
    clf = load_model(setup["model"])
    strip = StripFilter.calibrate(clf, setup["cal"], StripConfig(n_blends=8, target_frr=0.05))
    scale = ConsistencyFilter.calibrate(clf, setup["cal"], ConsistencyConfig(target_frr=0.05))
    union = UnionFilter([strip, scale])
    x = np.concatenate([setup["clean"][:100], setup["triggered"][:100]])
    r, a, b = union.screen(x), strip.screen(x), scale.screen(x)
    assert np.array_equal(r.suspicious, a.suspicious | b.suspicious)
    assert r.suspicious[100:].mean() > r.suspicious[:100].mean()  # the BadNets triggers
    assert union.name == "strip+scale-up" and abs(union.target_frr - 0.1) < 1e-9
    union.save(tmp_path)
    again = load_filter(tmp_path, clf)
    assert isinstance(again, UnionFilter)
    assert np.array_equal(again.screen(x).suspicious, r.suspicious)
    assert parse_methods("both") == ("strip", "feature")
    with pytest.raises(ConfigError):
        parse_methods("strip+strip")


def test_cli_filter_method(setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cal, data = tmp_path / "cal.npz", tmp_path / "data.npz"
    np.savez(cal, x=setup["cal"])
    np.savez(data, x=np.concatenate([setup["clean"][:50], setup["triggered"][:50]]))
    out = tmp_path / "both"
    rc = main(["filter", str(setup["model"]), str(data), "--clean", str(cal), "--out", str(out),
               "--method", "strip+scale-up", "--frr", "0.1", "--n-blends", "8", "--quiet"])
    assert rc == 1
    flags = (out / "flags.csv").read_text().splitlines()
    assert flags[0] == "index,prediction,entropy,score,suspicious" and len(flags) == 101
    report = json.loads((out / "report.json").read_text())
    assert "SCALE-UP" in report["layers"]["runtime"]["method"]
    assert {"filters.json", "scale-up.json", "strip.json"} <= {p.name for p in out.iterdir()}
    again = tmp_path / "again"
    assert main(["filter", str(setup["model"]), str(data), "--calibration", str(out),
                 "--out", str(again), "--quiet"]) == 1
    assert (again / "flags.csv").read_text() == (out / "flags.csv").read_text()
    bad = tmp_path / "bad"
    assert main(["filter", str(setup["model"]), str(data), "--clean", str(cal), "--out",
                 str(bad), "--method", "magic"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--method" in err and len(err.splitlines()) == 1 and not bad.exists()


def test_feature_filter(setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from poisonguard.runtime.feature import FeatureConfig, FeatureFilter

    clf = load_model(setup["model"])
    filt = FeatureFilter.calibrate(clf, setup["cal"], FeatureConfig(target_frr=0.1))
    assert filt.calibration.n_fit == 150 and filt.calibration.achieved_frr <= 0.1
    clean, trig = filt.screen(setup["clean"]), filt.screen(setup["triggered"])
    assert clean.suspicious.mean() < 0.25 < trig.suspicious.mean()
    filt.save(tmp_path)
    again = load_filter(tmp_path, clf)
    assert isinstance(again, FeatureFilter)
    assert np.array_equal(again.screen(setup["triggered"]).suspicious, trig.suspicious)
    clf.layer = None
    with pytest.raises(ModelError, match="representation layer"):
        FeatureFilter.calibrate(clf, setup["cal"])
    cal, data = tmp_path / "cal.npz", tmp_path / "data.npz"
    np.savez(cal, x=setup["cal"])
    np.savez(data, x=setup["triggered"][:40])
    out = tmp_path / "both"
    assert main(["filter", str(setup["model"]), str(data), "--clean", str(cal), "--out",
                 str(out), "--method", "both", "--frr", "0.1", "--n-blends", "8",
                 "--quiet"]) == 1
    assert {"feature.json", "strip.json", "filters.json"} <= {p.name for p in out.iterdir()}


def test_service_serves_a_union(setup: dict) -> None:
    from fastapi.testclient import TestClient

    from poisonguard.runtime.feature import FeatureConfig, FeatureFilter
    from poisonguard.runtime.service import create_app

    clf = load_model(setup["model"])
    union = UnionFilter([FeatureFilter.calibrate(clf, setup["cal"], FeatureConfig(0.05)),
                         ConsistencyFilter.calibrate(clf, setup["cal"],
                                                     ConsistencyConfig(target_frr=0.05))])
    client = TestClient(create_app(union, max_inputs=50))
    health = client.get("/health").json()
    assert health["method"] == "feature+scale-up" and health["sample_shape"] == [8, 8]
    r = client.post("/predict", json=setup["triggered"][:20].tolist())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["n"] == 20 and body["n_suspicious"] >= 10
    assert set(body["threshold"]) == {"feature:high", "scale-up:high", "scale-up:low"}
