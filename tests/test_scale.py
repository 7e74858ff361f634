"""Streamed, mergeable detector (poisonguard.scale) and the scan-features command: tiny sets."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from poisonguard.cli import main
from poisonguard.scale.moments import Moments
from poisonguard.scale.run import detect_in_memory
from poisonguard.scale.sketch import HashSample, Histogram
from poisonguard.scale.sources import ArraySource


def planted(n: int = 4000, d: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray,
                                                                  np.ndarray]:
    """4 Gaussian classes; 8% of class 1 is a shifted cluster."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = rng.normal(size=(n, d)) + y[:, None] * 0.5
    poison = (y == 1) & (rng.random(n) < 0.08)
    x[poison, :4] += 3.0
    return x, y, poison


def write_parquet(path: Path, x: np.ndarray, y: np.ndarray, row_group: int = 700,
                  as_list: bool = False) -> Path:
    cols = ({"emb": pa.array(list(x.astype(np.float32)), pa.list_(pa.float32()))} if as_list
            else {f"f{i}": x[:, i] for i in range(x.shape[1])})
    pq.write_table(pa.table({"label": y, **cols}), path, row_group_size=row_group)
    return path


def test_moments_merge_matches_whole() -> None:
    x = np.random.default_rng(0).normal(size=(500, 5))
    parts = [Moments.of(x[:7]), Moments.of(x[7:300]), Moments.of(x[300:300]),
             Moments.of(x[300:])]
    m = parts[0]
    for p in parts[1:]:
        m = m.merge(p)
    whole = Moments.of(x)
    assert m.n == 500
    np.testing.assert_allclose(m.mean, whole.mean, atol=1e-12)
    np.testing.assert_allclose(m.covariance, np.cov(x.T), atol=1e-10)


def test_sketches_merge_independent_of_chunking() -> None:
    rng = np.random.default_rng(1)
    v = rng.normal(3, 2, 20000)
    h = Histogram.of(v[:5000], -10, 16, 4096).merge(Histogram.of(v[5000:], -10, 16, 4096))
    med = h.median()
    assert abs(med - np.median(v)) < 0.01
    assert abs(h.mad(med) - np.median(np.abs(v - np.median(v)))) < 0.01
    rows = np.arange(20000)
    a = HashSample.of(rows, v[:, None], 300, 0)
    b = HashSample.of(rows[11000:], v[11000:, None], 300, 0).merge(
        HashSample.of(rows[:11000], v[:11000, None], 300, 0))
    np.testing.assert_array_equal(a.rows, b.rows)


def test_in_memory_equals_chunked_and_finds_planted() -> None:
    x, y, poison = planted()
    one = detect_in_memory(x, y)
    many = detect_in_memory(x, y, chunk_rows=333, batch_rows=100)
    np.testing.assert_array_equal(one.flags, many.flags)
    assert one.poisoned_classes == [1]
    assert (one.flags & poison).sum() >= 0.95 * poison.sum()
    assert (one.flags & ~poison).sum() <= 0.01 * (~poison).sum()


def test_clean_data_no_class_poisoned() -> None:
    x, y, _ = planted()
    x, y = x[:, 4:], y  # the shift lives in the first 4 dims
    r = detect_in_memory(x, y)
    assert r.poisoned_classes == [] and not r.flags.any()


def test_large_group_on_top_direction_beside_heavy_tail() -> None:
    """A 45% poison group along the top principal direction, and a heavy-tailed clean
    direction that draws the fourth-moment direction away (as in MNIST BadNets
    representations): the spectral half takes the top direction and the class is found."""
    rng = np.random.default_rng(0)
    n = 6000
    y = rng.integers(0, 3, n)
    x = rng.normal(size=(n, 12)) + y[:, None] * 0.5
    x[:, 5] = rng.standard_t(3, n)
    poison = (y == 1) & (rng.random(n) < 0.45)
    x[poison, 0] += 5.0
    r = detect_in_memory(x, y)
    assert r.poisoned_classes == [1]
    assert r.findings[1]["spectral"]["direction"] == "top principal direction"
    assert (r.flags & poison).sum() >= 0.95 * poison.sum()
    assert (r.flags & ~poison).sum() <= 0.01 * (~poison).sum()


