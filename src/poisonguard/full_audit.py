"""``poisonguard audit``: every layer the inputs allow, one report, one verdict.

Which layers run follows from what is given: a manifest verifies provenance, data is scanned
(the quarantine), ``train`` adds guarded training, a model with clean data is audited and gets
a runtime-filter calibration (screening the data when there is data). Every input is loaded
and checked before any layer runs; the output folder is written into a temporary sibling and
renamed into place, so a failed audit leaves nothing behind.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from poisonguard.errors import ConfigError, DataError, PoisonguardError
from poisonguard.profiles import Profile, get_profile
from poisonguard.verdict import (
    LAYERS,
    guarded_training_status,
    layer_status,
    model_audit_status,
    provenance_status,
    quarantine_status,
    runtime_status,
    set_verdict,
    skipped,
    worse_status,
)

TRAIN_DEFENSES = ("abl", "trim")
MAX_CLEAN = 500
EXIT_CODES = {"clean": 0, "suspicious": 1, "compromised": 1}


@dataclass
class AuditInputs:
    """The loaded and checked inputs of an audit; each is None when not given."""

    data: Any = None
    data_path: str | None = None
    model: Any = None
    model_path: str | None = None
    clean: Any = None
    clean_path: str | None = None
    manifest: str | None = None
    public_key: str | None = None
    base_model: Any = None
    base_model_path: str | None = None
    meta: Any = None
    meta_path: str | None = None


@dataclass
class AuditOutcome:
    """The result of :func:`run_audit`: the canonical report and where it was written."""

    report: dict[str, Any]
    out: Path | None
    artifacts: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def overall(self) -> str:
        return str(self.report["verdict"]["overall"])

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.overall]

    @property
    def layers(self) -> dict[str, dict[str, Any]]:
        return dict(self.report["verdict"]["layers"])

    def _repr_html_(self) -> str:
        from poisonguard.report.html import banner_and_cards

        return banner_and_cards(self.report)


# ----------------------------------------------------------------------------- inputs
def _log(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def _prepare_out(out: str | Path) -> tuple[Path, Path]:
    """Check that ``out`` can be written (before any work) and make a temporary sibling to
    write into. An existing ``out`` must be empty or an earlier audit's folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / "report.json").exists():
        raise ConfigError(f"{out}: folder exists and is not an earlier audit's output; "
                          "choose another --out or empty it")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.exists():
        raise ConfigError(f"{out}: parent folder {parent} does not exist")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    except OSError as exc:
        raise ConfigError(f"{out}: cannot write here ({exc.strerror})") from None
    return out, tmp


def _commit_out(tmp: Path, out: Path) -> None:
    """Move the finished folder into place (an earlier audit's folder is replaced)."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_inputs(data: Any = None, model: Any = None, clean: Any = None,
                manifest: str | Path | None = None, public_key: str | Path | None = None,
                max_clean: int = MAX_CLEAN, seed: int = 0, base_model: Any = None,
                meta: Any = None) -> AuditInputs:
    """Load and cross-check every input; raises :class:`PoisonguardError` on the first
    problem (nothing has run yet). ``data``/``clean`` may be paths or ``LabeledData``;
    ``model`` a path (pickles refused) or an ``AuditModel``."""
    from poisonguard.audit.model import AuditModel, check_clean_data, load_audit_model
    from poisonguard.data import LabeledData, check_scannable, check_trusted, load_dataset

    if data is None and model is None and manifest is None:
        raise ConfigError("nothing to audit: give data, a model (with clean data) or a "
                          "manifest")
    inp = AuditInputs(manifest=str(manifest) if manifest else None,
                      public_key=str(public_key) if public_key else None)
    if manifest is not None and not Path(manifest).is_file():
        raise DataError(f"{manifest}: no such manifest file")
    if public_key is not None and manifest is None:
        raise ConfigError("a public key checks a manifest's signature: give the manifest too")
    if data is not None:
        inp.data = data if isinstance(data, LabeledData) else load_dataset(data)
        inp.data_path = None if isinstance(data, LabeledData) else str(data)
        check_scannable(inp.data)
    if clean is not None:
        cl = clean if isinstance(clean, LabeledData) else load_dataset(clean)
        if max_clean and len(cl) > max_clean:
            rng = np.random.default_rng(seed)
            cl = cl.subset(np.sort(rng.choice(len(cl), max_clean, replace=False)))
        inp.clean = cl
        inp.clean_path = None if isinstance(clean, LabeledData) else str(clean)
        if inp.data is not None:
            check_trusted(inp.data, cl)
    if model is not None:
        inp.model = model if isinstance(model, AuditModel) else load_audit_model(model)
        inp.model_path = str(getattr(inp.model, "path", model))
        if inp.clean is not None:
            check_clean_data(inp.model, inp.clean)
        if inp.data is not None:
            _check_data_fits_model(inp.model, inp.data)
    elif clean is not None and data is None:
        raise ConfigError("clean data alone audits nothing: give a model or data too")
    if base_model is not None:
        from poisonguard.audit.compare import check_same_architecture

        if inp.model is None or inp.clean is None:
            raise ConfigError("a base model is compared with --model on --clean data: give "
                              "both")
        inp.base_model = (base_model if isinstance(base_model, AuditModel)
                          else load_audit_model(base_model))
        inp.base_model_path = str(getattr(inp.base_model, "path", base_model))
        check_same_architecture(inp.base_model, inp.model)
        check_clean_data(inp.base_model, inp.clean)
    if meta is not None:
        _load_meta(inp, meta)
    return inp


def _load_meta(inp: AuditInputs, meta: Any) -> None:
    """The zoo meta model (a folder, a built-in name or a loaded ``MetaModel``), checked
    against the audited model's architecture and inputs before anything runs."""
    from poisonguard.audit.meta import MetaModel, load_meta, resolve_meta_path
    from poisonguard.models.io import check_inputs

    if inp.model is None:
        raise ConfigError("a meta model (--meta) judges --model: give the model")
    inp.meta = meta if isinstance(meta, MetaModel) else load_meta(meta)
    inp.meta_path = None if isinstance(meta, MetaModel) else str(resolve_meta_path(meta))
    clf = inp.model.classifier
    inp.meta.check_architecture(clf, "--model")
    if inp.meta.queries is not None:
        check_inputs(getattr(clf, "expected_inputs", None), inp.meta.queries,
                     "the meta model's queries")


