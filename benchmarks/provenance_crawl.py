"""Provenance at crawl size: verify a large URL manifest against a loopback HTTP server.

    python benchmarks/provenance_crawl.py --sizes 100000 1000000
    python benchmarks/provenance_crawl.py --sizes 20000 --kill-at 0.5     # a quick check

For each size N: a URL list in the img2dataset/LAION Parquet layout (``key``, ``url``,
``sha256``) is generated in row groups of 65,536 rows (never whole in memory); each URL is
``http://127.0.0.1:PORT/i/<n>`` and the server (``--server-procs`` processes sharing one
listening socket, each a minimal asyncio HTTP/1.1 server with keep-alive) answers it with
deterministic bytes for ``n``. The list is pinned with its listed hashes (nothing fetched),
then verified in fresh processes:

1. the single-process path (``poisonguard verify``, no ``--engine``);
2. ``--engine dask --workers W`` (a LocalCluster);
3. the same Dask run killed (SIGKILL to its process group: client and workers) once the
   server has answered ``--kill-at`` x N requests, then run again: it resumes from the parts
   that were finished; how many URLs it fetched is counted by the server and by the report.

Per run: wall time, URLs per second (N / wall), peak RSS of the verify process tree (the CLI
and its Dask workers; psutil, sampled every 0.2 s; the server is not counted), the exit code
and the report's counts. Writes benchmarks/results/provenance_crawl.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing as mp
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from poisonguard import __version__
from poisonguard.io import atomic_write_json, atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
GROUP = 65_536
REPO = Path(__file__).resolve().parent.parent


def body(n: int) -> bytes:
    """What the server answers for ``/i/<n>``: 64 deterministic bytes."""
    return hashlib.sha256(str(n).encode()).digest() * 2


# ----------------------------------------------------------------------------- server
class _Http11(asyncio.Protocol):
    """A minimal HTTP/1.1 server connection: GET ``/i/<n>`` answers ``body(n)``, kept alive
    (pipelined requests answered in order), anything else 404. Counts every request."""

    def __init__(self, hits: Any) -> None:
        self.hits = hits
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        out = []
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head, self.buf = self.buf[:end], self.buf[end + 4:]
            parts = head.split(b"\r\n", 1)[0].split(b" ")
            with self.hits.get_lock():
                self.hits.value += 1
            tail = parts[1].rsplit(b"/", 1)[-1] if len(parts) == 3 else b""
            if parts[0] == b"GET" and parts[1].startswith(b"/i/") and tail.isdigit():
                data_ = body(int(tail))
                out.append(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                           % (len(data_), data_))
            else:
                out.append(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        if out:
            self.transport.write(b"".join(out))  # type: ignore[attr-defined]


def _serve(sock: socket.socket, hits: Any) -> None:
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(
        loop.create_server(lambda: _Http11(hits), sock=sock, backlog=1024))
    try:
        loop.run_forever()
    finally:
        server.close()


class LoopbackServer:
    """``procs`` server processes accepting on one loopback socket; ``hits`` counts requests."""

    def __init__(self, procs: int) -> None:
        ctx = mp.get_context("fork")
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        self.hits = ctx.Value("q", 0)
        self.procs = [ctx.Process(target=_serve, args=(self.sock, self.hits), daemon=True)
                      for _ in range(procs)]
        for p in self.procs:
            p.start()

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
            p.join(5)
        self.sock.close()


# ----------------------------------------------------------------------------- data
def write_url_list(path: Path, n: int, port: int) -> None:
    """The URL list, one row group of 65,536 rows at a time."""
    schema = pa.schema([("key", pa.string()), ("url", pa.string()), ("sha256", pa.string())])
    with pq.ParquetWriter(path, schema, compression="zstd") as w:
        for start in range(0, n, GROUP):
            idx = range(start, min(n, start + GROUP))
            w.write_table(pa.table({
                "key": [f"{i:09d}" for i in idx],
                "url": [f"http://127.0.0.1:{port}/i/{i}" for i in idx],
                "sha256": [hashlib.sha256(body(i)).hexdigest() for i in idx]}, schema=schema))


# ----------------------------------------------------------------------------- runs
def _tree_rss(p: psutil.Process) -> tuple[int, int]:
    total, count = 0, 0
    try:
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    for q in procs:
        try:
            total += q.memory_info().rss
            count += 1
        except psutil.NoSuchProcess:
            pass
    return total, count


def run_cli(argv: list[str], server: LoopbackServer, kill_after: int | None = None,
            limit_s: float = 3600) -> dict[str, Any]:
    """Run ``python -m poisonguard ARGV`` in a new session; sample its tree's RSS; SIGKILL
    the whole group once the server has answered ``kill_after`` more requests."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    hits0 = server.hits.value
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "poisonguard", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    ps = psutil.Process(proc.pid)
    peak, peak_procs, killed = 0, 0, False
    while proc.poll() is None:
        rss, count = _tree_rss(ps)
        if rss > peak:
            peak, peak_procs = rss, count
        if kill_after is not None and server.hits.value - hits0 >= kill_after:
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
        if time.perf_counter() - t0 > limit_s:
            os.killpg(proc.pid, signal.SIGKILL)
            raise RuntimeError(f"{argv} ran past {limit_s} s")
        time.sleep(0.2)
    out = proc.communicate()[0].decode(errors="replace")
    wall = time.perf_counter() - t0
    if killed:  # the group is gone; wait for any straggler to exit
        deadline = time.time() + 30
        while time.time() < deadline and any(
                q.pid != proc.pid for q in psutil.process_iter() if _in_group(q, proc.pid)):
            time.sleep(0.2)
    return {"argv": argv, "rc": proc.returncode, "killed": killed, "wall_s": round(wall, 2),
            "peak_rss_mb": round(peak / 1e6, 1), "processes_at_peak": peak_procs,
            "server_requests": server.hits.value - hits0, "output_tail": out[-1500:]}


