"""Tabular datasets from .csv, .parquet or .npz (``x``, ``y``, ``feature_names``).

Numeric columns stay numbers; a column whose non-missing values are all non-numeric is
categorical, its strings encoded as 0..K-1 in sorted order (``TabularData.encodings``); a
column mixing numbers and strings is refused. Missing values (empty cells, NaN, Parquet nulls)
are replaced by the column median (numeric) or a ``<missing>`` category, and counted per column
(``TabularData.missing``). In an .npz, a ``categories_<col>`` array of strings makes ``<col>``
categorical (its codes index the array). Every problem is one
:class:`~poisonguard.errors.DataError` line.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from poisonguard.data.labeled import LabeledData
from poisonguard.errors import DataError

MIN_ROWS = 20
MISSING = "<missing>"
TABULAR_SUFFIXES = (".csv", ".parquet", ".npz")
_NA = ("", "nan", "NaN", "NA", "None", "null")


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

    def subset(self, index: np.ndarray) -> TabularData:
        index = np.asarray(index)
        return self.replace(x=self.x[index], y=self.y[index], ids=self.ids[index])

    def replace(self, **changes: Any) -> TabularData:
        """A copy with ``x``/``y``/``ids`` (or any field) replaced; column metadata kept."""
        kw = {"x": self.x, "y": self.y, "ids": self.ids, "columns": self.columns,
              "encodings": self.encodings, "missing": self.missing,
              "label_map": self.label_map, **changes}
        return TabularData(**kw)

    @property
    def categorical(self) -> list[int]:
        """Indices of the categorical columns."""
        return [j for j, c in enumerate(self.columns) if c in self.encodings]

    def cardinality(self, j: int) -> int:
        return len(self.encodings[self.columns[j]])

    def decode(self, j: int, code: float) -> Any:
        """Column ``j``'s value as the file wrote it (the category string, or the number)."""
        col = self.columns[j]
        if col in self.encodings:
            inverse = {v: k for k, v in self.encodings[col].items()}
            return inverse.get(int(round(code)), int(round(code)))
        v = float(code)
        return int(v) if v.is_integer() else round(v, 6)

    def encode(self, j: int, value: Any) -> float:
        """The code of ``value`` in column ``j`` (the number itself for a numeric column)."""
        col = self.columns[j]
        if col in self.encodings:
            if str(value) not in self.encodings[col]:
                raise DataError(f"column {col!r} has no value {value!r}; it holds "
                                f"{sorted(self.encodings[col])[:10]}")
            return float(self.encodings[col][str(value)])
        return float(value)

    def original_label(self, code: int) -> str:
        inverse = {v: k for k, v in self.label_map.items()}
        return inverse.get(int(code), str(code))


def tabular_suffix(path: str | Path) -> str | None:
    name = Path(path).name.lower()
    return next((s for s in TABULAR_SUFFIXES if name.endswith(s)), None)


def header_of(path: str | Path) -> list[str] | None:
    """The column names of a .csv/.parquet file, or an .npz's ``feature_names`` (None when
    the file cannot be read as such)."""
    path = Path(path)
    suffix = tabular_suffix(path)
    try:
        if suffix == ".csv":
            with open(path, encoding="utf-8-sig", newline="") as f:
                return next(csv.reader(f), [])
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return ([str(n) for n in z["feature_names"]]
                        if "feature_names" in z.files else None)
    except (OSError, ValueError, UnicodeDecodeError, csv.Error):
        return None
    except Exception:  # pyarrow's own errors (ArrowInvalid) are not OSError subclasses
        return None
    return None


def _number(v: str) -> float | None:
    try:
        return float(v)
    except ValueError:
        return None


def _encode_column(name: str, raw: list[str], path: Path) -> tuple[np.ndarray, dict | None, int]:
    present = [v for v in raw if v.strip() not in _NA]
    n_missing = len(raw) - len(present)
    if not present:
        raise DataError(f"{path}: column {name!r} is missing in every row; drop it")
    nums = [_number(v) for v in present]
    n_num = sum(n is not None for n in nums)
    if 0 < n_num < len(present):
        bad = next(v for v, n in zip(present, nums) if n is None)
        good = next(v for v, n in zip(present, nums) if n is not None)
        raise DataError(f"{path}: column {name!r} mixes numbers and text (e.g. {good!r} and "
                        f"{bad!r}); make it one type")
    if n_num == len(present):
        vals = np.array([_number(v) if v.strip() not in _NA else np.nan for v in raw],
                        dtype=np.float64)
        if np.isinf(vals).any():
            raise DataError(f"{path}: column {name!r} holds infinities; replace them")
        vals[np.isnan(vals)] = float(np.nanmedian(vals))
        return vals, None, n_missing
    cats = sorted(set(present)) + ([MISSING] if n_missing else [])
    mapping = {c: i for i, c in enumerate(cats)}
    vals = np.array([mapping[v] if v in mapping else mapping[MISSING] for v in raw],
                    dtype=np.float64)
    return vals, mapping, n_missing


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return str(v)


def _read_parquet(path: Path) -> tuple[list[str], dict[str, list[str]]]:
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    except Exception as exc:  # pyarrow raises its own ArrowInvalid for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})"
                        ) from None
    header = list(table.column_names)
    return header, {h: [_cell(v) for v in table.column(h).to_pylist()] for h in header}


