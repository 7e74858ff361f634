"""``poisonguard filter`` end to end on digits (tiny model), calibration reuse, exit codes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from poisonguard.attacks import badnets
from poisonguard.cli import build_parser, main
from poisonguard.models.io import save_model
from poisonguard.models.training import TrainConfig, train_classifier
from poisonguard.report.schema import validate


@pytest.fixture(scope="module")
def setup(tmp_path_factory, digits) -> dict[str, Path]:  # noqa: ANN001
    train, test = digits
    d = tmp_path_factory.mktemp("runtime")
    poisoned = badnets(train, rate=0.1, target=3, seed=0, test=test, size=2)
    result = train_classifier(poisoned.data.subset(np.arange(700)),
                              TrainConfig(epochs=2, seed=0, batch_size=64))
    clf = result.classifier
    save_model(d / "model", clf.model, result.arch, result.arch_kwargs, clf.input_spec,
               10, clf.layer)
    np.savez(d / "clean.npz", x=test.x[:250])
    np.savez(d / "data.npz", x=np.concatenate([test.x[250:300],
                                               poisoned.test_triggered.x[-20:]]))
    np.savez(d / "eval.npz", x_test=test.x[250:], x_triggered=poisoned.test_triggered.x[-150:])
    return {"dir": d, "model": d / "model"}


def test_filter_writes_flags_report_and_calibration(setup: dict[str, Path]) -> None:
    d = setup["dir"]
    out = d / "out"
    rc = main(["filter", str(setup["model"]), str(d / "data.npz"), "--clean",
               str(d / "clean.npz"), "--out", str(out), "--n-blends", "8", "--test",
               str(d / "eval.npz"), "--quiet"])
    rows = list(csv.DictReader((out / "flags.csv").open()))
    assert len(rows) == 70
    assert list(rows[0]) == ["index", "prediction", "entropy", "score", "suspicious"]
    n_sus = sum(int(r["suspicious"]) for r in rows)
    assert rc == (1 if n_sus else 0)
    report = json.loads((out / "report.json").read_text())
    assert validate(report) == []
    layer = report["layers"]["runtime"]
    assert layer["n_suspicious"] == n_sus and layer["calibration"]["n_blends"] == 8
    ev = layer["evaluation"]
    assert ev["n_clean"] == 200 and ev["n_triggered"] == 150
    assert 0 <= ev["far"] <= 1 and 0 <= ev["frr"] <= 1
    html = (out / "report.html").read_text()
    assert 'id="runtime"' in html and "data:image/png;base64" in html
    for name in ("strip.json", "strip_pool.npz"):
        assert (out / name).exists()
    # reuse the saved calibration: same flags without --clean
    out2 = d / "out2"
    rc2 = main(["filter", str(setup["model"]), str(d / "data.npz"), "--calibration", str(out),
                "--out", str(out2), "--quiet"])
    assert rc2 == rc
    assert list(csv.DictReader((out2 / "flags.csv").open())) == rows
    assert main(["report", str(out / "report.json"), "--out", str(d / "r.html")]) == 0


def test_filter_bad_usage_exits_2(setup: dict[str, Path], capsys) -> None:  # noqa: ANN001
    d = setup["dir"]
    assert main(["filter", str(setup["model"]), str(d / "data.npz"), "--out",
                 str(d / "x")]) == 2
    assert "--clean" in capsys.readouterr().err
    np.savez(d / "wrong.npz", x=np.zeros((5, 9, 9), np.uint8))
    assert main(["filter", str(setup["model"]), str(d / "wrong.npz"), "--clean",
                 str(d / "clean.npz"), "--out", str(d / "y"), "--n-blends", "4"]) == 2
    assert "shape" in capsys.readouterr().err
    assert not (d / "y").exists()  # nothing left behind
    assert main(["filter", str(setup["model"]), str(d / "data.npz"), "--clean",
                 str(d / "clean.npz"), "--out", str(d / "z"), "--frr", "1.5"]) == 2


def test_serve_is_registered() -> None:
    args = build_parser().parse_args(["serve", "m", "--clean", "c.npz", "--port", "0"])
    assert args.command == "serve" and callable(args.handler)
