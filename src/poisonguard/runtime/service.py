"""The screening service: a FastAPI app that answers predictions with a STRIP verdict.

``POST /predict`` takes one input or a batch, as JSON (a nested array, or ``{"inputs": [...]}``)
or as ``.npy`` bytes (``Content-Type: application/octet-stream`` or ``application/x-npy``;
loaded with ``allow_pickle=False``), and answers, per input, ``id``, ``prediction``, ``entropy``,
``score`` (> 0 flagged) and ``suspicious``. Suspicious inputs are logged (logger
``poisonguard.runtime``) with their id and input digest, kept in a bounded in-memory list
(``GET /flagged``) and, with ``review_dir``, saved as ``<id>.npy`` for review. ``GET /health``
and ``GET /metrics`` (request counts by status, latency percentiles, inputs screened and
flagged) complete it.

Bad requests never reach the model: an empty or oversized body, a body that is not JSON / .npy,
non-numeric values, NaN/inf, a wrong shape or too many inputs get a 4xx with the reason. Bodies
are read up to ``max_body_bytes`` and inputs are screened in chunks under one lock, so memory per
request is bounded and the model runs one batch at a time.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
import time
import uuid
from collections import Counter, deque
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from poisonguard.errors import DataError, PoisonguardError
from poisonguard.io import atomic_write_bytes
from poisonguard.runtime.strip import StripFilter, validate_inputs

log = logging.getLogger("poisonguard.runtime")

JSON_TYPES = ("application/json", "text/json")
NPY_TYPES = ("application/octet-stream", "application/x-npy", "application/npy")
LATENCY_WINDOW = 20_000
FLAGGED_KEPT = 1000


class RequestError(Exception):
    """A request the service refuses, with the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status: int, message: str) -> JSONResponse:
    """The JSON answer to a refused request."""
    return JSONResponse({"error": message, "status": status}, status_code=status)


