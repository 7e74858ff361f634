"""Fast SHA-256 of files and of array samples.

Files are read with raw ``os.read`` calls (1 MiB at a time, one call for a small file) and hashed
by OpenSSL through :mod:`hashlib`, which releases the GIL while hashing, so a thread pool over
files scales across cores. Array samples are hashed over a fixed prefix naming the dtype and
shape followed by the sample's raw C-order bytes.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

READ_SIZE = 1 << 20
CHUNK_FILES = 64  # files per pool task: amortises the pool's per-task cost over small files
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True)
class FileHash:
    """The outcome of hashing one path: ``sha256`` and ``size``, or ``error`` (and no hash).

    ``error`` is ``"missing"`` (no such file, or a folder now stands there), ``"not_regular"``
    (a FIFO, socket or device) or ``"unreadable: <reason>"``.
    """

    size: int | None
    sha256: str | None
    error: str | None = None


def hash_file(path: str) -> FileHash:
    """SHA-256 and size of the regular file at ``path`` (never raises for per-file problems)."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        return FileHash(None, None, "missing")
    except OSError as exc:
        return FileHash(None, None, f"unreadable: {exc.strerror}")
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            return FileHash(None, None, "missing")
        if not stat.S_ISREG(mode):
            return FileHash(None, None, "not_regular")
        h = hashlib.sha256()
        size = 0
        read = os.read
        while True:
            chunk = read(fd, READ_SIZE)
            if not chunk:
                break
            h.update(chunk)
            size += len(chunk)
        return FileHash(size, h.hexdigest())
    except OSError as exc:
        return FileHash(None, None, f"unreadable: {exc.strerror}")
    finally:
        os.close(fd)


def _hash_chunk(paths: Sequence[str]) -> list[FileHash]:
    return [hash_file(p) for p in paths]


def submit_files(paths: Sequence[str], pool: Executor | None) -> Callable[[], list[FileHash]]:
    """Start hashing ``paths`` on ``pool`` (chunks of files per task); return a function that
    waits for and returns the results in order. Without a pool, hash when it is called."""
    if pool is None:
        return lambda: _hash_chunk(paths)
    futures = [pool.submit(_hash_chunk, paths[i:i + CHUNK_FILES])
               for i in range(0, len(paths), CHUNK_FILES)]

    def collect() -> list[FileHash]:
        out: list[FileHash] = []
        for f in futures:
            out.extend(f.result())
        return out

    return collect


def hash_files(paths: Sequence[str], pool: Executor | None = None) -> list[FileHash]:
    """Hash ``paths`` (in order), spreading chunks of files over ``pool`` when one is given."""
    return submit_files(paths, pool)()


def sample_prefix(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The bytes hashed before every sample's raw bytes: format tag, dtype, per-sample shape."""
    return (b"poisonguard-array-sample-v1\0" + np.dtype(dtype).str.encode() + b"\0"
            + ",".join(str(int(s)) for s in shape).encode() + b"\0")


def hash_samples(x: np.ndarray, start: int, stop: int) -> list[str]:
    """SHA-256 (hex) of samples ``x[start:stop]``: prefix (dtype, shape) + raw C-order bytes."""
    block = np.ascontiguousarray(x[start:stop])
    base = hashlib.sha256(sample_prefix(x.dtype, x.shape[1:]))
    item = block.itemsize * int(np.prod(x.shape[1:], dtype=np.int64))
    view = memoryview(block.reshape(-1).view(np.uint8)) if block.size else memoryview(b"")
    out = []
    for i in range(stop - start):
        h = base.copy()
        h.update(view[i * item:(i + 1) * item])
        out.append(h.hexdigest())
    return out
