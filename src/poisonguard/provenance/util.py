"""Small helpers: streaming atomic output, UTC timestamps, key fingerprints, ordered pools."""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import numpy as np

T = TypeVar("T")
R = TypeVar("R")

FP_DTYPE = "S16"  # 128-bit key fingerprints: sortable fixed-width byte strings


def utc_now() -> str:
    """The current time as UTC ISO-8601 with second resolution, e.g. 2024-05-01T12:00:00Z."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def tmp_prefix(path: Path) -> str:
    """Name prefix of the temporary files :func:`atomic_output` creates beside ``path``."""
    return f".{path.name}."


@contextmanager
def atomic_output(path: str | Path, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it, give it ``mode`` and rename
    it over ``path``.

    The streaming counterpart of :func:`poisonguard.io.atomic_write_bytes`, for files too big to
    build in memory. On error the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def fingerprints(keys: Sequence[str]) -> np.ndarray:
    """128-bit BLAKE2b fingerprints of ``keys`` as an ``S16`` array (for bounded-memory sets)."""
    blake = hashlib.blake2b
    raw = b"".join([blake(k.encode("utf-8"), digest_size=16).digest() for k in keys])
    return np.frombuffer(raw, dtype=FP_DTYPE)


def contains(sorted_fps: np.ndarray, fps: np.ndarray) -> np.ndarray:
    """Boolean mask: which of ``fps`` occur in the sorted array ``sorted_fps``."""
    if len(sorted_fps) == 0 or len(fps) == 0:
        return np.zeros(len(fps), dtype=bool)
    idx = np.searchsorted(sorted_fps, fps)
    idx[idx == len(sorted_fps)] = 0
    return sorted_fps[idx] == fps


def ordered_map(pool: Executor, fn: Callable[[T], R], items: Iterable[T],
                window: int) -> Iterator[R]:
    """Like ``pool.map`` but lazy: at most ``window`` calls in flight, results in input order."""
    pending: deque[Future[R]] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
