"""``pin`` and ``verify`` of URL lists at crawl size: row ranges ("parts") as tasks on an engine
(this process, or Dask workers), each fetching its URLs with its own thread pool, timeouts and
retries (:class:`~poisonguard.provenance.fetch.FetchOptions`), and writing its result as one
Parquet shard in a work folder beside the output.

A shard is written to a temporary name and renamed into place when its part is complete, so a
shard that exists is a part that is done: a run that was killed, or lost a worker past Dask's
retries, is resumed by running the same command again (only the parts without a shard are
fetched). The work folder's ``run.json`` names what the shards belong to (the manifest digest,
or the URL lists' sizes and times, and the part size); shards of another run are deleted. The
final manifest or report is written atomically from the shards, after which the work folder is
removed: an output that exists is complete.

Memory: a task holds one part (``part_rows`` rows, plus its findings); the client keeps the
manifest's key fingerprints (16 bytes per item, as :func:`~poisonguard.provenance.verify`),
16 more per item of a URL list being checked for new rows, and the findings.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from poisonguard.errors import ConfigError, DataError
from poisonguard.provenance.errors import ManifestError
from poisonguard.provenance.fetch import Fetcher, FetchOptions
from poisonguard.provenance.manifest import (
    SCHEMA,
    ItemBatch,
    ManifestReader,
    manifest_digest,
    manifest_format,
    new_header,
    write_manifest,
)
from poisonguard.provenance.sign import (
    load_private_key,
    sign_digest,
    signature_path,
)
from poisonguard.provenance.sources import (
    Exclusion,
    UrlColumns,
    _row,
    plan_sources,
    url_columns,
)
from poisonguard.provenance.util import atomic_output, fingerprints, utc_now
from poisonguard.provenance.verify import (
    Modified,
    Unverifiable,
    VerifyResult,
    _find_new,
    _pair,
    start_result,
)

DEFAULT_PART_ROWS = 16_384
READ_BATCH = 8192
PART_META_KEY = "poisonguard.part"
FINDINGS_SCHEMA = pa.schema([
    pa.field("kind", pa.string()), pa.field("key", pa.string()), pa.field("url", pa.string()),
    pa.field("status", pa.string()), pa.field("detail", pa.string()),
    pa.field("old_sha256", pa.string()), pa.field("new_sha256", pa.string()),
    pa.field("old_size", pa.int64()), pa.field("new_size", pa.int64()),
])
SKIPPED_SCHEMA = pa.schema([pa.field(n, pa.string()) for n in ("key", "url", "status",
                                                               "detail")])


@dataclass(frozen=True)
class Part:
    """Rows ``[offset, stop)`` of source ``source``; its shard is ``name``."""

    index: int
    source: int
    offset: int
    stop: int

    @property
    def name(self) -> str:
        return f"part-{self.source:03d}-{self.index:06d}.parquet"


@dataclass(frozen=True)
class _Parts:
    """The engine's "source": a part is its own unit of work (the task reads its rows)."""

    def read(self, ref: Part, batch_rows: int) -> Part:
        return ref


@dataclass(frozen=True)
class VerifyTask:
    """What a verify task needs: the manifest, the work folder, the HTTP limits."""

    manifest: str
    work: str
    fetch: FetchOptions


@dataclass(frozen=True)
class PinTask:
    """What a pin task needs: the URL lists and their columns, key prefixes, limits."""

    paths: tuple[str, ...]
    columns: tuple[UrlColumns, ...]
    prefixes: tuple[str, ...]
    work: str
    fetch: FetchOptions


@dataclass
class CrawlStats:
    """How a partitioned run went: parts, parts found done (resumed), URLs fetched now."""

    engine: dict[str, Any]
    parts: int = 0
    parts_resumed: int = 0
    rows: int = 0
    fetched: int = 0
    attempts: int = 0
    fetch_s: float = 0.0
    wall_s: float = 0.0
    work_dir: str = ""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "parts": self.parts, "parts_resumed": self.parts_resumed,
                "rows": self.rows, "urls_fetched_this_run": self.fetched,
                "http_attempts_this_run": self.attempts, "fetch_s": round(self.fetch_s, 3),
                "wall_s": round(self.wall_s, 3), "work_dir": self.work_dir}


