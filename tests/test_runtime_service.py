"""The screening service: answers, metrics, flagged log, and 4xx on every kind of bad input
while it keeps serving."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from poisonguard.runtime.service import create_app
from poisonguard.runtime.strip import StripConfig, StripFilter
from tests.test_runtime_strip import clean_images, make_clf, trigger


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> TestClient:  # noqa: ANN001
    filt = StripFilter.calibrate(make_clf(), clean_images(420), StripConfig(n_blends=10))
    review = tmp_path_factory.mktemp("review")
    app = create_app(filt, max_body_bytes=64 * 1024, max_inputs=50, review_dir=review)
    app.state.review = review
    return TestClient(app)


def test_health(client: TestClient) -> None:
    r = client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["sample_shape"] == [8, 8] and body["n_blends"] == 10


def test_predict_json_single_and_batch(client: TestClient) -> None:
    x = clean_images(3, seed=5)
    one = client.post("/predict", json=x[0].tolist())
    assert one.status_code == 200
    res = one.json()["results"]
    assert len(res) == 1 and set(res[0]) == {"id", "prediction", "entropy", "score", "suspicious"}
    batch = client.post("/predict", json={"inputs": trigger(x).tolist()})
    assert batch.status_code == 200
    out = batch.json()
    assert out["n"] == 3 and out["n_suspicious"] == 3
    assert all(r["suspicious"] and r["prediction"] == 0 for r in out["results"])
    flagged = client.get("/flagged").json()["flagged"]
    ids = {r["id"] for r in out["results"]}
    assert ids <= {f["id"] for f in flagged}
    assert all((client.app.state.review / f"{i}.npy").exists() for i in ids)


def test_predict_npy(client: TestClient) -> None:
    buf = io.BytesIO()
    np.save(buf, clean_images(4, seed=6))
    r = client.post("/predict", content=buf.getvalue(),
                    headers={"content-type": "application/octet-stream"})
    assert r.status_code == 200 and r.json()["n"] == 4


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


BAD = [
    ("empty body", b"", "application/json", 400, "empty"),
    ("not JSON", b"{nope", "application/json", 400, "not valid JSON"),
    ("wrong shape", json.dumps(np.zeros((2, 7, 8)).tolist()).encode(), "application/json", 422,
     "shape"),
    ("ragged", json.dumps([[1, 2], [3]]).encode(), "application/json", 400, "ragged"),
    ("strings", json.dumps([["a"] * 8] * 8).encode(), "application/json", 422, "non-numeric"),
    ("NaN", json.dumps([[float("nan")] * 8] * 8).encode(), "application/json", 422, "NaN"),
    ("null", json.dumps([[None] * 8] * 8).encode(), "application/json", 400, "non-numbers"),
    ("out of range", json.dumps([[1e6] * 8] * 8).encode(), "application/json", 422, "values"),
    ("JSON scalar", b"3", "application/json", 400, "JSON array"),
    ("no inputs key", b'{"foo": 1}', "application/json", 400, "inputs"),
    ("too many inputs", json.dumps(np.zeros((51, 8, 8), int).tolist()).encode(),
     "application/json", 413, "limit"),
    ("oversized", b"[" + b"0," * 40000 + b"0]", "application/json", 413, "exceeds"),
    ("bad npy", b"\x93NUMPY garbage", "application/octet-stream", 400, ".npy"),
    ("pickled npy", _npy(np.array([{"a": 1}], dtype=object)), "application/x-npy", 400, ".npy"),
    ("wrong content type", b"x", "text/plain", 415, "Content-Type"),
    ("empty batch", b"[]", "application/json", 422, "shape"),
    ("deep nesting", b"[" * 100000 + b"]" * 100000, "application/json", 413, "exceeds"),
]


@pytest.mark.parametrize("name,body,ctype,status,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_4xx(client: TestClient, name: str, body: bytes, ctype: str,
                              status: int, needle: str) -> None:
    r = client.post("/predict", content=body, headers={"content-type": ctype})
    assert r.status_code == status, r.text
    assert needle.lower() in r.json()["error"].lower()
    assert client.get("/health").status_code == 200


def test_metrics_count_requests_and_errors(client: TestClient) -> None:
    client.post("/predict", content=b"", headers={"content-type": "application/json"})
    client.post("/predict", json=clean_images(1)[0].tolist())
    m = client.get("/metrics").json()
    assert m["requests_by_path"]["/predict"] >= 2
    assert m["errors_total"] >= 1 and m["responses_by_status"]["200"] >= 1
    assert m["inputs_screened"] >= 1 and m["predict_latency_ms"]["p50"] > 0