def _check_data_fits_model(model: Any, data: Any) -> None:
    """The model must take the data's samples and have at least its classes."""
    from poisonguard.models.io import check_inputs

    check_inputs(model.classifier.expected_inputs, data.x, "the data")
    try:
        k = model.n_outputs(data.x)
    except (RuntimeError, ValueError, PoisonguardError) as exc:
        raise DataError(f"the model rejected the data's samples of shape {data.x.shape[1:]} "
                        f"({str(exc).splitlines()[0]})") from None
    if k < data.n_classes:
        raise DataError(f"the model has {k} classes but the data's labels go up to "
                        f"{data.n_classes - 1}")


# ----------------------------------------------------------------------------- layers
def _provenance(inp: AuditInputs, quiet: bool) -> dict[str, Any]:
    from poisonguard.provenance.manifest import ManifestReader
    from poisonguard.provenance.verify import verify

    single = len(ManifestReader(inp.manifest).header["sources"]) == 1
    res = verify(inp.manifest, [inp.data_path] if inp.data_path and single else None,
                 public_key=inp.public_key)
    _log(quiet, f"provenance: {res.summary()}")
    return res.to_report_layer()


def _scan_config(profile: Profile, inp: AuditInputs, seed: int, quiet: bool) -> Any:
    from poisonguard.pipeline import ScanConfig

    return ScanConfig(seed=seed, epochs=profile.scan_epochs(len(inp.data)),
                      max_rounds=profile.scan_rounds, detectors=profile.detectors,
                      loss_seed=profile.loss_seed, final_model=profile.final_model,
                      progress=not quiet, trusted=inp.clean)


DIRTY_SHARE = 0.5      # of a class's flags the re-check confirms: a dirty-label poisoning
DIRTY_MIN_FLAGS = 10   # flags a class needs before its confirmation share is read
RECHECK_ROUNDS = 3     # fits of the re-check model, the unconfirmed flags rejoining its data


def dirty_label_classes(flags: np.ndarray, confirmed: np.ndarray, y: np.ndarray
                        ) -> list[int]:
    """Classes whose flags the independent re-check mostly confirms (at least
    ``DIRTY_SHARE`` of at least ``DIRTY_MIN_FLAGS``): their flagged samples carry labels the
    re-check model disputes, as a dirty-label poisoning's do. A flagged class not named reads
    as a clean-label poisoning (its poisons keep their true labels) or as false flags."""
    out = []
    for c in np.unique(y[flags]):
        m = flags & (y == c)
        if m.sum() >= DIRTY_MIN_FLAGS and (m & confirmed).sum() >= DIRTY_SHARE * m.sum():
            out.append(int(c))
    return out


def _vote_seeds(results: list[Any], confirmed: np.ndarray | None = None) -> Any:
    """Keep the flags every seed's scan makes; a class is poisoned when at least half the
    seeds call it so. ``confirmed`` (the independent re-check's verdict on every sample some
    seed flags) is evidence beside the vote, not part of it: the classes whose flags it mostly
    confirms are named (:func:`dirty_label_classes`). Measured on three MNIST 60k rows (BadNets
    1% and 10%, blended 10%), every poison was flagged by all three seeds, while a majority
    vote kept 40-431 clean samples, and the re-check confirmed 15-35% of the clean samples some
    seed flags (atypical digits the scans and any independent model find odd), too many to
    keep or drop flags by. Returns the first result with the voted cross-reference."""
    from dataclasses import replace

    from poisonguard.types import ClassFinding, DetectorResult

    need = (len(results) + 1) // 2
    votes = np.sum([r.flags for r in results], axis=0)
    flags = votes >= len(results)
    first = results[0]
    by_class: dict[int, int] = {}
    for r in results:
        for c in r.poisoned_classes:
            by_class[c] = by_class.get(c, 0) + 1
    rule = f"flagged by all {len(results)} seeds; a class poisoned by >= {need}"
    dirty: list[int] = []
    if confirmed is not None:
        dirty = dirty_label_classes(flags, confirmed, first.data.y)
    findings = []
    for f in first.combined.findings:
        is_poisoned = by_class.get(f.label, 0) >= need
        idx = first.data.y == f.label
        ev = {**f.evidence, "verdict": "poisoned" if is_poisoned else (
            "suspect" if by_class.get(f.label) else "clean"),
            "seed_votes": f"{by_class.get(f.label, 0)} of {len(results)}"}
        findings.append(ClassFinding(f.label, is_poisoned, f.n_samples, int(flags[idx].sum()),
                                     ev))
    c = first.combined
    det_flags = {k: v & flags for k, v in c.extras["detector_flags"].items()}
    voted = DetectorResult(c.name, votes / len(results), flags, None,
                           {**c.threshold_rule, "seed_vote": rule},
                           tuple(findings), c.runtime_s,
                           extras={**c.extras, "detector_flags": det_flags,
                                   "seed_votes": votes, "dirty_label_classes": dirty})
    return replace(first, combined=voted)


