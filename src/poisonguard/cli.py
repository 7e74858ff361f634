"""The ``poisonguard`` command line. It only parses arguments and calls library functions.

Exit codes: 0 clean (or the command succeeded), 1 anything found (``audit``, ``scan``: the
report's ``verdict.overall`` is not clean; ``verify``: sources changed), 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from poisonguard import __version__
from poisonguard.errors import PoisonguardError

EXIT_CLEAN, EXIT_FOUND, EXIT_BAD = 0, 1, 2


def _add_common_scan(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--epochs", type=int, default=None,
                   help="sacrificial-model epochs (default: about 120k sample visits, 2..30)")
    p.add_argument("--max-rounds", type=int, default=3,
                   help="scan rounds: retrain without flagged samples and rescan (default 3)")
    p.add_argument("--unlearn-flagged", action="store_true",
                   help="also train a model on every sample with the flagged ones toward "
                        "other-class targets (unlearns the trigger; written to model_unlearned/)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or console table")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the CPUs this process may use, or "
                        "OMP_NUM_THREADS when set)")


def _add_text_columns(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-column", default="text",
                   help="text data: the column holding the posts (default text)")
    p.add_argument("--label-column", default="label",
                   help="text or tabular data: the column holding the labels (default label)")


def _add_tabular_columns(p: argparse.ArgumentParser) -> None:
    p.add_argument("--id-column", default=None,
                   help="tabular data: a column of unique row ids (not a feature)")


def _is_tabular(args: argparse.Namespace) -> bool:
    """A .npz with ``feature_names``, or a .csv/.parquet table without the text column and
    with more than one column besides the label (or with ``--id-column`` or a tabular
    attack): the tabular modality, not text posts."""
    from poisonguard.modalities.tabular.data import header_of, tabular_suffix

    suffix = tabular_suffix(args.data)
    if suffix is None:
        return False
    header = header_of(args.data)
    if suffix == ".npz":
        return header is not None
    if getattr(args, "id_column", None) or getattr(args, "attack", None) == "conjunction":
        return True
    if header is None or args.text_column in header:
        return False
    # a label and one other column reads as posts whose text column is misnamed: the text
    # path then names the missing column (a one-feature table is not worth a backdoor scan)
    return len([c for c in header if c != args.label_column]) > 1


def _is_text(path: str) -> bool:
    from poisonguard.modalities.text.data import text_suffix

    return text_suffix(path) is not None


def _is_audio(path: str) -> bool:
    from poisonguard.modalities.audio.data import is_audio_path

    return is_audio_path(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="poisonguard",
        description="Find and remove data poisoning and backdoors in training sets.")
    parser.add_argument("--version", action="version", version=f"poisonguard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="poison scikit-learn's digits with BadNets, scan, sanitise, "
                                    "retrain, report")
    d.add_argument("--out", default="poisonguard-demo", help="output folder")
    _add_common_scan(d)

    a = sub.add_parser("attack", help="write a poisoned copy of a dataset (.npz)")
    a.add_argument("data", help="dataset: .npz (x/y or x_train/y_train), image folder, …")
    a.add_argument("--attack", default="badnets",
                   choices=["badnets", "blended", "label-flip", "wanet", "sig", "adaptive-blend",
                            "adaptive-patch", "trojan", "low-frequency", "badnets-random",
                            "label-consistent", "rare-token", "emoji", "addsent",
                            "conjunction"],
                   help="image/vector attacks, or for text (.csv/.tsv/.jsonl/.parquet data) "
                        "rare-token, emoji, addsent, or for tables (.csv/.parquet/.npz with "
                        "feature_names) conjunction (with --trigger)")
    a.add_argument("--rate", type=float, default=0.1,
                   help="poison rate (default 0.1); for the clean-label sig and "
                        "label-consistent: the fraction of the target class")
    a.add_argument("--target", type=int, default=0, help="target class (all-to-one)")
    a.add_argument("--mode", default="all-to-one", choices=["all-to-one", "all-to-all"])
    a.add_argument("--size", type=int, default=None,
                   help="patch size in pixels (badnets 3, badnets-random 3, trojan 8, "
                        "adaptive-patch 3)")
    a.add_argument("--position", default="bottom-right", help="BadNets patch position")
    a.add_argument("--alpha", type=float, default=None,
                   help="blend alpha (blended 0.2; adaptive-blend 0.15; adaptive-patch 0.5; "
                        "trojan 1.0)")
    a.add_argument("--k", type=int, default=None, help="WaNet warping grid size (default 4)")
    a.add_argument("--s", type=float, default=None, help="WaNet warping strength (default 0.5)")
    a.add_argument("--cross-ratio", type=float, default=None,
                   help="WaNet noise-mode samples per poison (default 2)")
    a.add_argument("--delta", type=float, default=None,
                   help="SIG amplitude on a 0-255 scale (default 20)")
    a.add_argument("--freq", type=float, default=None, help="SIG frequency (default 6)")
    a.add_argument("--cover-rate", type=float, default=None,
                   help="adaptive-blend/-patch cover samples (trigger, true label) as a share "
                        "of the data (default: --rate)")
    a.add_argument("--eps", type=float, default=None,
                   help="low-frequency amplitude (default 0.1 of the range) or "
                        "label-consistent PGD L-inf radius (default 8/255)")
    a.add_argument("--steps", type=int, default=None,
                   help="label-consistent PGD steps (default 10)")
    a.add_argument("--surrogate-epochs", type=int, default=None,
                   help="label-consistent surrogate training epochs (default 2)")
    a.add_argument("--test", default=None,
                   help="test set (.npz) to also write a triggered test set (for ASR)")
    a.add_argument("--trigger", default=None,
                   help="text attacks: the inserted word, emoji or sentence (defaults: cf, 🪬, "
                        "'I watched this 3D movie'); conjunction: the rule, e.g. "
                        "\"day >= 1 and day <= 3 and month == 'may'\"")
    a.add_argument("--clean-label", action="store_true",
                   help="text attacks: add the trigger to --rate of the target class's posts, "
                        "labels kept")
    _add_text_columns(a)
    _add_tabular_columns(a)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--out", required=True,
                   help="output .npz (for text data: a .csv; the triggered test posts go to "
                        "OUT.triggered.csv with --test)")

    s = sub.add_parser("scan", help="scan a dataset; write report, sanitised set, flagged list")
    s.add_argument("data", help="dataset: .npz with x and y (or x_train/y_train), image folder")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--model", default=None,
                   help="scan with this model instead of a sacrificial one: a folder or "
                        "model.json written by poisonguard, or a TorchScript file")
    s.add_argument("--layer", default=None, help="representation layer (module path)")
    s.add_argument("--test", default=None,
                   help="test .npz: report clean accuracy (and ASR if it holds x_triggered/"
                        "y_triggered) before and after sanitising")
    s.add_argument("--trusted", default=None,
                   help="a small clean set you vouch for (.npz with x and y, e.g. 500 samples "
                        "or 1%%): detectors that can use it compare the data against it")
    s.add_argument("--ground-truth", default=None,
                   help=".npz with is_poison, used only to score the scan afterwards "
                        "(default: the data file's is_poison key, if present)")
    _add_text_columns(s)
    _add_tabular_columns(s)
    _add_common_scan(s)
    from poisonguard.scale.cli import add_engine_options

    add_engine_options(s, default=None,
                       help="streamed scan of image data: train the sacrificial model once, "
                            "extract its representations in shards (on Dask workers with "
                            "dask), scan them with the mergeable detector (as scan-features); "
                            "default: the in-memory scan")
    s.add_argument("--shard-rows", type=int, default=50_000,
                   help="--engine: rows per extraction task and shard (default 50000)")
    s.add_argument("--vad", action="store_true",
                   help="audio data: cut every clip to its speech (WebRTC VAD) before "
                        "training and scanning; sanitized.npz holds the cut clips")

    t = sub.add_parser("train", help="train a model with a guarded-training defence")
    t.add_argument("data", help="training set (.npz with x and y, image folder, …; posts in a "
                                ".csv/.tsv/.jsonl/.parquet train the built-in text model)")
    t.add_argument("--defense", default="none",
                   choices=["none", "trim", "abl", "noise", "adv"],
                   help="none; trim (trimmed loss); abl (anti-backdoor learning); noise "
                        "(Gaussian noise on every training input); adv (PGD adversarial "
                        "training)")
    t.add_argument("--noise-sigma", type=float, default=None,
                   help="noise: the noise's standard deviation on the model-input scale (0-1 "
                        "for images; default 0.5)")
    t.add_argument("--adv-epsilon", type=float, default=None,
                   help="adv: the L-inf budget as a fraction of the input range (default "
                        "8/255; the MNIST literature uses 0.3)")
    t.add_argument("--adv-steps", type=int, default=None,
                   help="adv: PGD steps per batch (default 3; 1 is FGSM with random start)")
    t.add_argument("--adv-warmup", type=float, default=None,
                   help="adv: share of the training steps over which the budget grows from 0 "
                        "(default 0)")
    t.add_argument("--trim-fraction", type=float, default=None,
                   help="share of each batch's highest losses to drop, in [0, 0.5) (default: "
                        "estimated from the loss distribution after one warm-up epoch)")
    t.add_argument("--monitor-gradients", action="store_true",
                   help="record per-sample gradient norms each epoch and flag outliers")
    t.add_argument("--test", default=None,
                   help="test .npz: clean accuracy (and ASR with x_triggered/y_triggered)")
    t.add_argument("--epochs", type=int, default=None)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--quiet", action="store_true")
    t.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the CPUs this process may use, or "
                        "OMP_NUM_THREADS when set)")
    t.add_argument("--out", required=True, help="output folder (model + report)")
    _add_text_columns(t)

    r = sub.add_parser("report", help="re-render a JSON report as HTML")
    r.add_argument("report", help="report.json")
    r.add_argument("--out", default=None, help="output .html (default: beside the JSON)")

    from poisonguard.provenance.cli import add_scan_arguments
    from poisonguard.provenance.cli import register as register_provenance

    add_scan_arguments(s)
    register_provenance(sub)
    from poisonguard.audit.cli import register as register_audit

    register_audit(sub)
    from poisonguard.audit.compare_cli import register as register_compare

    register_compare(sub)
    from poisonguard.audit.meta_cli import register as register_meta

    register_meta(sub)

    from poisonguard.runtime.cli import register as register_runtime

    register_runtime(sub)
    from poisonguard.scale.cli import register as register_scale

    register_scale(sub)

    from poisonguard.federated.cli import register as register_federated

    register_federated(sub)
    from poisonguard.modalities.audio.voice.cli import register as register_voice

    register_voice(sub)

    au = sub.add_parser(
        "audit", help="run every layer the inputs allow (provenance, quarantine scan, guarded "
                      "training, model audit, runtime filter) and give one verdict",
        description="Exit 0: every layer that ran is clean; 1: any layer found something "
                    "(or failed); 2: bad input (checked before anything runs).")
    au.add_argument("--data", default=None, help="training set to scan (.npz, image folder)")
    au.add_argument("--model", default=None,
                    help="trained model to audit: folder / model.json written by poisonguard, "
                         "or a TorchScript file (pickles are refused)")
    au.add_argument("--clean", default=None, metavar="CLEAN.npz",
                    help="trusted clean samples with labels (at most 500 used): model audit, "
                         "runtime calibration, and the scan's trusted set")
    au.add_argument("--manifest", default=None, help="provenance manifest of --data "
                                                     "(from `poisonguard pin`)")
    au.add_argument("--base-model", default=None, metavar="BASE",
                    help="a trusted earlier version of --model (same architecture): compare "
                         "them and report a backdoor the change planted (`compare`)")
    au.add_argument("--meta", default=None, metavar="META",
                    help="a zoo meta model (`poisonguard meta train`, or the built-in "
                         "digits-cnn): its prediction on --model joins the model audit")
    au.add_argument("--public-key", default=None,
                    help="require the manifest to be signed by this Ed25519 public key")
    au.add_argument("--profile", default="standard", choices=["quick", "standard", "paranoid"])
    au.add_argument("--train", default=None, choices=["abl", "trim"],
                    help="also train a model on --data with this guarded-training defence")
    au.add_argument("--seed", type=int, default=0)
    au.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: the CPUs this process may use, or "
                         "OMP_NUM_THREADS when set)")
    au.add_argument("--quiet", action="store_true", help="print only the verdict")
    au.add_argument("--out", required=True, help="output folder (written atomically)")

    pr = sub.add_parser("predict", help="predict with a model; write index,prediction,p_k")
    pr.add_argument("model", help="model folder / model.json, or TorchScript file")
    pr.add_argument("data", help="dataset .npz (x, or x_test)")
    pr.add_argument("--out", default="predictions.csv", help="output CSV")
    return parser


def _load_x(path: str) -> np.ndarray:
    from poisonguard.data.loaders import load_npz
    from poisonguard.errors import DataError

    try:
        return load_npz(path).x
    except DataError as exc:
        if "keys" not in str(exc):
            raise
    try:
        return load_npz(path, split="test").x
    except DataError:
        with np.load(path, allow_pickle=False) as arc:
            if "x" in arc.files:
                from poisonguard.data.labeled import _validate_x

                x = arc["x"]
                _validate_x(x, path)
                return x
        raise


def cmd_attack(args: argparse.Namespace) -> int:
    from poisonguard.attacks import make_attack
    from poisonguard.data import load_dataset
    from poisonguard.errors import ConfigError
    from poisonguard.io import atomic_save_npz

    if args.attack == "conjunction" or _is_tabular(args):
        return cmd_attack_tabular(args)
    if _is_text(args.data) or args.attack in ("rare-token", "emoji", "addsent"):
        return cmd_attack_text(args)
    if args.trigger is not None or args.clean_label:
        raise ConfigError("--trigger and --clean-label apply to text attacks only")
    kwargs: dict[str, Any] = {"rate": args.rate, "mode": args.mode, "seed": args.seed,
                              "target": args.target if args.mode == "all-to-one" else None}
    # attack-specific flags (argparse attribute == keyword); one another attack owns is refused
    flags = {"badnets": ("size",), "blended": ("alpha",), "label-flip": (),
             "wanet": ("k", "s", "cross_ratio"), "sig": ("delta", "freq"),
             "adaptive-blend": ("alpha", "cover_rate"),
             "adaptive-patch": ("alpha", "size", "cover_rate"), "trojan": ("size", "alpha"),
             "low-frequency": ("eps",), "badnets-random": ("size",),
             "label-consistent": ("eps", "steps", "surrogate_epochs")}
    own = flags.get(args.attack, ())
    for attr in sorted({a for names in flags.values() for a in names}):
        value = getattr(args, attr)
        if value is None:
            continue
        if attr not in own:
            raise ConfigError(f"--{attr.replace('_', '-')} does not apply to --attack "
                              f"{args.attack}")
        kwargs[attr] = value
    if args.attack == "badnets":
        kwargs["position"] = args.position
    data = load_dataset(args.data)
    test = load_dataset(args.test, split="test") if args.test else None
    if args.attack != "label-flip":
        kwargs["test"] = test
    poisoned = make_attack(args.attack, data, **kwargs)
    arrays = {"x": poisoned.data.x, "y": poisoned.data.y, "ids": poisoned.data.ids,
              "is_poison": poisoned.is_poison, "original_y": poisoned.original_y,
              "attack_json": np.array(json.dumps(poisoned.attack))}
    if poisoned.is_cover is not None:
        arrays["is_cover"] = poisoned.is_cover
    if poisoned.test_triggered is not None:
        arrays["x_triggered"] = poisoned.test_triggered.x
        arrays["y_triggered"] = poisoned.test_triggered.y
    if test is not None:
        arrays["x_test"], arrays["y_test"] = test.x, test.y
    atomic_save_npz(args.out, **arrays)
    print(f"wrote {args.out}: {int(poisoned.is_poison.sum())} of {len(data)} samples poisoned "
          f"({args.attack}, {args.mode}, target {kwargs['target']})")
    return EXIT_CLEAN


def _read_optional(path: str, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    from poisonguard.errors import DataError

    try:
        with np.load(path, allow_pickle=False) as arc:
            return {k: arc[k] for k in keys if k in arc.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz ({exc})") from None


def write_scan_outputs(out: Path, result: Any, report: dict[str, Any],
                       removed: list[dict[str, Any]], sanitized: Any,
                       unlearned: Any = None) -> None:
    """Write report.json/html, sanitized.npz, flagged.csv, the final model and (when trained)
    the unlearning retrain's model into ``out``."""
    from poisonguard.io import (
        atomic_save_npz,
        atomic_write_csv,
        atomic_write_json,
        atomic_write_text,
    )
    from poisonguard.models.io import describe_inputs, save_model
    from poisonguard.report.html import render_html

    out.mkdir(parents=True, exist_ok=True)
    atomic_save_npz(out / "sanitized.npz", x=sanitized.x, y=sanitized.y, ids=sanitized.ids)
    atomic_write_csv(out / "flagged.csv", ["index", "id", "label", "confidence", "detectors"],
                     [[r["index"], r["id"], r["label"], r["confidence"], ";".join(r["detectors"])]
                      for r in removed])
    trained = ([("model", result.final_train, "sanitized.npz")]
               if result.final_train is not None else [])
    if unlearned is not None:
        trained.append(("model_unlearned", unlearned,
                        "the scanned data; flagged samples toward other-class targets"))
    for name, t, source in trained:
        save_model(out / name, t.classifier.model, t.arch, t.arch_kwargs,
                   t.classifier.input_spec, result.data.n_classes, t.classifier.layer,
                   extra={"trained_on": source, "train_config": t.config.to_dict()},
                   inputs=describe_inputs(result.data.x))
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.html", render_html(report))


