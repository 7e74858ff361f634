"""Where feature rows come from, a bounded chunk at a time.

A source lists :class:`ChunkRef` s (which rows a task reads) and reads one ref as batches of at
most ``batch_rows`` rows: ``(rows, x, y)`` with global row indices, float64 features (n, d) and
int64 labels. Sources are small picklable objects (paths and column names), so Dask workers
read the files themselves; the files must be visible to every worker.

* :class:`ArraySource`: arrays already in memory (the in-memory path).
* :class:`ParquetSource`: one Parquet file or a folder of ``*.parquet`` shards (name order), one
  float column per feature or one list column, read by row groups with pyarrow.
* :class:`NpySource`: a 2-D ``.npy`` memmap with its labels in a 1-D ``.npy`` beside it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from poisonguard.errors import DataError

Batch = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class ChunkRef:
    """Rows ``offset .. offset + n_rows`` of the concatenated data: in file ``file`` (index into
    the source's files), row groups ``groups`` (Parquet) or the row range itself (arrays)."""

    file: int
    groups: tuple[int, ...]
    offset: int
    n_rows: int


def check_batch(rows: np.ndarray, x: np.ndarray, y: np.ndarray, where: str) -> Batch:
    """Finite features, integral labels: otherwise a DataError naming the first bad row."""
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise DataError(f"{where}: row {int(rows[np.argmax(bad)])} has a NaN or infinite "
                        f"feature ({int(bad.sum())} such rows in its chunk); drop or impute them")
    if y.dtype.kind == "f":
        if not np.isfinite(y).all() or np.any(y != np.round(y)):
            raise DataError(f"{where}: labels must be integers; found a missing or fractional "
                            "label")
    elif y.dtype.kind not in "iu":
        raise DataError(f"{where}: labels must be integers, found dtype {y.dtype}")
    return rows, x, y.astype(np.int64)


@dataclass(frozen=True)
class ArraySource:
    """In-memory features (n, d) and labels (n,), cut into chunks of ``chunk_rows``."""

    x: np.ndarray
    y: np.ndarray
    chunk_rows: int = 1 << 62
    name: str = "arrays"

    def __post_init__(self) -> None:
        if self.x.ndim != 2 or self.y.ndim != 1 or len(self.x) != len(self.y) or not len(self.y):
            raise DataError(f"{self.name}: features must be 2-D and labels 1-D of the same "
                            f"non-zero length, got {self.x.shape} and {self.y.shape}")

    @property
    def n_features(self) -> int:
        return int(self.x.shape[1])

    def chunks(self) -> list[ChunkRef]:
        n, step = len(self.y), max(1, self.chunk_rows)
        return [ChunkRef(0, (), s, min(step, n - s)) for s in range(0, n, step)]

    def read(self, ref: ChunkRef, batch_rows: int) -> Iterator[Batch]:
        for s in range(ref.offset, ref.offset + ref.n_rows, max(1, batch_rows)):
            e = min(s + batch_rows, ref.offset + ref.n_rows)
            yield check_batch(np.arange(s, e), np.asarray(self.x[s:e], dtype=np.float64),
                              np.asarray(self.y[s:e]), self.name)


@dataclass(frozen=True)
class NpySource:
    """``features`` (.npy, 2-D numeric) and ``labels`` (.npy, 1-D integers), both memmapped."""

    features: str
    labels: str
    chunk_rows: int = 131072

    def _open(self) -> tuple[np.ndarray, np.ndarray]:
        try:
            x = np.load(self.features, mmap_mode="r", allow_pickle=False)
            y = np.load(self.labels, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{self.features}: not a readable .npy pair with {self.labels} "
                            f"({exc})") from None
        return x, y

    def validate(self) -> None:
        x, y = self._open()
        if x.ndim != 2 or x.dtype.kind not in "fiu":
            raise DataError(f"{self.features}: features must be a 2-D numeric array, got shape "
                            f"{x.shape} dtype {x.dtype}")
        if y.ndim != 1 or len(y) != len(x) or not len(y):
            raise DataError(f"{self.labels}: labels must be 1-D with one per feature row "
                            f"({len(x)}), got shape {y.shape}")
        if y.dtype.kind not in "iuf":
            raise DataError(f"{self.labels}: labels must be integers, found dtype {y.dtype}")

    @property
    def n_features(self) -> int:
        return int(self._open()[0].shape[1])

    def chunks(self) -> list[ChunkRef]:
        n, step = len(self._open()[1]), max(1, self.chunk_rows)
        return [ChunkRef(0, (), s, min(step, n - s)) for s in range(0, n, step)]

    def read(self, ref: ChunkRef, batch_rows: int) -> Iterator[Batch]:
        x, y = self._open()
        for s in range(ref.offset, ref.offset + ref.n_rows, max(1, batch_rows)):
            e = min(s + batch_rows, ref.offset + ref.n_rows)
            yield check_batch(np.arange(s, e), np.asarray(x[s:e], dtype=np.float64),
                              np.asarray(y[s:e]), self.features)


@dataclass(frozen=True)
class ParquetSource:
    """Parquet ``files`` (in order) with ``label`` and feature ``columns``; ``list_column`` when
    the features are one list column. Build it with :func:`open_parquet`."""

    files: tuple[str, ...]
    label: str
    columns: tuple[str, ...]
    list_column: bool
    dims: int
    chunk_rows: int = 131072
    group_rows: tuple[tuple[int, ...], ...] = field(default=(), repr=False)

    @property
    def n_features(self) -> int:
        return self.dims

    def chunks(self) -> list[ChunkRef]:
        """Consecutive row groups of one file joined until they hold ``chunk_rows`` rows."""
        refs, offset = [], 0
        for f, sizes in enumerate(self.group_rows):
            start, groups, rows = offset, [], 0
            for g, size in enumerate(sizes):
                if groups and rows + size > self.chunk_rows:
                    refs.append(ChunkRef(f, tuple(groups), start, rows))
                    start, groups, rows = start + rows, [], 0
                groups.append(g)
                rows += size
            if groups:
                refs.append(ChunkRef(f, tuple(groups), start, rows))
            offset += sum(sizes)
        return refs

    def read(self, ref: ChunkRef, batch_rows: int) -> Iterator[Batch]:
        import pyarrow.parquet as pq

        path = self.files[ref.file]
        start = ref.offset
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=max(1, batch_rows), row_groups=list(ref.groups),
                                     columns=[self.label, *self.columns], use_threads=False):
            n = batch.num_rows
            rows = np.arange(start, start + n)
            start += n
            y = batch.column(0)
            if y.null_count:
                raise DataError(f"{path}: label column {self.label!r} has missing values "
                                f"(rows {rows[0]}..{rows[-1]})")
            if self.list_column:
                x = _list_to_matrix(batch.column(1), self.dims, path)
            else:
                x = np.empty((n, len(self.columns)))
                for i in range(len(self.columns)):
                    x[:, i] = batch.column(i + 1).to_numpy(zero_copy_only=False)
            yield check_batch(rows, x, y.to_numpy(zero_copy_only=False), path)


