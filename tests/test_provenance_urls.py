"""Provenance of URL lists, against a local HTTP server on loopback (split-view changes)."""

from __future__ import annotations

import argparse
import csv
import hashlib
import http.server
import json
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from poisonguard.provenance import Fetcher, FetchOptions, PinOptions, pin, read_manifest, verify
from poisonguard.provenance.cli import register
from poisonguard.provenance.verify import VerifyOptions

SLOW_S = 3.0


class Handler(http.server.SimpleHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        Handler.hits.append(self.path)
        if self.path.startswith("/slow/"):
            time.sleep(SLOW_S)
        if self.path.startswith("/boom/"):
            self.send_error(503)
            return
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that gave up (timeouts) close their sockets: not an error here


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    (root / "slow").mkdir()
    for i in range(12):
        (root / f"img{i}.jpg").write_bytes(f"image {i}".encode() * 50)
    (root / "slow" / "late.jpg").write_bytes(b"late")
    server = Server(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    Handler.hits = []
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


def run(*argv: str | Path) -> int:
    parser = argparse.ArgumentParser(prog="poisonguard")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    return args.handler(args)


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


# generous: the test machine may be busy; only the timeout test relies on a short timeout
NET = ("--timeout", "10", "--retries", "1", "--fetch-workers", "8")


def test_pin_fetch_and_detect_split_view_change(served: tuple[str, Path], tmp_path: Path) -> None:
    base, root = served
    urls = write_csv(tmp_path / "urls.csv", ["url", "caption"],
                     [[f"{base}/img{i}.jpg", f"caption {i}"] for i in range(10)])
    manifest = tmp_path / "m.parquet"
    assert run("pin", urls, "--out", manifest, *NET) == 0
    header, items = read_manifest(manifest)
    assert len(items) == 10 and len(Handler.hits) == 10
    assert items[0]["key"] == items[0]["url"] == f"{base}/img0.jpg"
    assert items[0]["label"] == "caption 0"
    assert items[0]["sha256"] == hashlib.sha256(b"image 0" * 50).hexdigest()
    assert header["sources"][0]["options"]["hashes_from_list"] is False

    assert run("verify", manifest, urls, *NET) == 0
    (root / "img4.jpg").write_bytes(b"the domain changed hands")   # split-view
    (root / "img7.jpg").unlink()                                  # gone: 404
    report = tmp_path / "r.json"
    assert run("verify", manifest, urls, "--out", report, *NET) == 1
    rep = json.loads(report.read_text())
    assert rep["modified"] == [f"{base}/img4.jpg"]
    assert rep["missing"] == [f"{base}/img7.jpg"]
    assert rep["new"] == [] and rep["unverifiable"] == []
    det = rep["modified_details"][0]
    assert det["new_sha256"] == hashlib.sha256(b"the domain changed hands").hexdigest()


def test_timeout_is_unverifiable_not_clean(served: tuple[str, Path], tmp_path: Path) -> None:
    base, _ = served
    urls = write_csv(tmp_path / "urls.csv", ["url", "sha256"],
                     [[f"{base}/img1.jpg", hashlib.sha256(b"image 1" * 50).hexdigest()],
                      [f"{base}/slow/late.jpg", hashlib.sha256(b"late").hexdigest()],
                      [f"{base}/boom/x.jpg", hashlib.sha256(b"x").hexdigest()],
                      ["http://127.0.0.1:9/refused.jpg", hashlib.sha256(b"y").hexdigest()]])
    manifest = tmp_path / "m.jsonl"
    assert run("pin", urls, "--out", manifest) == 0
    assert Handler.hits == []  # hash column present: nothing fetched
    opts = VerifyOptions(fetch=FetchOptions(timeout=1.0, retries=1, backoff=0.01, workers=4))
    res = verify(manifest, [str(urls)], options=opts)
    assert res.unchanged_count == 1 and not res.modified and not res.missing
    status = {u.key.rsplit("/", 1)[-1]: u.status for u in res.unverifiable}
    assert status == {"late.jpg": "timeout", "x.jpg": "http_error", "refused.jpg": "unreachable"}
    assert res.exit_code == 1 and not res.clean
    assert Handler.hits.count("/boom/x.jpg") == 2  # one retry for a 503
    layer = res.to_report_layer()
    assert layer["status"] == "unverifiable"
    assert {f["kind"] for f in layer["findings"]} == {"unverifiable"}


def test_hash_column_pins_without_fetching_and_verify_fetches(
        served: tuple[str, Path], tmp_path: Path) -> None:
    base, root = served
    rows = [[f"k{i}", f"{base}/img{i}.jpg",
             hashlib.sha256(f"image {i}".encode() * 50).hexdigest().upper(), i % 2]
            for i in range(6)]
    table = pa.table({"key": [r[0] for r in rows], "url": [r[1] for r in rows],
                      "sha256": [r[2] for r in rows], "label": [r[3] for r in rows]})
    urls = tmp_path / "urls.parquet"
    pq.write_table(table, urls)
    manifest = tmp_path / "m.parquet"
    assert run("pin", urls, "--out", manifest) == 0
    assert Handler.hits == []
    _, items = read_manifest(manifest)
    assert [it["key"] for it in items] == [f"k{i}" for i in range(6)]
    assert items[1]["label"] == "1" and items[1]["size"] is None
    (root / "img2.jpg").write_bytes(b"swapped")
    res = verify(manifest, [str(urls)])
    assert [m.key for m in res.modified] == ["k2"] and res.unchanged_count == 5
    assert len(Handler.hits) == 6

    # the list itself gains a row and repoints a key: new + modified
    table2 = pa.table({"key": [r[0] for r in rows] + ["k9"],
                       "url": [r[1] for r in rows[:5]] + [f"{base}/img9.jpg"] * 2,
                       "sha256": [r[2] for r in rows] + [rows[0][2]],
                       "label": [r[3] for r in rows] + [0]})
    pq.write_table(table2, urls)
    res = verify(manifest, [str(urls)])
    assert res.new == ["k9"]
    assert {m.key for m in res.modified} == {"k2", "k5"}


def test_laion_style_integer_hash_column_is_not_a_content_hash(
        served: tuple[str, Path], tmp_path: Path) -> None:
    base, _ = served
    urls = write_csv(tmp_path / "laion.csv", ["SAMPLE_ID", "URL", "TEXT", "hash"],
                     [[100 + i, f"{base}/img{i}.jpg", f"text {i}", 123456789 + i]
                      for i in range(3)])
    manifest = tmp_path / "m.jsonl"
    assert run("pin", urls, "--out", manifest, *NET) == 0
    header, items = read_manifest(manifest)
    opts = header["sources"][0]["options"]
    assert opts["hash_column"] is None and opts["key_column"] == "SAMPLE_ID"
    assert len(Handler.hits) == 3 and items[0]["key"] == "100" and items[0]["label"] == "text 0"


def test_pin_skips_unfetchable_and_says_so(served: tuple[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    base, _ = served
    urls = tmp_path / "urls.txt"
    urls.write_text(f"{base}/img0.jpg\n{base}/nope.jpg\nftp://example.invalid/x\n")
    manifest = tmp_path / "m.jsonl"
    assert run("pin", urls, "--out", manifest, *NET) == 1
    _, items = read_manifest(manifest)
    assert [it["key"] for it in items] == [f"{base}/img0.jpg"]
    out = capsys.readouterr().out
    assert "2 item(s) could not be read or fetched" in out and "bad_url" in out
    # never pinned, so verify against the list calls them new: not vetted
    res = verify(manifest, [str(urls)], options=VerifyOptions(fetch=FetchOptions(timeout=10)))
    assert sorted(res.new) == sorted([f"{base}/nope.jpg", "ftp://example.invalid/x"])


def test_fetcher_limits(served: tuple[str, Path]) -> None:
    base, _ = served
    with Fetcher(FetchOptions(timeout=2, retries=0, max_bytes=100, workers=2)) as f:
        results = list(f.fetch_many([f"{base}/img0.jpg", f"{base}/missing", "file:///etc"]))
    assert [r.status for r in results] == ["too_large", "gone", "bad_url"]


def test_duplicate_urls_need_a_key_column(served: tuple[str, Path], tmp_path: Path) -> None:
    from poisonguard.provenance import ManifestError

    base, _ = served
    h = hashlib.sha256(b"a").hexdigest()
    urls = write_csv(tmp_path / "dups.csv", ["url", "sha256"],
                     [[f"{base}/img0.jpg", h], [f"{base}/img0.jpg", h]])
    with pytest.raises(ManifestError, match="duplicate"):
        pin([str(urls)], tmp_path / "m.jsonl", PinOptions())
    assert not (tmp_path / "m.jsonl").exists()