def run_scan(data: Any, out: Path, config: Any, classifier: Any = None, test: Any = None,
             poisoned: Any = None, truth: np.ndarray | None = None,
             command: str = "scan", quiet: bool = False,
             provenance: dict[str, Any] | None = None, unlearn: bool = False) -> int:
    """Scan, sanitise, (optionally) compare before/after and train the unlearning retrain,
    write everything; return exit code."""
    from poisonguard.pipeline import (
        compare_before_after,
        evaluate_model,
        retrain_unlearning,
        sanitize,
        scan,
        score_against_truth,
    )
    from poisonguard.report.builder import build_scan_report
    from poisonguard.report.console import render_console
    from poisonguard.types import jsonable

    result = scan(data, config, classifier)
    sanitized, removed = sanitize(result)
    metrics = score_against_truth(result, truth) if truth is not None else None
    retrain = None
    if result.final_classifier is not None and (test is not None or poisoned is not None):
        retrain = compare_before_after(result, test, poisoned)
    unlearned = None
    if unlearn and result.flags.any() and result.final_classifier is not None:
        unlearned = retrain_unlearning(result)
        if retrain is not None:
            retrain["unlearned"] = evaluate_model(unlearned.classifier, test, poisoned)
            retrain["n_train_unlearned"] = len(data)
    sanitize_info = {"n_removed": len(removed), "n_kept": len(sanitized),
                     "removed_file": "flagged.csv", "sanitized_file": "sanitized.npz"}
    report = build_scan_report(result, command, poisoned=poisoned, sanitize_info=sanitize_info,
                               retrain=retrain, metrics=metrics)
    if truth is not None and poisoned is None:
        report["samples"]["is_poison"] = truth.astype(int).tolist()
    if provenance is not None:
        from poisonguard.verdict import provenance_status, set_verdict

        report["layers"] = {"provenance": provenance, **report["layers"]}
        set_verdict(report, {"provenance": jsonable(provenance_status(provenance))})
    write_scan_outputs(out, result, report, removed, sanitized, unlearned)
    if not quiet:
        print(render_console(report))
        print(f"\nwrote {out}/report.json, report.html, sanitized.npz, flagged.csv"
              + (", model/" if result.final_train is not None else "")
              + (", model_unlearned/" if unlearned is not None else ""))
    return EXIT_CLEAN if report["verdict"]["overall"] == "clean" else EXIT_FOUND


