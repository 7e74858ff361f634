"""Run the four passes of :mod:`poisonguard.scale.detector` over a source with an engine, and
write ``flagged.csv`` (streamed, atomically) and ``summary.json``.

:func:`detect_in_memory` is the in-memory path: the very same passes over arrays held in
memory (one chunk by default), returning every row's scores and flags.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Any

import numpy as np

from poisonguard.scale import detector as D
from poisonguard.scale.engine import LocalEngine
from poisonguard.scale.sources import ArraySource

FLAGGED_HEADER = "index,label,confidence,spectral_score,cluster_z,detectors\n"


@dataclass
class FitResult:
    """The fitted per-class model, the per-class evidence and pass timings."""

    model: D.Model
    evidence: dict[int, dict[str, Any]]
    skipped: dict[int, str]
    n_rows: int
    timings: dict[str, float]
    config: D.ScaleConfig


def _fold(engine: Any, source: Any, refs: list, fn: Callable, merge: Callable, model: Any,
          config: D.ScaleConfig, batch_rows: int, desc: str) -> Any:
    return reduce(merge, engine.imap(source, refs, fn, model, config, batch_rows, desc), {})


def fit(source: Any, engine: Any, config: D.ScaleConfig, batch_rows: int) -> FitResult:
    """Passes 1-3: moments and projection, sample and splits, stats and thresholds."""
    refs = source.chunks()
    timings: dict[str, float] = {}
    t = time.perf_counter()
    moments = _fold(engine, source, refs, D.moments_partial, D.merge_moments, None, config,
                    batch_rows, "pass 1/4 moments")
    model, skipped = D.fit_projection(moments, config)
    config = D.sized_for(config, len(model))
    timings["moments_s"] = time.perf_counter() - t
    t = time.perf_counter()
    samples = _fold(engine, source, refs, D.sample_partial, D.merge_samples, model, config,
                    batch_rows, "pass 2/4 sample")
    model = D.fit_splits(model, samples, config)
    timings["sample_split_s"] = time.perf_counter() - t
    t = time.perf_counter()
    stats = _fold(engine, source, refs, D.stats_partial, D.merge_stats, model, config,
                  batch_rows, "pass 3/4 stats")
    model, evidence = D.fit_thresholds(model, stats, config)
    timings["stats_s"] = time.perf_counter() - t
    return FitResult(model, evidence, skipped, sum(m.n for m in moments.values()), timings,
                     config)


def score(source: Any, engine: Any, fitted: FitResult, config: D.ScaleConfig,
          batch_rows: int, keep_all: bool = False) -> Iterator[D.Scored]:
    """Pass 4: each chunk's scored rows (flagged ones only unless ``keep_all``), in order."""
    return engine.imap(source, source.chunks(), D.score_partial, fitted.model, config,
                       batch_rows, "pass 4/4 score", keep_all=keep_all)


def findings(fitted: FitResult, flagged_per_class: dict[int, int]) -> list[dict[str, Any]]:
    out = []
    for c in sorted(set(fitted.model) | set(fitted.skipped)):
        if c in fitted.skipped:
            out.append({"label": c, "poisoned": False, "n_flagged": 0,
                        "reason": fitted.skipped[c]})
            continue
        cm = fitted.model[c]
        out.append({"label": c, "poisoned": cm.poisoned,
                    "n_flagged": int(flagged_per_class.get(c, 0)), **fitted.evidence[c]})
    return out


@dataclass
class InMemoryResult:
    flags: np.ndarray
    spectral_score: np.ndarray
    cluster_z: np.ndarray
    votes: np.ndarray
    poisoned_classes: list[int]
    findings: list[dict[str, Any]]


def detect_in_memory(x: np.ndarray, y: np.ndarray, config: D.ScaleConfig | None = None,
                     engine: Any = None, chunk_rows: int | None = None,
                     batch_rows: int = 131072) -> InMemoryResult:
    """The streamed detector over arrays: one chunk unless ``chunk_rows`` is given."""
    config = config or D.ScaleConfig()
    engine = engine or LocalEngine()
    source = ArraySource(np.asarray(x), np.asarray(y), chunk_rows or len(y))
    fitted = fit(source, engine, config, batch_rows)
    sc = D.Scored.concat(list(score(source, engine, fitted, config, batch_rows,
                                    keep_all=True)))
    n = len(y)
    flags, ss, acz, votes = (np.zeros(n, dtype=bool), np.zeros(n), np.zeros(n),
                             np.zeros(n, dtype=np.int64))
    flags[sc.rows], ss[sc.rows], acz[sc.rows], votes[sc.rows] = (sc.flags, sc.ss_score,
                                                                 sc.ac_z, sc.votes)
    per_class = {int(c): int(flags[y == c].sum()) for c in np.unique(y)}
    return InMemoryResult(flags, ss, acz, votes,
                          [c for c, cm in fitted.model.items() if cm.poisoned],
                          findings(fitted, per_class))


def _write_flagged(path: Path, chunks: Iterator[D.Scored]) -> tuple[int, dict[int, int]]:
    """Append each chunk's flagged rows to a temporary file beside ``path``; rename it into
    place only after the last chunk (a failed run leaves no flagged.csv)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    n, per_class = 0, {}
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(FLAGGED_HEADER)
            for sc in chunks:
                for r, c, s, z, fs, fa in zip(sc.rows.tolist(), sc.labels.tolist(),
                                              sc.ss_score.tolist(), sc.ac_z.tolist(),
                                              sc.ss_flag.tolist(), sc.ac_flag.tolist()):
                    names = ";".join((["activation_clustering"] if fa else [])
                                     + (["spectral_signatures"] if fs else []))
                    fh.write(f"{r},{c},{(fs + fa) / 2:g},{s:.6g},{z:.6g},{names}\n")
                    per_class[c] = per_class.get(c, 0) + 1
                n += len(sc.rows)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return n, per_class


def scan_features(source: Any, engine: Any, out: Path, config: D.ScaleConfig | None = None,
                  batch_rows: int = 131072, describe: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    """Fit, score, write ``out/flagged.csv`` and ``out/summary.json``; return the summary.
    A stale flagged.csv/summary.json in ``out`` is removed first, so a failed run never leaves
    one behind that looks complete."""
    from poisonguard.io import atomic_write_json
    from poisonguard.types import jsonable

    config = config or D.ScaleConfig()
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("flagged.csv", "summary.json"):
        (out / stale).unlink(missing_ok=True)
    t0 = time.perf_counter()
    fitted = fit(source, engine, config, batch_rows)
    t = time.perf_counter()
    n_flagged, per_class = _write_flagged(out / "flagged.csv",
                                          score(source, engine, fitted, config, batch_rows))
    fitted.timings["score_s"] = time.perf_counter() - t
    fitted.timings["total_s"] = time.perf_counter() - t0
    summary = {
        "command": "scan-features",
        "n_rows": fitted.n_rows, "n_features": source.n_features,
        "n_chunks": len(source.chunks()), "n_flagged": n_flagged,
        "poisoned_classes": [c for c, cm in fitted.model.items() if cm.poisoned],
        "verdict": "poisoned" if any(cm.poisoned for cm in fitted.model.values()) else "clean",
        "classes": findings(fitted, per_class),
        "threshold_rule": fitted.config.rule(),
        "engine": describe or engine.describe(),
        "timings": {k: round(v, 3) for k, v in fitted.timings.items()},
        "flagged_file": "flagged.csv",
    }
    atomic_write_json(out / "summary.json", jsonable(summary))
    return summary