def _in_group(q: psutil.Process, pgid: int) -> bool:
    try:
        return os.getpgid(q.pid) == pgid
    except (ProcessLookupError, PermissionError):
        return False


def bench_size(work: Path, n: int, server: LoopbackServer, args: argparse.Namespace,
               out: dict[str, Any], save: Any) -> None:
    urls, manifest = work / f"urls-{n}.parquet", work / f"m-{n}.parquet"
    t = time.perf_counter()
    write_url_list(urls, n, server.port)
    gen_s = time.perf_counter() - t
    pinned = run_cli(["pin", str(urls), "--out", str(manifest), "--quiet"], server)
    assert pinned["rc"] == 0 and pinned["server_requests"] == 0, pinned
    net = ["--timeout", str(args.timeout), "--retries", "2", "--fetch-workers",
           str(args.fetch_workers), "--quiet", *(["--no-keep-alive"] if args.no_keep_alive
                                                 else [])]
    out.update(rows=n, generate_s=round(gen_s, 2), pin=pinned, runs={})

    def report_of(run: dict[str, Any], path: Path) -> None:
        if path.exists():
            rep = json.loads(path.read_text())
            run["counts"] = rep["counts"]
            run["run"] = rep["layers"]["provenance"].get("run")
            path.unlink()
        run["urls_per_s"] = round(n / run["wall_s"], 1)

    if "single" in args.paths:
        rep = work / "single.json"
        r = run_cli(["verify", str(manifest), str(urls), "--out", str(rep), *net], server)
        report_of(r, rep)
        out["runs"]["single_process"] = r
        save()
    dask = ["--engine", "dask", "--workers", str(args.workers), "--memory-limit",
            args.memory_limit, "--part-rows", str(args.part_rows)]
    if "dask" in args.paths:
        rep = work / "dask.json"
        r = run_cli(["verify", str(manifest), str(urls), "--out", str(rep), *dask, *net],
                    server)
        report_of(r, rep)
        out["runs"]["dask"] = r
        save()
    if "resume" in args.paths and n <= args.resume_max:
        rep = work / "resume.json"
        argv = ["verify", str(manifest), str(urls), "--out", str(rep), *dask, *net]
        k = run_cli(argv, server, kill_after=int(args.kill_at * n))
        work_dir = Path(f"{rep}.work")
        k["report_exists_after_kill"] = rep.exists()
        k["shards_after_kill"] = len(list(work_dir.glob("part-*.parquet")))
        r = run_cli(argv, server)
        report_of(r, rep)
        r["work_dir_left"] = work_dir.exists()
        out["runs"]["dask_killed"] = k
        out["runs"]["dask_resumed"] = r
        save()
    for p in (urls, manifest):
        p.unlink()