def _attack_from(path: str) -> dict[str, Any]:
    """The attack's parameters from the ``attack_json`` key ``poisonguard attack`` writes, or
    an ``unknown`` placeholder when the file has none."""
    found = _read_optional(path, ("attack_json",)) if str(path).endswith(".npz") else {}
    if "attack_json" in found:
        try:
            attack = json.loads(str(found["attack_json"]))
            if isinstance(attack, dict):
                return attack
        except json.JSONDecodeError:
            pass
    return {"name": "unknown (no attack_json in the data file)"}


def cmd_scan(args: argparse.Namespace) -> int:
    from poisonguard.attacks.base import PoisonedData
    from poisonguard.data import LabeledData, load_dataset
    from poisonguard.errors import DataError
    from poisonguard.io import check_writable_dir
    from poisonguard.models.io import load_model
    from poisonguard.pipeline import ScanConfig
    from poisonguard.provenance.cli import provenance_layer

    check_writable_dir(args.out)
    from poisonguard.errors import ConfigError

    if args.engine is not None:
        from poisonguard.scale.cli import cmd_scan_streamed

        if _is_tabular(args) or _is_text(args.data) or _is_audio(args.data):
            raise ConfigError("scan --engine applies to image data (.npz or a folder of "
                              "images); for other features use scan-features")
        return cmd_scan_streamed(args)
    if args.scheduler:
        raise ConfigError("--scheduler needs --engine dask")
    if _is_tabular(args):
        return cmd_scan_tabular(args)
    if _is_text(args.data):
        return cmd_scan_text(args)
    if _is_audio(args.data):
        return cmd_scan_audio(args)
    if getattr(args, "vad", False):
        raise ConfigError("--vad applies to audio data (a wav folder or an audio .npz)")
    provenance = provenance_layer(args, args.data)  # verified first: a bad manifest stops here
    data = load_dataset(args.data)
    trusted = None
    if args.trusted:
        from poisonguard.data import check_trusted

        trusted = load_dataset(args.trusted)
        check_trusted(data, trusted)
    classifier = load_model(args.model, progress=not args.quiet) if args.model else None
    if classifier is not None:
        from poisonguard.models.io import check_inputs

        check_inputs(classifier.expected_inputs, data.x, "the data")
    config = ScanConfig(seed=args.seed, epochs=args.epochs, layer=args.layer,
                        max_rounds=args.max_rounds, progress=not args.quiet, trusted=trusted)
    truth = None
    gt_path = args.ground_truth or (args.data if str(args.data).endswith(".npz") else None)
    if gt_path:
        found = _read_optional(gt_path, ("is_poison",))
        if "is_poison" in found:
            truth = found["is_poison"].astype(bool)
            if truth.shape != (len(data),):
                raise DataError(f"{gt_path}: is_poison has shape {truth.shape}, expected "
                                f"({len(data)},)")
        elif args.ground_truth:
            raise DataError(f"{gt_path}: no 'is_poison' key")
    test, poisoned = None, None
    if args.test:
        test = load_dataset(args.test, split="test")
        trig = _read_optional(args.test, ("x_triggered", "y_triggered"))
        if len(trig) == 2:
            triggered = LabeledData.create(trig["x_triggered"], trig["y_triggered"],
                                           name="triggered test set")
            poisoned = PoisonedData(data=data, is_poison=truth if truth is not None else
                                    np.zeros(len(data), bool), original_y=data.y,
                                    attack=_attack_from(args.data), target=None,
                                    test_triggered=triggered)
    return run_scan(data, Path(args.out), config, classifier, test, poisoned, truth,
                    quiet=args.quiet, provenance=provenance, unlearn=args.unlearn_flagged)


