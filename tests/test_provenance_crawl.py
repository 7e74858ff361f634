"""Partitioned, resumable ``pin``/``verify`` of URL lists (``--engine local|dask``) against a
loopback HTTP server."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from poisonguard.cli import main
from poisonguard.provenance import FetchOptions, PinOptions, read_manifest, verify
from poisonguard.provenance.crawl import Part, pin_crawl, verify_crawl
from poisonguard.scale.engine import LocalEngine
from tests.test_provenance_urls import Handler, served  # noqa: F401 (fixture)

N = 30
NET = ["--timeout", "10", "--retries", "1", "--fetch-workers", "4", "--quiet"]


def body(i: int) -> bytes:
    return f"crawl {i}\n".encode() * 20


def url_list(base: str, root: Path, tmp_path: Path, hashes: bool = False) -> Path:
    for i in range(N):
        (root / f"c{i}.bin").write_bytes(body(i))
    cols: dict[str, list[Any]] = {"key": [f"k{i:03d}" for i in range(N)],
                                  "url": [f"{base}/c{i}.bin" for i in range(N)],
                                  "caption": [f"cap {i}" for i in range(N)]}
    if hashes:
        cols["sha256"] = [hashlib.sha256(body(i)).hexdigest() for i in range(N)]
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.table(cols), path, row_group_size=8)  # parts cross row groups
    return path


def items_by_key(manifest: Path) -> dict[str, tuple[str, str | None]]:
    return {it["key"]: (it["sha256"], it["label"]) for it in read_manifest(manifest)[1]}


def test_pin_and_verify_local_engine_match_single_process(
        served: tuple[str, Path], tmp_path: Path) -> None:  # noqa: F811
    base, root = served
    urls = url_list(base, root, tmp_path)
    single, parts = tmp_path / "single.parquet", tmp_path / "parts.parquet"
    assert main(["pin", str(urls), "--out", str(single), *NET]) == 0
    Handler.hits = []
    assert main(["pin", str(urls), "--out", str(parts), "--engine", "local", "--part-rows",
                 "7", *NET]) == 0
    assert len(Handler.hits) == N
    assert items_by_key(parts) == items_by_key(single)
    assert items_by_key(parts)["k004"] == (hashlib.sha256(body(4)).hexdigest(), "cap 4")
    assert not (tmp_path / "parts.parquet.work").exists()

    (root / "c4.bin").write_bytes(b"swapped")   # split-view
    (root / "c9.bin").unlink()                  # gone
    report = tmp_path / "r.json"
    assert main(["verify", str(parts), str(urls), "--out", str(report), "--engine", "local",
                 "--part-rows", "7", *NET]) == 1
    rep = json.loads(report.read_text())
    ref = verify(parts, [str(urls)])
    assert rep["modified"] == [m.key for m in ref.modified] == ["k004"]
    assert rep["missing"] == ref.missing == ["k009"]
    assert rep["counts"]["unchanged"] == ref.unchanged_count == N - 2
    run = rep["layers"]["provenance"]["run"]
    assert run["parts"] == 5 and run["parts_resumed"] == 0 and run["urls_fetched_this_run"] == N
    assert not (tmp_path / "r.json.work").exists()


class StopAfter(LocalEngine):
    """Runs ``limit`` parts, then fails as a killed run would (the client dies)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def imap(self, source: Any, refs: list, fn: Any, *args: Any, **kwargs: Any
             ) -> Iterator[Any]:
        for n, out in enumerate(super().imap(source, refs, fn, *args, **kwargs)):
            if n == self.limit:
                raise KeyboardInterrupt
            yield out


def test_killed_verify_resumes_where_it_stopped(
        served: tuple[str, Path], tmp_path: Path) -> None:  # noqa: F811
    base, root = served
    urls = url_list(base, root, tmp_path, hashes=True)
    manifest = tmp_path / "m.parquet"
    assert main(["pin", str(urls), "--out", str(manifest), "--engine", "local", *NET]) == 0
    assert Handler.hits == []  # listed hashes: nothing fetched
    report = tmp_path / "r.json"
    report.write_text("{}")  # stale: must not survive as this run's report
    fetch = FetchOptions(timeout=10, retries=0, workers=4)
    with pytest.raises(KeyboardInterrupt):
        verify_crawl(manifest, [str(urls)], StopAfter(2), fetch=fetch, report=report,
                     part_rows=7)
    # parts are fetched one after another: the two yielded, and the third (done, not yet
    # yielded when the run stopped) have shards
    work = tmp_path / "r.json.work"
    assert not report.exists()
    assert sorted(p.name for p in work.glob("part-*")) == [
        Part(i, 0, 0, 0).name for i in range(3)]
    assert len(Handler.hits) == 21
    Handler.hits = []
    res, stats = verify_crawl(manifest, [str(urls)], LocalEngine(), fetch=fetch, report=report,
                              part_rows=7)
    assert stats.parts_resumed == 3 and stats.fetched == N - 21 == len(Handler.hits)
    assert res.clean and res.unchanged_count == N and res.item_count == N
    assert json.loads(report.read_text())["counts"]["unchanged"] == N
    assert not work.exists()


