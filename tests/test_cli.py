import csv
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from poisonguard.cli import main
from poisonguard.report.schema import validate


@pytest.fixture(scope="module")
def poisoned_npz(tmp_path_factory, digits) -> Path:
    train, test = digits
    d = tmp_path_factory.mktemp("data")
    np.savez(d / "train.npz", x=train.x[:500], y=train.y[:500])
    np.savez(d / "test.npz", x=test.x, y=test.y)
    rc = main(["attack", str(d / "train.npz"), "--rate", "0.1", "--target", "3", "--size", "3",
               "--test", str(d / "test.npz"), "--out", str(d / "poisoned.npz")])
    assert rc == 0
    return d / "poisoned.npz"


@pytest.fixture(scope="module")
def scan_out(tmp_path_factory, poisoned_npz: Path) -> tuple[int, Path]:
    out = tmp_path_factory.mktemp("scan") / "out"
    rc = main(["scan", str(poisoned_npz), "--out", str(out), "--epochs", "6",
               "--max-rounds", "1", "--quiet", "--test", str(poisoned_npz),
               "--unlearn-flagged"])
    return rc, out


def test_attack_file(poisoned_npz: Path) -> None:
    with np.load(poisoned_npz) as f:
        assert f["is_poison"].sum() == 50
        assert (f["y"][f["is_poison"]] == 3).all()
        assert json.loads(str(f["attack_json"]))["name"] == "badnets"
        assert "x_triggered" in f.files


def test_scan_writes_all_outputs(scan_out: tuple[int, Path]) -> None:
    rc, out = scan_out
    assert rc in (0, 1)
    for name in ("report.json", "report.html", "sanitized.npz", "flagged.csv",
                 "model/model.safetensors", "model/model.json"):
        assert (out / name).exists(), name
    report = json.loads((out / "report.json").read_text())
    assert validate(report) == []
    # --test POISONED.npz: the attack named from its attack_json, accuracy on its x_test
    assert report["ground_truth"]["attack"]["name"] == "badnets"
    thumb = report["plots"]["thumbnails"][0]
    assert isinstance(thumb["votes"], int) and thumb["n_detectors"] >= 2
    assert rc == (0 if report["verdict"]["overall"] == "clean" else 1)
    if report["verdict"]["poisoning_found"]:
        assert report["verdict"]["overall"] == "compromised"
    rows = list(csv.DictReader((out / "flagged.csv").open()))
    assert report["verdict"]["n_flagged"] == len(rows)
    with np.load(out / "sanitized.npz") as s:
        assert len(s["y"]) == 500 - len(rows)
    if rows:
        assert list(rows[0]) == ["index", "id", "label", "confidence", "detectors"]
    assert "metrics" in report["layers"]["quarantine"]  # is_poison present in the file
    retrain = report["layers"]["quarantine"]["retrain"]
    assert retrain["after"]["asr"] is not None
    if rows:  # --unlearn-flagged: a second model, trained on every sample
        assert (out / "model_unlearned" / "model.safetensors").exists()
        assert retrain["n_train_unlearned"] == 500 and retrain["unlearned"]["asr"] is not None
        assert "flagged unlearned" in (out / "report.html").read_text()


def test_predict_and_report(scan_out: tuple[int, Path], poisoned_npz: Path,
                            tmp_path: Path) -> None:
    _, out = scan_out
    preds = tmp_path / "p.csv"
    assert main(["predict", str(out / "model"), str(poisoned_npz), "--out", str(preds)]) == 0
    rows = list(csv.reader(preds.open()))
    assert rows[0][:3] == ["index", "prediction", "p_0"] and len(rows) == 501
    html = tmp_path / "r.html"
    assert main(["report", str(out / "report.json"), "--out", str(html)]) == 0
    assert html.read_text().startswith("<!DOCTYPE html>")


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse usage errors
        return int(exc.code)


@pytest.mark.parametrize("make,match", [
    (lambda d: (d.joinpath("e.npz").write_bytes(b""), d / "e.npz")[1], "empty"),
    (lambda d: np.savez(d / "k.npz", a=np.zeros(3)) or d / "k.npz", "keys"),
    (lambda d: np.savez(d / "m.npz", x=np.zeros((5, 4)), y=np.zeros(4)) or d / "m.npz",
     "must match"),
    (lambda d: np.savez(d / "n.npz", x=np.full((10, 4), np.nan), y=np.arange(10) % 2)
     or d / "n.npz", "NaN"),
    (lambda d: np.savez(d / "o.npz", x=np.zeros((10, 4)), y=np.zeros(10)) or d / "o.npz",
     "one class"),
    (lambda d: np.savez(d / "f.npz", x=np.zeros((12, 4)), y=np.r_[np.zeros(9), np.ones(3)])
     or d / "f.npz", "fewer than 5"),
])
def test_scan_bad_input_exit_2_nothing_written(tmp_path: Path, capsys, make, match) -> None:
    path = make(tmp_path)
    out = tmp_path / "out"
    assert _exit_code(["scan", str(path), "--out", str(out), "--quiet"]) == 2
    assert match in capsys.readouterr().err
    assert not out.exists()


