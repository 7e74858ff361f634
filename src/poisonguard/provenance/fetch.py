"""Concurrent HTTP(S) fetching that hashes content as it streams (standard library only).

Every URL gets a :class:`FetchResult` with a status:

* ``ok``: the body was read whole; ``sha256`` and ``size`` describe it;
* ``gone``: HTTP 404 or 410, the server says the item no longer exists;
* ``http_error``: any other HTTP error status (retried for 408, 429 and 5xx);
* ``timeout``: no complete answer within ``timeout`` seconds (per attempt; retried);
* ``unreachable``: DNS failure, refused or dropped connection (retried);
* ``too_large``: the body exceeds ``max_bytes``;
* ``bad_url``: not an ``http``/``https`` URL.

Only ``ok`` says anything about the content: the rest are *unverifiable* (``gone`` counts as
missing), never clean.
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType

from poisonguard import __version__
from poisonguard.errors import ConfigError
from poisonguard.provenance.util import ordered_map

RETRY_STATUSES = {"timeout", "unreachable"}
RETRY_HTTP = {408, 425, 429, 500, 502, 503, 504}
READ_CHUNK = 1 << 16


@dataclass(frozen=True)
class FetchResult:
    """What fetching one URL gave."""

    url: str
    status: str
    sha256: str | None = None
    size: int | None = None
    http_status: int | None = None
    detail: str = ""
    attempts: int = 1

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class FetchOptions:
    """Per-request limits: ``timeout`` (s, per attempt, whole body), ``retries`` after the
    first attempt, exponential ``backoff`` base (s), ``max_bytes`` per body, ``workers``."""

    timeout: float = 10.0
    retries: int = 2
    backoff: float = 0.5
    max_bytes: int = 256 << 20
    workers: int = 32

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise ConfigError(f"--timeout must be > 0 seconds, got {self.timeout}")
        if self.retries < 0:
            raise ConfigError(f"--retries must be >= 0, got {self.retries}")
        if self.backoff < 0:
            raise ConfigError(f"backoff must be >= 0, got {self.backoff}")
        if self.max_bytes < 1:
            raise ConfigError(f"--max-bytes must be >= 1, got {self.max_bytes}")
        if self.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {self.workers}")

    def to_dict(self) -> dict[str, float | int]:
        return {"timeout_s": self.timeout, "retries": self.retries, "backoff_s": self.backoff,
                "max_bytes": self.max_bytes, "workers": self.workers}


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Fetcher:
    """A thread pool that fetches and hashes URLs; use as a context manager."""

    def __init__(self, options: FetchOptions | None = None) -> None:
        self.options = options or FetchOptions()
        self._pool = ThreadPoolExecutor(max_workers=self.options.workers,
                                        thread_name_prefix="poisonguard-fetch")
        # loopback never goes through a proxy; everything else honours the environment's
        self._direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._env = urllib.request.build_opener()
        self._headers = {"User-Agent": f"poisonguard/{__version__} (provenance check)",
                         "Accept-Encoding": "identity"}

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def fetch(self, url: str) -> FetchResult:
        """Fetch ``url`` with retries and backoff; never raises for network problems."""
        opts = self.options
        result = self._attempt(url)
        attempt = 1
        while attempt <= opts.retries and (
                result.status in RETRY_STATUSES
                or (result.status == "http_error" and result.http_status in RETRY_HTTP)):
            time.sleep(opts.backoff * (2 ** (attempt - 1)) * (0.5 + random.random()))
            result = self._attempt(url)
            attempt += 1
        if attempt > 1:
            result = FetchResult(result.url, result.status, result.sha256, result.size,
                                 result.http_status, result.detail, attempt)
        return result

    def submit(self, url: str) -> Future[FetchResult]:
        """Start fetching ``url`` on the pool."""
        return self._pool.submit(self.fetch, url)

    def fetch_many(self, urls: Iterable[str]) -> Iterator[FetchResult]:
        """Fetch concurrently; results in input order, a bounded number in flight."""
        return ordered_map(self._pool, self.fetch, urls, window=self.options.workers * 4)

    def _attempt(self, url: str) -> FetchResult:
        opts = self.options
        try:
            parts = urllib.parse.urlsplit(url)
        except ValueError as exc:
            return FetchResult(url, "bad_url", detail=str(exc))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return FetchResult(url, "bad_url", detail="not an http(s) URL")
        opener = self._direct if _is_loopback(parts.hostname) else self._env
        req = urllib.request.Request(url, headers=self._headers)
        deadline = time.monotonic() + opts.timeout
        try:
            with opener.open(req, timeout=opts.timeout) as resp:
                code = resp.status
                length = resp.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > opts.max_bytes:
                    return FetchResult(url, "too_large", http_status=code,
                                       detail=f"Content-Length {length} > {opts.max_bytes}")
                h = hashlib.sha256()
                size = 0
                while True:
                    if time.monotonic() > deadline:
                        return FetchResult(url, "timeout", http_status=code,
                                           detail=f"body not complete after {opts.timeout} s")
                    chunk = resp.read(READ_CHUNK)
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > opts.max_bytes:
                        return FetchResult(url, "too_large", http_status=code,
                                           detail=f"body exceeds {opts.max_bytes} bytes")
                    h.update(chunk)
                return FetchResult(url, "ok", h.hexdigest(), size, code)
        except urllib.error.HTTPError as exc:
            exc.close()
            status = "gone" if exc.code in (404, 410) else "http_error"
            return FetchResult(url, status, http_status=exc.code, detail=f"HTTP {exc.code}")
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                return FetchResult(url, "timeout", detail=f"no answer within {opts.timeout} s")
            return FetchResult(url, "unreachable", detail=str(exc.reason))
        except TimeoutError:
            return FetchResult(url, "timeout", detail=f"no answer within {opts.timeout} s")
        except (http.client.HTTPException, OSError) as exc:
            return FetchResult(url, "unreachable", detail=f"{type(exc).__name__}: {exc}")
        except ValueError as exc:
            return FetchResult(url, "bad_url", detail=str(exc))