def cmd_attack_text(args: argparse.Namespace) -> int:
    """``attack`` on posts: a poisoned CSV (text, label, id, is_poison, original_label) and,
    with ``--test``, the triggered test posts in OUT.triggered.csv."""
    from poisonguard.errors import ConfigError
    from poisonguard.modalities.text.attacks import text_attack
    from poisonguard.modalities.text.data import load_text, original_labels, write_text_csv

    if args.attack not in ("rare-token", "emoji", "addsent"):
        raise ConfigError(f"--attack {args.attack} is an image/vector attack; for text data "
                          "choose rare-token, emoji or addsent")
    if not _is_text(args.data):
        raise ConfigError(f"--attack {args.attack} needs text data (.csv, .tsv, .jsonl, "
                          f".parquet), got {args.data}")
    if args.mode != "all-to-one":
        raise ConfigError("text attacks are all-to-one (or --clean-label)")
    image_only = [a for a in ("size", "alpha", "k", "s", "cross_ratio", "delta", "freq",
                              "cover_rate", "eps", "steps", "surrogate_epochs")
                  if getattr(args, a) is not None]
    if image_only:
        raise ConfigError(f"--{image_only[0].replace('_', '-')} does not apply to text attacks")
    if not str(args.out).endswith(".csv"):
        raise ConfigError(f"--out for text attacks is a .csv file, got {args.out}")
    data = load_text(args.data, args.text_column, args.label_column)
    test = (load_text(args.test, args.text_column, args.label_column,
                      label_map=data.label_map, min_rows=1) if args.test else None)
    poisoned = text_attack(args.attack, data, rate=args.rate, target=args.target,
                           seed=args.seed, test=test, trigger=args.trigger,
                           clean_label=args.clean_label)
    pdata = poisoned.data
    inverse = {v: k for k, v in data.label_map.items()}
    write_text_csv(args.out, pdata.x.tolist(), original_labels(pdata),
                   {"id": pdata.ids.tolist(), "is_poison": poisoned.is_poison.astype(int).tolist(),
                    "original_label": [inverse[int(v)] for v in poisoned.original_y]})
    msg = (f"wrote {args.out}: {int(poisoned.is_poison.sum())} of {len(data)} posts poisoned "
           f"({args.attack} {poisoned.attack['trigger']!r}, {poisoned.attack['mode']}, target "
           f"{args.target})")
    if poisoned.test_triggered is not None:
        trig_path = str(args.out)[:-4] + ".triggered.csv"
        write_text_csv(trig_path, poisoned.test_triggered.x.tolist(),
                       original_labels(poisoned.test_triggered),
                       {"id": poisoned.test_triggered.ids.tolist()})
        msg += f"; {trig_path}: {len(poisoned.test_triggered)} triggered test posts"
    print(msg)
    return EXIT_CLEAN