def _read_csv(path: Path) -> tuple[list[str], dict[str, list[str]]]:
    try:
        rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8-sig"), newline="")))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a readable UTF-8 CSV ({exc})") from None
    if not rows:
        raise DataError(f"{path}: empty file")
    header, body = rows[0], [r for r in rows[1:] if r]
    short = next((i for i, r in enumerate(body) if len(r) != len(header)), None)
    if short is not None:
        raise DataError(f"{path}: row {short} has {len(body[short])} fields, header has "
                        f"{len(header)}")
    return header, {h: [r[j] for r in body] for j, h in enumerate(header)}


def load_tabular(path: str | Path, label_column: str, id_column: str | None = None,
                 min_rows: int = MIN_ROWS, label_map: dict[str, int] | None = None
                 ) -> TabularData:
    """Read a table (see the module docstring); the label column's values map to 0..K-1
    (sorted), or through ``label_map`` (a test set read with its training set's map)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = tabular_suffix(path)
    if suffix == ".npz":
        return _load_npz(path, min_rows)
    if suffix is None:
        raise DataError(f"{path}: expected a .csv, .parquet or .npz table")
    header, cols = _read_parquet(path) if suffix == ".parquet" else _read_csv(path)
    if len(set(header)) != len(header):
        dup = next(h for h in header if header.count(h) > 1)
        raise DataError(f"{path}: column {dup!r} appears twice in the header")
    n = len(next(iter(cols.values()))) if cols else 0
    if n == 0:
        raise DataError(f"{path}: header only, no rows")
    if label_column not in header:
        raise DataError(f"{path}: no label column {label_column!r}; found {header[:10]}")
    if id_column is not None and id_column not in header:
        raise DataError(f"{path}: no id column {id_column!r}; found {header[:10]}")
    if n < min_rows:
        raise DataError(f"{path}: {n} rows; a scan needs at least {min_rows}")
    labels = [v.strip() for v in cols.pop(label_column)]
    if any(v in _NA for v in labels):
        raise DataError(f"{path}: {sum(v in _NA for v in labels)} row(s) without a label in "
                        f"{label_column!r}")
    values = sorted(set(labels))
    if label_map is None:
        if len(values) < 2:
            raise DataError(f"{path}: the label column {label_column!r} holds one value "
                            f"({values[0]!r}); a scan needs at least two classes")
        label_map = {v: i for i, v in enumerate(values)}
    unknown = [v for v in values if v not in label_map]
    if unknown:
        raise DataError(f"{path}: label(s) {unknown[:5]} not in the training labels")
    ids: np.ndarray = np.arange(n, dtype=np.int64)
    if id_column is not None:
        ids = np.asarray([v.strip() for v in cols.pop(id_column)], dtype=str)
        if len(set(ids.tolist())) != len(ids):
            raise DataError(f"{path}: the id column {id_column!r} holds duplicates")
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
    try:
        with np.load(path, allow_pickle=False) as z:
            if not {"x", "y", "feature_names"} <= set(z.files):
                raise DataError(f"{path}: a tabular .npz needs x, y and feature_names")
            x, y = z["x"].astype(np.float64), z["y"]
            names = [str(n) for n in z["feature_names"]]
            cats = {n: [str(v) for v in z[f"categories_{n}"]] for n in names
                    if f"categories_{n}" in z.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz ({exc})") from None
    if x.ndim != 2 or x.shape[1] != len(names) or len(y) != len(x):
        raise DataError(f"{path}: x must be (N, len(feature_names)) with one y per row")
    if len(x) == 0:
        raise DataError(f"{path}: no rows")
    if len(x) < min_rows:
        raise DataError(f"{path}: {len(x)} rows; a scan needs at least {min_rows}")
    if np.isinf(x).any():
        bad = names[int(np.flatnonzero(np.isinf(x).any(0))[0])]
        raise DataError(f"{path}: column {bad!r} holds infinities; replace them")
    missing = {}
    for j, n in enumerate(names):
        nan = np.isnan(x[:, j])
        if nan.all():
            raise DataError(f"{path}: column {n!r} is missing in every row; drop it")
        if nan.any():
            missing[n] = int(nan.sum())
            x[nan, j] = float(np.nanmedian(x[:, j]))
    encodings = {}
    for n, values in cats.items():
        j = names.index(n)
        codes = x[:, j]
        if (codes != np.round(codes)).any() or codes.min() < 0 or codes.max() >= len(values):
            raise DataError(f"{path}: column {n!r} has codes outside 0..{len(values) - 1} of "
                            f"categories_{n}")
        encodings[n] = {v: i for i, v in enumerate(values)}
    values = sorted(set(y.tolist()))
    if len(values) < 2:
        raise DataError(f"{path}: y holds one value; a scan needs at least two classes")
    label_map = {str(v): i for i, v in enumerate(values)}
    yy = np.array([label_map[str(v)] for v in y.tolist()], dtype=np.int64)
    return TabularData(x=x.astype(np.float32), y=yy, ids=np.arange(len(x), dtype=np.int64),
                       columns=names, encodings=encodings, missing=missing,
                       label_map=label_map)
