"""``scan --engine dask``: a sacrificial model's representations extracted on Dask workers
and written as Parquet shards, then scanned with the mergeable detector (as ``scan-features``).

The client trains the sacrificial model once (as the in-memory scan's first round, without its
loss seeding or later rounds) and writes it to ``OUT/sacrificial_model/``. Each task loads the
model and the dataset on its worker (cached per worker process), embeds rows
``start .. stop`` and writes ``OUT/representations/part-NNNNN.parquet`` (a temporary file
renamed into place). The shards are then the features of :func:`poisonguard.scale.run.
scan_features` on the same cluster.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np


@lru_cache(maxsize=2)
def _worker_data(path: str) -> Any:
    from poisonguard.data import load_dataset

    return load_dataset(path)


@lru_cache(maxsize=2)
def _worker_model(model_dir: str) -> Any:
    import torch

    from poisonguard.models.io import load_model

    torch.set_num_threads(1)
    return load_model(model_dir)


def extract_shard(data_path: str, model_dir: str, start: int, stop: int, out_path: str,
                  layer: str | None = None) -> int:
    """Embed rows ``start .. stop`` of the dataset; write them (``label``, ``r0`` ..) to
    ``out_path``; return the row count (the task run on a worker)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = _worker_data(data_path)
    reps = _worker_model(model_dir).representations(data.x[start:stop], layer=layer)
    reps = np.asarray(reps, dtype=np.float32)
    table = pa.table({"label": np.asarray(data.y[start:stop], dtype=np.int64),
                      **{f"r{i}": reps[:, i] for i in range(reps.shape[1])}})
    tmp = f"{out_path}.tmp{os.getpid()}"
    pq.write_table(table, tmp)
    os.replace(tmp, out_path)
    return stop - start


def extract_representations(engine: Any, data_path: str, model_dir: Path, n_rows: int,
                            out_dir: Path, shard_rows: int, layer: str | None = None,
                            progress: bool = False) -> list[Path]:
    """One task per ``shard_rows`` rows on the engine's workers (in this process for the
    local engine); the shard paths in row order."""
    from poisonguard.scale.engine import EngineError, _progress

    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("part-*.parquet"):
        old.unlink()
    starts = list(range(0, n_rows, shard_rows))
    paths = [out_dir / f"part-{i:05d}.parquet" for i in range(len(starts))]
    args = [(str(data_path), str(model_dir), s, min(s + shard_rows, n_rows), str(p), layer)
            for s, p in zip(starts, paths)]
    with _progress(len(args), "extract representations", progress) as bar:
        if getattr(engine, "name", "local") != "dask":
            for a in args:
                extract_shard(*a)
                bar.update(1)
            return paths
        from distributed import as_completed

        futures = [engine.client.submit(extract_shard, *a, pure=False) for a in args]
        try:
            for fut in as_completed(futures):
                fut.result()
                bar.update(1)
        except Exception as exc:  # noqa: BLE001 - worker/comm failure: one line
            for fut in futures:
                fut.cancel()
            raise EngineError(f"dask: extracting representations failed: "
                              f"{type(exc).__name__}: {exc}; no flagged.csv written") from None
    return paths