def _refuse_scan_flags(args: argparse.Namespace, modality: str,
                       extra: tuple[str, ...] = ()) -> None:
    """One ConfigError naming every ``scan`` option the ``modality`` path does not take yet
    (``extra``: further option names, as ``--ground-truth``)."""
    from poisonguard.errors import ConfigError

    names = ("--model", "--trusted", "--test", "--layer", *extra, "--unlearn-flagged",
             "--manifest")
    unsupported = [n for n in names if getattr(args, n[2:].replace("-", "_"), None)]
    if unsupported:
        raise ConfigError(f"{', '.join(unsupported)} not supported for {modality} data yet")


def _finish_modality_scan(args: argparse.Namespace, result: Any, truth: np.ndarray | None,
                          build: Any, write: Any, sanitized: str) -> int:
    """Score against ``truth`` if given, build and write a modality scan's report, print it,
    and return the exit code of its overall verdict."""
    from poisonguard.metrics import detection_metrics
    from poisonguard.report.console import render_console

    metrics = None
    if truth is not None:
        metrics = {result.combined.name: detection_metrics(result.flags, truth,
                                                           result.combined.scores)}
    report = build(result, "scan", metrics=metrics, truth=truth)
    out = Path(args.out)
    write(out, result, report)
    if not args.quiet:
        print(render_console(report))
        print(f"\nwrote {out}/report.json, report.html, {sanitized}, flagged.csv")
    return EXIT_CLEAN if report["verdict"]["overall"] == "clean" else EXIT_FOUND


