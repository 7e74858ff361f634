"""The fetcher's kept-alive connections, against an HTTP/1.1 loopback server."""

from __future__ import annotations

import hashlib
import http.server
import threading
import time
from collections.abc import Iterator

import pytest

from poisonguard.provenance import Fetcher, FetchOptions


def body(name: str) -> bytes:
    return f"content of {name} ".encode() * 20


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    connections = 0
    requests = 0
    drop_every = 0          # close the connection silently after this many requests (0: never)
    lock = threading.Lock()

    def setup(self) -> None:
        super().setup()
        with Handler.lock:
            Handler.connections += 1
        self.served = 0

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        with Handler.lock:
            Handler.requests += 1
        self.served += 1
        path = self.path
        if path.startswith("/redirect/"):
            self.send_response(302)
            self.send_header("Location", "/" + path.split("/", 2)[2])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path.startswith("/missing"):
            self.send_error(404)
        elif path.startswith("/slow"):
            time.sleep(1.5)
            self._send(body(path))
        else:
            self._send(body(path))
        if Handler.drop_every and self.served >= Handler.drop_every:
            self.close_connection = True   # no "Connection: close" header: a stale connection

    def _send(self, data: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass


@pytest.fixture()
def base() -> Iterator[str]:
    Handler.connections = Handler.requests = Handler.drop_every = 0
    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def sha(name: str) -> str:
    return hashlib.sha256(body(name)).hexdigest()


def test_connections_are_reused(base: str) -> None:
    urls = [f"{base}/img/{i}" for i in range(60)]
    with Fetcher(FetchOptions(workers=3, retries=0)) as f:
        results = list(f.fetch_many(urls))
        opened = f.connections_opened
    assert [r.sha256 for r in results] == [sha(f"/img/{i}") for i in range(60)]
    assert opened <= 3 and Handler.connections <= 3
    assert Handler.requests == 60


def test_stale_connections_are_replaced_without_an_attempt(base: str) -> None:
    Handler.drop_every = 3
    urls = [f"{base}/img/{i}" for i in range(30)]
    with Fetcher(FetchOptions(workers=2, retries=0)) as f:
        results = list(f.fetch_many(urls))
    assert all(r.ok and r.attempts == 1 for r in results)
    assert [r.sha256 for r in results] == [sha(f"/img/{i}") for i in range(30)]
    assert Handler.connections >= 10


def test_errors_redirects_and_limits_on_a_kept_connection(base: str) -> None:
    with Fetcher(FetchOptions(workers=1, retries=0, timeout=0.5)) as f:
        missing = f.fetch(f"{base}/missing/x")
        after = f.fetch(f"{base}/img/1")
        moved = f.fetch(f"{base}/redirect/img/2")
        slow = f.fetch(f"{base}/slow/3")
        again = f.fetch(f"{base}/img/4")
    assert (missing.status, missing.http_status) == ("gone", 404)
    assert after.ok and after.sha256 == sha("/img/1")
    assert moved.ok and moved.sha256 == sha("/img/2")
    assert slow.status == "timeout"
    assert again.ok and again.sha256 == sha("/img/4")
    with Fetcher(FetchOptions(workers=1, retries=0, max_bytes=50)) as f:
        big = f.fetch(f"{base}/img/5")
        big_again = f.fetch(f"{base}/img/6")
    assert big.status == big_again.status == "too_large"


def test_keep_alive_off_gives_the_same_results(base: str) -> None:
    urls = [f"{base}/img/{i}" for i in range(10)] + [f"{base}/missing/1"]
    with Fetcher(FetchOptions(workers=2, retries=0)) as f:
        kept = [(r.status, r.sha256) for r in f.fetch_many(urls)]
    with Fetcher(FetchOptions(workers=2, retries=0, keep_alive=False)) as f:
        plain = [(r.status, r.sha256) for r in f.fetch_many(urls)]
        assert f.connections_opened == 0
    assert kept == plain


def test_refused_connection_is_unreachable() -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with Fetcher(FetchOptions(workers=1, retries=0, timeout=2)) as f:
        r = f.fetch(f"http://127.0.0.1:{port}/x")
    assert r.status == "unreachable"


def test_each_thread_keeps_a_bounded_number_of_hosts(base: str, monkeypatch) -> None:
    from poisonguard.provenance import fetch

    port = base.rsplit(":", 1)[1]
    hosts = [f"http://127.0.0.1:{port}", f"http://localhost:{port}"]
    urls = [f"{hosts[i % 2]}/img/{i}" for i in range(6)]
    for kept, opened in ((1, 6), (2, 2)):
        monkeypatch.setattr(fetch, "KEPT_PER_THREAD", kept)
        with Fetcher(FetchOptions(workers=1, retries=0)) as f:
            results = [f.fetch(u) for u in urls]
            assert f.connections_opened == opened and len(f._opened) <= kept
        assert all(r.ok for r in results)
