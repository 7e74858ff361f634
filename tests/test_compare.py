"""`poisonguard compare`: a backdoored fine-tune of a trusted digits model is caught with its
planted class, a clean fine-tune is not, and bad input is refused with one line."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from poisonguard.attacks import make_attack
from poisonguard.audit import CleanseConfig, load_audit_model
from poisonguard.audit.compare import compare_models
from poisonguard.cli import main
from poisonguard.data import LabeledData
from poisonguard.models.adapter import InputSpec
from poisonguard.models.architectures import build_model
from poisonguard.models.io import save_model
from poisonguard.models.training import TrainConfig, train_classifier
from poisonguard.report.schema import validate

FAST = CleanseConfig(max_steps=60, min_steps=30, patience=15, eval_samples=150)
TARGET = 3


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory, digits: tuple[LabeledData, LabeledData]
          ) -> dict[str, object]:
    train, test = digits
    root = tmp_path_factory.mktemp("compare")
    half = len(train) // 2
    first, second = train.subset(np.arange(half)), train.subset(np.arange(half, len(train)))
    base = train_classifier(first, TrainConfig(epochs=6, seed=0))
    clf = base.classifier

    def tune(data: LabeledData, name: str) -> Path:
        r = train_classifier(data, TrainConfig(epochs=4, seed=1, lr=1e-3),
                             model=copy.deepcopy(clf.model), input_spec=clf.input_spec,
                             arch=base.arch, n_classes=10)
        return save_model(root / name, r.classifier.model, base.arch, base.arch_kwargs,
                          clf.input_spec, 10, clf.layer)

    poisoned = make_attack("badnets", second, rate=0.1, target=TARGET, seed=0, test=test)
    clean = root / "clean.npz"
    np.savez(clean, x=test.x[:300], y=test.y[:300])
    return {"base": save_model(root / "base", clf.model, base.arch, base.arch_kwargs,
                               clf.input_spec, 10, clf.layer),
            "backdoored": tune(poisoned.data, "bd"), "clean_tune": tune(second, "ct"),
            "clean": clean, "test": test}


def test_clean_fine_tune_passes(pairs: dict) -> None:
    clean = pairs["test"].subset(np.arange(300))
    base = load_audit_model(pairs["base"])
    ok = compare_models(base, load_audit_model(pairs["clean_tune"]), clean, FAST)
    assert not ok.verdict["backdoored"]
    assert ok.verdict["max_differential_success"] < 0.5
    assert len(ok.layers) == len(list(base.module.parameters()))
    assert all(r["relative_change"] >= 0 for r in ok.layers)


def test_cli_compare_writes_a_valid_report(pairs: dict, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    rc = main(["compare", str(pairs["base"]), str(pairs["backdoored"]), "--clean",
               str(pairs["clean"]), "--steps", "60", "--quiet", "--out", str(out)])
    assert rc == 1
    report = json.loads((out / "report.json").read_text())
    validate(report)
    assert report["verdict"]["overall"] == "compromised"
    assert report["verdict"]["target_class"] == TARGET
    layer = report["layers"]["model_audit"]
    assert layer["triggers"][0]["class"] == TARGET
    row = layer["classes"][TARGET]
    assert row["trigger_success_tuned"] - row["trigger_success_base"] >= 0.5
    assert (out / "report.html").exists() and (out / "triggers.npz").exists()


def test_cli_compare_bad_inputs(pairs: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    kw = {"in_features": 64, "n_classes": 10}
    spec = InputSpec(layout="flat", scale=1 / 16)
    other = save_model(tmp_path / "mlp", build_model("mlp", **kw), "mlp", kw, spec, 10, None)
    out = tmp_path / "o"
    assert main(["compare", str(pairs["base"]), str(other), "--clean", str(pairs["clean"]),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "different architectures" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert main(["compare", str(pairs["base"]), str(tmp_path / "missing"), "--clean",
                 str(pairs["clean"]), "--out", str(out)]) == 2
    assert not out.exists()


def test_audit_with_base_model(pairs: dict, tmp_path: Path,
                               capsys: pytest.CaptureFixture) -> None:
    import poisonguard
    from poisonguard.profiles import Profile

    prof = Profile("quick", scan_rounds=1, epoch_share=0.1, min_epochs=1,
                   detectors=("spectral_signatures",), loss_seed=False, final_model=False,
                   seeds=(0,), recheck=False, cleanse_steps=60, cleanse_min_steps=30,
                   additive_search=False, dormant=False, runtime=False)
    outcome = poisonguard.audit(model=str(pairs["backdoored"]), base_model=str(pairs["base"]),
                                clean=str(pairs["clean"]), profile=prof,
                                out=str(tmp_path / "audit"))
    assert outcome.exit_code == 1
    report = json.loads((tmp_path / "audit" / "report.json").read_text())
    validate(report)
    layer = report["layers"]["model_audit"]
    assert layer["comparison"]["verdict"]["target_class"] == TARGET
    assert report["verdict"]["layers"]["model_audit"]["status"] == "compromised"
    checks = {c["check"]: c for c in report["cross_layer"]}
    assert "model-audit target vs classes planted since the base model" in checks
    assert any("comparison" in step for step in report["profile"]["ran"])
    bad = tmp_path / "bad"
    assert main(["audit", "--data", str(pairs["clean"]), "--base-model", str(pairs["base"]),
                 "--out", str(bad)]) == 2
    assert "base model" in capsys.readouterr().err and not bad.exists()
