"""``pin``: hash every item of one or more sources into a manifest (streamed, bounded memory)."""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from poisonguard.errors import ConfigError
from poisonguard.provenance.fetch import Fetcher, FetchOptions, FetchResult
from poisonguard.provenance.hashing import hash_samples, submit_files
from poisonguard.provenance.manifest import (
    ItemBatch,
    manifest_digest,
    manifest_format,
    new_header,
    write_manifest,
)
from poisonguard.provenance.sign import load_private_key, sign_digest, signature_path
from poisonguard.provenance.sources import (
    Exclusion,
    SourceSpec,
    UrlRow,
    iter_url_rows,
    load_npz_samples,
    plan_sources,
    url_columns,
    walk_tree,
)
from poisonguard.provenance.util import utc_now

T = TypeVar("T")
BATCH = 4096
DEFAULT_FILE_WORKERS = min(16, 2 * (os.cpu_count() or 2))


@dataclass(frozen=True)
class PinOptions:
    """How to read sources: file-hashing threads, HTTP limits, npz arrays, URL-list columns."""

    workers: int = DEFAULT_FILE_WORKERS
    fetch: FetchOptions = field(default_factory=FetchOptions)
    npz_key: str | None = None
    label_key: str | None = None
    url_column: str | None = None
    key_column: str | None = None
    hash_column: str | None = None
    label_column: str | None = None

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {self.workers}")

    def to_dict(self) -> dict[str, Any]:
        return {"workers": self.workers, "fetch": self.fetch.to_dict()}


@dataclass
class PinResult:
    """What ``pin`` wrote: the manifest, its header and digest, and the items it skipped."""

    manifest: Path
    header: dict[str, Any]
    digest: str
    skipped: list[dict[str, Any]]
    signature: Path | None
    wall_s: float

    @property
    def item_count(self) -> int:
        return int(self.header["item_count"])


def batched(it: Iterable[T], n: int) -> Iterator[list[T]]:
    it = iter(it)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


# ----------------------------------------------------------------------------- per kind
def _folder_batches(spec: SourceSpec, index: int, pool: Executor,
                    exclude: Exclusion, skipped: list[dict[str, Any]]
                    ) -> Iterator[ItemBatch]:
    pending: tuple[list[str], list[str], Callable[[], Any]] | None = None

    def finish(rels: list[str], paths: list[str], collect: Callable[[], Any]) -> ItemBatch:
        now = utc_now()
        out = ItemBatch()
        for rel, path, fh in zip(rels, paths, collect()):
            if fh.sha256 is None:
                skipped.append({"key": spec.prefix + rel, "path": path, "status": fh.error})
            else:
                out.append(spec.prefix + rel, index, fh.size, fh.sha256, now)
        return out

    for chunk in batched(walk_tree(spec.path, exclude), BATCH):
        rels = [c[0] for c in chunk]
        paths = [c[1] for c in chunk]
        collect = submit_files(paths, pool)  # hashing runs while the next chunk is walked
        if pending:
            yield finish(*pending)
        pending = (rels, paths, collect)
    if pending:
        yield finish(*pending)


def _npz_batches(spec: SourceSpec, index: int, samples: Any) -> Iterator[ItemBatch]:
    x = samples.x
    size = int(x.dtype.itemsize) * int(x[0].size) if len(x) else 0
    for start in range(0, len(x), BATCH):
        stop = min(len(x), start + BATCH)
        hashes = hash_samples(x, start, stop)
        now = utc_now()
        out = ItemBatch()
        for i, h in zip(range(start, stop), hashes):
            out.append(f"{spec.prefix}{samples.x_key}[{i}]", index, size, h, now,
                       samples.label(i))
        yield out


def _url_batches(spec: SourceSpec, index: int, cols: Any, fetcher: Fetcher,
                 skipped: list[dict[str, Any]]) -> Iterator[ItemBatch]:
    window: deque[tuple[UrlRow, Future[FetchResult] | None]] = deque()
    limit = fetcher.options.workers * 4

    def resolved() -> Iterator[tuple[UrlRow, FetchResult | None]]:
        for row in iter_url_rows(spec.path, cols):
            window.append((row, None if row.sha256 else fetcher.submit(row.url)))
            if len(window) >= limit:
                r, f = window.popleft()
                yield r, None if f is None else f.result()
        while window:
            r, f = window.popleft()
            yield r, None if f is None else f.result()

    for chunk in batched(resolved(), BATCH):
        now = utc_now()
        out = ItemBatch()
        for row, res in chunk:
            key = spec.prefix + row.key
            if res is None:
                out.append(key, index, None, row.sha256 or "", now, row.label, row.url)
            elif res.ok:
                out.append(key, index, res.size, res.sha256 or "", now, row.label, row.url)
            else:
                skipped.append({"key": key, "url": row.url, "status": res.status,
                                "detail": res.detail})
        yield out


# ----------------------------------------------------------------------------- pin
def pin(sources: list[str], out: str | Path, options: PinOptions | None = None,
        sign_key: str | Path | None = None) -> PinResult:
    """Pin ``sources`` into the manifest ``out`` (Parquet or JSONL by suffix); sign it when
    ``sign_key`` (an Ed25519 private key PEM) is given.

    Items that cannot be read or fetched are left out of the manifest and listed in
    ``PinResult.skipped``: nothing is pinned that was not hashed.
    """
    t0 = time.perf_counter()
    options = options or PinOptions()
    out = Path(out)
    manifest_format(out)
    key = load_private_key(sign_key) if sign_key else None
    specs = plan_sources(list(sources))
    npz: dict[int, Any] = {}
    cols: dict[int, Any] = {}
    for i, s in enumerate(specs):
        if s.kind == "folder":
            s.options = {"follow_file_symlinks": True, "follow_folder_symlinks": False}
        elif s.kind == "npz":
            smp = load_npz_samples(s.path, options.npz_key, options.label_key)
            npz[i] = smp
            s.options = {"array": smp.x_key, "labels": smp.y_key, "n_samples": len(smp.x),
                         "dtype": smp.x.dtype.str, "sample_shape": list(smp.x.shape[1:]),
                         "sample_hash": "sha256(prefix(dtype, shape) + C-order bytes)"}
        else:
            c = url_columns(s.path, options.url_column, options.key_column,
                            options.hash_column, options.label_column)
            cols[i] = c
            s.options = dict(c.to_dict(), hashes_from_list=c.hash is not None)
    sig = signature_path(out)
    exclude = Exclusion.of(out, sig)
    header = new_header([s.to_dict() for s in specs], options.to_dict(), utc_now())
    skipped: list[dict[str, Any]] = []
    # thread pools start their threads on first use: an unused one costs nothing
    with ThreadPoolExecutor(max_workers=options.workers,
                            thread_name_prefix="poisonguard-hash") as pool, \
            Fetcher(options.fetch) as fetcher:

        def all_batches() -> Iterator[ItemBatch]:
            for i, s in enumerate(specs):
                if s.kind == "folder":
                    yield from _folder_batches(s, i, pool, exclude, skipped)
                elif s.kind == "npz":
                    yield from _npz_batches(s, i, npz.pop(i))
                else:
                    yield from _url_batches(s, i, cols[i], fetcher, skipped)

        final = write_manifest(out, header, all_batches())
    digest = manifest_digest(final)
    sig_written = None
    if key is not None:
        sign_digest(digest, key, sig)
        sig_written = sig
    return PinResult(out, final, digest, skipped, sig_written, time.perf_counter() - t0)
