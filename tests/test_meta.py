"""``poisonguard meta``: a meta-classifier trained on a tiny zoo of tiny digits MLPs saves as
JSON + safetensors, predicts through the CLI with exit 0/1, and bad input (a one-label zoo, a
newer format, another architecture) is refused with one line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from poisonguard.attacks import make_attack
from poisonguard.audit.meta import (
    BUILTIN,
    ZOO_FORMAT,
    load_meta,
    signature,
    train_meta,
    weight_features,
)
from poisonguard.cli import main
from poisonguard.data import LabeledData
from poisonguard.errors import ConfigError
from poisonguard.models.adapter import InputSpec
from poisonguard.models.architectures import build_model, fit_normalization
from poisonguard.models.io import describe_inputs, load_model, save_model
from poisonguard.models.training import TrainConfig, train_classifier


def _tiny(folder: Path, data: LabeledData, seed: int, hidden: int = 16) -> Path:
    spec = InputSpec(layout="flat", scale=1 / 255)
    model = build_model("mlp", in_features=64, n_classes=10, hidden=hidden, embed_dim=8)
    fit_normalization(model, spec.prepare(data.x))
    r = train_classifier(data, TrainConfig(epochs=4, seed=seed, batch_size=64), model=model,
                         input_spec=spec, arch="mlp", n_classes=10)
    return save_model(folder, r.classifier.model, "mlp",
                      {"in_features": 64, "n_classes": 10, "hidden": hidden, "embed_dim": 8},
                      spec, 10, None, inputs=describe_inputs(data.x))


def _write_zoo(root: Path, entries: list[dict]) -> Path:
    (root / "zoo.json").write_text(json.dumps({"format": ZOO_FORMAT, "models": entries}))
    return root


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory, small_digits: LabeledData) -> Path:
    root = tmp_path_factory.mktemp("zoo")
    entries = []
    for i in range(4):
        _tiny(root / f"clean-{i}", small_digits, seed=i)
        entries.append({"folder": f"clean-{i}", "backdoored": False, "seed": i})
        bd = make_attack("badnets", small_digits, rate=0.2, target=i, seed=i, size=3)
        _tiny(root / f"bd-{i}", bd.data, seed=10 + i)
        entries.append({"folder": f"bd-{i}", "backdoored": True, "attack": "badnets",
                        "seed": i, "target": i})
    _tiny(root / "other-arch", small_digits, seed=99, hidden=24)
    return _write_zoo(root, entries)


@pytest.fixture(scope="module")
def meta_dir(zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("meta") / "m"
    assert main(["meta", "train", str(zoo), "--out", str(out), "--n-queries", "12",
                 "--quiet"]) == 0
    return out


def test_saved_as_json_and_safetensors_with_the_zoo(meta_dir: Path, zoo: Path) -> None:
    assert sorted(p.name for p in meta_dir.iterdir()) == ["meta.json", "queries.safetensors",
                                                          "zoo.json"]
    d = json.loads((meta_dir / "meta.json").read_text())
    assert d["format_version"] == 1 and d["classifier"]["kind"] == "logistic-regression"
    assert len(d["classifier"]["coef"]) == len(d["classifier"]["feature_names"])
    desc = json.loads((meta_dir / "zoo.json").read_text())
    assert sorted(e["folder"] for e in desc["models"]) == sorted(
        e["folder"] for e in json.loads((zoo / "zoo.json").read_text())["models"])
    meta = load_meta(meta_dir)
    assert meta.queries is not None and meta.queries.shape == (12, 8, 8)
    assert meta.queries.dtype == np.uint8


def test_predict_cli_exit_code_follows_the_prediction(meta_dir: Path, zoo: Path,
                                                      tmp_path: Path) -> None:
    for name in ("clean-0", "bd-0"):
        out = tmp_path / f"{name}.json"
        code = main(["meta", "predict", str(meta_dir), str(zoo / name), "--out", str(out),
                     "--quiet"])
        rec = json.loads(out.read_text())
        assert 0.0 <= rec["p_backdoored"] <= 1.0
        assert code == (1 if rec["backdoored"] else 0)
        assert rec["backdoored"] == (rec["p_backdoored"] > rec["threshold"])
        assert rec["zoo"]["backdoored_per_attack"] == {"badnets": 4}


def test_meta_model_scores_the_training_zoo_by_its_labels(meta_dir: Path, zoo: Path) -> None:
    meta = load_meta(meta_dir)
    entries = json.loads((zoo / "zoo.json").read_text())["models"]
    p = {e["folder"]: meta.predict(load_model(zoo / e["folder"]))["p_backdoored"]
         for e in entries}
    # fit on these models: every backdoored one scores above every clean one
    assert min(p[f"bd-{i}"] for i in range(4)) > max(p[f"clean-{i}"] for i in range(4))


def test_head_features_do_not_depend_on_which_class_is_the_target() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", in_features=64, n_classes=10, hidden=16, embed_dim=8)
    names, a = weight_features(model)
    perm = torch.randperm(10)
    with torch.no_grad():
        model.head.weight.copy_(model.head.weight[perm])
        model.head.bias.copy_(model.head.bias[perm])
    names2, b = weight_features(model)
    assert names == names2
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    return err


def test_one_label_zoo_is_refused(zoo: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    entries = [e for e in json.loads((zoo / "zoo.json").read_text())["models"]
               if not e["backdoored"]]
    bad = tmp_path / "clean-only"
    bad.mkdir()
    for e in entries:
        (bad / e["folder"]).symlink_to(zoo / e["folder"])
    _write_zoo(bad, entries)
    err = _one_line_error(capsys, ["meta", "train", str(bad), "--out", str(tmp_path / "m")])
    assert "4 clean and 0 backdoored" in err
    assert not (tmp_path / "m").exists()


def test_mixed_architecture_zoo_is_refused(zoo: Path) -> None:
    entries = json.loads((zoo / "zoo.json").read_text())["models"]
    entries = entries + [{"folder": "other-arch", "backdoored": False}]
    mixed = zoo.parent / "mixed"
    mixed.mkdir(exist_ok=True)
    for e in entries:
        if not (mixed / e["folder"]).exists():
            (mixed / e["folder"]).symlink_to(zoo / e["folder"])
    _write_zoo(mixed, entries)
    with pytest.raises(ConfigError, match="another architecture"):
        train_meta(mixed)


def test_newer_format_is_refused(meta_dir: Path, zoo: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    newer = tmp_path / "newer"
    newer.mkdir()
    for p in meta_dir.iterdir():
        (newer / p.name).write_bytes(p.read_bytes())
    d = json.loads((newer / "meta.json").read_text())
    d["format_version"] = 2
    (newer / "meta.json").write_text(json.dumps(d))
    err = _one_line_error(capsys, ["meta", "predict", str(newer), str(zoo / "clean-0")])
    assert "newer" in err


def test_other_architecture_model_is_refused(meta_dir: Path, zoo: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    err = _one_line_error(capsys, ["meta", "predict", str(meta_dir), str(zoo / "other-arch")])
    assert "another architecture" in err


def test_builtin_meta_model_covers_the_digits_cnn() -> None:
    meta = load_meta("digits-cnn")
    assert BUILTIN["digits-cnn"].is_dir()
    cnn = build_model("cnn", in_channels=1, n_classes=10, width=16, pools=0)
    assert signature(cnn) == meta.architecture
    assert meta.zoo["models"] and meta.info["n_models"] == len(meta.zoo["models"])
    assert sum(p.stat().st_size for p in BUILTIN["digits-cnn"].iterdir()) < 1_000_000


def test_audit_folds_the_meta_prediction_into_the_model_audit(meta_dir: Path, zoo: Path,
                                                               tmp_path: Path) -> None:
    from poisonguard.full_audit import run_audit

    for name in ("clean-1", "bd-1"):
        out = run_audit(model=zoo / name, meta=meta_dir, out=tmp_path / name)
        rep = json.loads((tmp_path / name / "report.json").read_text())
        entry = rep["layers"]["model_audit"]["meta_classifier"]
        status = rep["verdict"]["layers"]["model_audit"]["status"]
        assert status == ("suspicious" if entry["backdoored"] else "clean")
        assert rep["inputs"]["meta"] == str(meta_dir)
        assert out.exit_code == (1 if entry["backdoored"] else 0)


def test_audit_meta_bad_input_is_refused_before_anything_runs(
        meta_dir: Path, zoo: Path, tmp_path: Path, small_digits: LabeledData,
        capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "d.npz"
    np.savez(data, x=small_digits.x, y=small_digits.y)
    err = _one_line_error(capsys, ["audit", "--meta", str(meta_dir), "--out",
                                   str(tmp_path / "a"), "--data", str(data)])
    assert "give the model" in err
    assert not (tmp_path / "a").exists()
    err = _one_line_error(capsys, ["audit", "--model", str(zoo / "other-arch"), "--meta",
                                   str(meta_dir), "--out", str(tmp_path / "b")])
    assert "another architecture" in err
    assert not (tmp_path / "b").exists()


def test_weights_only_meta_model_has_no_queries(zoo: Path, tmp_path: Path) -> None:
    out = tmp_path / "w"
    assert main(["meta", "train", str(zoo), "--out", str(out), "--features", "weights",
                 "--quiet"]) == 0
    assert not (out / "queries.safetensors").exists()
    meta = load_meta(out)
    assert meta.queries is None and all(not n.startswith("q:") for n in meta.feature_names)
    assert set(meta.predict(load_model(zoo / "clean-2"))) == {"p_backdoored", "threshold",
                                                             "backdoored"}
