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

Connections are kept alive: each fetch thread holds one HTTP/1.1 connection per host and
reuses it for that host's next URL (a stale one, closed by the server while idle, is replaced
once without counting as an attempt); it keeps the connections of the ``KEPT_PER_THREAD`` hosts
it used last, so a crawl over millions of hosts holds a bounded number of sockets. URLs that
go through a proxy from the environment, and redirects, are fetched with :mod:`urllib` (a new
connection each).
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import random
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
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
KEPT_PER_THREAD = 4      # open connections a fetch thread keeps (the hosts it used last)
REDIRECTS = {301, 302, 303, 307, 308}
DRAIN_BYTES = 1 << 16   # an error or redirect body up to this is read so the connection stays


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
    first attempt, exponential ``backoff`` base (s), ``max_bytes`` per body, ``workers``
    (threads), ``keep_alive`` (reuse each thread's connection to a host)."""

    timeout: float = 10.0
    retries: int = 2
    backoff: float = 0.5
    max_bytes: int = 256 << 20
    workers: int = 32
    keep_alive: bool = True

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
                "max_bytes": self.max_bytes, "workers": self.workers,
                "keep_alive": self.keep_alive}


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


Key = tuple[str, str, int | None]


class Fetcher:
    """A thread pool that fetches and hashes URLs; use as a context manager."""

    def __init__(self, options: FetchOptions | None = None) -> None:
        self.options = options or FetchOptions()
        self._pool = ThreadPoolExecutor(max_workers=self.options.workers,
                                        thread_name_prefix="poisonguard-fetch")
        # loopback never goes through a proxy; everything else honours the environment's
        self._direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._env = urllib.request.build_opener()
        self._proxies = urllib.request.getproxies()
        self._headers = {"User-Agent": f"poisonguard/{__version__} (provenance check)",
                         "Accept-Encoding": "identity"}
        self._local = threading.local()
        self._opened: set[http.client.HTTPConnection] = set()
        self._proxied_hosts: dict[tuple[str, str], bool] = {}
        self._lock = threading.Lock()
        self._ssl: ssl.SSLContext | None = None
        self.connections_opened = 0   # new TCP connections made by the kept-alive path

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for conn in self._opened:
                conn.close()
            self._opened.clear()

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

    # ------------------------------------------------------------------ one attempt
    def _attempt(self, url: str) -> FetchResult:
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError as exc:
            return FetchResult(url, "bad_url", detail=str(exc))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return FetchResult(url, "bad_url", detail="not an http(s) URL")
        loopback = _is_loopback(parts.hostname)
        if self.options.keep_alive and (loopback or not self._proxied(parts)):
            return self._attempt_kept(url, parts, port)
        return self._attempt_urllib(url, self._direct if loopback else self._env)

    def _proxied(self, parts: urllib.parse.SplitResult) -> bool:
        """Whether the environment sends this URL through a proxy (cached per host)."""
        if parts.scheme not in self._proxies:
            return False
        key = (parts.scheme, parts.netloc)
        hit = self._proxied_hosts.get(key)
        if hit is None:
            hit = self._proxied_hosts[key] = not urllib.request.proxy_bypass(parts.netloc)
        return hit

    def _connection(self, key: Key) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection to ``key`` and whether it is already open (reused)."""
        conns: OrderedDict[Key, http.client.HTTPConnection] | None = getattr(
            self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = OrderedDict()
        conn = conns.get(key)
        if conn is not None:
            conns.move_to_end(key)
        else:
            while len(conns) >= KEPT_PER_THREAD:   # the host used least recently
                self._drop(next(iter(conns)))
            scheme, host, port = key
            if scheme == "https":
                if self._ssl is None:
                    self._ssl = ssl.create_default_context()
                conn = http.client.HTTPSConnection(host, port, timeout=self.options.timeout,
                                                   context=self._ssl)
            else:
                conn = http.client.HTTPConnection(host, port, timeout=self.options.timeout)
            conns[key] = conn
            with self._lock:
                self._opened.add(conn)
        return conn, conn.sock is not None

    def _drop(self, key: Key) -> None:
        conn = self._local.conns.pop(key, None)
        if conn is not None:
            conn.close()
            with self._lock:
                self._opened.discard(conn)

    def _attempt_kept(self, url: str, parts: urllib.parse.SplitResult,
                      port: int | None) -> FetchResult:
        opts = self.options
        key: Key = (parts.scheme, parts.hostname or "", port)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        deadline = time.monotonic() + opts.timeout
        while True:
            conn, reused = self._connection(key)
            if not reused:
                with self._lock:
                    self.connections_opened += 1
            try:
                conn.request("GET", target, headers=self._headers)
                resp = conn.getresponse()
                break
            except TimeoutError:
                self._drop(key)
                return FetchResult(url, "timeout", detail=f"no answer within {opts.timeout} s")
            except (ConnectionResetError, BrokenPipeError, http.client.BadStatusLine) as exc:
                self._drop(key)
                if reused:   # the server closed the idle connection: once more, on a new one
                    continue
                return FetchResult(url, "unreachable", detail=f"{type(exc).__name__}: {exc}")
            except (http.client.HTTPException, OSError) as exc:
                self._drop(key)
                return FetchResult(url, "unreachable", detail=f"{type(exc).__name__}: {exc}")
            except ValueError as exc:   # a URL http.client refuses (control characters)
                self._drop(key)
                return FetchResult(url, "bad_url", detail=str(exc))
        code = resp.status
        try:
            if code in REDIRECTS or not 200 <= code < 300:
                self._discard(key, resp)
                if code in REDIRECTS:   # urllib follows redirects, with its own limits
                    loopback = _is_loopback(parts.hostname)
                    return self._attempt_urllib(url, self._direct if loopback else self._env)
                status = "gone" if code in (404, 410) else "http_error"
                return FetchResult(url, status, http_status=code, detail=f"HTTP {code}")
            result = self._read_body(url, resp, code, deadline)
        except TimeoutError:
            self._drop(key)
            return FetchResult(url, "timeout", detail=f"body not complete after {opts.timeout} s")
        except (http.client.HTTPException, OSError) as exc:
            self._drop(key)
            return FetchResult(url, "unreachable", detail=f"{type(exc).__name__}: {exc}")
        if not resp.isclosed():   # stopped part way (too large, too slow): the rest is unread
            self._drop(key)
        return result

    def _discard(self, key: Key, resp: http.client.HTTPResponse) -> None:
        """Read a small error or redirect body so the connection can be reused; else drop it."""
        resp.read(DRAIN_BYTES)
        if not resp.isclosed():
            self._drop(key)

    def _read_body(self, url: str, resp: http.client.HTTPResponse, code: int,
                   deadline: float) -> FetchResult:
        """Hash the body as it streams, within the deadline and the size limit."""
        opts = self.options
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

    def _attempt_urllib(self, url: str, opener: urllib.request.OpenerDirector) -> FetchResult:
        opts = self.options
        req = urllib.request.Request(url, headers=self._headers)
        deadline = time.monotonic() + opts.timeout
        try:
            with opener.open(req, timeout=opts.timeout) as resp:
                return self._read_body(url, resp, resp.status, deadline)
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
