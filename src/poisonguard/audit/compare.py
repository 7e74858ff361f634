"""Model comparison: what changed between a model you trust (BASE) and a new version of it
(TUNED, e.g. a third-party fine-tune), and whether the change planted a backdoor.

Four views, on a trusted clean set:

* **Triggers, checked against the base.** Neural Cleanse reverse-engineers the smallest trigger
  of every class in TUNED (a mask and pattern, and a universal additive perturbation). Each is
  stamped on clean samples of the other classes and fed to *both* models. A backdoor planted by
  the fine-tune works on TUNED and not on BASE; a class's natural shortcut (a stroke that makes
  any digit a 1) or an adversarial perturbation transfers between two versions of one model.
  The *differential success* of class k is ``asr_tuned[k] - asr_base[k]``; a class is planted
  when it reaches :data:`MIN_DIFFERENTIAL` with either search. No poison rate and no target
  are assumed: the bar is an absolute share of clean samples.
* **Predictions.** Per class, the share of clean samples that BASE put elsewhere and TUNED puts
  in the class (and the reverse); the clean samples whose probabilities moved most.
* **Layers and units.** Each parameter tensor's relative change; per output class, the change of
  its row in the last linear layer (robust z across classes).
* **Accuracy** of both models on the clean set.

The verdict is ``backdoored`` (with ``target_class``) when a class is planted. A class whose
output row or share of moved predictions is an outlier is listed in ``changed_classes`` for
review; on its own it does not make the verdict (a fine-tune on new data moves classes).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from poisonguard.audit.model import AuditModel, check_clean_data
from poisonguard.audit.neural_cleanse import (
    MAD_SCALE,
    CleanseConfig,
    CleanseResult,
    neural_cleanse,
    reversed_asr,
)
from poisonguard.data.labeled import LabeledData
from poisonguard.detect.common import robust_z
from poisonguard.errors import ModelError

MIN_DIFFERENTIAL = 0.5     # share of clean samples a planted trigger moves in TUNED, not BASE
OUTLIER_Z = 3.5            # robust z of a class's output-row change / moved share
MOVED_SHOWN = 20


@dataclass
class CompareResult:
    """What :func:`compare_models` found; ``verdict`` is the report's verdict block."""

    verdict: dict[str, Any]
    classes: list[dict[str, Any]]
    layers: list[dict[str, Any]]
    moved: list[dict[str, Any]]
    accuracy: dict[str, float]
    cleanse: CleanseResult
    timings: dict[str, float] = field(default_factory=dict)


def _params(model: AuditModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().float() for k, v in model.module.named_parameters()}


def check_same_architecture(base: AuditModel, tuned: AuditModel) -> None:
    """Refuse two models whose parameter names or shapes differ (one line naming the first)."""
    pb, pt = _params(base), _params(tuned)
    if list(pb) != list(pt):
        only = sorted(set(pb) ^ set(pt))
        raise ModelError("BASE and TUNED have different architectures: parameter "
                         f"{(only or list(pb))[0]!r} is not in both (compare needs two versions "
                         "of one model)")
    for k, v in pb.items():
        if v.shape != pt[k].shape:
            raise ModelError(f"BASE and TUNED have different architectures: {k} is "
                             f"{tuple(v.shape)} in BASE and {tuple(pt[k].shape)} in TUNED")


def _robust_z(v: np.ndarray, floor: float = 1e-9) -> np.ndarray:
    """Robust z with the MAD floored at 5% of |median| and at ``floor`` (shares of a few
    hundred samples are often all zero but one)."""
    scale_floor = MAD_SCALE * max(0.05 * abs(float(np.median(v))), floor)
    return robust_z(np.asarray(v, dtype=np.float64), floor=scale_floor)