def test_other_runs_shards_are_not_reused(
        served: tuple[str, Path], tmp_path: Path) -> None:  # noqa: F811
    base, root = served
    urls = url_list(base, root, tmp_path, hashes=True)
    manifest = tmp_path / "m.parquet"
    assert main(["pin", str(urls), "--out", str(manifest), *NET]) == 0
    fetch = FetchOptions(timeout=10, retries=0, workers=4)
    with pytest.raises(KeyboardInterrupt):
        verify_crawl(manifest, None, StopAfter(1), fetch=fetch, part_rows=7)
    res, stats = verify_crawl(manifest, None, LocalEngine(), fetch=fetch, part_rows=10)
    assert stats.parts_resumed == 0 and stats.fetched == N and res.clean
    assert any("different run" in n for n in res.notes)


def test_engine_refuses_what_it_cannot_partition(tmp_path: Path, capsys: Any) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("a")
    jm = tmp_path / "m.jsonl"
    assert main(["pin", str(tmp_path / "d"), "--out", str(jm), "--quiet"]) == 0
    assert main(["pin", str(tmp_path / "d"), "--out", str(tmp_path / "x.parquet"),
                 "--engine", "local", "--quiet"]) == 2
    assert "--engine pins Parquet URL lists" in capsys.readouterr().err
    assert main(["verify", str(jm), "--engine", "local", "--quiet"]) == 2
    assert "verify it without --engine" in capsys.readouterr().err
    assert main(["verify", str(jm), "--part-rows", "5", "--quiet"]) == 2
    assert "--part-rows needs --engine" in capsys.readouterr().err


def test_unanswering_scheduler_is_one_line_exit_2(tmp_path: Path, capsys: Any) -> None:
    urls = tmp_path / "u.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a"]}), urls)
    t0 = time.perf_counter()
    rc = main(["pin", str(urls), "--out", str(tmp_path / "m.parquet"), "--engine", "dask",
               "--scheduler", "tcp://127.0.0.1:9", "--connect-timeout", "1", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "no Dask scheduler answered within 1 s" in err and "\n" not in err
    assert time.perf_counter() - t0 < 15
    assert not (tmp_path / "m.parquet").exists()


@dataclass(frozen=True)
class DoomedPart(Part):
    """The last part (4) kills the worker process that runs it (not the client)."""

    client: int = 0

    @property
    def name(self) -> str:
        if self.index == 4 and os.getpid() != self.client:
            os._exit(3)
        return super().name


class Dooming:
    """Wraps an engine: the last part kills the worker that runs it."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "engine":
            object.__setattr__(self, name, value)
        else:
            setattr(self.engine, name, value)

    def describe(self) -> dict[str, Any]:
        return self.engine.describe()

    def imap(self, source: Any, refs: list, *args: Any, **kwargs: Any) -> Iterator[Any]:
        doomed = [DoomedPart(r.index, r.source, r.offset, r.stop, os.getpid()) for r in refs]
        return self.engine.imap(source, doomed, *args, **kwargs)


def test_dask_verify_matches_and_worker_death_fails_then_resumes(
        served: tuple[str, Path], tmp_path: Path) -> None:  # noqa: F811
    import cloudpickle
    import dask

    from poisonguard.scale.engine import DaskEngine, EngineError

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    base, root = served
    urls = url_list(base, root, tmp_path)
    single, manifest = tmp_path / "single.parquet", tmp_path / "m.parquet"
    assert main(["pin", str(urls), "--out", str(single), *NET]) == 0
    fetch = FetchOptions(timeout=10, retries=0, workers=4)
    report = tmp_path / "r.json"
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        engine = DaskEngine(workers=2, memory_limit="1GiB")
        try:
            Handler.hits = []
            pinned, _ = pin_crawl([str(urls)], manifest, engine, PinOptions(fetch=fetch),
                                  part_rows=7)
            assert len(Handler.hits) == N and not pinned.skipped
            assert items_by_key(manifest) == items_by_key(single)
            (root / "c5.bin").write_bytes(b"swapped")
            with pytest.raises(EngineError, match="worker died.*run the same command again"):
                verify_crawl(manifest, [str(urls)], Dooming(engine), fetch=fetch,
                             report=report, part_rows=7)
            assert not report.exists()
            # parts on the dead worker are lost (without retries); the others have shards
            done = {p.name for p in (tmp_path / "r.json.work").glob("part-*")}
            assert Part(4, 0, 0, 0).name not in done
            Handler.hits = []
            res, stats = verify_crawl(manifest, [str(urls)], engine, fetch=fetch,
                                      report=report, part_rows=7)
        finally:
            engine.close()
    assert stats.parts_resumed == len(done) and stats.fetched == len(Handler.hits)
    rows = {Part(i, 0, 0, 0).name: min(7, N - 7 * i) for i in range(5)}
    assert stats.fetched == N - sum(rows[d] for d in done)
    ref = verify(manifest, [str(urls)])
    assert [m.key for m in res.modified] == [m.key for m in ref.modified] == ["k005"]
    assert res.unchanged_count == ref.unchanged_count == N - 1
    assert report.exists() and not (tmp_path / "r.json.work").exists()