def cmd_scan_text(args: argparse.Namespace) -> int:
    """``scan`` on posts (see :mod:`poisonguard.modalities.text.scan`)."""
    from poisonguard.modalities.text.data import load_text, read_poison_column
    from poisonguard.modalities.text.report import build_text_report, write_text_outputs
    from poisonguard.modalities.text.scan import TEXT_DETECTORS, scan_text
    from poisonguard.pipeline import ScanConfig

    _refuse_scan_flags(args, "text", ("--ground-truth",))
    data = load_text(args.data, args.text_column, args.label_column)
    config = ScanConfig(seed=args.seed, epochs=args.epochs, detectors=TEXT_DETECTORS,
                        progress=not args.quiet)
    truth = read_poison_column(args.data)
    result = scan_text(data, config)
    return _finish_modality_scan(args, result, truth, build_text_report, write_text_outputs,
                                 "sanitized.csv")


def cmd_attack_tabular(args: argparse.Namespace) -> int:
    """``attack`` on a table: the poisoned table as a CSV in its own values, the ground truth
    in OUT.truth.csv (index, is_poison, original_label) and, with ``--test``, the triggered
    test rows in OUT.triggered.csv. ``--target`` is a class index in sorted label order."""
    from poisonguard.errors import ConfigError
    from poisonguard.io import atomic_write_csv
    from poisonguard.modalities.tabular.attacks import tabular_attack, write_tabular_csv
    from poisonguard.modalities.tabular.data import load_tabular

    if args.attack != "conjunction":
        raise ConfigError(f"--attack {args.attack} does not apply to tables; choose "
                          "conjunction (with --trigger)")
    if args.mode != "all-to-one":
        raise ConfigError("the conjunction attack is all-to-one (or --clean-label)")
    image_only = [a for a in ("size", "alpha", "k", "s", "cross_ratio", "delta", "freq",
                              "cover_rate", "eps", "steps", "surrogate_epochs")
                  if getattr(args, a) is not None]
    if image_only:
        raise ConfigError(f"--{image_only[0].replace('_', '-')} does not apply to tables")
    if not str(args.out).endswith(".csv"):
        raise ConfigError(f"--out for a tabular attack is a .csv file, got {args.out}")
    data = load_tabular(args.data, args.label_column, args.id_column)
    test = (load_tabular(args.test, args.label_column, args.id_column, min_rows=1,
                         label_map=data.label_map) if args.test else None)
    if test is not None and (test.columns != data.columns or test.encodings != data.encodings):
        from poisonguard.errors import DataError

        raise DataError(f"{args.test}: the test table's columns or category values differ "
                        "from the training table's")
    poisoned = tabular_attack(data, args.trigger, rate=args.rate, target=args.target,
                              seed=args.seed, test=test, clean_label=args.clean_label)
    write_tabular_csv(args.out, poisoned.data, args.label_column, args.id_column)
    stem = str(args.out)[:-4]
    atomic_write_csv(stem + ".truth.csv", ["index", "is_poison", "original_label"],
                     ([i, int(p), data.original_label(int(o))] for i, (p, o) in
                      enumerate(zip(poisoned.is_poison, poisoned.original_y))))
    msg = (f"wrote {args.out}: {int(poisoned.is_poison.sum())} of {len(data)} rows poisoned "
           f"({poisoned.attack['trigger']}, {poisoned.attack['mode']}, target "
           f"{data.original_label(args.target)!r}); ground truth in {stem}.truth.csv")
    if poisoned.test_triggered is not None:
        write_tabular_csv(stem + ".triggered.csv", poisoned.test_triggered, args.label_column)
        msg += f"; {stem}.triggered.csv: {len(poisoned.test_triggered)} triggered test rows"
    print(msg)
    return EXIT_CLEAN


