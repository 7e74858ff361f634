"""What can be pinned: a folder tree, the samples of an ``.npz``, or a URL list.

Item keys: a folder's files by relative POSIX path (``cat/001.png``); an ``.npz``'s samples as
``NAME#ARRAY[i]`` (e.g. ``train.npz#x[12]``); a URL list's rows by their key column when there
is one (img2dataset's ``key``, LAION's ``SAMPLE_ID``), else by URL. With several sources pinned
into one manifest, folder and URL-list keys get the source's name and ``/`` as a prefix.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from poisonguard.errors import ConfigError, DataError

URL_LIST_SUFFIXES = (".csv", ".tsv", ".txt", ".parquet", ".pq")
URL_COLUMNS = ("url",)
KEY_COLUMNS = ("key", "sample_id")
HASH_COLUMNS = ("sha256", "hash")
LABEL_COLUMNS = ("label", "caption", "text")
NPZ_X_KEYS = ("x", "x_train")
NPZ_Y_FOR = {"x": "y", "x_train": "y_train", "x_test": "y_test"}
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_NPZ_KEY = re.compile(r"(?P<arr>.+)\[(?P<i>0|[1-9][0-9]*)\]")


def source_kind(path: str | Path) -> str:
    """``folder``, ``npz`` or ``urls`` from what ``path`` is; ConfigError otherwise."""
    p = Path(path)
    if p.is_dir():
        return "folder"
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    name = p.name.lower()
    if name.endswith(".npz"):
        return "npz"
    if name.endswith(URL_LIST_SUFFIXES):
        return "urls"
    raise ConfigError(f"{p}: cannot pin this kind of file; pin a folder, an .npz, or a URL list "
                      f"({', '.join(URL_LIST_SUFFIXES)})")


@dataclass
class SourceSpec:
    """One pinned source as recorded in the manifest header."""

    kind: str
    name: str
    path: str
    prefix: str
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "path": self.path, "prefix": self.prefix,
                "options": self.options}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SourceSpec:
        return cls(d["kind"], d["name"], d["path"], d["prefix"], dict(d.get("options") or {}))


def plan_sources(paths: list[str]) -> list[SourceSpec]:
    """Kinds, unique names and key prefixes for the sources of one ``pin``."""
    if not paths:
        raise ConfigError("pin needs at least one SOURCE")
    specs: list[SourceSpec] = []
    names: set[str] = set()
    for raw in paths:
        kind = source_kind(raw)
        p = Path(raw).resolve()
        name, n = p.name or "root", 2
        while name in names:
            name, n = f"{p.name}~{n}", n + 1
        names.add(name)
        specs.append(SourceSpec(kind, name, str(p), ""))
    for s in specs:
        if s.kind == "npz":
            s.prefix = f"{s.name}#"
        elif len(specs) > 1:
            s.prefix = f"{s.name}/"
    return specs


# ----------------------------------------------------------------------------- folders
@dataclass(frozen=True)
class Exclusion:
    """Files a walk skips: exact names and name prefixes, per absolute folder path."""

    by_folder: dict[str, tuple[frozenset[str], tuple[str, ...]]] = field(default_factory=dict)

    @classmethod
    def of(cls, *paths: Path, temp_prefixes: bool = True) -> Exclusion:
        """Skip ``paths`` and (by default) the temporary files atomic writes make beside them."""
        from poisonguard.provenance.util import tmp_prefix

        names: dict[str, set[str]] = {}
        prefixes: dict[str, list[str]] = {}
        for p in paths:
            p = p.resolve()
            names.setdefault(str(p.parent), set()).add(p.name)
            if temp_prefixes:
                prefixes.setdefault(str(p.parent), []).append(tmp_prefix(p))
        return cls({d: (frozenset(names.get(d, ())), tuple(prefixes.get(d, ())))
                    for d in set(names) | set(prefixes)})

    def skips(self, folder: str, name: str) -> bool:
        rule = self.by_folder.get(folder)
        if rule is None:
            return False
        return name in rule[0] or (name.startswith(rule[1]) and name.endswith(".tmp"))


def walk_tree(root: str | Path, exclude: Exclusion | None = None
              ) -> Iterator[tuple[str, str]]:
    """Yield ``(relative POSIX path, absolute path)`` of every regular file under ``root``.

    Sorted by relative path in code-point order (each folder's entries are visited sorted by
    name, with ``/`` appended to folder names, which gives the global order); hidden files are
    included; symlinks to files are followed, symlinks to folders are not (no cycles).
    Non-UTF-8 file names raise DataError.
    """
    return _walk(os.path.abspath(os.fspath(root)), "", exclude or Exclusion())


def _walk(folder: str, rel: str, exclude: Exclusion) -> Iterator[tuple[str, str]]:
    try:
        with os.scandir(folder) as it:
            entries = [(e.name + "/" if e.is_dir(follow_symlinks=False) else e.name, e)
                       for e in it]
    except OSError as exc:
        raise DataError(f"{folder}: cannot list folder ({exc.strerror})") from None
    entries.sort(key=lambda t: t[0])
    check = folder in exclude.by_folder
    for sort_name, e in entries:
        try:
            e.name.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"{e.path!r}: file name is not valid UTF-8; rename it before "
                            "pinning") from None
        if sort_name[-1] == "/":
            yield from _walk(e.path, rel + sort_name, exclude)
        elif e.is_file() and not (check and exclude.skips(folder, e.name)):
            yield rel + e.name, e.path


def check_relative_key(key: str, where: str | Path) -> str:
    """A folder item key must be a clean relative POSIX path inside the folder."""
    if (not key or key[0] == "/" or "\\" in key or "\0" in key or "//" in key
            or key[-1] == "/" or any(part in ("..", ".") for part in key.split("/"))):
        raise DataError(f"{where}: item key {key!r} is not a clean relative path inside the "
                        "folder; the manifest is refused")
    return key


# ----------------------------------------------------------------------------- npz
@dataclass
class NpzSamples:
    """The sample array (and labels, when present) of an ``.npz``."""

    path: str
    x_key: str
    x: np.ndarray
    y_key: str | None
    y: np.ndarray | None

    def label(self, i: int) -> str | None:
        return None if self.y is None else _label_str(self.y[i])


def _label_str(v: Any) -> str:
    if isinstance(v, np.generic):
        v = v.item()
    return str(v)


def load_npz_samples(path: str | Path, x_key: str | None = None, y_key: str | None = None
                     ) -> NpzSamples:
    """Load the sample array of an ``.npz`` (``x``, else ``x_train``, else its only array)."""
    try:
        with np.load(path, allow_pickle=False) as arc:
            files = list(arc.files)
            if x_key is None:
                found = [k for k in NPZ_X_KEYS if k in files]
                if found:
                    x_key = found[0]
                elif len(files) == 1:
                    x_key = files[0]
                else:
                    raise ConfigError(f"{path}: cannot tell which array holds the samples "
                                      f"(arrays: {files}); pass --npz-key")
            if x_key not in files:
                raise DataError(f"{path}: no array {x_key!r} (arrays: {files})")
            if y_key is None:
                y_key = NPZ_Y_FOR.get(x_key)
                y_key = y_key if y_key in files else None
            elif y_key not in files:
                raise DataError(f"{path}: no label array {y_key!r} (arrays: {files})")
            x = arc[x_key]
            y = arc[y_key] if y_key else None
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz ({exc})") from None
    if x.ndim < 1:
        raise DataError(f"{path}: array {x_key!r} is a scalar, expected one row per sample")
    if x.dtype.hasobject:
        raise DataError(f"{path}: array {x_key!r} holds Python objects; refused")
    if y is not None and (y.ndim != 1 or len(y) != len(x)):
        raise DataError(f"{path}: labels {y_key!r} have shape {y.shape}, expected ({len(x)},)")
    return NpzSamples(str(path), x_key, x, y_key, y)


def parse_npz_key(relkey: str, x_key: str) -> int | None:
    """Sample index from ``ARRAY[i]``; None when the key does not name a sample of ``x_key``."""
    m = _NPZ_KEY.fullmatch(relkey)
    if not m or m.group("arr") != x_key:
        return None
    return int(m.group("i"))


# ----------------------------------------------------------------------------- URL lists
@dataclass
class UrlRow:
    key: str
    url: str
    sha256: str | None
    label: str | None


@dataclass
class UrlColumns:
    """Which columns of a URL list hold what (recorded in the manifest header)."""

    url: str
    key: str | None
    hash: str | None
    label: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"url_column": self.url, "key_column": self.key, "hash_column": self.hash,
                "label_column": self.label}


def _pick(names: list[str], wanted: str | None, candidates: tuple[str, ...], what: str,
          path: Path, required: bool = False) -> str | None:
    if wanted is not None:
        if wanted.lower() == "none" and not required:
            return None
        if wanted not in names:
            raise ConfigError(f"{path}: no {what} column {wanted!r} (columns: {names})")
        return wanted
    lower = {n.lower(): n for n in names}
    for c in candidates:
        if c in lower:
            return lower[c]
    if required:
        raise DataError(f"{path}: no {what} column (looked for {list(candidates)}; columns: "
                        f"{names}); pass --{what}-column")
    return None


def _header_columns(path: Path) -> list[str]:
    low = path.name.lower()
    if low.endswith((".parquet", ".pq")):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return list(pq.ParquetFile(path).schema_arrow.names)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{path}: not a readable Parquet URL list ({exc})") from None
    if low.endswith(".txt"):
        return ["url"]
    with open(path, encoding="utf-8", newline="") as fh:
        try:
            return next(csv.reader(fh, delimiter="\t" if low.endswith(".tsv") else ","))
        except StopIteration:
            raise DataError(f"{path}: empty URL list (expected a header row)") from None
        except (UnicodeDecodeError, csv.Error) as exc:
            raise DataError(f"{path}: not a readable CSV/TSV URL list ({exc})") from None


def url_columns(path: str | Path, url: str | None = None, key: str | None = None,
                hash_: str | None = None, label: str | None = None) -> UrlColumns:
    """Choose the URL list's columns: explicit names first, else the img2dataset/LAION names.

    A hash column is used only when it holds SHA-256 hex digests: LAION's integer ``hash``
    column (of URL and caption, not of the content) is recognised and ignored.
    """
    path = Path(path)
    names = _header_columns(path)
    cols = UrlColumns(
        url=_pick(names, url, URL_COLUMNS, "url", path, required=True) or "",
        key=_pick(names, key, KEY_COLUMNS, "key", path),
        hash=_pick(names, hash_, HASH_COLUMNS, "hash", path),
        label=_pick(names, label, LABEL_COLUMNS, "label", path))
    if cols.hash is not None and hash_ is None:
        first = next((r.sha256 for r in _raw_rows(path, cols, check_hash=False)
                      if r.sha256), None)
        if first is None or not _HEX64.fullmatch(first):
            cols.hash = None  # not a content SHA-256 column (e.g. LAION's url+text hash)
    return cols


def _raw_rows(path: Path, cols: UrlColumns, check_hash: bool = True) -> Iterator[UrlRow]:
    low = path.name.lower()
    if low.endswith((".parquet", ".pq")):
        yield from _parquet_rows(path, cols, check_hash)
        return
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            if low.endswith(".txt"):
                for n, line in enumerate(fh, start=1):
                    u = line.strip()
                    if u and not u.startswith("#"):
                        yield _row(path, n, u, None, None, None, check_hash)
                return
            reader = csv.reader(fh, delimiter="\t" if low.endswith(".tsv") else ",")
            names = next(reader, [])
            idx = {c: names.index(c) for c in (cols.url, cols.key, cols.hash, cols.label) if c}
            width = max(idx.values()) + 1
            for n, rec in enumerate(reader, start=2):
                if not rec:
                    continue
                if len(rec) < width:
                    raise DataError(f"{path}: row {n} has {len(rec)} fields, expected at least "
                                    f"{width}")
                yield _row(path, n, rec[idx[cols.url]],
                           rec[idx[cols.key]] if cols.key else None,
                           rec[idx[cols.hash]] if cols.hash else None,
                           rec[idx[cols.label]] if cols.label else None, check_hash)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a readable URL list ({exc})") from None


def _parquet_rows(path: Path, cols: UrlColumns, check_hash: bool) -> Iterator[UrlRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    wanted = [c for c in (cols.url, cols.key, cols.hash, cols.label) if c]
    n = 0
    try:
        for rb in pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=8192,
                                                                 columns=wanted):
            data = {c: rb.column(c).to_pylist() for c in wanted}
            for i in range(rb.num_rows):
                n += 1
                yield _row(path, n, data[cols.url][i],
                           data[cols.key][i] if cols.key else None,
                           data[cols.hash][i] if cols.hash else None,
                           data[cols.label][i] if cols.label else None, check_hash)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet URL list ({exc})") from None


def _row(path: Path, n: int, url: Any, key: Any, sha: Any, label: Any, check_hash: bool
         ) -> UrlRow:
    if not isinstance(url, str) or not url.strip():
        raise DataError(f"{path}: row {n} has no URL")
    url = url.strip()
    key_s = url if key is None or key == "" else str(key)
    sha_s = None if sha is None or sha == "" else str(sha).strip()
    if sha_s is not None and check_hash:
        if not _HEX64.fullmatch(sha_s):
            raise DataError(f"{path}: row {n}: hash {sha_s[:80]!r} is not a 64-hex-digit "
                            "SHA-256 (pass --hash-column none to fetch and hash instead)")
        sha_s = sha_s.lower()
    return UrlRow(key_s, url, sha_s, None if label is None else str(label))


def iter_url_rows(path: str | Path, cols: UrlColumns) -> Iterator[UrlRow]:
    """Stream the rows of a URL list (CSV/TSV with a header row, TXT one URL a line, Parquet)."""
    return _raw_rows(Path(path), cols)