def _flagged(out: Path) -> np.ndarray:
    lines = (out / "flagged.csv").read_text().splitlines()
    assert lines[0].startswith("index,label,")
    return np.array([int(r.split(",")[0]) for r in lines[1:]], dtype=np.int64)


def test_scan_features_formats_agree(tmp_path: Path) -> None:
    x, y, poison = planted()
    ref = np.flatnonzero(detect_in_memory(x, y).flags)
    shards = tmp_path / "shards"
    shards.mkdir()
    write_parquet(shards / "a.parquet", x[:1500], y[:1500])
    write_parquet(shards / "b.parquet", x[1500:], y[1500:])
    np.save(tmp_path / "emb.npy", x)
    np.save(tmp_path / "emb.label.npy", y)
    inputs = [write_parquet(tmp_path / "cols.parquet", x, y),
              write_parquet(tmp_path / "list.parquet", x, y, as_list=True), shards,
              tmp_path / "emb.npy"]
    for i, path in enumerate(inputs):
        out = tmp_path / f"out{i}"
        rc = main(["scan-features", str(path), "--label-column", "label", "--chunk-rows",
                   "900", "--quiet", "--out", str(out)])
        assert rc == 1
        got = _flagged(out)
        # float32 in Parquet vs float64 in memory: the flags may move by a row or two
        assert len(np.intersect1d(got, ref)) / len(np.union1d(got, ref)) >= 0.99, path
        assert (out / "summary.json").exists()


def test_feature_columns_subset(tmp_path: Path) -> None:
    x, y, _ = planted()
    path = write_parquet(tmp_path / "f.parquet", x, y)
    rc = main(["scan-features", str(path), "--feature-columns", "f4,f5", "f6", "--quiet",
               "--out", str(tmp_path / "o")])
    assert rc == 0  # the planted shift is in f0..f3


def _bad_parquet(tmp_path: Path, kind: str) -> Path:
    x, y, _ = planted(600)
    cols: dict = {"label": y, **{f"f{i}": x[:, i] for i in range(3)}}
    if kind == "nolabel":
        cols["target"] = cols.pop("label")
    elif kind == "text":
        cols["f1"] = np.array(["a"] * 600)
    elif kind == "nan":
        cols["f2"] = x[:, 2].copy()
        cols["f2"][417] = np.nan
    elif kind == "strlabel":
        cols["label"] = np.array(["cat"] * 600)
    path = tmp_path / f"{kind}.parquet"
    pq.write_table(pa.table(cols), path, row_group_size=200)
    return path


@pytest.mark.parametrize("kind, match", [
    ("nolabel", "no label column 'label'"), ("text", "non-numeric feature column(s) f1"),
    ("nan", "row 417 has a NaN"), ("strlabel", "expected integers")])