def _list_to_matrix(arr: object, dims: int, path: str) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    if arr.null_count:
        raise DataError(f"{path}: the feature list column has missing rows")
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    if np.any(lengths != dims):
        raise DataError(f"{path}: feature lists must all hold {dims} values, found a row with "
                        f"{int(lengths[lengths != dims][0])}")
    flat = pc.cast(pc.list_flatten(arr), pa.float64()).to_numpy(zero_copy_only=False)
    return flat.reshape(len(lengths), dims)


def _is_numeric(t: object) -> bool:
    import pyarrow as pa

    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _is_list(t: object) -> bool:
    import pyarrow as pa

    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def parquet_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".parquet" and p.is_file())
        if not files:
            raise DataError(f"{path}: a folder with no *.parquet shards")
        return files
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    return [path]


def open_parquet(path: str | Path, label: str, columns: list[str] | None = None,
                 chunk_rows: int = 131072) -> ParquetSource:
    """Check every shard's schema (label column present, feature columns numeric or one list
    column of a fixed length, the same in every shard) and return the source."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = parquet_files(path)
    chosen: tuple[str, ...] | None = None
    is_list, dims, group_rows = False, 0, []
    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"{f}: not a readable Parquet file ({exc})") from None
        schema = pf.schema_arrow
        names = list(schema.names)
        if label not in names:
            raise DataError(f"{f}: no label column {label!r} (columns: "
                            f"{', '.join(names[:12])}{'…' if len(names) > 12 else ''}); "
                            "name it with --label-column")
        if not (_is_numeric(schema.field(label).type)):
            raise DataError(f"{f}: label column {label!r} is {schema.field(label).type}, "
                            "expected integers")
        want = list(columns) if columns else [n for n in names if n != label]
        missing = [c for c in want if c not in names]
        if missing:
            raise DataError(f"{f}: no feature column(s) {', '.join(missing)}")
        if not want:
            raise DataError(f"{f}: no feature columns besides the label {label!r}")
        types = {c: schema.field(c).type for c in want}
        lists = [c for c in want if _is_list(types[c])]
        if lists and len(want) > 1:
            raise DataError(f"{f}: list column {lists[0]!r} mixed with other feature columns; "
                            "pick the features with --feature-columns")
        if lists:
            vt = types[lists[0]].value_type
            if not _is_numeric(vt):
                raise DataError(f"{f}: feature list column {lists[0]!r} holds {vt}, expected "
                                "numbers")
        else:
            bad = [c for c in want if not _is_numeric(types[c])]
            if bad:
                raise DataError(f"{f}: non-numeric feature column(s) "
                                f"{', '.join(f'{c} ({types[c]})' for c in bad[:5])}; name the "
                                "numeric ones with --feature-columns")
        if chosen is not None and tuple(want) != chosen:
            raise DataError(f"{f}: its feature columns differ from {files[0]}'s")
        chosen, is_list = tuple(want), bool(lists)
        if is_list and not dims:
            dims = _list_dims(pf, chosen[0], types[chosen[0]], f)
        elif not is_list:
            dims = len(chosen)
        meta = pf.metadata
        group_rows.append(tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups)))
    if sum(sum(g) for g in group_rows) == 0:
        raise DataError(f"{path}: no rows")
    assert chosen is not None
    return ParquetSource(tuple(str(f) for f in files), label, chosen, is_list, dims,
                         chunk_rows, tuple(group_rows))


def _list_dims(pf: object, column: str, typ: object, path: Path) -> int:
    import pyarrow as pa

    if pa.types.is_fixed_size_list(typ):
        return int(typ.list_size)
    for batch in pf.iter_batches(batch_size=1, columns=[column]):
        if batch.num_rows:
            first = batch.column(0)[0].as_py()
            if not first:
                raise DataError(f"{path}: the first feature list is empty or missing")
            return len(first)
    raise DataError(f"{path}: no rows")
