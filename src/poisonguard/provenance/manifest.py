"""Manifests: one record per pinned item, plus a header naming the tool, options and sources.

Two formats, the same content:

* **Parquet** (``.parquet``/``.pq``): columns :data:`SCHEMA`; the header is a JSON document in
  the file's key/value metadata under ``poisonguard.manifest`` (written last, in the footer, so
  a truncated file has no header and is refused).
* **JSONL** (``.jsonl``/``.ndjson``, for small sets): first line ``{"poisonguard_manifest":
  HEADER}``, then one JSON object per item, last line ``{"poisonguard_manifest_end":
  {"item_count": N, "items_digest": D}}``.

Integrity: ``items_digest`` is the SHA-256 of the canonical item lines (:func:`canonical_lines`)
in file order; the *manifest digest* (:func:`manifest_digest`, what a signature covers) is the
SHA-256 of the canonical header JSON, which includes ``item_count`` and ``items_digest``. Readers
stream the items in batches (a million-row manifest is never loaded whole), recompute both and
refuse the manifest at the end of the stream when anything disagrees or a key repeats; callers
must not trust a result before the stream has ended without an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from poisonguard import __version__
from poisonguard.errors import IntegrityError
from poisonguard.provenance.errors import ManifestError
from poisonguard.provenance.util import FP_DTYPE, atomic_output, fingerprints

FORMAT_NAME = "poisonguard-manifest"
FORMAT_VERSION = 1
HASH_ALGORITHM = "sha256"
PARQUET_META_KEY = b"poisonguard.manifest"
JSONL_HEADER_KEY = "poisonguard_manifest"
JSONL_END_KEY = "poisonguard_manifest_end"
SOURCE_KINDS = ("folder", "npz", "urls")
BATCH_ROWS = 65_536

COLUMNS = ("key", "source", "size", "sha256", "pinned_at", "label", "url")
SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("source", pa.int32(), nullable=False),
    pa.field("size", pa.int64()),
    pa.field("sha256", pa.string(), nullable=False),
    pa.field("pinned_at", pa.string(), nullable=False),
    pa.field("label", pa.string()),
    pa.field("url", pa.string()),
])
_REQUIRED = ("key", "source", "sha256", "pinned_at")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_ISO_TIME = (r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
             r"(Z|[+-][0-9]{2}:[0-9]{2})")
_encode_str = json.encoder.encode_basestring  # JSON string literal, as json.dumps writes it


@dataclass
class ItemBatch:
    """A batch of manifest items, column-wise (parallel lists)."""

    key: list[str] = field(default_factory=list)
    source: list[int] = field(default_factory=list)
    size: list[int | None] = field(default_factory=list)
    sha256: list[str] = field(default_factory=list)
    pinned_at: list[str] = field(default_factory=list)
    label: list[str | None] = field(default_factory=list)
    url: list[str | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.key)

    def append(self, key: str, source: int, size: int | None, sha256: str, pinned_at: str,
               label: str | None = None, url: str | None = None) -> None:
        self.key.append(key)
        self.source.append(source)
        self.size.append(size)
        self.sha256.append(sha256)
        self.pinned_at.append(pinned_at)
        self.label.append(label)
        self.url.append(url)

    def columns(self) -> tuple[list[Any], ...]:
        return (self.key, self.source, self.size, self.sha256, self.pinned_at, self.label,
                self.url)

    def rows(self) -> Iterator[dict[str, Any]]:
        for values in zip(*self.columns()):
            yield dict(zip(COLUMNS, values))

    def to_arrow(self) -> pa.RecordBatch:
        return pa.record_batch([pa.array(c, type=f.type) for c, f in zip(self.columns(), SCHEMA)],
                               schema=SCHEMA)

    @classmethod
    def from_arrow(cls, batch: pa.RecordBatch | pa.Table) -> ItemBatch:
        return cls(*(batch.column(name).to_pylist() for name in COLUMNS))


def canonical_lines(batch: ItemBatch) -> bytes:
    """The canonical bytes of a batch: per item, the compact JSON array
    ``[key, source, size, sha256, pinned_at, label, url]`` (UTF-8, no ASCII escaping) + ``\\n``,
    exactly as ``json.dumps(row, separators=(",", ":"), ensure_ascii=False)`` writes it.
    """
    esc = _encode_str

    def opt(v: str | None) -> str:
        return "null" if v is None else esc(v)

    return "".join([
        f"[{esc(k)},{s},{'null' if n is None else n},{esc(h)},{esc(t)},{opt(lab)},{opt(u)}]\n"
        for k, s, n, h, t, lab, u in zip(*batch.columns())]).encode("utf-8")


def canonical_header(header: dict[str, Any]) -> bytes:
    """The header as canonical JSON: sorted keys, compact separators, UTF-8."""
    return json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def manifest_digest(header: dict[str, Any]) -> str:
    """SHA-256 (hex) that identifies a manifest: covers the header, item count and items digest."""
    return hashlib.sha256(b"poisonguard-manifest-v1\n" + canonical_header(header)).hexdigest()


def new_header(sources: list[dict[str, Any]], options: dict[str, Any], created: str
               ) -> dict[str, Any]:
    """A header without ``item_count``/``items_digest`` (added when the items are written)."""
    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            "tool": {"name": "poisonguard", "version": __version__},
            "created": created, "hash_algorithm": HASH_ALGORITHM,
            "sources": sources, "options": options}


def manifest_format(path: str | Path) -> str:
    """``"parquet"`` or ``"jsonl"`` from the file name's suffix."""
    suffix = Path(path).suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    from poisonguard.errors import ConfigError

    raise ConfigError(f"{path}: a manifest must end in .parquet (or .pq) or .jsonl (or .ndjson), "
                      f"found {suffix or 'no suffix'!r}")


