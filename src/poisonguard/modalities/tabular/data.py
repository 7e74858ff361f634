"""Tabular datasets from .csv or .npz (``x``, ``y``, ``feature_names``).

Numeric columns stay numbers; a column whose non-missing values are all non-numeric is
categorical, its strings encoded as 0..K-1 in sorted order (``TabularData.encodings``); a
column mixing numbers and strings is refused. Missing values (empty cells, NaN) are replaced by
the column median (numeric) or a ``<missing>`` category, and counted per column
(``TabularData.missing``). Every problem is one :class:`~poisonguard.errors.DataError` line.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from poisonguard.data.labeled import LabeledData
from poisonguard.errors import DataError

MIN_ROWS = 20
MISSING = "<missing>"


@dataclass(frozen=True)
class TabularData(LabeledData):
    """``x`` (N, F) float32 (categoricals as codes), ``y`` int64, ``ids``; column names,
    which columns are categorical and their string -> code maps, missing counts."""

    columns: list[str] = field(default_factory=list)
    encodings: dict[str, dict[str, int]] = field(default_factory=dict)
    missing: dict[str, int] = field(default_factory=dict)
    label_map: dict[str, int] = field(default_factory=dict)

    @property
    def is_image(self) -> bool:
        return False


def _number(v: str) -> float | None:
    try:
        return float(v)
    except ValueError:
        return None


def _encode_column(name: str, raw: list[str], path: Path) -> tuple[np.ndarray, dict | None, int]:
    present = [v for v in raw if v.strip() not in ("", "nan", "NaN", "NA")]
    n_missing = len(raw) - len(present)
    if not present:
        raise DataError(f"{path}: column {name!r} is missing in every row; drop it")
    nums = [_number(v) for v in present]
    n_num = sum(n is not None for n in nums)
    if 0 < n_num < len(present):
        bad = next(v for v, n in zip(present, nums) if n is None)
        raise DataError(f"{path}: column {name!r} mixes numbers and text (e.g. {bad!r}); "
                        "make it one type")
    if n_num == len(present):
        vals = np.array([_number(v) if v.strip() not in ("", "nan", "NaN", "NA") else np.nan
                         for v in raw], dtype=np.float64)
        if np.isinf(vals).any():
            raise DataError(f"{path}: column {name!r} holds infinities; replace them")
        vals[np.isnan(vals)] = float(np.nanmedian(vals))
        return vals, None, n_missing
    cats = sorted(set(present)) + ([MISSING] if n_missing else [])
    mapping = {c: i for i, c in enumerate(cats)}
    vals = np.array([mapping[v] if v in mapping else mapping[MISSING] for v in raw],
                    dtype=np.float64)
    return vals, mapping, n_missing


def load_tabular(path: str | Path, label_column: str, id_column: str | None = None,
                 min_rows: int = MIN_ROWS) -> TabularData:
    """Read a table (see the module docstring); the label column's values map to 0..K-1."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix.lower() == ".npz":
        return _load_npz(path, min_rows)
    if path.suffix.lower() != ".csv":
        raise DataError(f"{path}: expected a .csv or .npz table (.parquet is not supported yet)")
    try:
        rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8-sig"), newline="")))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a readable UTF-8 CSV ({exc})") from None
    if not rows:
        raise DataError(f"{path}: empty file")
    header, body = rows[0], [r for r in rows[1:] if r]
    if not body:
        raise DataError(f"{path}: header only, no rows")
    if label_column not in header:
        raise DataError(f"{path}: no label column {label_column!r}; found {header[:10]}")
    if id_column is not None and id_column not in header:
        raise DataError(f"{path}: no id column {id_column!r}; found {header[:10]}")
    if len(body) < min_rows:
        raise DataError(f"{path}: {len(body)} rows; a scan needs at least {min_rows}")
    short = next((i for i, r in enumerate(body) if len(r) != len(header)), None)
    if short is not None:
        raise DataError(f"{path}: row {short} has {len(body[short])} fields, header has "
                        f"{len(header)}")
    cols = {h: [r[j] for r in body] for j, h in enumerate(header)}
    labels = [v.strip() for v in cols.pop(label_column)]
    if any(v == "" for v in labels):
        raise DataError(f"{path}: {sum(v == '' for v in labels)} row(s) without a label")
    values = sorted(set(labels))
    if len(values) < 2:
        raise DataError(f"{path}: the label column holds one value ({values[0]!r})")
    label_map = {v: i for i, v in enumerate(values)}
    ids: np.ndarray = np.arange(len(body), dtype=np.int64)
    if id_column is not None:
        ids = np.asarray(cols.pop(id_column), dtype=str)
        if len(set(ids.tolist())) != len(ids):
            raise DataError(f"{path}: the id column holds duplicates")
    features, encodings, missing = [], {}, {}
    for name, raw in cols.items():
        vals, mapping, n_missing = _encode_column(name, raw, path)
        features.append(vals)
        if mapping is not None:
            encodings[name] = mapping
        if n_missing:
            missing[name] = n_missing
    if not features:
        raise DataError(f"{path}: no feature columns besides the label")
    x = np.stack(features, axis=1).astype(np.float32)
    return TabularData(x=x, y=np.array([label_map[v] for v in labels], dtype=np.int64),
                       ids=ids, columns=list(cols), encodings=encodings, missing=missing,
                       label_map=label_map)


def _load_npz(path: Path, min_rows: int) -> TabularData:
    with np.load(path, allow_pickle=False) as z:
        if not {"x", "y", "feature_names"} <= set(z.files):
            raise DataError(f"{path}: a tabular .npz needs x, y and feature_names")
        x, y, names = z["x"].astype(np.float64), z["y"], [str(n) for n in z["feature_names"]]
    if x.ndim != 2 or x.shape[1] != len(names) or len(y) != len(x):
        raise DataError(f"{path}: x must be (N, len(feature_names)) with one y per row")
    if len(x) < min_rows:
        raise DataError(f"{path}: {len(x)} rows; a scan needs at least {min_rows}")
    if np.isinf(x).any():
        raise DataError(f"{path}: x holds infinities; replace them")
    missing = {}
    for j, n in enumerate(names):
        nan = np.isnan(x[:, j])
        if nan.all():
            raise DataError(f"{path}: column {n!r} is missing in every row; drop it")
        if nan.any():
            missing[n] = int(nan.sum())
            x[nan, j] = float(np.nanmedian(x[:, j]))
    values = sorted(set(y.tolist()))
    if len(values) < 2:
        raise DataError(f"{path}: y holds one value; a scan needs at least two classes")
    label_map = {str(v): i for i, v in enumerate(values)}
    yy = np.array([label_map[str(v)] for v in y.tolist()], dtype=np.int64)
    return TabularData(x=x.astype(np.float32), y=yy, ids=np.arange(len(x), dtype=np.int64),
                       columns=names, missing=missing, label_map=label_map)


