"""Where the per-chunk work runs: in this process (``local``) or on Dask workers (``dask``).

An engine maps a pass function over a source's chunk refs and yields each chunk's partial
result in chunk order, with a bounded number of chunks in flight (memory stays bounded; the
client merges partial states as they come). The Dask engine starts a ``LocalCluster`` unless
given a scheduler address; a scheduler that does not answer, a worker that dies, or a task that
fails surface as one :class:`EngineError` line (bad data raised on a worker surfaces as the
original :class:`~poisonguard.errors.DataError`).
"""

from __future__ import annotations

import sys
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from poisonguard.errors import ConfigError, PoisonguardError


class EngineError(PoisonguardError):
    """The distributed run failed (worker lost, scheduler gone): nothing was written."""


def run_task(source: Any, ref: Any, fn: Callable, model: Any, config: Any, batch_rows: int,
             kwargs: dict[str, Any]) -> Any:
    """One chunk: ``fn`` over the ref's batches (the unit of work on a worker)."""
    return fn(source.read(ref, batch_rows), model, config, **kwargs)


def _const(value: Any) -> Any:
    return value


def _run_shared(shared: tuple, ref: Any, fn: Callable, batch_rows: int,
                kwargs: dict[str, Any]) -> Any:
    source, model, config = shared
    return run_task(source, ref, fn, model, config, batch_rows, kwargs)


def _progress(total: int, desc: str, show: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="chunk", disable=not show, file=sys.stderr,
                leave=False)


class LocalEngine:
    """Chunks one after another in this process."""

    name = "local"

    def __init__(self, progress: bool = False) -> None:
        self.progress = progress

    def imap(self, source: Any, refs: list, fn: Callable, model: Any, config: Any,
             batch_rows: int, desc: str, **kwargs: Any) -> Iterator[Any]:
        with _progress(len(refs), desc, self.progress) as bar:
            for ref in refs:
                yield run_task(source, ref, fn, model, config, batch_rows, kwargs)
                bar.update(1)

    def describe(self) -> dict[str, Any]:
        return {"engine": "local", "workers": 1}

    def close(self) -> None:
        pass


class DaskEngine:
    """Chunks as tasks on a Dask cluster: a new ``LocalCluster`` of ``workers`` single-threaded
    worker processes (``memory_limit`` each), or the running cluster at ``scheduler``."""

    name = "dask"

    def __init__(self, scheduler: str | None = None, workers: int = 2,
                 memory_limit: str = "2GiB", timeout_s: float = 5.0, progress: bool = False,
                 in_flight: int | None = None) -> None:
        try:
            import logging

            from distributed import Client, LocalCluster
        except ImportError:
            raise ConfigError("--engine dask needs the dask and distributed packages "
                              "(pip install 'poisonguard[scale]')") from None
        if workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {workers}")
        for name in ("distributed", "bokeh", "tornado"):
            logging.getLogger(name).setLevel(logging.ERROR)
        self.progress = progress
        self.nothing_written = "no flagged.csv written"  # the tail of a failure's message
        self.cluster = None
        if scheduler:
            try:
                self.client = Client(scheduler, timeout=f"{timeout_s}s")
            except (OSError, TimeoutError, ValueError) as exc:
                raise ConfigError(f"--scheduler {scheduler}: no Dask scheduler answered within "
                                  f"{timeout_s:g} s ({type(exc).__name__}); check the address "
                                  "and that the scheduler is running") from None
        else:
            try:
                self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1,
                                            processes=True, memory_limit=memory_limit,
                                            dashboard_address=":0")
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"cannot start a LocalCluster with --workers {workers} "
                                  f"--memory-limit {memory_limit}: {exc}") from None
            self.client = Client(self.cluster)
        n = len(self.client.scheduler_info().get("workers", {})) or workers
        self.in_flight = in_flight or max(2, 2 * n)

    @property
    def dashboard(self) -> str | None:
        try:
            return self.client.dashboard_link
        except Exception:  # noqa: BLE001 - no dashboard (bokeh missing) is not an error
            return None

    def describe(self) -> dict[str, Any]:
        info = self.client.scheduler_info()
        workers = info.get("workers", {})
        return {"engine": "dask", "scheduler": info.get("address"), "workers": len(workers),
                "memory_limit_per_worker": sorted({w.get("memory_limit") for w in
                                                   workers.values()}),
                "dashboard": self.dashboard}

    def imap(self, source: Any, refs: list, fn: Callable, model: Any, config: Any,
             batch_rows: int, desc: str, **kwargs: Any) -> Iterator[Any]:
        from distributed import KilledWorker

        client = self.client
        # Not client.scatter: scattered data lost with a worker cannot be recovered, while a
        # task's result can be recomputed, so a retried chunk still finds the model.
        token = uuid.uuid4().hex[:10]
        shared = client.submit(_const, (source, model, config), pure=False,
                               key=f"{desc}-model-{token}")
        pending: deque = deque()
        it = iter(enumerate(refs))
        with _progress(len(refs), desc, self.progress) as bar:
            try:
                while True:
                    while len(pending) < self.in_flight:
                        nxt = next(it, None)
                        if nxt is None:
                            break
                        i, ref = nxt
                        pending.append((i, client.submit(_run_shared, shared, ref, fn,
                                                         batch_rows, kwargs, pure=False,
                                                         key=f"{desc}-{i}-{token}")))
                    if not pending:
                        return
                    i, fut = pending.popleft()
                    try:
                        result = fut.result()
                    except PoisonguardError:
                        raise
                    except KilledWorker as exc:
                        raise EngineError(f"dask: a worker died running {desc} on chunk {i} "
                                          f"(rows from {refs[i].offset}) and the task was not "
                                          f"retried again ({exc}); the run is abandoned, "
                                          f"{self.nothing_written}") from None
                    except Exception as exc:  # noqa: BLE001 - worker/comm failure: one line
                        raise EngineError(f"dask: {desc} failed on chunk {i} (rows from "
                                          f"{refs[i].offset}): {type(exc).__name__}: {exc}; "
                                          f"{self.nothing_written}") from None
                    bar.update(1)
                    yield result
            finally:
                for _, fut in pending:
                    fut.cancel()
                shared.cancel()

    def close(self) -> None:
        try:
            self.client.close()
            if self.cluster is not None:
                self.cluster.close()
        except Exception:  # noqa: BLE001 - closing a broken cluster must not mask the error
            pass


def make_engine(name: str, scheduler: str | None = None, workers: int = 2,
                memory_limit: str = "2GiB", timeout_s: float = 5.0,
                progress: bool = False) -> LocalEngine | DaskEngine:
    if name == "local":
        if scheduler:
            raise ConfigError("--scheduler needs --engine dask")
        return LocalEngine(progress)
    if name == "dask":
        return DaskEngine(scheduler, workers, memory_limit, timeout_s, progress)
    raise ConfigError(f"--engine must be local or dask, got {name!r}")