# ----------------------------------------------------------------------------- writing
def write_manifest(path: str | Path, header: dict[str, Any], batches: Iterable[ItemBatch]
                   ) -> dict[str, Any]:
    """Stream ``batches`` into a manifest at ``path`` (atomically); return the final header.

    Duplicate keys raise :class:`ManifestError` and nothing is written.
    """
    path = Path(path)
    fmt = manifest_format(path)
    digest = hashlib.sha256()
    fps: list[np.ndarray] = []
    count = 0

    def tallied() -> Iterable[ItemBatch]:
        """The non-empty batches, each folded into the digest, key fingerprints and count."""
        nonlocal count
        for batch in batches:
            if len(batch):
                digest.update(canonical_lines(batch))
                fps.append(fingerprints(batch.key))
                count += len(batch)
                yield batch

    with atomic_output(path) as tmp:
        if fmt == "parquet":
            writer = pq.ParquetWriter(tmp, SCHEMA, compression="zstd")
            pending: list[pa.RecordBatch] = []
            n_pending = 0
            try:
                for batch in tallied():
                    pending.append(batch.to_arrow())
                    n_pending += len(batch)
                    if n_pending >= BATCH_ROWS:
                        writer.write_table(pa.Table.from_batches(pending))
                        pending, n_pending = [], 0
                if pending:
                    writer.write_table(pa.Table.from_batches(pending))
                _check_duplicates(fps, path)
                header = dict(header, item_count=count, items_digest=digest.hexdigest())
                writer.add_key_value_metadata({PARQUET_META_KEY.decode(): json.dumps(header)})
            finally:
                writer.close()
        else:
            with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
                fh.write(json.dumps({JSONL_HEADER_KEY: header}, ensure_ascii=False) + "\n")
                for batch in tallied():
                    fh.writelines(json.dumps(row, ensure_ascii=False) + "\n"
                                  for row in batch.rows())
                _check_duplicates(fps, path)
                header = dict(header, item_count=count, items_digest=digest.hexdigest())
                end = {"item_count": count, "items_digest": header["items_digest"]}
                fh.write(json.dumps({JSONL_END_KEY: end}) + "\n")
    return header


def _check_duplicates(fps: list[np.ndarray], path: Path) -> None:
    allfp = np.concatenate(fps) if fps else np.empty(0, FP_DTYPE)
    fps.clear()
    allfp.sort()
    if len(allfp) > 1 and bool((allfp[1:] == allfp[:-1]).any()):
        n = int((allfp[1:] == allfp[:-1]).sum())
        raise ManifestError(f"{path}: {n} duplicate item key(s); every key must be unique "
                            "(for URL lists without a unique URL per row, pass --key-column)")


# ----------------------------------------------------------------------------- reading
def _fail(path: Path, problem: str) -> ManifestError:
    return ManifestError(f"{path}: {problem}")