def _quarantine(inp: AuditInputs, profile: Profile, seed: int, quiet: bool
                ) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """Scan (every seed of the profile, voted, with the independent re-check when the profile
    asks), sanitise; the scan report, the result and the files to write."""
    from dataclasses import replace

    from poisonguard.pipeline import sanitize, scan
    from poisonguard.report.builder import build_scan_report

    config = _scan_config(profile, inp, seed, quiet)
    results = []
    for s in profile.seeds:
        _log(quiet, f"quarantine: scanning {len(inp.data)} samples (seed {seed + s}, "
                    f"{config.epochs} epochs, up to {config.max_rounds} round(s))")
        results.append(scan(inp.data, replace(config, seed=seed + s)))
    votes = np.sum([r.flags for r in results], axis=0)
    recheck, confirmed = None, None
    if profile.recheck:
        recheck, confirmed = _recheck_guarded(results[0], votes > 0, seed, quiet)
    result = results[0] if len(results) == 1 else _vote_seeds(results, confirmed)
    sanitized, removed = sanitize(result)
    if len(results) > 1 or confirmed is not None:
        for r in removed:
            r["seed_votes"] = int(votes[r["index"]])
            if confirmed is not None:
                r["recheck_confirmed"] = int(confirmed[r["index"]])
    info = {"n_removed": len(removed), "n_kept": len(sanitized),
            "removed_file": "flagged.csv", "sanitized_file": "sanitized.npz"}
    report = build_scan_report(result, "audit", sanitize_info=info)
    q = report["layers"]["quarantine"]
    if len(results) > 1:
        q["seed_vote"] = {
            "seeds": [seed + s for s in profile.seeds],
            "n_flagged_per_seed": [int(r.flags.sum()) for r in results],
            "poisoned_classes_per_seed": [r.poisoned_classes for r in results],
            "rule": f"flag kept when all {len(results)} seeds flag it; a class is poisoned "
                    f"when at least {(len(results) + 1) // 2} call it so",
            "dirty_label_classes": result.combined.extras.get("dirty_label_classes", [])}
    if recheck is not None:
        if confirmed is not None:
            recheck.update(_recheck_tally(result, votes, confirmed))
            # every sample the re-check looked at, and those it confirmed (row indices)
            recheck["checked_index"] = np.flatnonzero(votes > 0).tolist()
            recheck["confirmed_index"] = np.flatnonzero(confirmed).tolist()
        q["independent_recheck"] = recheck
    return report, result, {"sanitized": sanitized, "removed": removed}


