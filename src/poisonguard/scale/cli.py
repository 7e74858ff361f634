"""``poisonguard scan-features``: the streamed representation scan of precomputed features."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

from poisonguard.errors import ConfigError, DataError


def register(sub: Any) -> None:
    p = sub.add_parser(
        "scan-features",
        help="scan precomputed features (Parquet, folder of Parquet shards, .npy) in bounded "
             "chunks, locally or on a Dask cluster; write flagged.csv and summary.json",
        description="Exit 0: no class poisoned; 1: poisoned classes found; 2: bad input. "
                    "Parquet: every column but the label is a feature unless "
                    "--feature-columns names them (or one list column holds the vector). "
                    ".npy: a 2-D array; labels from --labels, default the sibling "
                    "STEM.LABEL_COLUMN.npy (emb.npy -> emb.label.npy).")
    p.add_argument("features", help="features.parquet, a folder of *.parquet shards, or .npy")
    p.add_argument("--label-column", default="label", help="label column (default label)")
    p.add_argument("--feature-columns", nargs="+", default=None,
                   help="feature columns (space- or comma-separated; default: all but the "
                        "label)")
    p.add_argument("--labels", default=None, help=".npy features: the labels .npy")
    add_engine_options(p, default="local",
                       help="local: chunks in this process; dask: chunks as tasks on Dask "
                            "workers")
    p.add_argument("--chunk-rows", type=int, default=131072,
                   help="rows per task (default 131072); a task reads them in batches of at "
                        "most 64 MiB of float64 features")
    p.add_argument("--sample-rows", type=int, default=50_000,
                   help="rows per class in the hash sample the splits are fit on "
                        "(default 50000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary table")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(handler=cmd_scan_features)


def add_engine_options(p: argparse.ArgumentParser, default: str | None, help: str) -> None:
    """--engine, --scheduler, --workers, --memory-limit, --connect-timeout."""
    p.add_argument("--engine", choices=["local", "dask"], default=default, help=help)
    p.add_argument("--scheduler", default=None,
                   help="address of a running Dask scheduler (default: start a LocalCluster)")
    p.add_argument("--workers", type=int, default=2, help="LocalCluster workers (default 2)")
    p.add_argument("--memory-limit", default="2GiB",
                   help="LocalCluster memory limit per worker (default 2GiB)")
    p.add_argument("--connect-timeout", type=float, default=5.0,
                   help="seconds to wait for --scheduler (default 5)")


def open_engine(args: argparse.Namespace, workers: int | None = None,
                file: TextIO | None = None) -> Any:
    """The engine the ``add_engine_options`` flags ask for (``workers`` overrides
    ``--workers``); the Dask dashboard link goes to ``file`` (stderr) unless ``--quiet``."""
    from poisonguard.scale.engine import make_engine

    engine = make_engine(args.engine, args.scheduler,
                         args.workers if workers is None else workers, args.memory_limit,
                         args.connect_timeout, progress=not args.quiet)
    if not args.quiet and getattr(engine, "dashboard", None):
        print(f"dask dashboard: {engine.dashboard}", file=file or sys.stderr)
    return engine


def open_source(args: argparse.Namespace) -> Any:
    from poisonguard.scale.sources import NpySource, open_parquet

    path = Path(args.features)
    cols = None
    if args.feature_columns:
        cols = [c for item in args.feature_columns for c in item.split(",") if c]
    if path.suffix == ".npy":
        if cols:
            raise ConfigError("--feature-columns applies to Parquet; a .npy holds only "
                              "features")
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        labels = Path(args.labels) if args.labels else path.with_name(
            f"{path.stem}.{args.label_column}.npy")
        if not labels.is_file():
            raise DataError(f"{path}: no labels file {labels}; give one with --labels")
        src = NpySource(str(path), str(labels), args.chunk_rows)
        src.validate()
        return src
    if args.labels:
        raise ConfigError("--labels applies to .npy features; Parquet uses --label-column")
    return open_parquet(path, args.label_column, cols, args.chunk_rows)


def cmd_scan_features(args: argparse.Namespace) -> int:
    from poisonguard.io import check_writable_dir
    from poisonguard.scale.detector import ScaleConfig
    from poisonguard.scale.run import scan_features

    if args.chunk_rows < 1:
        raise ConfigError(f"--chunk-rows must be >= 1, got {args.chunk_rows}")
    if args.sample_rows < 100:
        raise ConfigError(f"--sample-rows must be >= 100, got {args.sample_rows}")
    if args.scheduler and args.engine != "dask":
        raise ConfigError("--scheduler needs --engine dask")
    check_writable_dir(args.out)
    source = open_source(args)
    engine = open_engine(args)
    try:
        desc = engine.describe()
        batch_rows = min(args.chunk_rows, max(1024, (64 << 20) // (8 * source.n_features)))
        summary = scan_features(source, engine, Path(args.out),
                                ScaleConfig(sample_rows=args.sample_rows, seed=args.seed),
                                batch_rows=batch_rows, describe=desc)
    finally:
        engine.close()
    if not args.quiet:
        print_summary(summary, desc, args.out)
    return 1 if summary["verdict"] == "poisoned" else 0


def print_summary(summary: dict[str, Any], desc: dict[str, Any], out: str) -> None:
    print(f"{summary['n_rows']} rows x {summary['n_features']} features, "
          f"{summary['n_chunks']} chunks, engine {desc['engine']} "
          f"({desc['workers']} worker(s)), {summary['timings']['total_s']:.1f} s")
    for c in summary["classes"]:
        if "spectral" not in c:
            print(f"  class {c['label']}: skipped ({c['reason']})")
            continue
        print(f"  class {c['label']}: {'POISONED' if c['poisoned'] else 'clean':<9}"
              f" n={c['n']:<9} flagged={c['n_flagged']:<8} "
              f"spectral sep {c['spectral']['separation']:.1f}, clusters sep "
              f"{c['clustering']['separation']:.1f} sil "
              f"{c['clustering']['silhouette']:.2f}")
    print(f"wrote {out}/flagged.csv ({summary['n_flagged']} rows), summary.json")


def cmd_scan_streamed(args: argparse.Namespace) -> int:
    """``scan DATA --engine local|dask``: train (or ``--model``), extract representations in
    shards on the engine, scan the shards; flagged.csv, summary.json, representations/."""
    import time

    from poisonguard.data import load_dataset
    from poisonguard.models.io import describe_inputs, save_model
    from poisonguard.models.training import train_classifier
    from poisonguard.pipeline import ScanConfig
    from poisonguard.scale.detector import ScaleConfig
    from poisonguard.scale.extract import extract_representations
    from poisonguard.scale.run import scan_features
    from poisonguard.scale.sources import open_parquet

    refused = [name for name, on in (("--trusted", args.trusted), ("--test", args.test),
                                     ("--unlearn-flagged", args.unlearn_flagged),
                                     ("--manifest", getattr(args, "manifest", None)))
               if on]
    if refused:
        raise ConfigError(f"scan --engine does not take {', '.join(refused)} (the streamed "
                          "scan runs the representation detector only)")
    if args.shard_rows < 1:
        raise ConfigError(f"--shard-rows must be >= 1, got {args.shard_rows}")
    if args.scheduler and args.engine != "dask":
        raise ConfigError("--scheduler needs --engine dask")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("flagged.csv", "summary.json"):
        (out / stale).unlink(missing_ok=True)
    t0 = time.perf_counter()
    if args.model:
        model_dir, n_rows = Path(args.model), len(load_dataset(args.data).y)
    else:
        data = load_dataset(args.data)
        config = ScanConfig(seed=args.seed, epochs=args.epochs, progress=not args.quiet)
        trained = train_classifier(data, config.train_config(len(data)),
                                   progress=not args.quiet, stage="sacrificial model")
        model_dir, n_rows = out / "sacrificial_model", len(data)
        save_model(model_dir, trained.classifier.model, trained.arch, trained.arch_kwargs,
                   trained.classifier.input_spec, data.n_classes, trained.classifier.layer,
                   extra={"trained_on": str(args.data),
                          "train_config": trained.config.to_dict()},
                   inputs=describe_inputs(data.x))
        del data, trained
    train_s = time.perf_counter() - t0
    engine = open_engine(args)
    try:
        desc = engine.describe()
        t = time.perf_counter()
        extract_representations(engine, str(args.data), model_dir, n_rows,
                                out / "representations", args.shard_rows, args.layer,
                                progress=not args.quiet)
        extract_s = time.perf_counter() - t
        source = open_parquet(out / "representations", "label", None, 131072)
        summary = scan_features(source, engine, out, ScaleConfig(seed=args.seed),
                                describe=desc)
    finally:
        engine.close()
    summary["timings"] = {"train_s": round(train_s, 3), "extract_s": round(extract_s, 3),
                          **summary["timings"]}
    from poisonguard.io import atomic_write_json
    from poisonguard.types import jsonable

    atomic_write_json(out / "summary.json", jsonable({**summary, "command": "scan --engine",
                                                      "representations": "representations/"}))
    if not args.quiet:
        print_summary(summary, desc, args.out)
    return 1 if summary["verdict"] == "poisoned" else 0
