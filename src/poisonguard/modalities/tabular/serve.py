"""``filter`` and ``serve`` for tables: :class:`~poisonguard.modalities.tabular.runtime.RowFilter`
(STRIP-style value swapping with clean rows, plus matching the rules a scan confirmed) behind
the CLI and an HTTP app that takes JSON objects by column name.

Rows are encoded with one schema (column order, category codes): a tabular scan's
``report.json`` (``--report``: its ``data.columns``/``data.encodings``, and its
``verdict.triggers`` become the rules matched), or else the clean table's own columns and
sorted category values. The model is a poisonguard model folder or a TorchScript archive over
the encoded rows (never a pickle); a scikit-learn estimator goes through the Python API
(``RowFilter.calibrate(UserModel(est).predict_proba, ...)``).
"""

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
from poisonguard.modalities.tabular.data import (
    _NA,
    MISSING,
    TabularData,
    _encode_column,
    _read_csv,
    _read_parquet,
    tabular_suffix,
)
from poisonguard.modalities.tabular.runtime import RowFilter, rows_from_records

FLAGGED_KEPT = 1000


def is_tabular_path(path: str | None) -> bool:
    """A .csv or .parquet file (tables; image inputs come as .npz/.npy)."""
    return path is not None and tabular_suffix(path) in (".csv", ".parquet")


def _read(path: str) -> tuple[list[str], dict[str, list[str]]]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    header, cols = _read_parquet(p) if tabular_suffix(p) == ".parquet" else _read_csv(p)
    if not cols or not len(next(iter(cols.values()))):
        raise DataError(f"{p}: header only, no rows")
    return header, cols


def schema_from_report(path: str) -> tuple[TabularData, list[dict[str, Any]]]:
    """An empty table with a scan report's columns and encodings, and its trigger rules."""
    try:
        report = json.loads(Path(path).read_text())
        data = report["data"]
        columns, encodings = list(data["columns"]), dict(data.get("encodings") or {})
        triggers = list(report.get("verdict", {}).get("triggers") or [])
        label_map = dict(data.get("label_map") or {})
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise DataError(f"{path}: not a tabular scan report (no data.columns)") from None
    return TabularData(x=np.zeros((0, len(columns)), np.float32), y=np.zeros(0, np.int64),
                       ids=np.zeros(0, np.int64), columns=columns, encodings=encodings,
                       label_map=label_map), triggers


def schema_from_table(path: str, label_column: str, id_column: str | None) -> TabularData:
    """An empty table with ``path``'s feature columns and its sorted category values."""
    header, cols = _read(path)
    encodings = {}
    names = [h for h in header if h not in (label_column, id_column)]
    for name in names:
        _, mapping, _ = _encode_column(name, cols[name], Path(path))
        if mapping is not None:
            encodings[name] = mapping
    return TabularData(x=np.zeros((0, len(names)), np.float32), y=np.zeros(0, np.int64),
                       ids=np.zeros(0, np.int64), columns=names, encodings=encodings)


def encode_table(path: str, like: TabularData, id_column: str | None = None
                 ) -> tuple[np.ndarray, list[Any]]:
    """``path``'s rows encoded in ``like``'s columns (extra columns ignored), and their ids
    (``id_column``'s values, else 0-based row numbers)."""
    header, cols = _read(path)
    n = len(next(iter(cols.values())))
    missing = [c for c in like.columns if c not in cols]
    if missing:
        raise DataError(f"{path}: no column(s) {missing[:5]} of the model's table")
    def cell(c: str, v: str) -> str:  # an empty category cell is the <missing> category
        v = v.strip()
        return MISSING if v in _NA and MISSING in like.encodings.get(c, {}) else v
    records = [{c: cell(c, cols[c][i]) for c in like.columns} for i in range(n)]
    try:
        x = rows_from_records(records, like)
    except DataError as exc:
        raise DataError(f"{path}: {exc}".replace("input ", "row ")) from None
    ids: list[Any] = (cols[id_column] if id_column and id_column in cols
                      else list(range(n)))
    return x, ids


def build_row_filter(args: argparse.Namespace, predict: Any
                     ) -> tuple[RowFilter, TabularData]:
    """A calibrated :class:`RowFilter` from ``--clean`` (and ``--report``) and the schema."""
    if getattr(args, "calibration", None):
        raise ConfigError("--calibration is for image inputs; a table filter calibrates on "
                          "--clean CLEAN.csv each run")
    if not is_tabular_path(args.clean):
        raise ConfigError("give --clean CLEAN.csv (or .parquet): held-out clean rows to "
                          "calibrate on")
    if args.report:
        like, triggers = schema_from_report(args.report)
    else:
        like, triggers = schema_from_table(args.clean, args.label_column, args.id_column), []
    x, _ = encode_table(args.clean, like)
    clean = like.replace(x=x, y=np.zeros(len(x), np.int64), ids=np.arange(len(x)))
    filt = RowFilter.calibrate(predict, clean, triggers, share=args.share,
                               n_perturb=args.n_blends, frr=args.frr, seed=args.seed)
    return filt, like


def _label(like: TabularData, k: int) -> str:
    return like.original_label(k) if like.label_map else str(k)