def layer_changes(base: AuditModel, tuned: AuditModel, n_classes: int
                  ) -> tuple[list[dict[str, Any]], np.ndarray | None]:
    """Relative change of every parameter tensor, and per class the change of its row in the
    last linear layer whose output size is ``n_classes`` (None when there is none)."""
    pb, pt = _params(base), _params(tuned)
    rows = []
    head = None
    for k, v in pb.items():
        d = pt[k] - v
        rows.append({"parameter": k, "shape": list(v.shape),
                     "relative_change": round(float(d.norm() / max(float(v.norm()), 1e-12)), 6)})
        if v.ndim == 2 and v.shape[0] == n_classes:
            head = (d.norm(dim=1) / v.norm(dim=1).clamp_min(1e-12)).numpy()
    rows.sort(key=lambda r: -r["relative_change"])
    return rows, head


def compare_models(base: AuditModel, tuned: AuditModel, clean: LabeledData,
                   config: CleanseConfig | None = None,
                   cleanse: CleanseResult | None = None) -> CompareResult:
    """Compare ``tuned`` against ``base`` on the trusted ``clean`` set (see the module doc).
    ``cleanse``: TUNED's reversed triggers when an audit of it on ``clean`` already found them
    (otherwise Neural Cleanse runs here with ``config``)."""
    t0 = time.perf_counter()
    check_same_architecture(base, tuned)
    k = check_clean_data(tuned, clean)
    if check_clean_data(base, clean) != k:
        raise ModelError("BASE and TUNED give different numbers of classes")
    p_b, p_t = base.classifier.predict_proba(clean.x), tuned.classifier.predict_proba(clean.x)
    pred_b, pred_t = p_b.argmax(1), p_t.argmax(1)
    acc = {"base": round(float(np.mean(pred_b == clean.y)), 4),
           "tuned": round(float(np.mean(pred_t == clean.y)), 4)}
    moved_to = np.array([np.mean((pred_b != c) & (pred_t == c)) for c in range(k)])
    moved_from = np.array([np.mean((pred_b == c) & (pred_t != c)) for c in range(k)])
    shift = 0.5 * np.abs(p_t - p_b).sum(1)
    top = np.argsort(-shift)[:MOVED_SHOWN]
    moved = [{"index": int(i), "label": int(clean.y[i]), "base_prediction": int(pred_b[i]),
              "tuned_prediction": int(pred_t[i]), "probability_shift": round(float(shift[i]), 4)}
             for i in top if shift[i] > 0]
    t1 = time.perf_counter()
    layers, head = layer_changes(base, tuned, k)
    nc = cleanse if cleanse is not None else neural_cleanse(tuned, clean, k, config)
    t2 = time.perf_counter()
    asr_t, asr_b = reversed_asr(tuned, nc, clean), reversed_asr(base, nc, clean)
    diff = asr_t - asr_b
    add_t = add_diff = None
    if nc.deltas is not None:
        add_t = reversed_asr(tuned, nc, clean, additive=True)
        add_diff = add_t - reversed_asr(base, nc, clean, additive=True)
    best = np.maximum(diff, add_diff) if add_diff is not None else diff
    planted = [int(c) for c in np.argsort(-best) if best[c] >= MIN_DIFFERENTIAL]
    head_z = _robust_z(head) if head is not None else None
    moved_z = _robust_z(moved_to, floor=1.0 / len(clean))  # one sample's share
    classes = []
    for c in range(k):
        row: dict[str, Any] = {
            "class": c, "planted": c in planted,
            "trigger_success_tuned": round(float(asr_t[c]), 4),
            "trigger_success_base": round(float(asr_b[c]), 4),
            "differential_success": round(float(diff[c]), 4),
            "mask_l1": round(float(nc.norms[c]), 3),
            "moved_to_share": round(float(moved_to[c]), 4),
            "moved_from_share": round(float(moved_from[c]), 4),
            "moved_to_z": round(float(moved_z[c]), 3)}
        if add_diff is not None and add_t is not None:
            row["additive_success_tuned"] = round(float(add_t[c]), 4)
            row["additive_differential_success"] = round(float(add_diff[c]), 4)
        if head_z is not None and head is not None:
            row["output_row_change"] = round(float(head[c]), 6)
            row["output_row_z"] = round(float(head_z[c]), 3)
        classes.append(row)
    changed = sorted({c for c in range(k)
                      if moved_z[c] > OUTLIER_Z and moved_to[c] > 0.01
                      or (head_z is not None and head_z[c] > OUTLIER_Z)} - set(planted))
    verdict = _verdict(planted, changed, best, acc)
    timings = {"predictions_s": round(t1 - t0, 3), "neural_cleanse_s": round(t2 - t1, 3),
               "compare_s": round(time.perf_counter() - t0, 3)}
    return CompareResult(verdict, classes, layers, moved, acc, nc, timings)


