"""Cross-layer evidence: where two layers speak about the same thing, do they agree?

Each check returns ``{"check", "layers", "agree": True | False | None, "detail", ...}``;
``agree`` is None when one side has nothing to say. Agreement raises confidence in a finding,
disagreement is shown to the reviewer; neither changes a layer's own status.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

_INDEX = re.compile(r"\[(0|[1-9][0-9]*)\]$")


def class_vs_target(poisoned_classes: Sequence[int], target: int | None) -> dict[str, Any]:
    """The data scan's poisoned classes against the model audit's target class."""
    classes = [int(c) for c in poisoned_classes]
    base = {"check": "scan poisoned class vs model-audit target",
            "layers": ["quarantine", "model_audit"], "scan_classes": classes,
            "model_target": target}
    if not classes and target is None:
        return {**base, "agree": True, "detail": "neither layer found a target class"}
    if classes and target is not None:
        agree = int(target) in classes
        detail = (f"both point at class {target}" if agree else
                  f"the scan names {classes}, the model audit class {target}")
        return {**base, "agree": agree, "detail": detail}
    if classes:
        return {**base, "agree": False,
                "detail": f"the scan names {classes}; the model audit found no backdoor (the "
                          "model may not have learned it, or the trigger evades the search)"}
    return {**base, "agree": False,
            "detail": f"the model audit names class {target}; the scan found no poisoned "
                      "class (the model may have been trained on other data)"}


def changed_indices(findings: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Sample indices of modified or missing ``ARRAY[i]`` manifest items."""
    out = []
    for f in findings:
        if f.get("kind") not in ("modified", "missing"):
            continue
        m = _INDEX.search(str(f.get("key", "")))
        if m:
            out.append(int(m.group(1)))
    return np.unique(np.asarray(out, dtype=np.int64))


def flags_vs_provenance(flagged: np.ndarray, findings: Sequence[Mapping[str, Any]]
                        ) -> dict[str, Any]:
    """Scan-flagged samples against the samples the manifest says were changed."""
    changed = changed_indices(findings)
    changed = changed[changed < len(flagged)]
    flagged_idx = np.flatnonzero(flagged)
    both = np.intersect1d(changed, flagged_idx)
    base = {"check": "flagged samples vs provenance changes",
            "layers": ["quarantine", "provenance"], "n_changed": int(len(changed)),
            "n_flagged": int(len(flagged_idx)), "n_both": int(len(both)),
            "changed_and_flagged": both[:50].tolist()}
    if len(changed) == 0:
        return {**base, "agree": None if len(flagged_idx) else True,
                "detail": "no changed sample to compare with"
                + (f"; {len(flagged_idx)} flagged samples are as pinned" if len(flagged_idx)
                   else "")}
    share = len(both) / len(changed)
    return {**base, "agree": share >= 0.5,
            "detail": f"{len(both)} of {len(changed)} changed samples are flagged by the scan"}


def runtime_vs_scan(runtime_flags: np.ndarray, scan_flags: np.ndarray) -> dict[str, Any]:
    """STRIP's flags on the training inputs against the scan's."""
    r, s = runtime_flags.astype(bool), scan_flags.astype(bool)
    both = int((r & s).sum())
    union = int((r | s).sum())
    base = {"check": "runtime-filter flags vs scan flags", "layers": ["runtime", "quarantine"],
            "n_runtime": int(r.sum()), "n_scan": int(s.sum()), "n_both": both,
            "jaccard": round(both / union, 4) if union else None}
    if not r.any() and not s.any():
        return {**base, "agree": True, "detail": "neither flagged any sample"}
    if not r.any() or not s.any():
        return {**base, "agree": None,
                "detail": f"only one side flagged samples ({int(r.sum())} runtime, "
                          f"{int(s.sum())} scan)"}
    share = both / max(int(s.sum()), 1)
    return {**base, "agree": share >= 0.5,
            "detail": f"STRIP flags {both} of the {int(s.sum())} samples the scan flagged "
                      f"({int(r.sum())} in all)"}


def trigger_vs_mask(scan_mask: np.ndarray | None, reversed_mask: np.ndarray | None
                    ) -> dict[str, Any]:
    """The data-side trigger estimate's pixels against the reversed trigger's mask (IoU of the
    top pixels of each, as many as the smaller trigger covers)."""
    base = {"check": "data-side trigger vs reversed trigger",
            "layers": ["quarantine", "model_audit"]}
    if scan_mask is None or reversed_mask is None:
        return {**base, "agree": None, "detail": "one side has no trigger estimate"}
    a = np.abs(np.asarray(scan_mask, dtype=float)).reshape(-1)
    b = np.asarray(reversed_mask, dtype=float).reshape(-1)
    if a.shape != b.shape or not a.any() or not b.any():
        return {**base, "agree": None, "detail": "trigger shapes differ or are empty"}
    k = max(1, int(round(min((a > 0.5 * a.max()).sum(), b.sum()))))
    top_a, top_b = set(np.argsort(-a)[:k]), set(np.argsort(-b)[:k])
    iou = len(top_a & top_b) / len(top_a | top_b)
    return {**base, "agree": iou >= 0.3, "iou": round(iou, 4), "pixels_compared": k,
            "detail": f"the top {k} pixels overlap with IoU {iou:.2f}"}


def audit_vs_comparison(target: int | None, planted: Sequence[int]) -> dict[str, Any]:
    """The model audit's target class against the classes the comparison with the base model
    found planted."""
    planted = [int(c) for c in planted]
    base = {"check": "model-audit target vs classes planted since the base model",
            "layers": ["model_audit"], "model_target": target, "planted_classes": planted}
    if target is None and not planted:
        return {**base, "agree": True, "detail": "neither the audit nor the comparison found a "
                                                 "backdoor"}
    if target is not None and planted:
        agree = int(target) in planted
        return {**base, "agree": agree,
                "detail": (f"both point at class {target}" if agree else
                           f"the audit names class {target}, the comparison {planted}")}
    if planted:
        return {**base, "agree": False,
                "detail": f"the comparison finds class(es) {planted} planted since the base "
                          "model; the audit on its own did not flag the model"}
    return {**base, "agree": False,
            "detail": f"the audit names class {target}; the base model shares it (nothing was "
                      "planted by the change, so the backdoor predates the base)"}
