"""``poisonguard compare BASE TUNED --clean CLEAN.npz --out DIR``: exit 0 when no backdoor was
planted between the two versions, 1 when one was, 2 on bad input."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    """Add ``compare`` to an argparse subparsers object."""
    from poisonguard.audit.cli import add_run_options

    c = sub.add_parser(
        "compare", help="compare two versions of one model (a model you trust and a fine-tune "
                        "of it): changed classes, layers, moved predictions, planted triggers",
        description="Reverse-engineer each class's trigger in TUNED and check it against "
                    "BASE: a trigger that works on TUNED but not on BASE was planted by the "
                    "change. Also reports moved predictions and changed layers. Writes "
                    "DIR/report.json, DIR/report.html, DIR/triggers.npz; exit 1 when a "
                    "backdoor was planted.")
    c.add_argument("base", help="the model you trust (poisonguard folder or TorchScript)")
    c.add_argument("tuned", help="the new version of it (same architecture)")
    c.add_argument("--clean", required=True, metavar="DATA.npz",
                   help="trusted clean samples with labels; a few hundred suffice")
    add_run_options(c)
    c.set_defaults(handler=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from poisonguard.audit.cli import (
        EXIT_CLEAN,
        EXIT_FOUND,
        _cleanse_config,
        _load_clean,
        _write_report,
    )
    from poisonguard.audit.compare import build_compare_report, compare_models
    from poisonguard.audit.core import save_triggers
    from poisonguard.audit.model import load_audit_model
    from poisonguard.io import check_writable_dir

    check_writable_dir(args.out)
    base = load_audit_model(args.base)
    tuned = load_audit_model(args.tuned)
    clean = _load_clean(args.clean, args.max_clean, args.seed)
    result = compare_models(base, tuned, clean, _cleanse_config(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_triggers(out / "triggers.npz", result.cleanse)
    report = build_compare_report(result, clean, base, tuned)
    _write_report(out, report)
    if not args.quiet:
        print(result.verdict["summary"])
        print(f"wrote {out / 'report.json'}, {out / 'report.html'} "
              f"({result.timings['compare_s']:.1f} s)")
    return EXIT_FOUND if result.verdict["backdoored"] else EXIT_CLEAN