# ----------------------------------------------------------------------------- report
def _md(res: dict[str, Any]) -> str:
    lines = [
        "# Provenance at crawl size",
        "",
        f"Generated by `python benchmarks/provenance_crawl.py {res['argv']}` (code "
        f"{res['code_commit']}) on {res['cpus']} CPU cores shared with other jobs (load "
        f"average {res['load_start']} at start, {res['load_end']} at the end), "
        f"{res['platform']}, poisonguard {res['version']}. Raw numbers in "
        f"{res.get('results_name', 'provenance_crawl')}.json.",
        "",
        f"Server: {res['server_procs']} processes on one loopback socket (asyncio, "
        "HTTP/1.1 keep-alive, 64-byte bodies), on the same 2 cores as the client. Client "
        f"connections kept alive: {res.get('keep_alive', False)}. Verify: timeout "
        f"{res['timeout']} s, 2 retries, {res['fetch_workers']} fetch threads per process "
        f"(per Dask worker), Dask: LocalCluster {res['workers']} workers x "
        f"{res['memory_limit']}, parts of {res['part_rows']} rows. Peak RSS: the verify "
        "process and its children (Dask scheduler threads run in the client; the workers are "
        "children), psutil every 0.2 s; the server is not counted.",
        "",
        "| rows | path | wall s | URLs/s | peak RSS MB (processes) | unchanged | exit | "
        "server requests |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in res["sizes"]:
        for name, r in s["runs"].items():
            if name == "dask_killed":
                lines.append(f"| {s['rows']:,} | dask, SIGKILL after {r['server_requests']:,} "
                             f"requests | {r['wall_s']} | - | {r['peak_rss_mb']} "
                             f"({r['processes_at_peak']}) | - | killed | "
                             f"{r['server_requests']:,} |")
                continue
            c = r.get("counts", {})
            lines.append(f"| {s['rows']:,} | {name.replace('_', ' ')} | {r['wall_s']} | "
                         f"{r['urls_per_s']:,} | {r['peak_rss_mb']} ({r['processes_at_peak']}) "
                         f"| {c.get('unchanged', '-'):,} | {r['rc']} | "
                         f"{r['server_requests']:,} |")
    lines.append("")
    for s in res["sizes"]:
        k, r = s["runs"].get("dask_killed"), s["runs"].get("dask_resumed")
        if k and r and r.get("run"):
            run = r["run"]
            lines.append(
                f"Resume at {s['rows']:,} rows: the killed run had {k['shards_after_kill']} of "
                f"{run['parts']} parts finished (report written: "
                f"{k['report_exists_after_kill']}); the resumed run skipped "
                f"{run['parts_resumed']} parts and fetched {run['urls_fetched_this_run']:,} of "
                f"{s['rows']:,} URLs (server: {r['server_requests']:,} requests); killed + "
                f"resumed requests {k['server_requests'] + r['server_requests']:,} "
                f"({(k['server_requests'] + r['server_requests']) / s['rows']:.3f} x N: parts "
                "in flight at the kill are fetched again). Work folder left after the "
                f"resumed run: {r['work_dir_left']}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--paths", nargs="+", default=["single", "dask", "resume"],
                    choices=["single", "dask", "resume"])
    ap.add_argument("--server-procs", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory-limit", default="1GiB")
    ap.add_argument("--part-rows", type=int, default=16_384)
    ap.add_argument("--fetch-workers", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--kill-at", type=float, default=0.4)
    ap.add_argument("--resume-max", type=int, default=10**9,
                    help="run the kill-and-resume pair only for sizes up to this")
    ap.add_argument("--work", default=None, help="scratch folder (default a temp folder)")
    ap.add_argument("--tag", default="", help="results file suffix")
    ap.add_argument("--no-keep-alive", action="store_true",
                    help="verify with a new connection per URL (the fetcher before keep-alive)")
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True).stdout.strip()
    res: dict[str, Any] = {
        "argv": " ".join(sys.argv[1:]), "code_commit": commit, "version": __version__,
        "platform": platform.platform(), "cpus": os.cpu_count(),
        "load_start": [round(x, 2) for x in os.getloadavg()],
        "server_procs": args.server_procs, "workers": args.workers,
        "memory_limit": args.memory_limit, "part_rows": args.part_rows,
        "fetch_workers": args.fetch_workers, "timeout": args.timeout,
        "keep_alive": not args.no_keep_alive, "sizes": []}
    server = LoopbackServer(args.server_procs)
    name = f"provenance_crawl{args.tag}"
    res["results_name"] = name
    try:
        with tempfile.TemporaryDirectory(dir=args.work) as tmp:
            def save() -> None:
                res["load_end"] = [round(x, 2) for x in os.getloadavg()]
                atomic_write_json(RESULTS / f"{name}.json", res)
                atomic_write_text(RESULTS / f"{name}.md", _md(res))
                print(_md(res), flush=True)

            for n in args.sizes:
                print(f"== {n:,} rows", flush=True)
                res["sizes"].append({"rows": n, "runs": {}})
                bench_size(Path(tmp), n, server, args, res["sizes"][-1], save)
    finally:
        server.close()


if __name__ == "__main__":
    main()
