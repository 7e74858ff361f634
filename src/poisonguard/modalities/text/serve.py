"""``filter`` and ``serve`` for a text model folder (one with ``vocab.json``): the
:class:`~poisonguard.modalities.text.runtime.TextFilter` (STRIP word swapping + ONION outlier
words) behind the CLI, and an HTTP app that takes JSON strings."""

from __future__ import annotations

import argparse
import json
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

from poisonguard.errors import ConfigError, DataError
from poisonguard.modalities.text.io import TextModel, load_text_model
from poisonguard.modalities.text.runtime import TESTS, TextFilter, TextFilterConfig, check_posts

FLAGGED_KEPT = 1000


def load_posts(path: str, text_column: str = "text") -> tuple[list[str], list[str]]:
    """The posts (and ids: the ``id`` column, else the row numbers) of a .csv/.tsv/.jsonl/
    .parquet file; labels are not needed."""
    from poisonguard.modalities.text.data import _rows, text_suffix

    p = Path(path)
    suffix = text_suffix(p)
    if suffix is None:
        raise DataError(f"{p}: expected posts in a .csv, .tsv, .jsonl or .parquet file")
    rows = _rows(p, suffix)
    if not rows:
        raise DataError(f"{p}: no rows")
    if text_column not in rows[0]:
        raise DataError(f"{p}: no column {text_column!r}; found {list(rows[0])[:10]}; name it "
                        "with --text-column")
    texts = ["" if r.get(text_column) is None else str(r[text_column]) for r in rows]
    ids = [str(r.get("id", i)) for i, r in enumerate(rows)]
    return check_posts(texts, str(p)), ids


def text_config(args: argparse.Namespace) -> TextFilterConfig:
    stat = args.statistic if args.statistic in ("entropy", "probability") else "entropy"
    return TextFilterConfig(tests=tuple(args.text_tests.split("+")), share=args.share,
                            n_copies=args.n_blends, frr=args.frr, statistic=stat,
                            seed=args.seed, max_span=args.max_span)


def build_text_filter(args: argparse.Namespace, model: TextModel) -> TextFilter:
    if args.calibration:
        return TextFilter.load(args.calibration, model.predict_proba)
    if not args.clean:
        raise ConfigError("give --clean CLEAN.csv (clean posts to calibrate on) or "
                          "--calibration PATH (a saved text_filter.json)")
    config = text_config(args)
    clean, _ = load_posts(args.clean, args.text_column)
    return TextFilter.calibrate(model.predict_proba, clean, config)


def _evaluation(filt: TextFilter, model: TextModel, path: str, column: str) -> dict[str, Any]:
    """FAR on the triggered posts (all, and those the model assigns to their label, the
    target: successful triggers), as ``attack --test`` writes them (OUT.triggered.csv)."""
    from poisonguard.modalities.text.data import read_column

    texts, _ = load_posts(path, column)
    res = filt.screen(texts)
    out: dict[str, Any] = {"n_triggered": len(texts),
                           "far": round(float((~res["suspicious"]).mean()), 4)}
    labels = read_column(path, "label")
    if labels is not None and model.label_map:
        want = np.array([model.label_map.get(str(v).strip(), -1) for v in labels])
        ok = res["prediction"] == want
        out["n_successful"] = int(ok.sum())
        out["far_successful"] = (round(float((~res["suspicious"][ok]).mean()), 4)
                                 if ok.any() else None)
    return out


def cmd_filter_text(args: argparse.Namespace) -> int:
    """``filter`` on posts: flags.csv (index, id, prediction, label, score, strip, onion,
    fired, suspicious, text) and report.json. Exit 0: nothing flagged, 1: some flagged."""
    from poisonguard.io import atomic_write_csv, atomic_write_json, check_writable_dir

    check_writable_dir(args.out)
    model = load_text_model(args.model, batch_size=args.batch_size)
    texts, ids = load_posts(args.data, args.text_column)
    config = None if args.calibration else text_config(args)  # bad options before any work
    if args.clean and not args.calibration:
        load_posts(args.clean, args.text_column)
    t0 = time.perf_counter()
    filt = build_text_filter(args, model)
    timings = {"calibrate_s": round(time.perf_counter() - t0, 3)}
    t1 = time.perf_counter()
    res = filt.screen(texts)
    timings["screen_s"] = round(time.perf_counter() - t1, 3)
    evaluation = _evaluation(filt, model, args.test, args.text_column) if args.test else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # only now: a bad input leaves no folder
    filt.save(out)
    nan = float("nan")
    atomic_write_csv(out / "flags.csv", ["index", "id", "prediction", "label", "score",
                                         "strip", "onion", "fired", "suspicious", "text"],
                     ([i, ids[i], int(res["prediction"][i]),
                       model.label_name(int(res["prediction"][i])), f"{res['score'][i]:.6f}",
                       f"{res.get('strip', [nan] * len(texts))[i]:.6f}",
                       f"{res.get('onion', [nan] * len(texts))[i]:.6f}", res["fired"][i],
                       int(res["suspicious"][i]), texts[i][:500]] for i in range(len(texts))))
    n_sus = int(res["suspicious"].sum())
    summary = (f"{n_sus} of {len(texts)} posts suspicious (tests "
               f"{'+'.join(filt.config.tests)}, target FRR {filt.config.frr:.2%})")
    report = {"command": "filter", "modality": "text", "summary": summary,
              "n_inputs": len(texts), "n_suspicious": n_sus, **filt.describe(),
              "config_given": None if config is None else filt.describe()["config"],
              "evaluation": evaluation, "timings": timings}
    atomic_write_json(out / "report.json", report)
    if not args.quiet:
        print(summary)
        if evaluation:
            print(f"evaluation: FAR {evaluation['far']:.4f} on {evaluation['n_triggered']} "
                  "triggered posts")
        print(f"wrote {out}/flags.csv, report.json, text_filter.json")
    return 1 if n_sus else 0