# ----------------------------------------------------------------------------- rows
def parquet_rows(path: str | Path) -> int:
    """Number of rows of a Parquet file (from its footer)."""
    try:
        return int(pq.ParquetFile(path).metadata.num_rows)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None


def read_range(path: str | Path, start: int, stop: int, columns: list[str],
               batch_rows: int = READ_BATCH) -> Iterator[pa.RecordBatch]:
    """Stream rows ``[start, stop)`` of a Parquet file (only the row groups they lie in)."""
    pf = pq.ParquetFile(path, pre_buffer=False)
    md = pf.metadata
    groups: list[int] = []
    first: int | None = None
    pos = 0
    for g in range(md.num_row_groups):
        n = md.row_group(g).num_rows
        if pos + n > start and pos < stop:
            groups.append(g)
            first = pos if first is None else first
        pos += n
    if not groups or first is None:
        return
    at = first
    for rb in pf.iter_batches(batch_size=batch_rows, row_groups=groups, columns=columns):
        lo, hi = max(start - at, 0), min(stop - at, rb.num_rows)
        if hi > lo:
            yield rb.slice(lo, hi - lo)
        at += rb.num_rows
        if at >= stop:
            break


def plan_parts(rows_per_source: list[int], part_rows: int) -> list[Part]:
    """Cut each source's rows into parts of ``part_rows`` rows."""
    if part_rows < 1:
        raise ConfigError(f"--part-rows must be >= 1, got {part_rows}")
    return [Part(i, s, start, min(n, start + part_rows))
            for s, n in enumerate(rows_per_source)
            for i, start in enumerate(range(0, n, part_rows))]


