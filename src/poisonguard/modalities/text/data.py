"""Text datasets: posts and labels from .csv, .tsv, .jsonl or .parquet (optionally .gz).

Texts are kept exactly as written (Unicode and emoji untouched); string labels are mapped to
0..K-1 in sorted order and the map is kept (``TextData.label_map``); an ``id`` column, when
present, gives the ids. Every problem is one :class:`~poisonguard.errors.DataError` line.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from poisonguard.data.labeled import LabeledData
from poisonguard.errors import DataError

TEXT_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")
MIN_ROWS = 20
# a post longer than this many characters is cut (recorded in TextData.n_cut): the model reads
# at most a few hundred tokens, and a 50 MB post must not exhaust memory
MAX_CHARS = 20_000


def text_suffix(path: str | Path) -> str | None:
    """``.csv``/``.tsv``/``.jsonl``/``.parquet`` (a trailing ``.gz`` ignored), or None."""
    name = Path(path).name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return next((s for s in TEXT_SUFFIXES if name.endswith(s)), None)


@dataclass(frozen=True)
class TextData(LabeledData):
    """Posts ``x`` (N,) object array of str, labels ``y`` (N,) int64, unique ``ids``;
    ``label_map`` maps each original label (as written in the file) to its integer."""

    label_map: dict[str, int] = field(default_factory=dict)
    n_cut: int = 0

    @classmethod
    def from_texts(cls, texts: list[str] | np.ndarray, labels: list[Any] | np.ndarray,
                   ids: list[Any] | np.ndarray | None = None, name: str = "data",
                   label_map: dict[str, int] | None = None) -> TextData:
        """Validate and build; string labels are mapped (sorted) unless ``label_map`` given."""
        texts = [str(t) for t in texts]
        if len(texts) != len(labels):
            raise DataError(f"{name}: {len(texts)} texts but {len(labels)} labels")
        empty = [i for i, t in enumerate(texts) if not t.strip()]
        if empty:
            raise DataError(f"{name}: {len(empty)} empty text(s) (first at row {empty[0]}); "
                            "drop or fill them")
        n_cut = sum(len(t) > MAX_CHARS for t in texts)
        texts = [t[:MAX_CHARS] for t in texts]
        y, label_map = _map_labels(list(labels), name, label_map)
        if ids is None:
            ids_arr = np.arange(len(texts), dtype=np.int64)
        else:
            ids_arr = np.asarray([str(i) for i in ids], dtype=str)
            if len(set(ids_arr.tolist())) != len(ids_arr):
                raise DataError(f"{name}: the id column holds duplicates; ids must be unique")
        x = np.empty(len(texts), dtype=object)
        x[:] = texts
        return cls(x=x, y=y, ids=ids_arr, label_map=label_map, n_cut=n_cut)

    def subset(self, index: np.ndarray) -> TextData:
        index = np.asarray(index)
        return TextData(x=self.x[index], y=self.y[index], ids=self.ids[index],
                        label_map=self.label_map, n_cut=self.n_cut)

    @property
    def texts(self) -> list[str]:
        return self.x.tolist()

    @property
    def is_image(self) -> bool:
        return False

    def fingerprint(self) -> str:
        """sha256 over the UTF-8 texts and the labels."""
        h = hashlib.sha256()
        for t in self.x:
            b = t.encode("utf-8", "surrogatepass")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
        h.update(np.ascontiguousarray(self.y).tobytes())
        return h.hexdigest()


def _map_labels(labels: list[Any], name: str, given: dict[str, int] | None
                ) -> tuple[np.ndarray, dict[str, int]]:
    raw = ["" if v is None else str(v).strip() for v in labels]
    if any(v == "" for v in raw):
        raise DataError(f"{name}: {sum(v == '' for v in raw)} row(s) without a label")
    if given is not None:
        unknown = sorted(set(raw) - set(given))
        if unknown:
            raise DataError(f"{name}: labels {unknown[:5]} are not in the training labels "
                            f"{sorted(given)}")
        return np.array([given[v] for v in raw], dtype=np.int64), dict(given)
    values = sorted(set(raw))
    if len(values) < 2:
        raise DataError(f"{name}: the label column holds one value ({values[0]!r}); a scan "
                        "needs at least two classes")
    if all(_is_int(v) for v in values):  # numeric labels keep their order (0..K-1 stay)
        ints = sorted({int(v) for v in values})
        mapping = {str(v): i for i, v in enumerate(ints)}
        return np.array([mapping[str(int(v))] for v in raw], dtype=np.int64), mapping
    mapping = {v: i for i, v in enumerate(values)}
    return np.array([mapping[v] for v in raw], dtype=np.int64), mapping


def _is_int(v: str) -> bool:
    try:
        int(v)
    except ValueError:
        return False
    return True


def _read_bytes(path: Path) -> str:
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory; expected a .csv, .tsv, .jsonl or .parquet file")
    raw = path.read_bytes()
    if path.name.lower().endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: not a readable gzip file ({exc})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 1]!r}); "
                        "re-save the file as UTF-8") from None


def _rows(path: Path, suffix: str) -> list[dict[str, Any]]:
    if suffix == ".parquet":
        try:
            import pandas as pd
        except ImportError:
            raise DataError(f"{path}: reading .parquet needs pandas and pyarrow (pip install "
                            "pandas pyarrow), or save the posts as .csv/.jsonl") from None
        try:
            frame = pd.read_parquet(path)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises many types
            raise DataError(f"{path}: not a readable parquet file ({exc})") from None
        return frame.to_dict(orient="records")
    text = _read_bytes(path)
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {n} is not JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {n} is not a JSON object")
            rows.append(row)
        return rows
    csv.field_size_limit(2**31 - 1)
    reader = csv.DictReader(io.StringIO(text, newline=""),
                            delimiter="\t" if suffix == ".tsv" else ",")
    try:
        return list(reader)
    except csv.Error as exc:
        raise DataError(f"{path}: not a readable {suffix[1:]} file ({exc})") from None


def load_text(path: str | Path, text_column: str = "text", label_column: str = "label",
              label_map: dict[str, int] | None = None, min_rows: int = MIN_ROWS) -> TextData:
    """Read posts and labels from ``path`` (see the module docstring)."""
    path = Path(path)
    suffix = text_suffix(path)
    if suffix is None:
        raise DataError(f"{path}: expected a .csv, .tsv, .jsonl or .parquet file (optionally "
                        ".gz)")
    rows = _rows(path, suffix)
    if not rows:
        raise DataError(f"{path}: no rows")
    columns = list(rows[0].keys())
    missing = [c for c in (text_column, label_column) if c not in columns]
    if missing:
        raise DataError(f"{path}: no column(s) {missing}; found {columns[:10]}; name them with "
                        "--text-column / --label-column")
    if len(rows) < min_rows:
        raise DataError(f"{path}: {len(rows)} rows; a scan needs at least {min_rows}")
    texts = ["" if r.get(text_column) is None else str(r[text_column]) for r in rows]
    labels = [r.get(label_column) for r in rows]
    ids = [r.get("id") for r in rows] if "id" in columns else None
    if ids is not None and any(i is None or str(i) == "" for i in ids):
        raise DataError(f"{path}: the id column has empty values")
    return TextData.from_texts(texts, labels, ids, name=str(path), label_map=label_map)


def read_column(path: str | Path, name: str) -> list[Any] | None:
    """The values of column ``name`` (None when the file has no such column)."""
    path = Path(path)
    rows = _rows(path, text_suffix(path) or ".csv")
    if not rows or name not in rows[0]:
        return None
    return [r.get(name) for r in rows]



def read_poison_column(path: str | Path) -> np.ndarray | None:
    """The file's ``is_poison`` column (as ``attack`` writes it) as booleans; None when absent;
    :class:`DataError` when it holds anything but 0/1."""
    column = read_column(path, "is_poison")
    if column is None:
        return None
    try:
        return np.array([int(v) for v in column], dtype=bool)
    except (TypeError, ValueError):
        raise DataError(f"{path}: is_poison holds values other than 0/1") from None

def original_labels(data: TextData) -> list[Any]:
    """Each post's label as the file wrote it (the inverse of ``label_map``)."""
    inverse = {v: k for k, v in data.label_map.items()}
    return [inverse.get(int(v), int(v)) for v in data.y]


def write_text_csv(path: str | Path, texts: list[str], labels: np.ndarray | list[Any],
                   extra: dict[str, list[Any]] | None = None) -> None:
    """Write ``text,label[,extra...]`` as UTF-8 CSV (atomically); labels as given."""
    from poisonguard.io import atomic_write_csv

    extra = extra or {}
    header = ["text", "label", *extra]
    rows = ([t, lab.item() if isinstance(lab, np.generic) else lab,
             *(extra[k][i] for k in extra)]
            for i, (t, lab) in enumerate(zip(texts, labels)))
    atomic_write_csv(path, header, rows)