def cmd_filter_tabular(args: argparse.Namespace) -> int:
    """``filter`` on a table: flags.csv (index, id, prediction, label, score, rule,
    suspicious) and report.json; with ``--test TRIGGERED.csv`` the share of triggered rows
    flagged. Exit 0 when nothing is flagged, 1 otherwise."""
    from poisonguard.io import atomic_write_csv, atomic_write_json, check_writable_dir
    from poisonguard.models.io import load_model

    check_writable_dir(args.out)
    clf = load_model(args.model, batch_size=args.batch_size)
    t0 = time.perf_counter()
    filt, like = build_row_filter(args, clf.predict_proba)
    x, ids = encode_table(args.data, like, args.id_column)
    timings = {"calibrate_s": round(time.perf_counter() - t0, 3)}
    t1 = time.perf_counter()
    res = filt.screen(x)
    timings["screen_s"] = round(time.perf_counter() - t1, 3)
    evaluation = None
    if args.test:
        xt, _ = encode_table(args.test, like)
        hit = filt.screen(xt)["suspicious"]
        evaluation = {"n_triggered": len(xt), "triggered_flagged": round(float(hit.mean()), 4)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(out / "flags.csv",
                     ["index", "id", "prediction", "label", "score", "rule", "suspicious"],
                     ([i, ids[i], int(p), _label(like, int(p)), f"{s:.6f}", r, int(f)]
                      for i, (p, s, r, f) in enumerate(zip(res["prediction"], res["score"],
                                                          res["rule"], res["suspicious"]))))
    n_sus = int(res["suspicious"].sum())
    n_rule = int((res["rule"] != "").sum())
    summary = (f"{n_sus} of {len(x)} rows suspicious ({n_rule} match a scan rule, "
               f"{n_sus - n_rule} by value swapping only)")
    report = {"command": "filter", "modality": "tabular", "summary": summary,
              "n_inputs": len(x), "n_suspicious": n_sus, "n_rule_matches": n_rule,
              "threshold": filt.threshold, "share": filt.share, "n_perturb": filt.n_perturb,
              "target_frr": filt.frr, "rules": [t for _, _, t in filt.rules],
              "columns": like.columns, "evaluation": evaluation, "timings": timings}
    atomic_write_json(out / "report.json", report)
    if not args.quiet:
        print(summary)
        if evaluation:
            print(f"evaluation: {evaluation['triggered_flagged']:.4f} of "
                  f"{evaluation['n_triggered']} triggered rows flagged")
        print(f"wrote {out}/flags.csv, report.json")
    return 1 if n_sus else 0


def records_of(doc: Any) -> list[dict[str, Any]]:
    """The rows of a request: one object, a list of objects, or ``{"inputs": [...]}``."""
    if isinstance(doc, dict) and "inputs" in doc:
        doc = doc["inputs"]
    if isinstance(doc, dict):
        doc = [doc]
    if not isinstance(doc, list) or not all(isinstance(r, dict) for r in doc):
        raise DataError("send JSON objects by column name: {\"inputs\": [{\"col\": value, "
                        "...}, ...]} or one object")
    return doc


def create_tabular_app(filt: RowFilter, like: TabularData, max_body_bytes: int = 8 << 20,
                       max_inputs: int = 512) -> FastAPI:
    """A FastAPI app: ``POST /predict`` (JSON objects by column name), ``GET /health``,
    ``GET /metrics``, ``GET /flagged``; bad requests get a 4xx with the reason."""
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

    app, stats, lock, flagged = new_service("poisonguard tabular screening")
    info = {"modality": "tabular", "columns": like.columns, "threshold": filt.threshold,
            "share": filt.share, "n_perturb": filt.n_perturb, "target_frr": filt.frr,
            "rules": [t for _, _, t in filt.rules], "max_inputs": max_inputs,
            "max_body_bytes": max_body_bytes}

    def screen(x: np.ndarray) -> dict[str, np.ndarray]:
        with lock:
            return filt.screen(x)

    add_status_routes(app, info, stats, flagged)

    @app.post("/predict", response_model=None)
    async def predict(request: Request) -> Any:
        try:
            doc = read_json(await read_body(request, max_body_bytes))
            records = records_of(doc)
            check_count(len(records), max_inputs)
        except RequestError as exc:
            return error_response(exc.status, exc.message)
        except DataError as exc:
            return error_response(422, str(exc))
        try:
            x = rows_from_records(records, like)
            res = await run_in_threadpool(screen, x)
        except DataError as exc:
            return error_response(422, str(exc))
        base = uuid.uuid4().hex[:16]
        results = []
        for i in range(len(x)):
            r = {"id": f"{base}-{i}", "prediction": int(res["prediction"][i]),
                 "label": _label(like, int(res["prediction"][i])),
                 "score": round(float(res["score"][i]), 6), "rule": str(res["rule"][i]),
                 "suspicious": bool(res["suspicious"][i])}
            results.append(r)
            if r["suspicious"]:
                flagged.append({**r, "time": round(time.time(), 3), "row": records[i]})
                log.warning("suspicious row %s", json.dumps(flagged[-1], default=str))
        n_sus = sum(r["suspicious"] for r in results)
        with stats.lock:
            stats.inputs += len(x)
            stats.suspicious += n_sus
        return {"threshold": filt.threshold, "n": len(x), "n_suspicious": n_sus,
                "results": results}

    return app


def cmd_serve_tabular(args: argparse.Namespace) -> int:
    """``serve`` for a table's model (``--clean CLEAN.csv``)."""
    from poisonguard.models.io import load_model
    from poisonguard.runtime.cli import run_service

    clf = load_model(args.model, batch_size=args.batch_size)
    filt, like = build_row_filter(args, clf.predict_proba)
    app = create_tabular_app(filt, like, int(args.max_body_mb * (1 << 20)), args.max_inputs)
    run_service(app, args, f"tabular rows ({len(like.columns)} columns), value-swap "
                           f"threshold {filt.threshold:.4g} (share {filt.share}, "
                           f"{filt.n_perturb} copies, target FRR {filt.frr:.2%}), "
                           f"{len(filt.rules)} rule(s)")
    return 0