def _recheck_guarded(result: Any, flags: np.ndarray, seed: int, quiet: bool
                     ) -> tuple[dict[str, Any], np.ndarray | None]:
    """:func:`_recheck`, a failure recorded as the re-check's error (the scan still stands)."""
    t0 = time.perf_counter()
    try:
        info, confirmed = _recheck(result.data, flags, result.config, seed, quiet)
    except (PoisonguardError, RuntimeError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        _log(quiet, f"re-check: error: {msg}")
        return {"error": f"re-check failed: {msg}"}, None
    info["runtime_s"] = round(time.perf_counter() - t0, 3)
    return info, confirmed


def _recheck(data: Any, flags: np.ndarray, scan_config: Any, seed: int, quiet: bool
             ) -> tuple[dict[str, Any], np.ndarray | None]:
    """Independent re-check: a model of another architecture (MLP), another seed, trained on
    the samples no seed flags, predicts every sample some seed flags; a flag is confirmed
    where it gives another class than the label (the image's own class, for a dirty-label
    poison). Leaving every flagged sample out of its training cuts a hole in the classes the
    scans over-flag, and clean samples in the hole look foreign to it; so the flags it does
    not confirm rejoin its training set and it is refitted (up to ``RECHECK_ROUNDS`` fits, until
    the confirmations stop changing). A poison it confirmed never rejoins. Returns the report
    entry and the per-sample confirmations (None: nothing to check)."""
    from poisonguard.models.adapter import InputSpec
    from poisonguard.models.architectures import build_model
    from poisonguard.models.training import TrainConfig, train_classifier

    if not flags.any() or flags.all():
        return {"n_checked": 0, "note": "nothing to re-check"}, None
    idx = np.flatnonzero(flags)
    confirmed = np.ones(len(data), bool)
    rounds: list[dict[str, int]] = []
    for r in range(RECHECK_ROUNDS):
        train_on = ~flags | ~confirmed
        _log(quiet, f"re-check: fit {r + 1} of up to {RECHECK_ROUNDS}, an MLP on "
                    f"{int(train_on.sum())} samples")
        kept = data.subset(np.flatnonzero(train_on))
        cfg = TrainConfig(epochs=scan_config.train_config(len(data)).epochs, seed=seed + 101 + r)
        spec = InputSpec.for_data(kept.x)
        n_in = int(np.prod(spec.sample_shape(kept.x)))
        mlp = build_model("mlp", in_features=n_in, n_classes=data.n_classes)
        flat = InputSpec(layout="flat", scale=spec.scale)
        _fit_recheck_normalization(mlp, flat.prepare(kept.x[:5000]), spec.layout)
        train = train_classifier(kept, cfg, model=mlp, input_spec=flat, arch="mlp",
                                 n_classes=data.n_classes)
        now = np.zeros(len(data), bool)
        now[idx] = train.classifier.predict(data.x[idx]) != data.y[idx]
        now &= confirmed
        rounds.append({"n_train": int(train_on.sum()), "n_confirmed": int(now.sum())})
        done = r > 0 and np.array_equal(now, confirmed)
        confirmed = now
        if done or not confirmed[idx].any() or confirmed[idx].all():
            break
    return {"model": {"arch": "mlp", "seed": seed + 101, "epochs": cfg.epochs,
                      "n_train": rounds[0]["n_train"]},
            "rounds": rounds,
            "rule": "a flag is confirmed when the independent model (trained on the samples "
                    "no seed flags, then refitted with the flags it did not confirm) predicts "
                    "another class than the label at every fit"}, confirmed


def _fit_recheck_normalization(mlp: Any, x: Any, layout: str) -> None:
    """Per-feature standardisation for vectors; one mean and scale over every pixel for
    images. Per-pixel scales of pixels that never vary in clean data (MNIST's border) are
    near zero, so a patch there reached the MLP a million times amplified and it answered
    noise, which read as a confirmation."""
    import torch

    from poisonguard.models.architectures import fit_normalization

    if layout == "flat":
        fit_normalization(mlp, x)
        return
    with torch.no_grad():
        mlp.normalize.mean.fill_(float(x.mean()))
        mlp.normalize.std.fill_(max(float(x.std()), 1e-6))


def _recheck_tally(result: Any, votes: np.ndarray, confirmed: np.ndarray) -> dict[str, Any]:
    """Confirmations of the final flags, per class, and of the flags some seed made that the
    vote left out."""
    flags, y = result.flags, result.data.y
    per_class = {}
    for c in np.unique(y[flags]):
        m = flags & (y == c)
        per_class[str(int(c))] = {"n_flagged": int(m.sum()),
                                  "n_confirmed": int((m & confirmed).sum())}
    left_out = (votes > 0) & ~flags
    n = int(flags.sum())
    return {"n_checked": int((votes > 0).sum()), "n_flagged": n,
            "n_confirmed": int((flags & confirmed).sum()),
            "confirmed_share": round(float((flags & confirmed).sum() / n), 4) if n else None,
            "n_left_out_by_vote": int(left_out.sum()),
            "left_out_confirmed_share": (round(float((left_out & confirmed).sum()
                                                     / left_out.sum()), 4)
                                         if left_out.any() else None),
            "per_class": per_class}


def _guarded(inp: AuditInputs, defense: str, profile: Profile, seed: int, quiet: bool
             ) -> tuple[dict[str, Any], Any]:
    from poisonguard.models.training import TrainConfig
    from poisonguard.report.builder import build_training_report
    from poisonguard.train import GuardConfig, train_guarded

    config = TrainConfig(epochs=profile.scan_epochs(len(inp.data)), seed=seed)
    _log(quiet, f"guarded training: {defense}, {config.epochs} epochs")
    result = train_guarded(inp.data, GuardConfig(defense=defense), config, progress=not quiet)
    layer = build_training_report(result, inp.data, "audit")["layers"]["guarded_training"]
    return layer, result


def _cleanse_config(profile: Profile, seed: int) -> Any:
    """The trigger search the profile asks for (the model audit's and the comparison's)."""
    from poisonguard.audit.neural_cleanse import CleanseConfig

    return CleanseConfig(seed=seed, max_steps=profile.cleanse_steps,
                         min_steps=profile.cleanse_min_steps, additive=profile.additive_search)


def _model_audit(inp: AuditInputs, profile: Profile, seed: int, quiet: bool
                 ) -> tuple[dict[str, Any], Any, Any]:
    from poisonguard.audit.core import audit_model, build_audit_report

    cfg = _cleanse_config(profile, seed)
    _log(quiet, f"model audit: Neural Cleanse over {inp.model.n_outputs(inp.clean.x)} classes "
                f"with {len(inp.clean)} clean samples ({cfg.max_steps} steps)"
                + (", and the max-margin search" if profile.max_margin else ""))
    margin = None
    if profile.max_margin:
        from poisonguard.audit.combined import combined_audit
        from poisonguard.audit.mmbd import MarginConfig, infer_domain

        domain = infer_domain(inp.model, clean_x=inp.clean.x)
        result, margin = combined_audit(inp.model, inp.clean, cfg, MarginConfig(seed=seed),
                                        domain)
    else:
        result = audit_model(inp.model, inp.clean, cfg, dormant=profile.dormant)
    rep = build_audit_report(result, inp.clean, inp.model, command="audit", margin=margin)
    return rep["layers"]["model_audit"], rep["verdict"], result


def _data_free_domain(inp: AuditInputs) -> Any:
    """The input domain for the data-free search: the model's record, else the scanned data's
    shape and range; None when neither says."""
    from poisonguard.audit.mmbd import infer_domain

    try:
        return infer_domain(inp.model, clean_x=None if inp.data is None else inp.data.x)
    except ConfigError:
        return None


def _data_free_audit(inp: AuditInputs, domain: Any, seed: int, quiet: bool
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The max-margin search alone (no clean data): the layer entry and its verdict."""
    from poisonguard.audit.combined import data_free_report
    from poisonguard.audit.mmbd import MarginConfig, check_classifier_output, max_margin_audit

    k = check_classifier_output(inp.model, domain)
    _log(quiet, f"model audit: no clean data; the max-margin search over {k} classes "
                f"(input domain from {domain.source})")
    rep = data_free_report(max_margin_audit(inp.model, domain, MarginConfig(seed=seed), k),
                           inp.model)
    return rep["layers"]["model_audit"], rep["verdict"]


def _compare(inp: AuditInputs, profile: Profile, seed: int, quiet: bool, cleanse: Any = None
             ) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """``compare`` of the model against the base model (reusing the model audit's reversed
    triggers ``cleanse`` when it ran: the same search on the same model and clean set): its
    report layer, its status and the result."""
    from poisonguard.audit.compare import build_compare_report, compare_models

    cfg = _cleanse_config(profile, seed)
    _log(quiet, "comparison: checking the model's reversed triggers on the base model")
    result = compare_models(inp.base_model, inp.model, inp.clean, cfg, cleanse)
    rep = build_compare_report(result, inp.clean, inp.base_model, inp.model)
    layer = {**rep["layers"]["model_audit"], "verdict": result.verdict}
    return layer, rep["verdict"]["layers"]["model_audit"], result


def _meta_predict(inp: AuditInputs, quiet: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The zoo meta model's prediction on the model: its report entry and status."""
    from poisonguard.audit.meta import zoo_summary
    from poisonguard.verdict import meta_classifier_status

    _log(quiet, "meta-classifier: features of the model's weights and query outputs")
    rec = inp.meta.predict(inp.model.classifier)
    entry = {**rec, "meta": inp.meta_path, "features": list(inp.meta.config.families),
             "zoo": zoo_summary(inp.meta.zoo), "training": inp.meta.info}
    return entry, meta_classifier_status(entry)


RUNTIME_SCREEN_MAX = 5000   # training inputs STRIP screens (a uniform sample beyond this)


def _runtime(inp: AuditInputs, seed: int, quiet: bool
             ) -> tuple[Any, Any, np.ndarray | None]:
    """Calibrate STRIP on the clean set; screen the training inputs (at most
    :data:`RUNTIME_SCREEN_MAX`, a uniform sample, so the binomial test of the flagged share
    stays unbiased). Returns the filter, the screen and the screened indices."""
    from poisonguard.runtime.strip import StripConfig, StripFilter

    _log(quiet, f"runtime: calibrating STRIP on {len(inp.clean)} clean samples")
    filt = StripFilter.calibrate(inp.model.classifier, inp.clean.x, StripConfig(seed=seed))
    if inp.data is None:
        return filt, None, None
    n = len(inp.data)
    idx = np.arange(n)
    if n > RUNTIME_SCREEN_MAX:
        rng = np.random.default_rng(seed + 7)
        idx = np.sort(rng.choice(n, RUNTIME_SCREEN_MAX, replace=False))
    _log(quiet, f"runtime: screening {len(idx)} of {n} training inputs")
    return filt, filt.screen(inp.data.x[idx]), idx


def _runtime_min_clean() -> int:
    from poisonguard.runtime.strip import StripConfig

    c = StripConfig()
    return c.pool_size + max(20, int(np.ceil(len(c.tests) / max(c.target_frr, 1e-9))))


def _run_layer(name: str, statuses: dict[str, Any], timings: dict[str, float], quiet: bool,
               fn: Any, *args: Any) -> Any:
    """Run one layer; a failure becomes the layer's ``error`` status (the others still run)."""
    t0 = time.perf_counter()
    try:
        return fn(*args)
    except (PoisonguardError, RuntimeError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        statuses[name] = layer_status("error", f"{name} failed: {msg}", type(exc).__name__)
        _log(quiet, f"{name}: error: {msg}")
        return None
    finally:
        timings[f"{name}_s"] = round(time.perf_counter() - t0, 3)


# ----------------------------------------------------------------------------- the audit
def run_audit(data: Any = None, model: Any = None, clean: Any = None,
              manifest: str | Path | None = None, profile: str | Profile = "standard",
              train: str | None = None, out: str | Path | None = None, seed: int = 0,
              public_key: str | Path | None = None, quiet: bool = True,
              base_model: Any = None, meta: Any = None) -> AuditOutcome:
    """Audit whatever is given and fold every layer into one verdict.

    ``data``: a training set (path or ``LabeledData``); ``model``: a model folder,
    ``model.json`` or TorchScript file (never unpickled); ``clean``: trusted clean samples
    (path or ``LabeledData``; at most 500 are used); ``manifest``: a ``poisonguard pin``
    manifest of the data; ``train``: ``"abl"`` or ``"trim"`` for guarded training;
    ``base_model``: a trusted earlier version of ``model``, compared with it (``compare``);
    ``meta``: a zoo meta model (folder or built-in name, ``poisonguard meta``) whose
    prediction on ``model`` joins the model-audit layer (no clean data needed);
    ``out``:
    folder for ``report.json``, ``report.html`` and the layers' files (None: write nothing).
    Raises :class:`PoisonguardError` on bad input before anything runs."""
    t_start = time.perf_counter()
    prof = get_profile(profile)
    if train is not None and train not in TRAIN_DEFENSES:
        raise ConfigError(f"unknown training defence {train!r}; choose one of {TRAIN_DEFENSES}")
    if train is not None and data is None:
        raise ConfigError("guarded training needs data")
    out_final, tmp = _prepare_out(out) if out is not None else (None, None)
    try:
        outcome = _audit(data, model, clean, manifest, prof, train, seed, public_key, quiet,
                         tmp, base_model, meta)
        outcome.report["timings"]["total_s"] = round(time.perf_counter() - t_start, 3)
        if tmp is not None and out_final is not None:
            _write(outcome, tmp)
            _commit_out(tmp, out_final)
            outcome.out = out_final
        return outcome
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _audit(data: Any, model: Any, clean: Any, manifest: Any, prof: Profile,
           train: str | None, seed: int, public_key: Any, quiet: bool,
           tmp: Path | None, base_model: Any = None, meta: Any = None) -> AuditOutcome:
    from poisonguard import __version__
    from poisonguard.models.io import describe_inputs
    from poisonguard.report.builder import environment
    from poisonguard.types import jsonable

    inp = load_inputs(data, model, clean, manifest, public_key, seed=seed,
                      base_model=base_model, meta=meta)
    statuses: dict[str, Any] = {}
    layers: dict[str, Any] = {}
    timings: dict[str, float] = {}
    artifacts: dict[str, Any] = {}
    ran: list[str] = []
    report: dict[str, Any] = {
        "schema_version": "2.0", "tool": {"name": "poisonguard", "version": __version__},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "audit", "environment": environment(),
        "profile": {"name": prof.name, "settings": prof.to_dict(), "ran": ran},
        "inputs": {"data": inp.data_path, "model": inp.model_path, "clean": inp.clean_path,
                   "manifest": inp.manifest, "train": train,
                   "base_model": inp.base_model_path, "meta": inp.meta_path},
        "seeds": {"audit": seed},
    }

    # provenance: first, so that a bad manifest stops the audit before any training
    if inp.manifest:
        layer = _provenance(inp, quiet)  # a bad manifest or signature raises: exit 2
        layers["provenance"] = layer
        statuses["provenance"] = provenance_status(layer)
        ran.append("provenance verification")
    else:
        statuses["provenance"] = skipped("no manifest given (--manifest)")

    scan_result = None
    if inp.data is not None:
        report["data"] = {"fingerprint": inp.data.fingerprint(), "n_samples": len(inp.data),
                          "n_classes": inp.data.n_classes,
                          "sample_shape": list(inp.data.x.shape[1:]),
                          "dtype": str(inp.data.x.dtype),
                          "class_counts": inp.data.class_counts()}
        got = _run_layer("quarantine", statuses, timings, quiet, _quarantine, inp, prof, seed,
                         quiet)
        if got is not None:
            scan_report, scan_result, files = got
            artifacts.update(files, scan_result=scan_result)
            layers["quarantine"] = scan_report["layers"]["quarantine"]
            for key in ("samples", "plots", "config"):
                report[key] = scan_report[key]
            layers["quarantine"]["verdict"] = scan_report["verdict"]
            statuses["quarantine"] = quarantine_status(scan_report["verdict"], len(inp.data))
            ran.append(f"quarantine scan ({', '.join(prof.detectors)}; "
                       f"{len(prof.seeds)} seed(s))")
            rc = layers["quarantine"].get("independent_recheck")
            if rc is not None and "error" not in rc:
                ran.append("independent re-check (MLP on the samples no seed flags)")
    else:
        statuses["quarantine"] = skipped("no data given (--data)")

    if train is not None and inp.data is not None:
        got = _run_layer("guarded_training", statuses, timings, quiet, _guarded, inp, train,
                         prof, seed, quiet)
        if got is not None:
            layers["guarded_training"], artifacts["guarded"] = got
            artifacts["n_classes"] = inp.data.n_classes
            artifacts["train_inputs"] = describe_inputs(inp.data.x)
            statuses["guarded_training"] = guarded_training_status(got[0])
            ran.append(f"guarded training ({train})")
    else:
        statuses["guarded_training"] = skipped("not asked for (--train abl|trim)")

    audit_verdict = None
    if inp.model is not None and inp.clean is not None:
        got = _run_layer("model_audit", statuses, timings, quiet, _model_audit, inp, prof,
                         seed, quiet)
        if got is not None:
            layers["model_audit"], audit_verdict, artifacts["audit"] = got
            layers["model_audit"]["verdict"] = audit_verdict
            statuses["model_audit"] = model_audit_status(
                audit_verdict, float(layers["model_audit"]["neural_cleanse"]["threshold"]))
            ran.append("model audit (Neural Cleanse"
                       + (", additive search" if prof.additive_search else "")
                       + (", max-margin search" if prof.max_margin else "")
                       + (", dormant units" if prof.dormant else "") + ")")
        if inp.base_model is not None:
            failed: dict[str, Any] = {}
            audited = artifacts.get("audit")
            got = _run_layer("comparison", failed, timings, quiet, _compare, inp, prof, seed,
                             quiet, audited.cleanse if audited is not None else None)
            entry = got[1] if got is not None else failed["comparison"]
            layers.setdefault("model_audit", {})["comparison"] = (
                got[0] if got is not None else {"error": entry["summary"]})
            statuses["model_audit"] = worse_status(statuses["model_audit"], entry,
                                                   "comparison")
            if got is not None:
                artifacts["comparison"] = got[2]
                ran.append("model comparison with the base model")
    elif inp.model is not None and (domain := _data_free_domain(inp)) is not None:
        got = _run_layer("model_audit", statuses, timings, quiet, _data_free_audit, inp,
                         domain, seed, quiet)
        if got is not None:
            layers["model_audit"], audit_verdict = got
            layers["model_audit"]["verdict"] = audit_verdict
            statuses["model_audit"] = model_audit_status(audit_verdict)
            ran.append("model audit (data-free max-margin search: no clean data given)")
    else:
        statuses["model_audit"] = skipped(
            "needs a model (--model)" if inp.model is None else
            "needs clean data (--clean): the model records no input domain and no data was "
            "given")
    if inp.meta is not None:
        failed_meta: dict[str, Any] = {}
        got = _run_layer("meta_classifier", failed_meta, timings, quiet, _meta_predict, inp,
                         quiet)
        entry = got[1] if got is not None else failed_meta["meta_classifier"]
        layers.setdefault("model_audit", {})["meta_classifier"] = (
            got[0] if got is not None else {"error": entry["summary"]})
        prior = statuses["model_audit"]
        statuses["model_audit"] = (entry if prior["status"] == "skipped"
                                   else worse_status(prior, entry, "meta-classifier"))
        if got is not None:
            ran.append("meta-classifier (zoo meta model)")

    runtime_screen = None
    if inp.model is None or inp.clean is None:
        need = "a model (--model)" if inp.model is None else "clean data (--clean)"
        statuses["runtime"] = skipped(f"needs {need}")
    elif not prof.runtime:
        statuses["runtime"] = skipped(f"profile {prof.name} does not calibrate the runtime "
                                      "filter (use standard or paranoid)")
    elif len(inp.clean) < _runtime_min_clean():
        statuses["runtime"] = skipped(f"STRIP calibration needs at least "
                                      f"{_runtime_min_clean()} clean samples, got "
                                      f"{len(inp.clean)}")
    else:
        got = _run_layer("runtime", statuses, timings, quiet, _runtime, inp, seed, quiet)
        if got is not None:
            from poisonguard.runtime.report import runtime_layer

            filt, runtime_screen, screened_idx = got
            artifacts["strip"] = filt
            ran.append("runtime-filter calibration (STRIP)")
            if runtime_screen is not None:
                layers["runtime"] = runtime_layer(filt, runtime_screen)
                layers["runtime"]["flags_file"] = "runtime/flags.csv"
                if len(screened_idx) < len(inp.data):
                    layers["runtime"]["screened_sample"] = {
                        "n_data": len(inp.data), "n_screened": len(screened_idx),
                        "rule": f"a uniform random sample of {RUNTIME_SCREEN_MAX} training "
                                "inputs (seeded) is screened"}
                ran.append(f"runtime screening of {len(screened_idx)} training inputs")
            else:
                layers["runtime"] = {"calibration": filt.describe()}
            layers["runtime"]["calibration_dir"] = "runtime"
            statuses["runtime"] = runtime_status(
                layers["runtime"] if runtime_screen is not None else None,
                filt.config.target_frr, 0 if runtime_screen is None else len(runtime_screen))
            artifacts["runtime_screen"] = runtime_screen
            artifacts["runtime_index"] = screened_idx

    report["cross_layer"] = _cross_layer(layers, statuses, scan_result, audit_verdict,
                                         artifacts, runtime_screen)
    report["layers"] = {k: layers[k] for k in LAYERS if k in layers}
    report["timings"] = timings
    report["verdict"] = {
        "poisoned_classes": [] if scan_result is None else scan_result.poisoned_classes,
        "n_flagged": None if scan_result is None else int(scan_result.flags.sum())}
    set_verdict(report, statuses, command="audit")
    return AuditOutcome(report=jsonable(report), out=None, artifacts=artifacts)


def _scan_trigger_mask(scan_report_layer: dict[str, Any], sample_shape: tuple[int, ...],
                       cls: int) -> np.ndarray | None:
    """The trigger template's pixels in class ``cls`` as a 2-D mask, if the scan formed one."""
    for det in scan_report_layer.get("detectors") or []:
        if det.get("name") not in ("trigger_template", "loss_seed_template"):
            continue
        for f in det.get("findings") or []:
            pos = (f.get("evidence") or {}).get("template_positions")
            if f.get("label") == cls and f.get("suspicious") and pos:
                flat = np.zeros(int(np.prod(sample_shape)))
                flat[np.asarray(pos, dtype=int)] = 1.0
                m = flat.reshape(sample_shape)
                return m.max(-1) if m.ndim == 3 else m
    return None


def _cross_layer(layers: dict[str, Any], statuses: dict[str, Any], scan_result: Any,
                 audit_verdict: dict[str, Any] | None, artifacts: dict[str, Any],
                 runtime_screen: Any) -> list[dict[str, Any]]:
    from poisonguard.crosscheck import (
        audit_vs_comparison,
        class_vs_target,
        flags_vs_provenance,
        runtime_vs_scan,
        trigger_vs_mask,
    )

    checks = []
    scan_classes = None
    if scan_result is not None:
        scan_classes = scan_result.poisoned_classes
    if scan_classes is not None and audit_verdict is not None:
        target = audit_verdict.get("target_class")
        checks.append(class_vs_target(scan_classes, target))
        if target is not None and target in scan_classes and "audit" in artifacts:
            nc = artifacts["audit"].cleanse
            scan_mask = _scan_trigger_mask(layers["quarantine"],
                                           tuple(scan_result.data.x.shape[1:]), int(target))
            checks.append(trigger_vs_mask(scan_mask, np.squeeze(nc.masks[int(target)])))
    if audit_verdict is not None and "comparison" in artifacts:
        checks.append(audit_vs_comparison(audit_verdict.get("target_class"),
                                          artifacts["comparison"].verdict["planted_classes"]))
    if scan_result is not None and "provenance" in layers:
        checks.append(flags_vs_provenance(scan_result.flags,
                                          layers["provenance"].get("findings") or []))
    if scan_result is not None and runtime_screen is not None:
        checks.append(runtime_vs_scan(runtime_screen.suspicious,
                                      scan_result.flags[artifacts["runtime_index"]]))
    return checks


# ----------------------------------------------------------------------------- output
def _write(outcome: AuditOutcome, tmp: Path) -> None:
    from poisonguard.io import (
        atomic_save_npz,
        atomic_write_csv,
        atomic_write_json,
        atomic_write_text,
    )
    from poisonguard.models.io import save_model
    from poisonguard.report.html import render_html

    a = outcome.artifacts
    if "sanitized" in a:
        s = a["sanitized"]
        atomic_save_npz(tmp / "sanitized.npz", x=s.x, y=s.y, ids=s.ids)
        extra = [k for k in ("seed_votes", "recheck_confirmed")
                 if a["removed"] and k in a["removed"][0]]
        atomic_write_csv(tmp / "flagged.csv", ["index", "id", "label", "confidence",
                                               "detectors", *extra],
                         [[r["index"], r["id"], r["label"], r["confidence"],
                           ";".join(r["detectors"]), *(r[k] for k in extra)]
                          for r in a["removed"]])
    if "audit" in a:
        from poisonguard.audit.core import save_triggers

        save_triggers(tmp / "triggers.npz", a["audit"].cleanse)
    if "strip" in a:
        a["strip"].save(tmp / "runtime")
        res = a.get("runtime_screen")
        if res is not None:
            atomic_write_csv(tmp / "runtime" / "flags.csv",
                             ["index", "prediction", "score", "suspicious"],
                             ([int(i), int(p), f"{sc:.6f}", int(f)] for i, p, sc, f in
                              zip(a["runtime_index"], res.prediction, res.score,
                                  res.suspicious)))
    if "guarded" in a:
        g = a["guarded"]
        t = g.train
        n_classes = a["n_classes"]
        save_model(tmp / "guarded_model", t.classifier.model, t.arch, t.arch_kwargs,
                   t.classifier.input_spec, n_classes, t.classifier.layer,
                   extra={"defense": g.config.defense, "train_config": t.config.to_dict()},
                   inputs=a.get("train_inputs"))
    atomic_write_json(tmp / "report.json", outcome.report)
    atomic_write_text(tmp / "report.html", render_html(outcome.report))
