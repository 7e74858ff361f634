"""Data-free max-margin audit (MM-BD with a batch-norm prior) and ``audit-model`` without
--clean, on tiny CNNs trained on scikit-learn's 8x8 digits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from poisonguard.attacks import make_attack
from poisonguard.audit.mmbd import (
    InputDomain,
    MarginConfig,
    check_classifier_output,
    gamma_p_value,
    infer_domain,
    max_margin_audit,
    parse_range,
    parse_shape,
)
from poisonguard.audit.model import AuditModel, load_audit_model
from poisonguard.cli import main
from poisonguard.data import LabeledData
from poisonguard.errors import ConfigError, ModelError
from poisonguard.models.adapter import InputSpec, TorchClassifier
from poisonguard.models.io import describe_inputs, save_model
from poisonguard.models.training import TrainConfig, train_classifier
from poisonguard.report.schema import validate

TARGET = 3
FAST = MarginConfig(steps=60, restarts=2)


def _train(data: LabeledData, folder: Path, record_inputs: bool = True) -> Path:
    res = train_classifier(data, TrainConfig(epochs=5, seed=0))
    clf = res.classifier
    save_model(folder, clf.model, res.arch, res.arch_kwargs, clf.input_spec, 10, clf.layer,
               inputs=describe_inputs(data.x) if record_inputs else None)
    return folder


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory, digits: tuple[LabeledData, LabeledData]
        ) -> dict[str, object]:
    train, test = digits
    root = tmp_path_factory.mktemp("mmbd_zoo")
    poisoned = make_attack("badnets", train, rate=0.1, target=TARGET, seed=0, test=test,
                           size=2, position="bottom-right")
    return {"backdoored": _train(poisoned.data, root / "bd"),
            "clean_model": _train(train, root / "clean"),
            "bare": _train(train, root / "bare", record_inputs=False),
            "clean": test.subset(np.arange(300))}


def test_gamma_p_value_outlier_and_null() -> None:
    rng = np.random.default_rng(0)
    base = rng.gamma(20.0, 1.5, 10)
    p_null, _, _ = gamma_p_value(base)
    spiked = base.copy()
    spiked[4] = 3 * base.max()
    p_out, top, null = gamma_p_value(spiked)
    assert top == 4 and p_out < 1e-3 < 0.05 < p_null
    assert null["shape"] > 0 and null["shift"] == 0.0
    p_neg, top, null = gamma_p_value(spiked - 40.0)  # negative margins are shifted first
    assert top == 4 and null["shift"] > 0 and p_neg < 0.05


def test_data_free_audit_finds_the_target_and_passes_the_clean_twin(zoo: dict) -> None:
    bd = load_audit_model(zoo["backdoored"])
    r = max_margin_audit(bd, infer_domain(bd), FAST)
    assert r.flagged and r.top == TARGET and r.prior_used
    assert r.margins.shape == (10,) and r.restart_margins.shape == (10, FAST.restarts)
    assert r.inputs.shape == (10, 8, 8) and r.inputs.min() >= 0 and r.inputs.max() <= 255
    v = r.verdict()
    assert v["backdoored"] and v["target_class"] == TARGET
    again = max_margin_audit(bd, infer_domain(bd), FAST)
    np.testing.assert_allclose(again.margins, r.margins, rtol=1e-5)  # seeded
    clean = load_audit_model(zoo["clean_model"])
    rc = max_margin_audit(clean, infer_domain(clean), FAST)
    assert not rc.flagged and rc.verdict()["target_class"] is None


def test_domain_from_model_json_flags_or_clean(zoo: dict) -> None:
    m = load_audit_model(zoo["backdoored"])
    d = infer_domain(m)
    assert d.shape == (8, 8) and (d.low, d.high) == (0.0, 255.0)
    bare = load_audit_model(zoo["bare"])
    with pytest.raises(ConfigError, match="--input-shape and --input-range"):
        infer_domain(bare)
    assert infer_domain(bare, (8, 8), (0.0, 1.0)).high == 1.0
    assert infer_domain(bare, clean_x=zoo["clean"].x).shape == (8, 8)
    assert parse_shape("28,28") == (28, 28) and parse_range("0,255") == (0.0, 255.0)
    for bad in ("a,b", "0"):
        with pytest.raises(ConfigError):
            parse_shape(bad) if bad == "a,b" else parse_range(bad)
    with pytest.raises(ConfigError):
        parse_range("5,1")


def test_output_must_be_a_class_distribution() -> None:
    reg = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 1))
    model = AuditModel(TorchClassifier(reg, InputSpec(layout="flat", scale=1.0)), "poisonguard",
                       Path("x"))
    with pytest.raises(ModelError, match="not a class distribution"):
        check_classifier_output(model, InputDomain((8, 8), 0.0, 1.0))
    wide = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 7))
    model = AuditModel(TorchClassifier(wide, InputSpec(layout="flat", scale=1.0),
                                       n_classes=10), "poisonguard", Path("x"))
    with pytest.raises(ModelError, match="declares 10 classes"):
        check_classifier_output(model, InputDomain((8, 8), 0.0, 1.0))


def test_cli_data_free_and_combined(zoo: dict, tmp_path: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "free"
    rc = main(["audit-model", str(zoo["backdoored"]), "--out", str(out), "--margin-steps", "60",
               "--margin-restarts", "2", "--quiet"])
    assert rc == 1
    report = json.loads((out / "report.json").read_text())
    assert validate(report) == []
    v = report["verdict"]
    assert v["backdoored"] is True and v["target_class"] == TARGET
    assert v["layers"]["model_audit"]["status"] == "compromised"
    assert set(v["evidence"]["detectors"]) == {"max_margin"}
    assert not (out / "triggers.npz").exists()
    data = tmp_path / "clean.npz"
    np.savez(data, x=zoo["clean"].x, y=zoo["clean"].y)
    both = tmp_path / "both"
    rc = main(["audit-model", str(zoo["backdoored"]), "--clean", str(data), "--out", str(both),
               "--steps", "80", "--margin-steps", "60", "--margin-restarts", "2", "--quiet"])
    assert rc == 1
    r = json.loads((both / "report.json").read_text())
    assert validate(r) == []
    det = r["verdict"]["evidence"]["detectors"]
    assert set(det) == {"neural_cleanse", "max_margin"}
    assert r["verdict"]["target_class"] == TARGET and r["verdict"]["decided_by"]
    assert "max_margin" in r["layers"]["model_audit"] and (both / "triggers.npz").exists()


def test_cli_bad_input_is_one_line_exit_2(zoo: dict, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "o"
    assert main(["audit-model", str(zoo["bare"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--input-shape" in err and len(err.splitlines()) == 1 and not out.exists()
    assert main(["audit-model", str(zoo["bare"]), "--out", str(out), "--input-shape", "8,8",
                 "--input-range", "nope"]) == 2
    assert "LOW,HIGH" in capsys.readouterr().err and not out.exists()
    reg = torch.jit.script(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 1)))
    from poisonguard.models.io import save_scripted

    folder = save_scripted(tmp_path / "reg", reg,
                           inputs={"sample_shape": [8, 8], "dtype": "float32",
                                   "value_range": [0.0, 1.0]})
    assert main(["audit-model", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a class distribution" in err and len(err.splitlines()) == 1
    assert not out.exists()