def _write_shard(path: Path, table: pa.Table, meta: dict[str, Any]) -> None:
    table = table.replace_schema_metadata({PART_META_KEY: json.dumps(meta)})
    with atomic_output(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def _shard_meta(path: Path) -> dict[str, Any]:
    md = pq.ParquetFile(path).schema_arrow.metadata or {}
    return dict(json.loads(md[PART_META_KEY.encode()]))


# ----------------------------------------------------------------------------- work folder
def open_work(work: Path, identity: dict[str, Any]) -> tuple[set[str], list[str]]:
    """Create or resume the work folder for ``identity``; return the names of the finished
    shards and notes. Shards of a different run, and temporary files, are deleted."""
    notes: list[str] = []
    work.mkdir(parents=True, exist_ok=True)
    run = work / "run.json"
    if run.exists():
        try:
            old = json.loads(run.read_text())
        except (ValueError, OSError):
            old = None
        if old != identity:
            n = sum(1 for _ in work.glob("part-*.parquet"))
            notes.append(f"work folder {work} held {n} shard(s) of a different run; "
                         "they were deleted")
            for p in work.iterdir():
                if p.is_file():
                    p.unlink()
    for p in work.glob(".*.tmp"):  # a part killed while writing
        p.unlink()
    if not run.exists():
        from poisonguard.io import atomic_write_json

        atomic_write_json(run, identity)
    done = {p.name for p in work.glob("part-*.parquet")}
    return done, notes


def _engine_error_tail(engine: Any, work: Path) -> None:
    if hasattr(engine, "nothing_written"):
        engine.nothing_written = (f"no output written; finished parts are kept in {work}: "
                                  "run the same command again to resume")


# ----------------------------------------------------------------------------- verify
def verify_part(part: Part, _model: Any, task: VerifyTask) -> dict[str, Any]:
    """Fetch and compare one part of a manifest; write its findings shard; return its counts."""
    shard = Path(task.work) / part.name
    if shard.exists():  # done by an earlier attempt of this task
        return dict(_shard_meta(shard), fetched=0, attempts=0, fetch_s=0.0)
    t0 = time.perf_counter()
    counts = {"unchanged": 0, "modified": 0, "missing": 0, "unverifiable": 0}
    cols: dict[str, list[Any]] = {f.name: [] for f in FINDINGS_SCHEMA}
    attempts = 0
    rows = 0

    def add(kind: str, key: str, url: str, status: str = "", detail: str = "",
            old: str | None = None, new: str | None = None, old_size: int | None = None,
            new_size: int | None = None) -> None:
        counts[kind] += 1
        for name, v in zip(cols, (kind, key, url, status, detail, old, new, old_size,
                                  new_size)):
            cols[name].append(v)

    with Fetcher(task.fetch) as fetcher:
        for rb in read_range(task.manifest, part.offset, part.stop,
                             ["key", "url", "sha256", "size"]):
            keys, urls = rb.column("key").to_pylist(), rb.column("url").to_pylist()
            shas, sizes = rb.column("sha256").to_pylist(), rb.column("size").to_pylist()
            for i, u in enumerate(urls):
                if not u:
                    raise ManifestError(f"{task.manifest}: item {keys[i]!r} of a URL source "
                                        "has no url")
            for key, url, sha, size, res in zip(keys, urls, shas, sizes,
                                                fetcher.fetch_many(urls)):
                rows += 1
                attempts += res.attempts
                if res.ok:
                    if res.sha256 == sha:
                        counts["unchanged"] += 1
                    else:
                        add("modified", key, url, "ok", "content changed", sha, res.sha256,
                            size, res.size)
                elif res.status == "gone":
                    add("missing", key, url, res.status, res.detail)
                else:
                    add("unverifiable", key, url, res.status, res.detail)
    meta = {"part": part.index, "offset": part.offset, "stop": part.stop, "rows": rows,
            **counts}
    _write_shard(shard, pa.table(cols, schema=FINDINGS_SCHEMA), meta)
    return dict(meta, fetched=rows, attempts=attempts, fetch_s=time.perf_counter() - t0)


def default_work_dir(out: str | Path | None, manifest: str | Path, command: str) -> Path:
    """``OUT.work`` beside the output, else ``MANIFEST.verify.work``."""
    return Path(f"{out}.work") if out else Path(f"{manifest}.{command}.work")


def verify_crawl(manifest: str | Path, sources: list[str] | None, engine: Any,
                 public_key: str | Path | None = None, signature: str | Path | None = None,
                 fetch: FetchOptions | None = None, report: str | Path | None = None,
                 work_dir: str | Path | None = None, part_rows: int = DEFAULT_PART_ROWS
                 ) -> tuple[VerifyResult, CrawlStats]:
    """Verify a Parquet manifest of URL sources part by part on ``engine`` (resumable).

    The manifest's integrity (item count, digest, unique keys, signature) is checked on the
    client before any URL is fetched. ``report`` (JSON) is written atomically when every part
    is done; then the work folder is removed.
    """
    t0 = time.perf_counter()
    started = utc_now()
    fetch = fetch or FetchOptions()
    manifest = Path(manifest)
    reader = ManifestReader(manifest)
    kinds = {s["kind"] for s in reader.header["sources"]}
    if reader.format != "parquet" or kinds != {"urls"}:
        raise ConfigError(f"{manifest}: --engine verifies Parquet manifests of URL lists; this "
                          f"one is {reader.format} with {sorted(kinds)} source(s): verify it "
                          "without --engine")
    work = Path(work_dir) if work_dir else default_work_dir(report, manifest, "verify")
    if report is not None and Path(report).exists():
        Path(report).unlink()  # a stale report must not pass for this run's
    result, srcs, sig_path = start_result(reader, manifest, sources, public_key, signature,
                                          started)
    # integrity first: nothing is fetched for a manifest that was edited
    for batch in reader.batches(batch_size=65_536):
        result.item_count += len(batch)
        for s, src in enumerate(srcs):
            if src.path is None:
                continue
            rows = range(len(batch)) if len(srcs) == 1 else [
                i for i, b in enumerate(batch.source) if b == s]
            src.pair_fps.append(fingerprints(
                [_pair(batch.key[i], batch.url[i], batch.label[i]) for i in rows]))
    n = result.item_count
    parts = plan_parts([n], part_rows)
    identity = {"command": "verify", "manifest_digest": reader.digest, "rows": n,
                "part_rows": part_rows}
    done, wnotes = open_work(work, identity)
    stats = CrawlStats(engine.describe(), parts=len(parts), rows=n, work_dir=str(work))
    stats.notes.extend(wnotes)
    todo = [p for p in parts if p.name not in done]
    stats.parts_resumed = len(parts) - len(todo)
    _engine_error_tail(engine, work)
    task = VerifyTask(str(manifest.resolve()), str(work.resolve()), fetch)
    tf = time.perf_counter()
    for summary in engine.imap(_Parts(), todo, verify_part, None, task, READ_BATCH,
                               "verify parts"):
        stats.fetched += int(summary["fetched"])
        stats.attempts += int(summary["attempts"])
    stats.fetch_s = time.perf_counter() - tf
    for p in parts:  # merge, in manifest order
        table = pq.read_table(work / p.name)
        result.unchanged_count += int(_shard_meta(work / p.name)["unchanged"])
        for f in table.to_pylist():
            if f["kind"] == "modified":
                result.modified.append(Modified(f["key"], f["old_sha256"], f["new_sha256"],
                                                f["old_size"], f["new_size"]))
            elif f["kind"] == "missing":
                result.missing.append(f["key"])
            else:
                result.unverifiable.append(Unverifiable(f["key"], f["status"], f["detail"],
                                                        f["url"]))
    assert reader.fingerprints is not None
    exclude = Exclusion.of(manifest, sig_path)
    _find_new(result, srcs, reader.fingerprints, exclude)
    result.notes.extend(stats.notes)
    result.wall_s = stats.wall_s = time.perf_counter() - t0
    result.run = stats.to_dict()
    if report is not None:
        from poisonguard.io import atomic_write_json

        atomic_write_json(report, result.to_dict())
    shutil.rmtree(work, ignore_errors=True)
    return result, stats


# ----------------------------------------------------------------------------- pin
def pin_part(part: Part, _model: Any, task: PinTask) -> dict[str, Any]:
    """Fetch and hash one part of a URL list (or take its listed SHA-256); write the items
    (and the rows that could not be fetched) as one shard; return its counts."""
    shard = Path(task.work) / part.name
    if shard.exists():
        return dict(_shard_meta(shard), fetched=0, attempts=0, fetch_s=0.0)
    t0 = time.perf_counter()
    path, cols, prefix = task.paths[part.source], task.columns[part.source], \
        task.prefixes[part.source]
    wanted = [c for c in (cols.url, cols.key, cols.hash, cols.label) if c]
    items = ItemBatch()
    skipped: dict[str, list[str]] = {f.name: [] for f in SKIPPED_SCHEMA}
    fetched = attempts = 0
    n = part.offset
    with Fetcher(task.fetch) as fetcher:
        for rb in read_range(path, part.offset, part.stop, wanted):
            data = {c: rb.column(c).to_pylist() for c in wanted}
            rows = []
            for i in range(rb.num_rows):
                n += 1
                rows.append(_row(Path(path), n, data[cols.url][i],
                                 data[cols.key][i] if cols.key else None,
                                 data[cols.hash][i] if cols.hash else None,
                                 data[cols.label][i] if cols.label else None, True))
            need = [r.url for r in rows if not r.sha256]
            results = iter(fetcher.fetch_many(need))
            now = utc_now()
            for r in rows:
                key = prefix + r.key
                if r.sha256:
                    items.append(key, part.source, None, r.sha256, now, r.label, r.url)
                    continue
                res = next(results)
                fetched += 1
                attempts += res.attempts
                if res.ok:
                    items.append(key, part.source, res.size, res.sha256 or "", now, r.label,
                                 r.url)
                else:
                    for name, v in zip(skipped, (key, r.url, res.status, res.detail)):
                        skipped[name].append(v)
    meta = {"part": part.index, "source": part.source, "offset": part.offset,
            "stop": part.stop, "items": len(items), "skipped": len(skipped["key"])}
    skip_path = shard.with_name("skipped-" + part.name)
    _write_shard(skip_path, pa.table(skipped, schema=SKIPPED_SCHEMA), meta)
    table = pa.Table.from_batches([items.to_arrow()], schema=SCHEMA) if len(items) \
        else SCHEMA.empty_table()
    _write_shard(shard, table, meta)  # last: the shard marks the part done
    return dict(meta, fetched=fetched, attempts=attempts, fetch_s=time.perf_counter() - t0)


def _source_identity(path: str) -> dict[str, Any]:
    st = os.stat(path)
    return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def pin_crawl(sources: list[str], out: str | Path, engine: Any, options: Any,
              sign_key: str | Path | None = None, work_dir: str | Path | None = None,
              part_rows: int = DEFAULT_PART_ROWS) -> tuple[Any, CrawlStats]:
    """Pin Parquet URL lists part by part on ``engine`` (resumable); the manifest is written
    atomically from the shards when every part is done. ``options`` is a ``PinOptions``."""
    from poisonguard.provenance.pin import PinResult

    t0 = time.perf_counter()
    out = Path(out)
    manifest_format(out)
    key = load_private_key(sign_key) if sign_key else None
    specs = plan_sources(list(sources))
    cols: list[UrlColumns] = []
    for s in specs:
        if s.kind != "urls" or not s.path.lower().endswith((".parquet", ".pq")):
            raise ConfigError(f"{s.path}: --engine pins Parquet URL lists (the img2dataset / "
                              "LAION layout); pin other sources without --engine")
        c = url_columns(s.path, options.url_column, options.key_column, options.hash_column,
                        options.label_column)
        cols.append(c)
        s.options = dict(c.to_dict(), hashes_from_list=c.hash is not None)
    rows = [parquet_rows(s.path) for s in specs]
    parts = plan_parts(rows, part_rows)
    work = Path(work_dir) if work_dir else Path(f"{out}.work")
    identity = {"command": "pin", "sources": [_source_identity(s.path) for s in specs],
                "columns": [c.to_dict() for c in cols], "part_rows": part_rows}
    done, notes = open_work(work, identity)
    stats = CrawlStats(engine.describe(), parts=len(parts), rows=sum(rows), work_dir=str(work))
    stats.notes.extend(notes)
    todo = [p for p in parts if p.name not in done]
    stats.parts_resumed = len(parts) - len(todo)
    _engine_error_tail(engine, work)
    task = PinTask(tuple(s.path for s in specs), tuple(cols), tuple(s.prefix for s in specs),
                   str(work.resolve()), options.fetch)
    tf = time.perf_counter()
    for summary in engine.imap(_Parts(), todo, pin_part, None, task, READ_BATCH, "pin parts"):
        stats.fetched += int(summary["fetched"])
        stats.attempts += int(summary["attempts"])
    stats.fetch_s = time.perf_counter() - tf
    header = new_header([s.to_dict() for s in specs], options.to_dict(), utc_now())

    def batches() -> Iterator[ItemBatch]:
        for p in parts:
            for rb in pq.ParquetFile(work / p.name).iter_batches(batch_size=65_536):
                yield ItemBatch.from_arrow(rb)

    final = write_manifest(out, header, batches())
    skipped: list[dict[str, Any]] = []
    for p in parts:
        skipped.extend(pq.read_table(work / ("skipped-" + p.name)).to_pylist())
    digest = manifest_digest(final)
    sig = signature_path(out)
    sig_written = None
    if key is not None:
        sign_digest(digest, key, sig)
        sig_written = sig
    shutil.rmtree(work, ignore_errors=True)
    stats.wall_s = time.perf_counter() - t0
    return PinResult(out, final, digest, skipped, sig_written, stats.wall_s), stats
