"""Command-line front end of the runtime layer: ``filter`` (offline) and ``serve`` (HTTP).

Wire into the main parser with ``register(subparsers)``. ``filter`` exits 0 when no input is
flagged, 1 when some are; both raise ``PoisonguardError`` subclasses on bad input (exit 2).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from poisonguard.errors import ConfigError, DataError

EXIT_CLEAN, EXIT_FOUND = 0, 1


def _add_strip_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="strip",
                   help="strip (blend with clean inputs; default), scale-up (prediction "
                        "consistency under pixel amplification), ibd-psc (under batch-norm "
                        "amplification of the model), feature (Mahalanobis distance of the "
                        "representation to the clean inputs of the predicted class), several "
                        "joined with '+', or both "
                        "(= strip+feature); a union splits --frr evenly and flags an input "
                        "when any filter fires")
    p.add_argument("--scale-factors", default="2,3,4,5,6", metavar="K,K,...",
                   help="scale-up's pixel amplification factors (default 2,3,4,5,6)")
    p.add_argument("--clean", default=None, metavar="CLEAN",
                   help="held-out clean inputs (.npz: x, or x_test) to calibrate on; the blend "
                        "pool is drawn from them")
    p.add_argument("--calibration", default=None, metavar="PATH",
                   help="load a saved calibration (folder or strip.json from an earlier "
                        "'filter' run) instead of calibrating")
    p.add_argument("--n-blends", type=int, default=20, help="clean blends per input (default 20)")
    p.add_argument("--frr", type=float, default=0.01,
                   help="target false-rejection rate on clean inputs (default 0.01)")
    p.add_argument("--blend", default="cut+mix",
                   help="'cut': a random rectangle of the input (--cut-area of it) replaced by "
                        "the clean image; 'mix': alpha*input + (1-alpha)*clean; 'add': "
                        "saturating sum (STRIP's superimposition); two joined with '+' run both "
                        "tests at half the FRR each and flag if either fires (default cut+mix)")
    p.add_argument("--alpha", type=float, default=0.8, help="input weight for 'mix' (0.8)")
    p.add_argument("--cut-area", type=float, default=0.75,
                   help="share of the input a 'cut' blend replaces (0.75)")
    p.add_argument("--statistic", default="log-odds",
                   choices=["log-odds", "probability", "auto", "entropy"],
                   help="per test: mean log-odds of the input's own prediction over the blends "
                        "(default; high = suspicious), its mean probability, auto (probability "
                        "for cut, log-odds for the others) or the mean entropy (STRIP's; low = "
                        "suspicious)")
    p.add_argument("--cut-blends", type=int, default=None,
                   help="blends of the 'cut' test (default 2 x --n-blends: whether a "
                        "rectangle hides a patch trigger varies from blend to blend)")
    p.add_argument("--seed", type=int, default=0, help="seed of the blend-pool draw")
    p.add_argument("--batch-size", type=int, default=256,
                   help="most blended samples per forward pass (bounds memory; default 256)")


def add_tabular_runtime_args(p: argparse.ArgumentParser) -> None:
    """The tabular options of ``filter`` and ``serve``."""
    p.add_argument("--report", default=None, metavar="REPORT.json",
                   help="tables: a tabular scan's report.json; its column encodings are used "
                        "and its verdict.triggers rules matched")
    p.add_argument("--label-column", default="label",
                   help="tables: a label column to ignore in DATA/CLEAN (default label)")
    p.add_argument("--id-column", default=None,
                   help="tables: a column of row ids (not a feature; written to flags.csv)")
    p.add_argument("--share", type=float, default=0.3,
                   help="tables: share of a row's values swapped with a clean row's per "
                        "copy; text: share of a post's words replaced by clean posts' words "
                        "(default 0.3); --n-blends copies per row or post")
    p.add_argument("--text-column", default="text",
                   help="text: the column holding the posts in DATA/CLEAN (default text)")
    p.add_argument("--max-span", type=int, default=1,
                   help="text, loo test: also remove runs of up to this many consecutive words "
                        "(an inserted sentence; default 1)")
    p.add_argument("--text-tests", default="loo",
                   help="text: 'loo' (the largest drop in the prediction's log-odds when one "
                        "word is removed; default), 'strip' (word swapping; --statistic "
                        "entropy or probability, else entropy), 'onion' (outlier words under "
                        "a bigram model of the clean posts), 'span' (as loo, removing runs of "
                        "2..--max-span words), or several joined with '+' (each at its share "
                        "of --frr; flagged when any fires)")


def add_audio_runtime_args(p: argparse.ArgumentParser, vad: bool = True) -> None:
    """The audio options of ``filter`` and ``serve``."""
    p.add_argument("--sample-rate", type=int, default=None,
                   help="audio: the model's sample rate in Hz (default: the built-in audio "
                        "model's own; inputs are resampled to it)")
    if vad:
        p.add_argument("--vad", action="store_true",
                       help="audio: cut every clip to its speech (WebRTC VAD) before "
                            "screening; removes sounds in the silence around speech")


def register(sub: Any) -> None:
    """Add ``filter`` and ``serve`` to an argparse subparsers object."""
    f = sub.add_parser(
        "filter", help="screen inputs with STRIP offline; write flags.csv and a report",
        description="Blend every input with N held-out clean inputs and flag those whose "
                    "prediction survives the blends (a statistic past a threshold calibrated on "
                    "clean data at a target false-rejection rate). Exit 0: nothing flagged, 1: "
                    "inputs flagged, 2: bad usage or input.")
    f.add_argument("model", help="model folder / model.json, or TorchScript file")
    f.add_argument("data", help="inputs to screen (.npz: x, or x_test; or a .csv/.parquet "
                                "table, with --clean CLEAN.csv)")
    f.add_argument("--out", required=True, help="output folder")
    f.add_argument("--test", default=None,
                   help="evaluation .npz with x_triggered and x_test (as 'poisonguard attack "
                        "--test' writes): report FAR/FRR and both score histograms; for a "
                        "table, the OUT.triggered.csv of a conjunction attack")
    _add_strip_args(f)
    add_tabular_runtime_args(f)
    add_audio_runtime_args(f)
    f.add_argument("--quiet", action="store_true")
    f.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the CPUs this process may use, or "
                        "OMP_NUM_THREADS when set)")
    f.set_defaults(handler=cmd_filter)

    s = sub.add_parser(
        "serve", help="serve predictions over HTTP with STRIP screening (FastAPI, uvicorn)",
        description="POST /predict (JSON arrays or .npy; for a table's model, with --clean "
                    "CLEAN.csv, JSON objects by column name), GET /health, GET /metrics, "
                    "GET /flagged. Suspicious inputs are logged with an id.")
    s.add_argument("model", help="model folder / model.json, or TorchScript file")
    _add_strip_args(s)
    add_tabular_runtime_args(s)
    add_audio_runtime_args(s, vad=False)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--save-calibration", default=None, metavar="DIR",
                   help="write the calibration here before serving")
    s.add_argument("--review-dir", default=None,
                   help="save each suspicious input as <id>.npy here (at most 10,000)")
    s.add_argument("--max-body-mb", type=float, default=8.0,
                   help="largest request body in MiB (default 8)")
    s.add_argument("--max-inputs", type=int, default=512,
                   help="most inputs in one request (default 512)")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    s.add_argument("--access-log", action="store_true", help="log every request")
    s.set_defaults(handler=cmd_serve)


def _load_inputs(path: str) -> np.ndarray:
    from poisonguard.cli import _load_x

    return _load_x(path)


def build_filter(args: argparse.Namespace, classifier: Any) -> Any:
    from poisonguard.runtime.consistency import ConsistencyConfig, ConsistencyFilter
    from poisonguard.runtime.feature import FeatureConfig, FeatureFilter
    from poisonguard.runtime.strip import StripConfig, StripFilter
    from poisonguard.runtime.union import UnionFilter, load_filter, parse_methods

    methods = parse_methods(getattr(args, "method", "strip"))
    if args.calibration:
        return load_filter(args.calibration, classifier)
    if not args.clean:
        raise ConfigError("give --clean CLEAN.npz (held-out clean inputs to calibrate on) or "
                          "--calibration PATH (a saved calibration)")
    try:
        factors = tuple(float(v) for v in str(args.scale_factors).split(","))
    except ValueError:
        raise ConfigError(f"--scale-factors {args.scale_factors!r}: expected numbers like "
                          "2,3,4") from None
    frr = args.frr / len(methods)
    clean_x = _load_inputs(args.clean)
    filters = []
    for m in methods:
        if m == "strip":
            config = StripConfig(n_blends=args.n_blends, blend=args.blend, alpha=args.alpha,
                                 target_frr=frr, seed=args.seed, chunk=args.batch_size,
                                 statistic=args.statistic, cut_area=args.cut_area,
                                 cut_blends=args.cut_blends)
            filters.append(StripFilter.calibrate(classifier, clean_x, config))
        elif m == "feature":
            filters.append(FeatureFilter.calibrate(classifier, clean_x,
                                                   FeatureConfig(target_frr=frr, seed=args.seed)))
        else:
            filters.append(ConsistencyFilter.calibrate(classifier, clean_x, ConsistencyConfig(
                method=m, factors=factors, target_frr=frr, chunk=max(args.batch_size, 1))))
    return filters[0] if len(filters) == 1 else UnionFilter(filters)


def _evaluation(filt: Any, path: str) -> dict[str, Any]:
    from poisonguard.runtime.strip import evaluate

    try:
        with np.load(path, allow_pickle=False) as arc:
            if "x_triggered" not in arc.files:
                raise DataError(f"{path}: no 'x_triggered' array; write it with 'poisonguard "
                                "attack --test'")
            xt = arc["x_triggered"]
            xc = arc["x_test"] if "x_test" in arc.files else None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz ({exc})") from None
    if xc is None:
        xc = _load_inputs(path)
    return evaluate(filt.screen(xc), filt.screen(xt))


def cmd_filter(args: argparse.Namespace) -> int:
    from poisonguard.io import atomic_write_csv
    from poisonguard.modalities.tabular.serve import cmd_filter_tabular, is_tabular_path
    from poisonguard.modalities.text.io import is_text_model
    from poisonguard.models.io import load_model

    if is_text_model(args.model):
        from poisonguard.modalities.text.serve import cmd_filter_text

        return cmd_filter_text(args)
    if is_tabular_path(args.data):
        return cmd_filter_tabular(args)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    from poisonguard.io import check_writable_dir
    from poisonguard.models.io import check_inputs

    check_writable_dir(args.out)
    classifier = load_model(args.model, batch_size=args.batch_size)
    from poisonguard.modalities.audio.serve import (
        cmd_filter_audio,
        is_audio_inputs,
        is_audio_model,
    )

    if is_audio_model(classifier) or is_audio_inputs(args.data):
        return cmd_filter_audio(args, classifier)
    if args.vad:
        raise ConfigError("--vad applies to audio models and clips")
    x = _load_inputs(args.data)
    check_inputs(classifier.expected_inputs, x, "the inputs")
    if args.clean and not args.calibration:  # a shape mismatch is found before calibrating
        from poisonguard.runtime.strip import validate_inputs

        validate_inputs(x, tuple(_load_inputs(args.clean).shape[1:]))
    filt = build_filter(args, classifier)
    timings["calibrate_s"] = round(time.perf_counter() - t0, 3)
    out = Path(args.out)
    t1 = time.perf_counter()
    result = filt.screen(x)
    timings["screen_s"] = round(time.perf_counter() - t1, 3)
    evaluation = None
    if args.test:
        t2 = time.perf_counter()
        evaluation = _evaluation(filt, args.test)
        timings["evaluate_s"] = round(time.perf_counter() - t2, 3)
    out.mkdir(parents=True, exist_ok=True)  # only now: a bad input leaves no empty folder
    filt.save(out)
    atomic_write_csv(out / "flags.csv", ["index", "prediction", "entropy", "score", "suspicious"],
                     ([i, int(p), f"{e:.6f}", f"{sc:.6f}", int(s)] for i, (p, e, sc, s) in
                      enumerate(zip(result.prediction, result.entropy, result.score,
                                    result.suspicious))))
    n_sus = write_filter_report(out, filt, x, result, evaluation, timings, args.quiet)
    return EXIT_FOUND if n_sus else EXIT_CLEAN


def write_filter_report(out: Path, filt: Any, x: Any, result: Any, evaluation: Any,
                        timings: dict[str, float], quiet: bool, what: str = "inputs",
                        data: dict[str, Any] | None = None) -> int:
    """``report.json``/``.html`` of a ``filter`` run (``data`` added to its data block),
    the console lines; returns the number of flagged inputs."""
    from poisonguard.io import atomic_write_json, atomic_write_text
    from poisonguard.report.html import render_html
    from poisonguard.runtime.report import build_filter_report

    report = build_filter_report(filt, x, result, evaluation, timings)
    if data:
        report["data"].update(data)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.html", render_html(report))
    if not quiet:
        print(report["verdict"]["summary"])
        if evaluation is not None:
            print(f"evaluation: FAR {evaluation['far']:.4f} on {evaluation['n_triggered']} "
                  f"triggered {what}, FRR {evaluation['frr']:.4f} on {evaluation['n_clean']} "
                  f"clean {what}")
        print(f"wrote {out}/flags.csv, report.json, report.html, and the calibration")
    return int(result.suspicious.sum())


def cmd_serve(args: argparse.Namespace) -> int:
    from poisonguard.modalities.tabular.serve import cmd_serve_tabular, is_tabular_path
    from poisonguard.models.io import load_model
    from poisonguard.runtime.service import create_app

    if args.max_inputs < 1 or args.max_body_mb <= 0:
        raise ConfigError("--max-inputs and --max-body-mb must be positive")
    from poisonguard.modalities.text.io import is_text_model

    if is_text_model(args.model):
        from poisonguard.modalities.text.serve import cmd_serve_text

        return cmd_serve_text(args)
    if is_tabular_path(args.clean) or args.report:
        return cmd_serve_tabular(args)
    classifier = load_model(args.model, batch_size=args.batch_size)
    from poisonguard.modalities.audio.serve import (
        build_audio_filter,
        is_audio_inputs,
        is_audio_model,
    )

    audio = is_audio_model(classifier) or is_audio_inputs(args.clean)
    filt = build_audio_filter(args, classifier)[0] if audio else build_filter(args, classifier)
    if args.save_calibration:
        filt.save(args.save_calibration)
    app = create_app(filt, max_body_bytes=int(args.max_body_mb * (1 << 20)),
                     max_inputs=args.max_inputs, review_dir=args.review_dir)
    from poisonguard.runtime.strip import StripFilter

    thr = ", ".join(f"{k} {v:.4g}" for k, v in filt.threshold.items())
    if isinstance(filt, StripFilter):
        cal = filt.calibration
        what = (f"STRIP {cal.config.blend} / {cal.config.statistic}, thresholds {thr} "
                f"(N={cal.config.n_blends}, cut N={cal.config.blends_for('cut')}, target FRR "
                f"{cal.target_frr:.2%})")
    else:
        what = (f"{filt.name}, thresholds {thr} (target FRR "
                f"{filt.describe().get('target_frr', 0.0):.2%})")
    run_service(app, args, what)
    return EXIT_CLEAN


def run_service(app: Any, args: argparse.Namespace, what: str) -> None:
    """Log at INFO, print what is served and where, and run ``app`` under uvicorn on
    ``--host``/``--port`` (the image and tabular ``serve``)."""
    import logging

    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                                                   "%(message)s")
    print(f"poisonguard serve: {what}; listening on http://{args.host}:{args.port}",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                access_log=args.access_log)