def test_bad_layer_and_pickle_model(tmp_path: Path, scan_out, poisoned_npz: Path,
                                    capsys) -> None:
    _, out = scan_out
    dest = tmp_path / "o"
    assert _exit_code(["scan", str(poisoned_npz), "--model", str(out / "model"), "--layer",
                       "nope", "--out", str(dest), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err and not dest.exists()
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"a": 1}))
    assert _exit_code(["scan", str(poisoned_npz), "--model", str(evil), "--out", str(dest),
                       "--quiet"]) == 2
    assert "refused" in capsys.readouterr().err and not dest.exists()
    assert _exit_code(["report", str(poisoned_npz)]) == 2
    assert _exit_code(["scan"]) == 2


@pytest.mark.parametrize("defense", ["trim", "abl"])
def test_train_command_writes_loadable_model(tmp_path: Path, poisoned_npz: Path,
                                             defense: str) -> None:
    out = tmp_path / defense
    rc = main(["train", str(poisoned_npz), "--defense", defense, "--epochs", "3",
               "--monitor-gradients", "--test", str(poisoned_npz), "--quiet", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert validate(report) == []
    layer = report["layers"]["guarded_training"]
    assert layer["defense"] == defense and "clean_accuracy" in layer["evaluation"]
    assert "gradient_monitor" in layer
    preds = tmp_path / "p.csv"
    assert main(["predict", str(out), str(poisoned_npz), "--out", str(preds)]) == 0


def test_train_bad_input(tmp_path: Path, poisoned_npz: Path, capsys) -> None:
    out = tmp_path / "t"
    assert _exit_code(["train", str(poisoned_npz), "--defense", "magic", "--out",
                       str(out)]) == 2
    assert _exit_code(["train", str(poisoned_npz), "--defense", "trim", "--trim-fraction",
                       "0.7", "--out", str(out)]) == 2
    assert "[0, 0.5)" in capsys.readouterr().err and not out.exists()


def test_scan_runs_provenance_first(tmp_path: Path, poisoned_npz: Path, capsys) -> None:
    data = tmp_path / "d.npz"
    data.write_bytes(poisoned_npz.read_bytes())
    manifest = tmp_path / "m.jsonl"
    assert main(["pin", str(data), "--out", str(manifest), "--quiet"]) == 0
    with np.load(data) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["x"] = arrays["x"].copy()
    arrays["x"][7] = 255 - arrays["x"][7]
    np.savez(data, **arrays)
    out = tmp_path / "scan"
    rc = main(["scan", str(data), "--manifest", str(manifest), "--out", str(out), "--epochs",
               "3", "--max-rounds", "1", "--quiet"])
    assert rc == 1
    report = json.loads((out / "report.json").read_text())
    assert validate(report) == []
    layer = report["layers"]["provenance"]
    assert layer["status"] == "changed" and layer["counts"]["modified"] == 1
    # a failed provenance check is never shown under a green banner
    assert report["verdict"]["layers"]["provenance"]["status"] == "compromised"
    assert report["verdict"]["overall"] == "compromised"
    page = (out / "report.html").read_text()
    assert 'class="verdict ok"' not in page and 'class="verdict bad"' in page
    truncated = tmp_path / "t.jsonl"
    truncated.write_text(manifest.read_text()[:-40])
    assert _exit_code(["scan", str(data), "--manifest", str(truncated), "--out",
                       str(tmp_path / "no"), "--quiet"]) == 2
    assert not (tmp_path / "no").exists()


def test_train_refuses_a_dataset_too_small_for_the_batch(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    tiny = tmp_path / "tiny.npz"
    np.savez(tiny, x=rng.integers(0, 255, (12, 8, 8), dtype=np.uint8), y=np.arange(12) % 3)
    out = tmp_path / "t"
    assert _exit_code(["train", str(tiny), "--out", str(out), "--quiet"]) == 2
    assert "too few for batch size" in capsys.readouterr().err and not out.exists()
