import numpy as np
import pytest

from poisonguard.errors import DataError
from poisonguard.modalities.tabular import load_tabular


def _write(tmp_path, rows, header="amount,channel,label"):
    p = tmp_path / "t.csv"
    p.write_text(header + "\n" + "\n".join(rows) + "\n")
    return p


def test_loads_numeric_categorical_missing(tmp_path):
    rows = [f"{i},{'web' if i % 2 else 'pos'},{i % 2}" for i in range(30)]
    rows[3] = ",pos,1"
    rows[4] = "4,,0"
    d = load_tabular(_write(tmp_path, rows), "label")
    assert d.columns == ["amount", "channel"]
    assert d.encodings["channel"] == {"pos": 0, "web": 1, "<missing>": 2}
    assert d.missing == {"amount": 1, "channel": 1}
    assert d.x.shape == (30, 2) and d.x[4, 1] == 2 and np.isfinite(d.x).all()
    assert sorted(set(d.y.tolist())) == [0, 1]


@pytest.mark.parametrize("rows,label,msg", [
    ([f"{i},a,{i % 2}" for i in range(30)], "nope", "no label column"),
    ([f"{i},a,1" for i in range(30)], "label", "one value"),
    ([f"{i if i else 'x'},a,{i % 2}" for i in range(30)], "label", "mixes numbers"),
    ([f",a,{i % 2}" for i in range(30)], "label", "every row"),
    ([], "label", "header only"),
    ([f"{i},a,{i % 2}" for i in range(10)], "label", "at least"),
    ([f"{'inf' if i == 2 else i},a,{i % 2}" for i in range(30)], "label", "infinities"),
])
def test_bad_input_one_line(tmp_path, rows, label, msg):
    with pytest.raises(DataError, match=msg) as e:
        load_tabular(_write(tmp_path, rows), label)
    assert "\n" not in str(e.value)


def test_id_column_and_duplicates(tmp_path):
    rows = [f"r{i},{i},a,{i % 2}" for i in range(30)]
    d = load_tabular(_write(tmp_path, rows, "tx,amount,channel,label"), "label", id_column="tx")
    assert d.columns == ["amount", "channel"] and d.ids[0] == "r0"
    rows[1] = "r0,1,a,1"
    with pytest.raises(DataError, match="duplicates"):
        load_tabular(_write(tmp_path, rows, "tx,amount,channel,label"), "label", id_column="tx")


def test_npz_with_feature_names_and_nan(tmp_path):
    x = np.arange(60, dtype=np.float32).reshape(30, 2)
    x[0, 1] = np.nan
    p = tmp_path / "t.npz"
    np.savez(p, x=x, y=np.arange(30) % 2, feature_names=np.array(["a", "b"]))
    d = load_tabular(p, "label")
    assert d.columns == ["a", "b"] and d.missing == {"b": 1} and np.isfinite(d.x).all()