async def read_body(request: Any, max_body_bytes: int) -> bytes:
    """The request body, refused (413) past ``max_body_bytes`` by its Content-Length header or,
    streamed, by its bytes."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            if int(length) > max_body_bytes:
                raise RequestError(413, f"request body of {int(length)} bytes exceeds the "
                                        f"limit of {max_body_bytes} bytes")
        except ValueError:
            raise RequestError(400, "bad Content-Length header") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body_bytes:
            raise RequestError(413, f"request body exceeds the limit of {max_body_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def read_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise RequestError(400, "body is not valid JSON") from None


def check_count(n: int, max_inputs: int) -> None:
    """Refuse an empty request (422) or one over ``max_inputs`` inputs (413)."""
    if n == 0:
        raise RequestError(422, "no inputs in the request")
    if n > max_inputs:
        raise RequestError(413, f"{n} inputs in one request; the limit is {max_inputs}")


class Stats:
    """Request metrics: counts by path and status, a window of latencies, inputs screened."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = time.time()
        self.requests: Counter[str] = Counter()
        self.status: Counter[str] = Counter()
        self.latency_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.inputs = 0
        self.suspicious = 0

    def record(self, path: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[path if path in ("/predict", "/health", "/metrics", "/flagged")
                          else "other"] += 1
            self.status[str(status)] += 1
            if path == "/predict":
                self.latency_ms.append(seconds * 1000.0)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            lat = np.array(self.latency_ms, dtype=np.float64)
            errors = sum(n for s, n in self.status.items() if not s.startswith("2"))
            return {
                "uptime_s": round(time.time() - self.started, 3),
                "requests_total": int(sum(self.requests.values())),
                "requests_by_path": dict(self.requests),
                "responses_by_status": dict(self.status),
                "errors_total": int(errors),
                "inputs_screened": self.inputs, "inputs_suspicious": self.suspicious,
                "predict_latency_ms": ({"window": int(len(lat)),
                                        "p50": round(float(np.percentile(lat, 50)), 3),
                                        "p90": round(float(np.percentile(lat, 90)), 3),
                                        "p99": round(float(np.percentile(lat, 99)), 3),
                                        "max": round(float(lat.max()), 3)}
                                       if len(lat) else {"window": 0}),
            }


class _MetricsMiddleware:
    """Pure ASGI middleware: status and wall time of every HTTP request."""

    def __init__(self, app: Any, stats: Stats) -> None:
        self.app = app
        self.stats = stats

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.stats.record(scope.get("path", ""), status[0], time.perf_counter() - t0)


def parse_body(body: bytes, content_type: str) -> np.ndarray:
    """The inputs held by a request body (JSON or .npy), or :class:`RequestError`."""
    if not body:
        raise RequestError(400, "empty request body; send a JSON array of inputs or .npy bytes")
    ctype = content_type.split(";")[0].strip().lower()
    if ctype in NPY_TYPES:
        try:
            arr = np.load(io.BytesIO(body), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise RequestError(400, f"body is not a readable .npy array (object arrays are "
                                    f"refused): {exc}") from None
        if not isinstance(arr, np.ndarray):
            raise RequestError(400, "body holds an .npz archive; send one .npy array")
        return arr
    if ctype and ctype not in JSON_TYPES:
        raise RequestError(415, f"unsupported Content-Type {ctype!r}; use application/json or "
                                "application/octet-stream (.npy)")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise RequestError(400, f"body is not valid JSON: {str(exc)[:200]}") from None
    if isinstance(doc, dict):
        key = next((k for k in ("inputs", "input", "x") if k in doc), None)
        if key is None:
            raise RequestError(400, "JSON object has no 'inputs' field; send {\"inputs\": "
                                    "[...]} or a bare array")
        doc = doc[key]
    if not isinstance(doc, list):
        raise RequestError(400, f"inputs must be a JSON array, got {type(doc).__name__}")
    try:
        arr = np.asarray(doc)
    except (ValueError, TypeError, RecursionError):
        raise RequestError(400, "inputs are ragged: nested arrays of unequal lengths") from None
    if arr.dtype == object:
        raise RequestError(400, "inputs are ragged or hold non-numbers (null, objects)")
    if arr.dtype.kind in "iub":
        return arr
    if arr.dtype.kind == "f":
        return arr.astype(np.float32) if np.isfinite(arr).all() else arr
    raise RequestError(422, f"inputs hold non-numeric values (dtype {arr.dtype})")


def add_status_routes(app: Any, info: dict[str, Any], stats: Stats, flagged: Any) -> None:
    """``GET /health`` (``info``), ``/metrics`` (``stats``) and ``/flagged`` (the recent
    suspicious inputs), shared by the image and tabular services."""

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", **info}

    @app.get("/metrics")
    def metrics() -> dict[str, Any]:
        return stats.snapshot()

    @app.get("/flagged")
    def flagged_list() -> dict[str, Any]:
        return {"n": len(flagged), "flagged": list(flagged)}


def new_service(title: str) -> tuple[FastAPI, Stats, threading.Lock, deque[dict[str, Any]]]:
    """A bare screening app with request metrics: the app, its stats, the model lock and the
    queue of recent suspicious inputs (``app.state`` holds the last two)."""
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)
    stats = Stats()
    app.add_middleware(_MetricsMiddleware, stats=stats)
    flagged: deque[dict[str, Any]] = deque(maxlen=FLAGGED_KEPT)
    app.state.stats = stats
    app.state.flagged = flagged
    return app, stats, threading.Lock(), flagged


def create_app(filt: Any, max_body_bytes: int = 8 << 20, max_inputs: int = 512,
               review_dir: str | Path | None = None, max_review_files: int = 10_000,
               title: str = "poisonguard screening service") -> FastAPI:
    """The FastAPI app screening inputs of ``filt``'s model (a calibrated STRIP,
    consistency or union filter)."""
    if filt.threshold is None:
        raise PoisonguardError("the runtime filter is not calibrated")
    app, stats, model_lock, flagged = new_service(title)
    review = Path(review_dir) if review_dir else None
    if review is not None:
        review.mkdir(parents=True, exist_ok=True)
    review_count = [0]
    if isinstance(filt, StripFilter):
        info = {"method": "strip", "threshold": filt.threshold,
                "n_blends": filt.config.n_blends,
                "cut_blends": filt.config.blends_for("cut") if "cut" in filt.config.tests
                else None, "blend": filt.config.blend, "statistic": filt.config.statistic,
                "target_frr": filt.config.target_frr, "input_dtype": str(filt.pool.dtype)}
    else:  # scale-up / ibd-psc, or a union (poisonguard.runtime.union)
        info = {"method": filt.name, "threshold": filt.threshold,
                "target_frr": filt.describe().get("target_frr"),
                "input_dtype": str(filt.input_dtype)}
    info.update({"sample_shape": list(filt.sample_shape), "max_inputs": max_inputs,
                 "max_body_bytes": max_body_bytes})

    def screen(x: np.ndarray) -> Any:
        with model_lock:
            return filt.screen(x)

    def note_suspicious(ids: list[str], x: np.ndarray, res: Any) -> None:
        for i in np.flatnonzero(res.suspicious):
            record = {"id": ids[i], "time": round(time.time(), 3),
                      "prediction": int(res.prediction[i]),
                      "entropy": round(float(res.entropy[i]), 6),
                      "score": round(float(res.score[i]), 6),
                      "sha256": hashlib.sha256(np.ascontiguousarray(x[i]).tobytes()).hexdigest()}
            if review is not None and review_count[0] < max_review_files:
                buf = io.BytesIO()
                np.save(buf, x[i], allow_pickle=False)
                atomic_write_bytes(review / f"{ids[i]}.npy", buf.getvalue())
                review_count[0] += 1
                record["saved"] = f"{ids[i]}.npy"
            flagged.append(record)
            log.warning("suspicious input %s", json.dumps(record))

    add_status_routes(app, info, stats, flagged)

    @app.post("/predict", response_model=None)
    async def predict(request: Request) -> Any:
        try:
            body = await read_body(request, max_body_bytes)
            arr = parse_body(body, request.headers.get("content-type", ""))
            try:
                x = validate_inputs(arr, filt.sample_shape)
                x = filt.coerce(x)
            except DataError as exc:
                raise RequestError(422, str(exc)) from None
            check_count(len(x), max_inputs)
            try:
                res = await run_in_threadpool(screen, x)
            except DataError as exc:
                raise RequestError(422, str(exc)) from None
        except RequestError as exc:
            return error_response(exc.status, exc.message)
        except PoisonguardError as exc:
            log.error("screening failed: %s", exc)
            return error_response(500, f"screening failed: {exc}")
        base = uuid.uuid4().hex[:16]
        ids = [f"{base}-{i}" for i in range(len(x))]
        n_sus = int(res.suspicious.sum())
        with stats.lock:
            stats.inputs += len(x)
            stats.suspicious += n_sus
        if n_sus:
            note_suspicious(ids, x, res)
        return {"threshold": res.threshold, "n": len(x), "n_suspicious": n_sus,
                "results": [{"id": ids[i], "prediction": int(res.prediction[i]),
                             "entropy": round(float(res.entropy[i]), 6),
                             "score": round(float(res.score[i]), 6),
                             "suspicious": bool(res.suspicious[i])} for i in range(len(x))]}

    return app