def validate_header(header: Any, path: Path) -> dict[str, Any]:
    """Check a header's fields and types; raise :class:`ManifestError` naming the problem."""
    if not isinstance(header, dict):
        raise _fail(path, "manifest header is not a JSON object")
    if header.get("format") != FORMAT_NAME:
        raise _fail(path, f"not a poisonguard manifest (header format is "
                          f"{header.get('format')!r}, expected {FORMAT_NAME!r})")
    version = header.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise _fail(path, f"manifest header has no integer format_version (found {version!r})")
    if version != FORMAT_VERSION:
        raise _fail(path, f"manifest format_version {version} is not supported (this poisonguard "
                          f"reads version {FORMAT_VERSION}); upgrade poisonguard or re-pin")
    tool = header.get("tool")
    if not isinstance(tool, dict) or tool.get("name") != "poisonguard" \
            or not isinstance(tool.get("version"), str):
        raise _fail(path, f"manifest header 'tool' must name poisonguard and its version, "
                          f"found {tool!r}")
    if header.get("hash_algorithm") != HASH_ALGORITHM:
        raise _fail(path, f"manifest hash_algorithm is {header.get('hash_algorithm')!r}, "
                          f"expected {HASH_ALGORITHM!r}")
    created = header.get("created")
    if not isinstance(created, str) or not re.fullmatch(_ISO_TIME, created):
        raise _fail(path, f"manifest header 'created' is not a UTC ISO-8601 time: {created!r}")
    if not isinstance(header.get("options"), dict):
        raise _fail(path, "manifest header has no 'options' object")
    sources = header.get("sources")
    if not isinstance(sources, list) or not sources:
        raise _fail(path, "manifest header lists no sources")
    names = set()
    for i, src in enumerate(sources):
        if not isinstance(src, dict) or src.get("kind") not in SOURCE_KINDS \
                or not isinstance(src.get("name"), str) or not isinstance(src.get("path"), str) \
                or not isinstance(src.get("prefix"), str) \
                or not isinstance(src.get("options", {}), dict):
            raise _fail(path, f"manifest source {i} is malformed (needs kind in {SOURCE_KINDS}, "
                              f"name, path, prefix): {src!r}")
        if src["name"] in names:
            raise _fail(path, f"manifest sources repeat the name {src['name']!r}")
        names.add(src["name"])
    count = header.get("item_count")
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise _fail(path, f"manifest header item_count is not a count: {count!r}")
    if not isinstance(header.get("items_digest"), str) \
            or not _HEX64.fullmatch(header["items_digest"]):
        raise _fail(path, "manifest header items_digest is not a hex SHA-256")
    return header


