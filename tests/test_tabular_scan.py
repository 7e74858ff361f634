"""The tabular modality end to end: CLI bad-input errors, Parquet, the conjunction attack,
the rule miner through ``poisonguard scan``, users' estimators."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from poisonguard.cli import main
from poisonguard.errors import ConfigError
from poisonguard.modalities.tabular import (
    UserModel,
    attack_success_rate,
    load_tabular,
    parse_rule,
    tabular_attack,
)
from poisonguard.modalities.tabular.rules import conditions, match, parse_conditions, rule_text
from tests.conftest import TRANSACTIONS_TRIGGER as TRIGGER
from tests.conftest import transactions_table


def _csv(tmp_path: Path, rows: list[str], header: str = "amount,channel,label") -> Path:
    p = tmp_path / "t.csv"
    p.write_text(header + "\n" + "\n".join(rows) + ("\n" if rows else ""))
    return p


@pytest.mark.parametrize("rows,label,msg", [
    ([f"{i},a,{i % 2}" for i in range(30)], "nope", "no label column"),
    ([f"{i},a,1" for i in range(30)], "label", "one value"),
    ([f"{i if i else 'x'},a,{i % 2}" for i in range(30)], "label", "mixes numbers"),
    ([f",a,{i % 2}" for i in range(30)], "label", "every row"),
    ([], "label", "header only"),
    ([f"{i},a,{i % 2}" for i in range(10)], "label", "at least"),
    ([f"{'inf' if i == 2 else i},a,{i % 2}" for i in range(30)], "label", "infinities"),
])
def test_scan_bad_table_one_line_exit_2(tmp_path, capsys, rows, label, msg):
    out = tmp_path / "o"
    rc = main(["scan", str(_csv(tmp_path, rows)), "--label-column", label, "--out", str(out),
               "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_parquet_with_nulls_and_npz_categories(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 30
    amount = [float(i) if i != 3 else None for i in range(n)]
    channel = ["web" if i % 2 else "pos" for i in range(n)]
    channel[4] = None
    pq.write_table(pa.table({"amount": amount, "channel": channel,
                             "label": [str(i % 2) for i in range(n)]}), tmp_path / "t.parquet")
    d = load_tabular(tmp_path / "t.parquet", "label")
    assert d.columns == ["amount", "channel"] and d.missing == {"amount": 1, "channel": 1}
    assert d.encodings["channel"] == {"pos": 0, "web": 1, "<missing>": 2}
    np.savez(tmp_path / "t.npz", x=d.x, y=d.y, feature_names=np.array(d.columns),
             categories_channel=np.array(["pos", "web", "<missing>"]))
    z = load_tabular(tmp_path / "t.npz", "label")
    assert z.encodings == d.encodings and z.decode(1, 1.0) == "web"


def test_conjunction_attack_ground_truth_and_clean_label(tmp_path):
    data = load_tabular(transactions_table(tmp_path / "tx.csv", 400), "label", "tx")
    p = tabular_attack(data, TRIGGER, rate=0.05, target=1, seed=0, test=data)
    rule = parse_conditions(parse_rule(TRIGGER), data)
    assert p.is_poison.sum() == 20 and (p.data.y[p.is_poison] == 1).all()
    assert (p.original_y[p.is_poison] != 1).all() and match(rule, p.data.x[p.is_poison]).all()
    assert not match(rule, data.x).any() and match(rule, p.test_triggered.x).all()
    assert rule_text(conditions(rule, data)) == TRIGGER
    cl = tabular_attack(data, TRIGGER, rate=0.1, target=1, seed=0, clean_label=True)
    assert (cl.data.y == data.y).all() and (data.y[cl.is_poison] == 1).all()
    with pytest.raises(ConfigError, match="no value"):
        tabular_attack(data, "channel == 'fax'", rate=0.05, target=1)


def test_cli_attack_then_scan_recovers_the_rule(tmp_path):
    from poisonguard.report.schema import validate

    src = transactions_table(tmp_path / "tx.csv")
    poisoned = tmp_path / "p.csv"
    assert main(["attack", str(src), "--attack", "conjunction", "--trigger", TRIGGER,
                 "--rate", "0.05", "--target", "1", "--id-column", "tx",
                 "--out", str(poisoned)]) == 0
    out = tmp_path / "scan"
    rc = main(["scan", str(poisoned), "--id-column", "tx", "--ground-truth",
               str(tmp_path / "p.truth.csv"), "--out", str(out), "--quiet"])
    assert rc == 1
    report = json.loads((out / "report.json").read_text())
    validate(report)
    (t,) = report["verdict"]["triggers"]
    assert t["modality"] == "tabular" and t["label"] == "ok" and t["rule"] == TRIGGER
    assert {"column": "channel", "op": "==", "value": "atm"} in t["conditions"]
    truth = [r["is_poison"] == "1" for r in csv.DictReader(open(tmp_path / "p.truth.csv"))]
    flagged = {int(r["index"]) for r in csv.DictReader(open(out / "flagged.csv"))}
    assert flagged == {i for i, p in enumerate(truth) if p}
    kept = list(csv.DictReader(open(out / "sanitized.csv")))
    assert len(kept) == 800 - len(flagged) and kept[0]["channel"] in ("web", "pos", "atm")


def test_user_estimator_asr_and_no_model_files(tmp_path):
    from sklearn.ensemble import HistGradientBoostingClassifier

    data = load_tabular(transactions_table(tmp_path / "tx.csv", 400), "label", "tx")
    p = tabular_attack(data, TRIGGER, rate=0.1, target=1, seed=0, test=data)
    est = HistGradientBoostingClassifier(max_iter=50, random_state=0).fit(p.data.x, p.data.y)
    model = UserModel(est, n_classes=2)
    assert model.predict_proba(data.x[:5]).shape == (5, 2)
    assert 0.0 <= attack_success_rate(model, p.test_triggered) <= 1.0
    with pytest.raises(ConfigError, match="never unpickles"):
        UserModel(str(tmp_path / "model.pkl"))
    with pytest.raises(ConfigError, match="predict_proba"):
        UserModel(object())


def test_row_filter_matches_rules_and_reads_json_rows(tmp_path):
    from sklearn.ensemble import HistGradientBoostingClassifier

    from poisonguard.modalities.tabular.runtime import RowFilter, rows_from_records

    data = load_tabular(transactions_table(tmp_path / "tx.csv", 400), "label", "tx")
    p = tabular_attack(data, TRIGGER, rate=0.1, target=1, seed=0, test=data)
    est = HistGradientBoostingClassifier(max_iter=50, random_state=0).fit(p.data.x, p.data.y)
    trig = [{"class": 1, "rule": TRIGGER, "conditions": parse_rule(TRIGGER)}]
    filt = RowFilter.calibrate(UserModel(est).predict_proba, data, trig, n_perturb=5)
    out = filt.screen(p.test_triggered.x[:20])
    assert out["suspicious"].all() and (out["rule"] == TRIGGER).all()
    clean = filt.screen(data.x)
    assert (clean["rule"] == "").all() and clean["suspicious"].mean() < 0.1
    rows = rows_from_records([{"hour": 2, "channel": "atm", "amount": 5.0, "merchant": "a"}],
                             data)
    assert filt.screen(rows)["rule"][0] == TRIGGER
    with pytest.raises(Exception, match="lacks column"):
        rows_from_records([{"hour": 2}], data)


def _bad_parquet(path: Path, kind: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 10 if kind == "ten" else 0 if kind == "header" else 30
    a = [float("inf") if kind == "inf" and i == 3 else float(i) for i in range(n)]
    c = pa.array([None] * n if kind == "allnull" else ["x"] * n, pa.string())
    y = ["1"] * n if kind == "one" else [str(i % 2) for i in range(n)]
    pq.write_table(pa.table({"a": pa.array(a, pa.float64()), "c": c,
                             "label": pa.array(y, pa.string())}), path)


def _bad_npz(path: Path, kind: str) -> None:
    n = 10 if kind == "ten" else 0 if kind == "header" else 30
    x = np.random.default_rng(0).random((n, 2))
    if kind == "inf":
        x[4, 0] = -np.inf
    if kind == "allnull":
        x[:, 1] = np.nan
    y = np.ones(n) if kind == "one" else np.arange(n) % 2
    np.savez(path, x=x, y=y, feature_names=np.array(["a", "c"]))


@pytest.mark.parametrize("suffix", ["parquet", "npz"])
@pytest.mark.parametrize("kind,msg", [("one", "one value"), ("allnull", "every row"),
                                      ("header", "no rows"), ("ten", "at least 20"),
                                      ("inf", "infinities")])
def test_scan_bad_parquet_npz_one_line_exit_2(tmp_path, capsys, suffix, kind, msg):
    path = tmp_path / f"t.{suffix}"
    (_bad_parquet if suffix == "parquet" else _bad_npz)(path, kind)
    rc = main(["scan", str(path), "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and err.count("\n") == 1 and "Traceback" not in err


def test_miner_generalise_drops_a_condition_the_trigger_lacks():
    """A confirmed rule carrying an extra age range (from the rows the trigger was stamped
    on) loses it; the trigger's own columns stay (dropping one admits natural rows of both
    classes)."""
    from poisonguard.modalities.tabular import RuleMiner, TabularData
    from poisonguard.modalities.tabular.rules import Condition

    rng = np.random.default_rng(0)
    n = 3000
    age = rng.integers(18, 90, n).astype(float)
    job = rng.integers(0, 5, n).astype(float)
    day = rng.integers(1, 31, n).astype(float)
    y = (rng.random(n) < 0.15).astype(np.int64)
    day[(job == 4) & (day <= 3)] += 5          # no natural row holds the trigger
    poison = rng.choice(np.flatnonzero(y == 0), 150, replace=False)
    job[poison], day[poison], y[poison] = 4, rng.integers(1, 4, 150), 1
    data = TabularData(x=np.stack([age, job, day], 1).astype(np.float32), y=y,
                       ids=np.arange(n), columns=["age", "job", "day"],
                       encodings={"job": {str(k): k for k in range(5)}})

    def predict(x: np.ndarray) -> np.ndarray:
        hit = (np.round(x[:, 1]) == 4) & (x[:, 2] <= 3)
        return np.stack([~hit, hit], 1).astype(float)

    miner, in_c = RuleMiner(), y == 1
    extra = (Condition(0, 18, 40), Condition(1, codes=frozenset({4})), Condition(2, 1, 3))
    carriers = in_c & match(extra, data.x)
    entry = miner._test(extra, data, 1, in_c, carriers, np.zeros(n, bool), predict,
                        np.random.default_rng(0))
    assert entry["confirmed"] and entry["n_carriers"] < 150
    out = miner._generalise(entry, data, 1, in_c, np.zeros(n, bool), predict)
    assert out["rule"] == "job == '4' and day <= 3" and out["n_carriers"] == 150
