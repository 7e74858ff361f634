"""``filter`` and ``serve`` on a table: a tabular model folder, rows encoded with the scan
report's schema, its rule matched, value-swapping STRIP, JSON objects by column name."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from poisonguard.cli import build_parser, main
from poisonguard.modalities.tabular import load_tabular
from poisonguard.modalities.tabular.scan import train_tabular_model
from poisonguard.models.io import load_model, save_model
from tests.conftest import TRANSACTIONS_TRIGGER as TRIGGER
from tests.conftest import transactions_table


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tabrt")
    src = transactions_table(d / "tx.csv")
    poisoned = d / "p.csv"
    assert main(["attack", str(src), "--attack", "conjunction", "--trigger", TRIGGER,
                 "--rate", "0.05", "--target", "1", "--id-column", "tx", "--test", str(src),
                 "--out", str(poisoned)]) == 0
    assert main(["scan", str(poisoned), "--id-column", "tx", "--out", str(d / "scan"),
                 "--quiet"]) == 1
    data = load_tabular(poisoned, "label", "tx")
    train = train_tabular_model(data, 2, seed=0, epochs=8)
    clf = train.classifier
    save_model(d / "model", clf.model, train.arch, train.arch_kwargs, clf.input_spec, 2,
               clf.layer)
    return {"dir": d, "model": d / "model", "clean": src, "report": d / "scan" / "report.json",
            "triggered": d / "p.triggered.csv"}


def test_filter_flags_triggered_rows_by_rule_and_not_clean_ones(setup: dict[str, Path]
                                                                 ) -> None:
    d = setup["dir"]
    common = ["--clean", str(setup["clean"]), "--report", str(setup["report"]),
              "--id-column", "tx", "--n-blends", "5", "--quiet"]
    rc = main(["filter", str(setup["model"]), str(setup["triggered"]), "--out",
               str(d / "f1"), "--test", str(setup["triggered"]), *common])
    rows = list(csv.DictReader((d / "f1" / "flags.csv").open()))
    assert rc == 1 and rows and list(rows[0]) == ["index", "id", "prediction", "label",
                                                  "score", "rule", "suspicious"]
    assert all(r["suspicious"] == "1" and r["rule"] == TRIGGER for r in rows)
    report = json.loads((d / "f1" / "report.json").read_text())
    assert report["rules"] == [TRIGGER] and report["evaluation"]["triggered_flagged"] == 1.0
    main(["filter", str(setup["model"]), str(setup["clean"]), "--out", str(d / "f2"), *common])
    clean = list(csv.DictReader((d / "f2" / "flags.csv").open()))
    assert len(clean) == 800 and clean[0]["id"] == "t0"
    assert not any(r["rule"] for r in clean)
    assert sum(r["suspicious"] == "1" for r in clean) / len(clean) < 0.05


def test_filter_bad_table_is_one_line_exit_2(setup: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("hour,channel\n3,atm\n")
    rc = main(["filter", str(setup["model"]), str(bad), "--out", str(tmp_path / "o"),
               "--clean", str(setup["clean"]), "--report", str(setup["report"]), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "no column(s)" in err and "\n" not in err
    rc = main(["filter", str(setup["model"]), str(setup["triggered"]), "--out",
               str(tmp_path / "o"), "--quiet"])
    assert rc == 2 and "--clean CLEAN.csv" in capsys.readouterr().err


def test_serve_app_takes_objects_by_column_name(setup: dict[str, Path]) -> None:
    from fastapi.testclient import TestClient

    from poisonguard.modalities.tabular.serve import build_row_filter, create_tabular_app

    args = build_parser().parse_args(["serve", str(setup["model"]), "--clean",
                                      str(setup["clean"]), "--report", str(setup["report"]),
                                      "--id-column", "tx", "--n-blends", "5"])
    filt, like = build_row_filter(args, load_model(args.model).predict_proba)
    client = TestClient(create_tabular_app(filt, like, max_inputs=3))
    assert client.get("/health").json()["rules"] == [TRIGGER]
    row = {"hour": 2, "channel": "atm", "amount": 12.5, "merchant": "a"}
    out = client.post("/predict", json=row).json()
    (r,) = out["results"]
    assert r["suspicious"] and r["rule"] == TRIGGER and r["label"] in ("fraud", "ok")
    ok = client.post("/predict", json={"inputs": [{**row, "hour": 12}]}).json()
    assert ok["results"][0]["rule"] == ""
    assert client.get("/flagged").json()["n"] >= 1
    assert client.post("/predict", json={"hour": 2}).status_code == 422
    assert client.post("/predict", json=[row] * 4).status_code == 413
    assert client.post("/predict", content=b"{").status_code == 400
    assert client.post("/predict", json={**row, "channel": "mail"}).status_code == 422
    assert np.isfinite(client.get("/metrics").json()["inputs_screened"])