def _tabular_truth(path: str, n: int) -> np.ndarray:
    """``is_poison`` from a .csv (a column of 0/1, as ``attack`` writes OUT.truth.csv) or an
    .npz, one per data row."""
    from poisonguard.errors import DataError

    if str(path).endswith(".npz"):
        found = _read_optional(path, ("is_poison",))
        if "is_poison" not in found:
            raise DataError(f"{path}: no 'is_poison' key")
        values = found["is_poison"].tolist()
    else:
        from poisonguard.modalities.text.data import read_poison_column

        truth = read_poison_column(path)
        if truth is None:
            raise DataError(f"{path}: no is_poison column")
        values = truth.astype(int).tolist()
    if len(values) != n:
        raise DataError(f"{path}: {len(values)} is_poison values for {n} rows")
    return np.asarray(values, dtype=bool)


def cmd_scan_tabular(args: argparse.Namespace) -> int:
    """``scan`` on a table (see :mod:`poisonguard.modalities.tabular.scan`)."""
    from functools import partial

    from poisonguard.modalities.tabular.data import load_tabular
    from poisonguard.modalities.tabular.report import (
        build_tabular_report,
        write_tabular_outputs,
    )
    from poisonguard.modalities.tabular.scan import TABULAR_DETECTORS, scan_tabular
    from poisonguard.pipeline import ScanConfig

    _refuse_scan_flags(args, "tabular")
    data = load_tabular(args.data, args.label_column, args.id_column)
    truth = _tabular_truth(args.ground_truth, len(data)) if args.ground_truth else None
    config = ScanConfig(seed=args.seed, epochs=args.epochs, detectors=TABULAR_DETECTORS,
                        progress=not args.quiet)
    result = scan_tabular(data, config)
    write = partial(write_tabular_outputs, label_column=args.label_column,
                    id_column=args.id_column)
    return _finish_modality_scan(args, result, truth, build_tabular_report, write,
                                 "sanitized.csv")


def cmd_scan_audio(args: argparse.Namespace) -> int:
    """``scan`` on clips: a wav folder ROOT/<label>/*.wav or an audio .npz (see
    :mod:`poisonguard.modalities.audio.scan`)."""
    from poisonguard.modalities.audio.data import load_audio
    from poisonguard.modalities.audio.report import build_audio_report, write_audio_outputs
    from poisonguard.modalities.audio.scan import AUDIO_DETECTORS, scan_audio
    from poisonguard.pipeline import ScanConfig

    _refuse_scan_flags(args, "audio")
    data = load_audio(args.data)
    if getattr(args, "vad", False):
        from poisonguard.modalities.audio.vad import trim_dataset

        data = trim_dataset(data)
    truth = None
    gt = args.ground_truth or (args.data if str(args.data).endswith(".npz") else None)
    if gt:
        found = _read_optional(gt, ("is_poison",))
        if "is_poison" in found and found["is_poison"].shape == (len(data),):
            truth = found["is_poison"].astype(bool)
    config = ScanConfig(seed=args.seed, epochs=args.epochs, detectors=AUDIO_DETECTORS,
                        progress=not args.quiet)
    result = scan_audio(data, config)
    return _finish_modality_scan(args, result, truth, build_audio_report, write_audio_outputs,
                                 "sanitized.npz")


def cmd_demo(args: argparse.Namespace) -> int:
    from poisonguard.attacks import badnets
    from poisonguard.data import load_builtin_digits
    from poisonguard.pipeline import ScanConfig

    train, test = load_builtin_digits()
    poisoned = badnets(train, rate=0.1, target=0, seed=args.seed, test=test, size=2)
    print(f"demo: scikit-learn digits, {len(train)} training images; BadNets 2x2 patch, 10% "
          f"poisoned into class 0 ({int(poisoned.is_poison.sum())} samples). The scan is told "
          "nothing about the attack.\n")
    config = ScanConfig(seed=args.seed, epochs=args.epochs, max_rounds=args.max_rounds,
                        progress=not args.quiet)
    run_scan(poisoned.data, Path(args.out), config, None, test, poisoned, poisoned.is_poison,
             command="demo", quiet=args.quiet, unlearn=args.unlearn_flagged)
    return EXIT_CLEAN


