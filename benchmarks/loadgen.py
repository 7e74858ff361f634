"""A small HTTP load generator: N sequential single-input POST /predict requests over one
keep-alive connection (http.client), run as its own process. Prints a JSON summary: latency
percentiles (ms), errors, wall time, load average.

    python benchmarks/loadgen.py --port 8765 --inputs inputs.npy --requests 10000
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--inputs", required=True, help=".npy of samples, cycled through")
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--warmup", type=int, default=50)
    args = ap.parse_args()
    x = np.load(args.inputs, allow_pickle=False)
    bodies = [json.dumps(s.tolist()).encode() for s in x]
    headers = {"Content-Type": "application/json"}
    conn = http.client.HTTPConnection(args.host, args.port, timeout=30)
    lat, errors, statuses = [], 0, {}
    suspicious = 0
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    for i in range(args.warmup + args.requests):
        body = bodies[i % len(bodies)]
        t0 = time.perf_counter()
        try:
            conn.request("POST", "/predict", body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            status = resp.status
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = http.client.HTTPConnection(args.host, args.port, timeout=30)
            status, data = -1, b""
        dt = (time.perf_counter() - t0) * 1000.0
        if i < args.warmup:
            continue
        if i == args.warmup:
            t_start = time.perf_counter() - dt / 1000.0
        lat.append(dt)
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        if status != 200:
            errors += 1
        else:
            suspicious += bool(json.loads(data)["results"][0]["suspicious"])
    wall = time.perf_counter() - t_start
    a = np.array(lat)
    print(json.dumps({
        "requests": len(lat), "errors": errors, "statuses": statuses,
        "suspicious_answers": suspicious, "wall_s": round(wall, 2),
        "requests_per_s": round(len(lat) / wall, 1),
        "latency_ms": {"p50": round(float(np.percentile(a, 50)), 3),
                       "p90": round(float(np.percentile(a, 90)), 3),
                       "p99": round(float(np.percentile(a, 99)), 3),
                       "mean": round(float(a.mean()), 3), "max": round(float(a.max()), 3)},
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
    }))


if __name__ == "__main__":
    main()
