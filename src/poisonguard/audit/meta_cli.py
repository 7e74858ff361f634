"""``poisonguard meta train ZOO_DIR --out META`` and ``poisonguard meta predict META MODEL``:
the weight-based meta-classifier. ``predict`` exits 0 when the model reads as clean, 1 when
as backdoored, 2 on bad input."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

EXIT_CLEAN, EXIT_FOUND = 0, 1


def register(sub: Any) -> None:
    """Add ``meta`` (with ``train`` and ``predict``) to an argparse subparsers object."""
    from poisonguard.audit.meta import BUILTIN, FAMILIES

    m = sub.add_parser("meta", help="a meta-classifier that tells backdoored models from clean "
                                    "ones by their weights (trained on a zoo of models)",
                       description="Train a meta-classifier on a zoo of clean and backdoored "
                                   "models of one architecture, or predict with one. See "
                                   "docs/meta.md for the zoo layout.")
    msub = m.add_subparsers(dest="meta_command", required=True)
    t = msub.add_parser("train", help="train a meta model on ZOO_DIR (zoo.json + model folders)")
    t.add_argument("zoo", metavar="ZOO_DIR", help="folder with zoo.json and the model folders")
    t.add_argument("--out", required=True, metavar="META", help="meta model folder to write")
    t.add_argument("--features", nargs="+", default=list(FAMILIES), choices=list(FAMILIES),
                   help="feature families (default: all)")
    t.add_argument("--queries", default=None, metavar="DATA.npz",
                   help="query inputs for the query features (default: a seeded random set "
                        "in the models' input range)")
    t.add_argument("--n-queries", type=int, default=96, help="random queries (default 96)")
    t.add_argument("--C", type=float, default=0.1, dest="c",
                   help="inverse L2 strength of the logistic regression (default 0.1)")
    t.add_argument("--fpr", type=float, default=0.05,
                   help="share of the zoo's clean models (out of fold) the threshold lets "
                        "above it (default 0.05)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(handler=cmd_meta_train)
    p = msub.add_parser("predict", help="predict whether MODEL is backdoored")
    p.add_argument("meta", metavar="META",
                   help=f"meta model folder, or a built-in one: {', '.join(BUILTIN)}")
    p.add_argument("model", metavar="MODEL", help="model folder (poisonguard or TorchScript)")
    p.add_argument("--out", default=None, metavar="FILE.json",
                   help="write the prediction here (default: print only)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=cmd_meta_predict)


def cmd_meta_train(args: argparse.Namespace) -> int:
    from poisonguard.audit.meta import FeatureConfig, save_meta, train_meta, zoo_summary
    from poisonguard.errors import ConfigError
    from poisonguard.io import check_writable_dir

    check_writable_dir(args.out)
    if args.n_queries < 3:
        raise ConfigError(f"--n-queries must be >= 3, got {args.n_queries}")
    if not 0 < args.fpr < 1:
        raise ConfigError(f"--fpr must be in (0, 1), got {args.fpr}")
    if not args.c > 0:
        raise ConfigError(f"--C must be > 0, got {args.c}")
    queries = None
    if args.queries:
        from poisonguard.data import load_dataset

        queries = load_dataset(args.queries).x
    cfg = FeatureConfig(families=tuple(args.features))
    meta = train_meta(args.zoo, cfg, n_queries=args.n_queries, query_seed=args.seed,
                      c=args.c, fpr=args.fpr, queries=queries)
    save_meta(args.out, meta)
    if not args.quiet:
        s = zoo_summary(meta.zoo)
        print(f"trained on {s['n_models']} models ({s['n_clean']} clean; backdoored: "
              f"{s['backdoored_per_attack']}); {len(meta.feature_names)} features; "
              f"cross-validated AUROC {meta.info['cv_auroc']}; threshold "
              f"{meta.threshold:.3f}")
        print(f"wrote {Path(args.out)}")
    return EXIT_CLEAN


def predict_record(meta_spec: str, model_path: str) -> dict[str, Any]:
    """Load the meta model and the model (architecture checked) and predict."""
    from poisonguard.audit.meta import load_meta, resolve_meta_path, zoo_summary
    from poisonguard.models.io import load_model

    meta = load_meta(meta_spec)
    clf = load_model(model_path)
    rec = meta.predict(clf)
    return {"meta": str(resolve_meta_path(meta_spec)), "model": str(model_path), **rec,
            "features": list(meta.config.families), "zoo": zoo_summary(meta.zoo),
            "training": meta.info}


def cmd_meta_predict(args: argparse.Namespace) -> int:
    from poisonguard.io import atomic_write_json

    if args.out:
        from poisonguard.io import check_writable_dir

        check_writable_dir(Path(args.out).parent or ".", "--out")
    rec = predict_record(args.meta, args.model)
    if args.out:
        atomic_write_json(args.out, rec)
    if not args.quiet:
        word = "BACKDOORED" if rec["backdoored"] else "clean"
        print(f"{word}: P(backdoored) {rec['p_backdoored']:.3f} (threshold "
              f"{rec['threshold']:.3f})" + (f"; wrote {args.out}" if args.out else ""))
    return EXIT_FOUND if rec["backdoored"] else EXIT_CLEAN