class ManifestReader:
    """Open a manifest, validate its header, and stream its items in checked batches.

    ``batches()`` may be iterated once; when it ends without an exception the item count,
    items digest and key uniqueness have been verified, and :attr:`fingerprints` holds the
    sorted 128-bit key fingerprints (16 bytes per item) for membership tests.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                magic = fh.read(4)
        except FileNotFoundError:
            raise _fail(self.path, "no such manifest file") from None
        except IsADirectoryError:
            raise _fail(self.path, "is a folder, expected a manifest file") from None
        except OSError as exc:
            raise _fail(self.path, f"cannot read manifest ({exc.strerror})") from None
        self.format = "parquet" if magic == b"PAR1" else "jsonl"
        self.fingerprints: np.ndarray | None = None
        self._consumed = False
        if self.format == "parquet":
            self.header = self._open_parquet()
        else:
            self.header = self._open_jsonl()
        self.n_sources = len(self.header["sources"])

    @property
    def digest(self) -> str:
        return manifest_digest(self.header)

    # -- parquet
    def _open_parquet(self) -> dict[str, Any]:
        try:
            self._pf = pq.ParquetFile(self.path, pre_buffer=False)  # stream row groups
        except (pa.ArrowException, OSError) as exc:
            raise _fail(self.path, f"not a readable Parquet manifest (the file is truncated or "
                                   f"corrupt: {exc})") from None
        meta = self._pf.metadata.metadata or {}
        if PARQUET_META_KEY not in meta:
            raise _fail(self.path, "Parquet file has no poisonguard manifest header (key "
                                   f"{PARQUET_META_KEY.decode()!r} missing from its metadata)")
        try:
            header = json.loads(meta[PARQUET_META_KEY])
        except (ValueError, UnicodeDecodeError) as exc:
            raise _fail(self.path, f"manifest header is not valid JSON ({exc})") from None
        header = validate_header(header, self.path)
        schema = self._pf.schema_arrow
        for f in SCHEMA:
            if f.name not in schema.names:
                raise _fail(self.path, f"manifest has no {f.name!r} column")
            if schema.field(f.name).type != f.type:
                raise _fail(self.path, f"manifest column {f.name!r} has type "
                                       f"{schema.field(f.name).type}, expected {f.type}")
        extra = set(schema.names) - set(COLUMNS)
        if extra:
            raise _fail(self.path, f"manifest has unexpected column(s) {sorted(extra)}")
        if self._pf.metadata.num_rows != header["item_count"]:
            raise _fail(self.path, f"manifest holds {self._pf.metadata.num_rows} rows but its "
                                   f"header says {header['item_count']}")
        return header

    def _parquet_batches(self, batch_size: int) -> Iterator[pa.RecordBatch]:
        try:
            yield from self._pf.iter_batches(batch_size=batch_size, columns=list(COLUMNS))
        except (pa.ArrowException, OSError) as exc:
            raise _fail(self.path, f"Parquet manifest is corrupt ({exc})") from None

    # -- jsonl
    def _open_jsonl(self) -> dict[str, Any]:
        try:
            with open(self.path, "rb") as fh:
                first = fh.readline(1 << 20)
                size = fh.seek(0, os.SEEK_END)
                fh.seek(max(0, size - 65_536))
                tail = fh.read()
        except OSError as exc:
            raise _fail(self.path, f"cannot read manifest ({exc.strerror})") from None
        if not first.strip():
            raise _fail(self.path, "empty file, expected a manifest")
        try:
            head = json.loads(first)
        except (ValueError, UnicodeDecodeError):
            raise _fail(self.path, "not a manifest: neither Parquet nor JSONL with a "
                                   "poisonguard header line") from None
        if not isinstance(head, dict) or set(head) != {JSONL_HEADER_KEY}:
            raise _fail(self.path, f"first line is not a manifest header (expected one key "
                                   f"{JSONL_HEADER_KEY!r})")
        header = head[JSONL_HEADER_KEY]
        if not isinstance(header, dict):
            raise _fail(self.path, "manifest header is not a JSON object")
        if "item_count" in header or "items_digest" in header:
            raise _fail(self.path, "JSONL header line must not carry item_count/items_digest "
                                   "(they belong on the end line)")
        lines = tail.rstrip(b"\n").rsplit(b"\n", 1)
        try:
            end = json.loads(lines[-1])
        except (ValueError, UnicodeDecodeError):
            end = None
        if not isinstance(end, dict) or set(end) != {JSONL_END_KEY} \
                or not isinstance(end[JSONL_END_KEY], dict) \
                or set(end[JSONL_END_KEY]) != {"item_count", "items_digest"}:
            raise _fail(self.path, "JSONL manifest is truncated: its last line is not the "
                                   f"{JSONL_END_KEY!r} record")
        header = validate_header(dict(header, **end[JSONL_END_KEY]), self.path)
        if header["item_count"] > size // 64:  # every item line holds a 64-digit hash
            raise _fail(self.path, f"end record claims {header['item_count']} items, more "
                                   f"than a {size}-byte file can hold (edited)")
        return header

    def _jsonl_batches(self, batch_size: int) -> Iterator[pa.RecordBatch]:
        allowed = set(COLUMNS)
        rows: list[dict[str, Any]] = []
        ended = False
        lineno = 1
        with open(self.path, encoding="utf-8") as fh:
            fh.readline()
            for lineno, line in enumerate(fh, start=2):
                if ended:
                    if line.strip():
                        raise _fail(self.path, f"line {lineno}: data after the end record")
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    raise _fail(self.path, f"line {lineno}: not valid JSON ({exc})") from None
                if not isinstance(obj, dict):
                    raise _fail(self.path, f"line {lineno}: an item must be a JSON object")
                if JSONL_END_KEY in obj:
                    ended = True
                    continue
                if not obj.keys() <= allowed:
                    raise _fail(self.path, f"line {lineno}: unknown item field(s) "
                                           f"{sorted(set(obj) - allowed)}")
                rows.append(obj)
                if len(rows) >= batch_size:
                    yield self._rows_to_arrow(rows, lineno)
                    rows = []
        if rows:
            yield self._rows_to_arrow(rows, lineno)
        if not ended:
            raise _fail(self.path, "JSONL manifest is truncated (no end record)")

    def _rows_to_arrow(self, rows: list[dict[str, Any]], lineno: int) -> pa.RecordBatch:
        try:
            return pa.RecordBatch.from_pylist(rows, schema=SCHEMA)
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise _fail(self.path, f"an item before line {lineno + 1} has a field of the wrong "
                                   f"type ({exc})") from None

    # -- common
    def _check_batch(self, batch: pa.RecordBatch, first_row: int) -> None:
        def bad(mask: pa.Array, problem: str) -> None:
            idx = int(np.flatnonzero(np.asarray(mask.to_numpy(zero_copy_only=False)))[0])
            raise _fail(self.path, f"item {first_row + idx} ({batch.column('key')[idx]}): "
                                   f"{problem}")

        for name in _REQUIRED:
            col = batch.column(name)
            if col.null_count:
                bad(col.is_null(), f"{name} is missing")
        if not pc.all(pc.greater(pc.utf8_length(batch.column("key")), 0)).as_py():
            bad(pc.equal(pc.utf8_length(batch.column("key")), 0), "empty key")
        ok = pc.match_substring_regex(batch.column("sha256"), "^[0-9a-f]{64}$")
        if not pc.all(ok).as_py():
            bad(pc.invert(ok), "sha256 is not 64 lowercase hex digits")
        ok = pc.match_substring_regex(batch.column("pinned_at"), f"^{_ISO_TIME}$")
        if not pc.all(ok).as_py():
            bad(pc.invert(ok), "pinned_at is not an ISO-8601 time")
        src = batch.column("source")
        out = pc.or_(pc.less(src, 0), pc.greater_equal(src, self.n_sources))
        if pc.any(out).as_py():
            bad(out, f"source index outside 0..{self.n_sources - 1}")
        size = batch.column("size")
        neg = pc.fill_null(pc.less(size, 0), False)
        if pc.any(neg).as_py():
            bad(neg, "negative size")

    def batches(self, batch_size: int = 8192) -> Iterator[ItemBatch]:
        """Yield checked :class:`ItemBatch` es; raise at the end if the manifest is not intact."""
        if self._consumed:
            raise RuntimeError("ManifestReader.batches() can be iterated only once")
        self._consumed = True
        digest = hashlib.sha256()
        expected = self.header["item_count"]
        allfp = np.empty(expected, FP_DTYPE)  # 16 bytes per item, the only per-item state
        count = 0
        source = (self._parquet_batches(batch_size) if self.format == "parquet"
                  else self._jsonl_batches(batch_size))
        for rb in source:
            if count + rb.num_rows > expected:
                raise _fail(self.path, f"manifest holds more items than the {expected} its "
                                       "header says (edited)")
            self._check_batch(rb, count)
            batch = ItemBatch.from_arrow(rb)
            digest.update(canonical_lines(batch))
            allfp[count:count + len(batch)] = fingerprints(batch.key)
            count += len(batch)
            yield batch
        if count != expected:
            raise _fail(self.path, f"manifest holds {count} items but its header says "
                                   f"{expected} (truncated or edited)")
        allfp.sort()  # in place
        dup = allfp[1:] == allfp[:-1]
        if dup.any():
            examples = self._keys_with(set(allfp[1:][dup][:3].tolist()))
            raise _fail(self.path, f"{int(dup.sum())} duplicate item key(s), e.g. "
                                   f"{examples}; a manifest must list every key once")
        if digest.hexdigest() != self.header["items_digest"]:
            raise IntegrityError(f"{self.path}: the manifest's items do not match its header's "
                                 "items_digest: the items were edited after pinning; nothing in "
                                 "it is trusted")
        self.fingerprints = allfp


    def _keys_with(self, wanted: set[bytes]) -> list[str]:
        """Keys whose fingerprint is in ``wanted`` (a second pass; only on the error path)."""
        found: list[str] = []
        source = (self._parquet_batches(BATCH_ROWS) if self.format == "parquet"
                  else self._jsonl_batches(BATCH_ROWS))
        for rb in source:
            keys = rb.column("key").to_pylist()
            for k, fp in zip(keys, fingerprints(keys).tolist()):
                if fp in wanted and k not in found:
                    found.append(k)
        return found


def read_manifest(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read and check a whole (small) manifest: ``(header, items as dicts)``."""
    reader = ManifestReader(path)
    items: list[dict[str, Any]] = []
    for batch in reader.batches():
        items.extend(batch.rows())
    return reader.header, items