def posts_of(doc: Any) -> list[str]:
    """The posts of a request: one string, a list of strings, or ``{"inputs": [...]}``."""
    if isinstance(doc, dict) and "inputs" in doc:
        doc = doc["inputs"]
    if isinstance(doc, str):
        doc = [doc]
    if not isinstance(doc, list) or not all(isinstance(t, str) for t in doc):
        raise DataError("send JSON strings: {\"inputs\": [\"post\", ...]}, a list or one string")
    return check_posts(doc, "inputs")


def create_text_app(filt: TextFilter, model: TextModel, max_body_bytes: int = 8 << 20,
                    max_inputs: int = 512) -> FastAPI:
    """``POST /predict`` (JSON strings), ``GET /health``, ``/metrics``, ``/flagged``."""
    from poisonguard.runtime.service import (
        RequestError,
        add_status_routes,
        check_count,
        error_response,
        log,
        new_service,
        read_body,
        read_json,
    )

    app, stats, lock, flagged = new_service("poisonguard text screening")
    info = {**filt.describe(), "max_inputs": max_inputs, "max_body_bytes": max_body_bytes}

    def screen(texts: list[str]) -> dict[str, np.ndarray]:
        with lock:
            return filt.screen(texts)

    add_status_routes(app, info, stats, flagged)

    @app.post("/predict", response_model=None)
    async def predict(request: Request) -> Any:
        try:
            doc = read_json(await read_body(request, max_body_bytes))
            texts = posts_of(doc)
            check_count(len(texts), max_inputs)
        except RequestError as exc:
            return error_response(exc.status, exc.message)
        except DataError as exc:
            return error_response(422, str(exc))
        try:
            res = await run_in_threadpool(screen, texts)
        except DataError as exc:
            return error_response(422, str(exc))
        base = uuid.uuid4().hex[:16]
        results = []
        for i, text in enumerate(texts):
            k = int(res["prediction"][i])
            r = {"id": f"{base}-{i}", "prediction": k, "label": model.label_name(k),
                 "score": round(float(res["score"][i]), 6), "fired": str(res["fired"][i]),
                 "suspicious": bool(res["suspicious"][i])}
            results.append(r)
            if r["suspicious"]:
                flagged.append({**r, "time": round(time.time(), 3), "text": text[:500]})
                log.warning("suspicious post %s", json.dumps(flagged[-1], ensure_ascii=False))
        n_sus = sum(r["suspicious"] for r in results)
        with stats.lock:
            stats.inputs += len(texts)
            stats.suspicious += n_sus
        return {"n": len(texts), "n_suspicious": n_sus, "results": results}

    return app


def cmd_serve_text(args: argparse.Namespace) -> int:
    """``serve`` for a text model folder (``--clean CLEAN.csv`` or ``--calibration``)."""
    from poisonguard.runtime.cli import run_service

    model = load_text_model(args.model, batch_size=args.batch_size)
    filt = build_text_filter(args, model)
    if args.save_calibration:
        Path(args.save_calibration).mkdir(parents=True, exist_ok=True)
        filt.save(args.save_calibration)
    app = create_text_app(filt, model, int(args.max_body_mb * (1 << 20)), args.max_inputs)
    thr = ", ".join(f"{k} {v:.4g}" for k, v in filt.thresholds.items())
    run_service(app, args, f"text posts, tests {'+'.join(filt.config.tests)} (thresholds "
                           f"{thr}, target FRR {filt.config.frr:.2%})")
    return 0


__all__ = ["TESTS", "cmd_filter_text", "cmd_serve_text", "create_text_app", "load_posts"]