def cmd_train(args: argparse.Namespace) -> int:
    from poisonguard.data import load_dataset
    from poisonguard.errors import ConfigError
    from poisonguard.io import atomic_write_json, atomic_write_text, check_writable_dir
    from poisonguard.metrics import accuracy, detection_metrics
    from poisonguard.models.io import describe_inputs, save_model
    from poisonguard.models.training import TrainConfig
    from poisonguard.pipeline import auto_epochs
    from poisonguard.report.builder import build_training_report
    from poisonguard.report.html import render_html
    from poisonguard.train import GuardConfig, train_guarded

    if _is_text(args.data):
        from poisonguard.modalities.text.train_cli import cmd_train_text

        return cmd_train_text(args)
    check_writable_dir(args.out)
    if args.noise_sigma is not None and args.defense != "noise":
        raise ConfigError("--noise-sigma applies to --defense noise only")
    adv = {k: v for k, v in (("adv_epsilon", args.adv_epsilon), ("adv_steps", args.adv_steps),
                             ("adv_warmup", args.adv_warmup)) if v is not None}
    if adv and args.defense != "adv":
        raise ConfigError("--adv-epsilon/--adv-steps/--adv-warmup apply to --defense adv only")
    guard = GuardConfig(defense=args.defense, trim_fraction=args.trim_fraction,
                        monitor_gradients=args.monitor_gradients, **adv,
                        **({} if args.noise_sigma is None else {"noise_sigma": args.noise_sigma}))
    data = load_dataset(args.data)
    from poisonguard.data.labeled import check_label_range

    check_label_range(data)
    test = load_dataset(args.test, split="test") if args.test else None
    config = TrainConfig(epochs=args.epochs or auto_epochs(len(data)), seed=args.seed)
    result = train_guarded(data, guard, config, progress=not args.quiet)
    evaluation, metrics = {}, None
    if test is not None:
        clf = result.classifier
        evaluation["clean_accuracy"] = accuracy(clf.predict(test.x), test.y)
        trig = _read_optional(args.test, ("x_triggered", "y_triggered"))
        if len(trig) == 2:
            evaluation["asr"] = accuracy(clf.predict(trig["x_triggered"]), trig["y_triggered"])
    truth = _read_optional(args.data, ("is_poison",)).get("is_poison") if str(
        args.data).endswith(".npz") else None
    suspects = result.suspects()
    if truth is not None and suspects is not None and truth.shape == suspects.shape:
        scores = result.monitor.scores if result.monitor is not None else None
        metrics = detection_metrics(suspects, truth.astype(bool), scores)
    out = Path(args.out)
    t = result.train
    save_model(out, t.classifier.model, t.arch, t.arch_kwargs, t.classifier.input_spec,
               data.n_classes, t.classifier.layer,
               extra={"defense": guard.defense, "train_config": config.to_dict()},
               inputs=describe_inputs(data.x))
    report = build_training_report(result, data, "train", evaluation or None, metrics)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.html", render_html(report))
    if not args.quiet:
        print(f"{report['verdict']['summary']}; wall {result.wall_s:.1f} s; "
              + ", ".join(f"{k} {v:.4f}" for k, v in evaluation.items()))
        print(f"wrote {out}/model.safetensors, model.json, report.json, report.html")
    return EXIT_CLEAN


def cmd_report(args: argparse.Namespace) -> int:
    from poisonguard.errors import DataError
    from poisonguard.io import atomic_write_text
    from poisonguard.report.html import render_html

    path = Path(args.report)
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a JSON report ({exc})") from None
    if not isinstance(report, dict) or "schema_version" not in report or "verdict" not in report:
        raise DataError(f"{path}: not a poisonguard report (no schema_version/verdict)")
    out = Path(args.out) if args.out else path.with_suffix(".html")
    atomic_write_text(out, render_html(report))
    print(f"wrote {out}")
    return EXIT_CLEAN


def cmd_predict(args: argparse.Namespace) -> int:
    from poisonguard.io import atomic_write_csv
    from poisonguard.models.io import check_inputs, load_model

    clf = load_model(args.model)
    x = _load_x(args.data)
    check_inputs(clf.expected_inputs, x, "the data")
    probs = clf.predict_proba(x)
    pred = probs.argmax(1)
    header = ["index", "prediction"] + [f"p_{k}" for k in range(probs.shape[1])]
    rows = ([i, int(p)] + [f"{v:.6f}" for v in pr] for i, (p, pr) in enumerate(zip(pred, probs)))
    atomic_write_csv(args.out, header, rows)
    print(f"wrote {args.out}: {len(pred)} predictions")
    return EXIT_CLEAN


def cmd_audit(args: argparse.Namespace) -> int:
    from poisonguard.full_audit import run_audit

    outcome = run_audit(data=args.data, model=args.model, clean=args.clean,
                        manifest=args.manifest, public_key=args.public_key,
                        profile=args.profile, train=args.train, out=args.out, seed=args.seed,
                        quiet=args.quiet, base_model=args.base_model, meta=args.meta)
    v = outcome.report["verdict"]
    print(v["overall_summary"])
    if not args.quiet:
        for name, entry in v["layers"].items():
            why = entry["reason"] if entry["status"] == "skipped" else entry["summary"]
            print(f"  {name:<17} {entry['status']:<12} {why}")
        print(f"wrote {args.out}/report.json, report.html "
              f"({outcome.report['timings']['total_s']:.1f} s)")
    return outcome.exit_code


COMMANDS = {"audit": cmd_audit, "demo": cmd_demo, "attack": cmd_attack, "scan": cmd_scan,
            "train": cmd_train,
            "report": cmd_report, "predict": cmd_predict}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        handler = getattr(args, "handler", None) or COMMANDS[args.command]
        no_torch = ("pin", "verify", "keygen", "report", "scan-features")
        if args.command not in no_torch:
            from poisonguard.threads import set_threads

            set_threads(getattr(args, "threads", None))
        return handler(args)
    except PoisonguardError as exc:
        print(f"poisonguard {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        print(f"poisonguard {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