def _verdict(planted: list[int], changed: list[int], best: np.ndarray,
             acc: dict[str, float]) -> dict[str, Any]:
    top = int(np.argmax(best))
    if planted:
        t = planted[0]
        summary = (f"BACKDOOR PLANTED: class {t}'s reversed trigger sends "
                   f"{100 * best[t]:.0f}% more clean samples to class {t} in TUNED than in "
                   f"BASE (bar {100 * MIN_DIFFERENTIAL:.0f}%)")
        if len(planted) > 1:
            summary += f"; also class(es) {', '.join(map(str, planted[1:]))}"
    elif changed:
        summary = (f"no planted trigger found (largest differential success "
                   f"{100 * best[top]:.0f}%, class {top}); class(es) "
                   f"{', '.join(map(str, changed))} changed more than the others (output row "
                   "or moved predictions), shown for review")
    else:
        summary = (f"no planted trigger found: the largest differential trigger success is "
                   f"{100 * best[top]:.0f}% (class {top}, bar {100 * MIN_DIFFERENTIAL:.0f}%)")
    summary += f"; clean accuracy {100 * acc['base']:.1f}% -> {100 * acc['tuned']:.1f}%"
    return {"backdoored": bool(planted), "target_class": planted[0] if planted else None,
            "planted_classes": planted, "changed_classes": changed,
            "max_differential_success": round(float(best[top]), 4),
            "threshold": MIN_DIFFERENTIAL, "summary": summary}


def build_compare_report(result: CompareResult, clean: LabeledData, base: AuditModel,
                         tuned: AuditModel) -> dict[str, Any]:
    """The schema-2 report of ``compare``: the comparison sits in ``layers.model_audit``."""
    import datetime as _dt

    from poisonguard import SCHEMA_VERSION, __version__
    from poisonguard.audit.core import trigger_images
    from poisonguard.report.builder import environment
    from poisonguard.types import jsonable
    from poisonguard.verdict import layer_status, set_verdict

    v = result.verdict
    shown = v["planted_classes"] or [int(np.argmax([c["differential_success"]
                                                    for c in result.classes]))]
    layer = {"base": {"path": str(base.path), "kind": base.kind},
             "tuned": {"path": str(tuned.path), "kind": tuned.kind},
             "accuracy": result.accuracy, "classes": result.classes,
             "layers_changed": result.layers[:20], "moved_predictions": result.moved,
             "triggers": trigger_images(result.cleanse, shown),
             "neural_cleanse": result.cleanse.summary(),
             "rule": (f"a class is planted when its reversed trigger (mask or additive) found "
                      f"in TUNED moves at least {100 * MIN_DIFFERENTIAL:.0f}% more clean "
                      "samples of other classes to it in TUNED than in BASE")}
    report = {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "poisonguard", "version": __version__},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "compare", "environment": environment(),
        "data": {"fingerprint": clean.fingerprint(), "n_samples": len(clean),
                 "n_classes": clean.n_classes, "sample_shape": list(clean.x.shape[1:])},
        "verdict": dict(v), "layers": {"model_audit": layer}, "timings": result.timings}
    numbers = {"target_class": v["target_class"],
               "max_differential_success": v["max_differential_success"],
               "accuracy_base": result.accuracy["base"],
               "accuracy_tuned": result.accuracy["tuned"]}
    if v["backdoored"]:
        status = layer_status("compromised", f"backdoor planted in class {v['target_class']}",
                              v["summary"], key_numbers=numbers)
    else:
        status = layer_status("clean", "no planted backdoor", v["summary"],
                              key_numbers=numbers)
    set_verdict(report, {"model_audit": status})
    return jsonable(report)
