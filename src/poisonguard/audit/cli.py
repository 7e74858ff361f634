"""Command-line front end of the model audit: ``audit-model`` and ``repair``.

``audit-model`` exits 0 when no backdoor is found, 1 when one is; ``repair`` exits 0 when the
repaired model is written. Bad input raises ``PoisonguardError`` (exit 2).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

EXIT_CLEAN, EXIT_FOUND = 0, 1


def _add_common(p: argparse.ArgumentParser, clean_required: bool = True) -> None:
    p.add_argument("model", help="model: a folder / model.json written by poisonguard "
                                 "(scan, train), or a TorchScript file; pickles are refused")
    p.add_argument("--clean", required=clean_required, metavar="DATA.npz",
                   help="trusted clean samples with labels (x/y or x_train/y_train; for a "
                        "text model, posts in a .csv/.tsv/.jsonl/.parquet with text and label "
                        "columns); a few hundred suffice" + (
                            "" if clean_required else "; without them only the data-free "
                            "max-margin audit runs (image and vector models)"))
    p.add_argument("--text-column", default="text",
                   help="text models: the column of CLEAN.csv holding the posts")
    p.add_argument("--label-column", default="label",
                   help="text models: the column of CLEAN.csv holding the labels")
    add_run_options(p)


def add_run_options(p: argparse.ArgumentParser) -> None:
    """``--out``, ``--max-clean``, ``--steps``, ``--seed``, ``--quiet``, ``--threads``: shared by
    ``audit-model``, ``repair`` and ``compare``."""
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--max-clean", type=int, default=500,
                   help="use at most this many clean samples (default 500)")
    p.add_argument("--steps", type=int, default=None,
                   help="Neural Cleanse step budget (default 160)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the CPUs this process may use, or "
                        "OMP_NUM_THREADS when set)")


def register(sub: Any) -> None:
    """Add ``audit-model`` and ``repair`` to an argparse subparsers object."""
    a = sub.add_parser(
        "audit-model", help="audit a trained model for a backdoor (Neural Cleanse, dormant "
                            "units) with a small trusted clean set",
        description="Data-free: find the largest classification margin every class reaches "
                    "from the input domain (MM-BD) and test the largest against the others. "
                    "With --clean also reverse-engineer the smallest trigger of every class "
                    "(Neural Cleanse, all classes batched) and scan dormant units; the verdict "
                    "combines both. Writes DIR/report.json, DIR/report.html (and "
                    "DIR/triggers.npz with --clean). Exit 1 when a backdoor is found.")
    _add_common(a, clean_required=False)
    a.add_argument("--input-shape", default=None, metavar="H,W[,C]",
                   help="one sample's shape, when model.json does not record it (e.g. 28,28)")
    a.add_argument("--input-range", default=None, metavar="LOW,HIGH",
                   help="the inputs' value range, when model.json does not record it (e.g. "
                        "0,255)")
    a.add_argument("--margin-steps", type=int, default=None,
                   help="max-margin search steps per start (default 100)")
    a.add_argument("--margin-restarts", type=int, default=None,
                   help="max-margin random starts per class (default 4)")
    a.add_argument("--alpha", type=float, default=None,
                   help="max-margin p-value below which a backdoor is reported (default "
                        "0.001)")
    a.add_argument("--layer", default=None,
                   help="layer for the dormant-unit scan (default: the model's representation "
                        "layer or its last convolution)")
    a.set_defaults(handler=cmd_audit_model)

    r = sub.add_parser(
        "repair", help="repair a backdoored model: fine-pruning, unlearning or adversarial "
                       "neuron pruning (ANP) with clean data",
        description="Audit the model (or reuse --triggers from audit-model), then repair it "
                    "and write the repaired model to DIR (a poisonguard model folder, or "
                    "DIR/model.pt for TorchScript input) with DIR/report.json.")
    _add_common(r)
    r.add_argument("--method", required=True, choices=["fine-prune", "unlearn", "anp"],
                   help="fine-prune: prune the last conv layer's units (the reversed trigger's "
                        "first), then fine-tune (with the reversed trigger stamped under "
                        "true labels when pruning used its whole unit budget); unlearn: "
                        "fine-tune with the reversed trigger stamped under true labels; anp: "
                        "prune the neurons that break under adversarial weight perturbation "
                        "(needs no trigger)")
    r.add_argument("--triggers", default=None,
                   help="triggers.npz written by audit-model, or its output folder (skips "
                   "the reverse-engineering)")
    r.add_argument("--test", default=None,
                   help="test .npz: clean accuracy (and ASR if it holds x_triggered/"
                        "y_triggered) before and after the repair")
    r.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default 15)")
    r.add_argument("--prune-budget", type=float, default=None,
                   help="clean-accuracy drop allowed while pruning (default 0.005; "
                        "ANP: 0.01)")
    r.set_defaults(handler=cmd_repair)


def _load_clean(path: str, max_clean: int, seed: int) -> Any:
    from poisonguard.data import load_dataset

    clean = load_dataset(path)
    if max_clean and len(clean) > max_clean:
        rng = np.random.default_rng(seed)
        clean = clean.subset(np.sort(rng.choice(len(clean), max_clean, replace=False)))
    return clean


def _cleanse_config(args: argparse.Namespace) -> Any:
    from poisonguard.audit.neural_cleanse import CleanseConfig

    kw: dict[str, Any] = {"seed": args.seed}
    if args.steps is not None:
        kw["max_steps"] = args.steps
        kw["min_steps"] = min(CleanseConfig.min_steps, args.steps)
    return CleanseConfig(**kw)


def _write_report(out: Path, report: dict[str, Any]) -> None:
    from poisonguard.io import atomic_write_json, atomic_write_text
    from poisonguard.report.html import render_html

    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.html", render_html(report))


def _margin_config(args: argparse.Namespace) -> Any:
    from poisonguard.audit.mmbd import MarginConfig

    kw: dict[str, Any] = {"seed": args.seed}
    for flag, key in (("margin_steps", "steps"), ("margin_restarts", "restarts"),
                      ("alpha", "alpha")):
        if getattr(args, flag, None) is not None:
            kw[key] = getattr(args, flag)
    return MarginConfig(**kw)


def cmd_audit_model(args: argparse.Namespace) -> int:
    from poisonguard.audit.combined import combined_audit, data_free_report
    from poisonguard.audit.core import build_audit_report, save_triggers
    from poisonguard.audit.mmbd import (
        check_classifier_output,
        infer_domain,
        max_margin_audit,
        parse_range,
        parse_shape,
    )
    from poisonguard.audit.model import load_audit_model
    from poisonguard.io import check_writable_dir
    from poisonguard.modalities.text.io import is_text_model

    if is_text_model(args.model):
        from poisonguard.errors import ConfigError
        from poisonguard.modalities.text.audit_cli import cmd_audit_text

        if not args.clean:
            raise ConfigError("a text model is audited with clean posts: give --clean")
        return cmd_audit_text(args)
    check_writable_dir(args.out)
    mcfg = _margin_config(args)
    shape = parse_shape(args.input_shape) if args.input_shape else None
    vrange = parse_range(args.input_range) if args.input_range else None
    model = load_audit_model(args.model)
    clean = _load_clean(args.clean, args.max_clean, args.seed) if args.clean else None
    domain = infer_domain(model, shape, vrange, None if clean is None else clean.x)
    k = check_classifier_output(model, domain)
    out = Path(args.out)
    if clean is None:
        margin = max_margin_audit(model, domain, mcfg, k)
        report = data_free_report(margin, model)
        verdict, seconds, files = report["verdict"], margin.runtime_s, ["report.json",
                                                                          "report.html"]
        out.mkdir(parents=True, exist_ok=True)
    else:
        result, margin = combined_audit(model, clean, _cleanse_config(args), mcfg, domain,
                                        layer=args.layer)
        report = build_audit_report(result, clean, model, command="audit-model",
                                    margin=margin)
        verdict, seconds = result.verdict, result.timings["audit_s"]
        files = ["report.json", "report.html", "triggers.npz"]
        out.mkdir(parents=True, exist_ok=True)
        save_triggers(out / "triggers.npz", result.cleanse)
    _write_report(out, report)
    if not args.quiet:
        print(verdict["summary"])
        print(f"wrote {', '.join(str(out / f) for f in files)} ({seconds:.1f} s)")
    return EXIT_FOUND if verdict["backdoored"] else EXIT_CLEAN


def _evaluate(model: Any, test: dict[str, np.ndarray] | None) -> dict[str, float]:
    if test is None:
        return {}
    from poisonguard.metrics import accuracy

    out = {}
    if "x" in test:
        out["clean_accuracy"] = accuracy(model.classifier.predict(test["x"]), test["y"])
    if "x_triggered" in test:
        out["asr"] = accuracy(model.classifier.predict(test["x_triggered"]),
                              test["y_triggered"])
    return out


def _load_test(path: str | None) -> dict[str, np.ndarray] | None:
    if path is None:
        return None
    from poisonguard.data import load_dataset
    from poisonguard.errors import DataError

    test = load_dataset(path, split="test")
    out = {"x": test.x, "y": test.y}
    try:
        with np.load(path, allow_pickle=False) as arc:
            if "x_triggered" in arc.files and "y_triggered" in arc.files:
                out["x_triggered"] = arc["x_triggered"]
                out["y_triggered"] = arc["y_triggered"].astype(np.int64)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable test file ({exc})") from None
    return out


def cmd_repair(args: argparse.Namespace) -> int:
    from poisonguard.audit.anp import ANPConfig, anp_prune
    from poisonguard.audit.core import (
        AuditResult,
        audit_model,
        build_audit_report,
        load_triggers,
        make_verdict,
    )
    from poisonguard.audit.model import check_clean_data, load_audit_model, save_repaired
    from poisonguard.audit.repair import RepairConfig, fine_prune, reversed_trigger_asr, unlearn
    from poisonguard.modalities.text.io import is_text_model

    if is_text_model(args.model):
        from poisonguard.modalities.text.audit_cli import cmd_repair_text

        return cmd_repair_text(args)
    model = load_audit_model(args.model)
    clean = _load_clean(args.clean, args.max_clean, args.seed)
    test = _load_test(args.test)
    t0 = time.perf_counter()
    if args.triggers:
        k = check_clean_data(model, clean)
        nc = load_triggers(args.triggers)
        if nc.n_classes != k or nc.masks.shape[1:3] != clean.x.shape[1:3]:
            from poisonguard.errors import DataError

            raise DataError(f"{args.triggers}: triggers for {nc.n_classes} classes of shape "
                            f"{nc.masks.shape[1:]} do not fit this model/data")
        result = AuditResult(cleanse=nc, dormant=None, verdict=make_verdict(nc), n_classes=k)
    else:
        result = audit_model(model, clean, _cleanse_config(args), dormant=False)
    nc = result.cleanse
    classes = list(nc.flagged) or [nc.most_anomalous()]
    kw: dict[str, Any] = {"seed": args.seed}
    if args.epochs is not None:
        kw["epochs"] = args.epochs
    if args.prune_budget is not None:
        kw["prune_budget"] = args.prune_budget
    cfg = RepairConfig(**kw)
    before = _evaluate(model, test)
    before["reversed_trigger_asr"] = reversed_trigger_asr(model, nc, classes, clean)
    if args.method == "anp":
        akw: dict[str, Any] = {"seed": args.seed}
        if args.prune_budget is not None:
            akw["acc_budget"] = args.prune_budget
        info = anp_prune(model, clean, ANPConfig(**akw))
    elif args.method == "fine-prune":
        info = fine_prune(model, clean, cfg, nc=nc if nc.flagged else None,
                          trigger_classes=list(nc.flagged))
    elif not nc.flagged:
        info = {"method": "unlearn", "skipped": "no class flagged, nothing to unlearn; the "
                                                "model is written unchanged"}
    else:
        info = unlearn(model, clean, nc, classes, cfg)
    after = _evaluate(model, test)
    after["reversed_trigger_asr"] = reversed_trigger_asr(model, nc, classes, clean)
    out = Path(args.out)
    repair = {"method": args.method, "trigger_classes": classes,
              "flagged": list(nc.flagged), "before": before, "after": after,
              "details": info, "runtime_s": round(time.perf_counter() - t0, 3)}
    if info.get("unchanged"):
        repair["warning"] = ("no fine-tuning epoch kept the held-out clean accuracy within the "
                             "budget at any learning rate; the model is written unchanged and "
                             "still carries the backdoor (try more clean samples, or "
                             "--method fine-prune)")
    if model.classifier.expected_inputs is None:
        from poisonguard.models.io import describe_inputs

        model.classifier.expected_inputs = describe_inputs(clean.x)
    written = save_repaired(model, out, repair)
    repair["model"] = str(written)
    report = build_audit_report(result, clean, model, command=f"repair --method {args.method}",
                                repair=repair)
    _write_report(out, report)
    if not args.quiet:
        def fmt(d: dict[str, Any]) -> str:
            return ", ".join(f"{k} {v:.4f}" for k, v in d.items() if v is not None)

        print(result.verdict["summary"])
        print(f"{args.method}: before {fmt(before)}; after {fmt(after)}")
        if "warning" in repair:
            print(f"warning: {repair['warning']}", file=sys.stderr)
        print(f"wrote {written} and {out / 'report.json'}")
    return EXIT_CLEAN