def test_bad_parquet_exit_2(tmp_path: Path, capsys, kind: str, match: str) -> None:
    out = tmp_path / "out"
    rc = main(["scan-features", str(_bad_parquet(tmp_path, kind)), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and match in err and "Traceback" not in err, err
    assert not (out / "flagged.csv").exists()


def test_bad_paths_exit_2(tmp_path: Path, capsys) -> None:
    np.save(tmp_path / "e.npy", np.zeros((10, 3)))
    for argv, match in [([str(tmp_path / "none.parquet")], "no such file"),
                        ([str(tmp_path)], "no *.parquet shards"),
                        ([str(tmp_path / "e.npy")], "no labels file"),
                        ([str(tmp_path / "e.npy"), "--scheduler", "tcp://x:1"], "--engine dask")]:
        assert main(["scan-features", *argv, "--out", str(tmp_path / "o")]) == 2
        assert match in capsys.readouterr().err


def test_unreachable_scheduler_fails_fast(tmp_path: Path, capsys) -> None:
    x, y, _ = planted(600)
    path = write_parquet(tmp_path / "f.parquet", x, y)
    t0 = time.perf_counter()
    rc = main(["scan-features", str(path), "--engine", "dask", "--scheduler",
               "tcp://127.0.0.1:9", "--connect-timeout", "1", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "no Dask scheduler answered" in err
    assert time.perf_counter() - t0 < 15


@dataclass(frozen=True)
class DyingSource(ArraySource):
    """Kills the worker process reading it once ``limit`` chunks have been read (by any
    process: the count lives in a file)."""

    counter: str = ""
    limit: int = 0

    def read(self, ref, batch_rows):  # type: ignore[no-untyped-def]
        with open(self.counter, "a+") as fh:
            fh.write("x")
            fh.seek(0)
            if len(fh.read()) > self.limit:
                os._exit(3)
        yield from super().read(ref, batch_rows)


def test_dask_matches_local_and_worker_death_leaves_no_flagged(tmp_path: Path) -> None:
    import cloudpickle
    import dask

    from poisonguard.scale.engine import DaskEngine, EngineError
    from poisonguard.scale.run import scan_features

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    x, y, _ = planted(3000)
    local = detect_in_memory(x, y, chunk_rows=500)
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        engine = DaskEngine(workers=2, memory_limit="1GiB")
        try:
            on_dask = detect_in_memory(x, y, engine=engine, chunk_rows=500)
            np.testing.assert_array_equal(local.flags, on_dask.flags)
            out = tmp_path / "out"
            out.mkdir()
            (out / "flagged.csv").write_text("index\n1\n")  # a stale one from an earlier run
            # 6 chunks x 3 fitting passes, then die during the scoring pass
            src = DyingSource(x, y, 500, counter=str(tmp_path / "count"), limit=6 * 3 + 2)
            with pytest.raises(EngineError, match="worker died"):
                scan_features(src, engine, out, batch_rows=500)
            assert not (out / "flagged.csv").exists()
            assert not list(out.glob(".flagged.csv*"))
        finally:
            engine.close()


def _tiny_images(path: Path, n: int = 360) -> Path:
    """3 classes of 8x8 images (a bright square per class), 10% of class 0 with a corner
    patch; written as x, y, is_poison."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, n)
    x = rng.integers(0, 60, (n, 8, 8)).astype(np.uint8)
    for c in range(3):
        x[y == c, 2 * c:2 * c + 3, 2:5] = 220
    poison = (y == 0) & (rng.random(n) < 0.1)
    x[poison, 6:, 6:] = 255
    np.savez(path, x=x, y=y, is_poison=poison)
    return path


def test_scan_engine_local_writes_shards_and_flags(tmp_path: Path) -> None:
    data = _tiny_images(tmp_path / "d.npz")
    out = tmp_path / "o"
    rc = main(["scan", str(data), "--engine", "local", "--epochs", "1", "--shard-rows", "150",
               "--threads", "1", "--quiet", "--out", str(out)])
    assert rc in (0, 1)
    assert sorted(p.name for p in (out / "representations").iterdir()) == [
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_rows"] == 360 and summary["command"] == "scan --engine"
    assert set(summary["timings"]) >= {"train_s", "extract_s", "total_s"}
    assert (out / "flagged.csv").read_text().startswith("index,label")


def test_scan_engine_refuses_options(tmp_path: Path, capsys) -> None:
    data = _tiny_images(tmp_path / "d.npz")
    for extra, match in [(["--engine", "local", "--trusted", str(data)], "--trusted"),
                         (["--scheduler", "tcp://x:1"], "--engine dask")]:
        assert main(["scan", str(data), *extra, "--out", str(tmp_path / "o")]) == 2
        assert match in capsys.readouterr().err
