"""One verdict over every layer: a status per layer and the overall judgement.

Each layer reports ``{"status", "summary", "reason"}`` with status one of :data:`STATUSES`. A
layer that did not run is ``skipped`` and one that failed is ``error``; neither reads as clean.
``overall`` is ``compromised`` when any layer is, else ``suspicious`` when any layer is
suspicious or in error (or when no layer ran at all), else ``clean``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

LAYERS = ("provenance", "quarantine", "guarded_training", "model_audit", "runtime")
STATUSES = ("clean", "suspicious", "compromised", "skipped", "error")
OVERALL = ("clean", "suspicious", "compromised")
SCHEMA_VERSION_2 = "2.0"
# Isolated flags (no class judged poisoned) on at most this share of the samples leave the
# quarantine clean: the cross-referenced set flags a few clean samples on clean data (1 of 400
# clean digits); the samples are still listed for review.
ISOLATED_SHARE = 0.01


def layer_status(status: str, summary: str, reason: str, **extra: Any) -> dict[str, Any]:
    """One layer's entry of ``verdict.layers``."""
    if status not in STATUSES:
        raise ValueError(f"unknown layer status {status!r}; expected one of {STATUSES}")
    return {"status": status, "summary": summary, "reason": reason, **extra}


SEVERITY = {"skipped": 0, "clean": 1, "suspicious": 2, "error": 3, "compromised": 4}


def worse_status(current: Mapping[str, Any], other: Mapping[str, Any], what: str
                 ) -> dict[str, Any]:
    """The more severe of two statuses of one layer (``other`` is the ``what`` check); the
    milder one's summary is appended to the kept one's."""
    worst = other if SEVERITY[other["status"]] > SEVERITY[current["status"]] else current
    merged = dict(worst)
    merged["summary"] = (f"{current['summary']}; {what}: {other['summary']}"
                         if worst is current else f"{what}: {other['summary']}; "
                                                  f"{current['summary']}")
    return merged


def skipped(reason: str) -> dict[str, Any]:
    return layer_status("skipped", "not run", reason)


def overall_status(layers: Mapping[str, Mapping[str, Any]]) -> str:
    """Fold the layer statuses into ``clean``, ``suspicious`` or ``compromised``."""
    found = [entry["status"] for entry in layers.values()]
    if "compromised" in found:
        return "compromised"
    if "suspicious" in found or "error" in found or "clean" not in found:
        return "suspicious"
    return "clean"


def overall_summary(overall: str, layers: Mapping[str, Mapping[str, Any]]) -> str:
    """One sentence naming the layers behind the overall status."""
    ran = [k for k, v in layers.items() if v["status"] not in ("skipped",)]
    if overall == "clean":
        return "CLEAN: no layer found anything (" + ", ".join(ran) + " ran)"
    worst = [k for k, v in layers.items() if v["status"] in ("compromised", "suspicious",
                                                               "error")]
    if not worst:
        return "SUSPICIOUS: no layer could run, so nothing was checked"
    parts = [f"{k}: {layers[k]['summary']}" for k in worst]
    return f"{overall.upper()}: " + "; ".join(parts)


def set_verdict(report: dict[str, Any], layers: Mapping[str, Mapping[str, Any]],
                command: str | None = None) -> dict[str, Any]:
    """Write ``verdict.overall`` and ``verdict.layers`` (every layer of :data:`LAYERS`; those
    not given are skipped) into ``report`` and mark it schema version 2. Entries already in
    the report are kept unless ``layers`` replaces them. Returns ``report``."""
    verdict = report.setdefault("verdict", {})
    merged: dict[str, Any] = dict(verdict.get("layers") or {})
    merged.update(layers)
    cmd = command or report.get("command") or "this command"
    for name in LAYERS:
        merged.setdefault(name, skipped(f"not part of `{cmd}`"))
    merged = {name: merged[name] for name in LAYERS}
    overall = overall_status(merged)
    verdict["overall"] = overall
    verdict["layers"] = merged
    verdict["overall_summary"] = overall_summary(overall, merged)
    report["schema_version"] = SCHEMA_VERSION_2
    return report


# ----------------------------------------------------------------------------- per layer
def provenance_status(layer: Mapping[str, Any]) -> dict[str, Any]:
    """``verified`` is clean; any change is compromised; unverifiable items are suspicious."""
    counts = layer.get("counts") or {}
    status = {"verified": "clean", "changed": "compromised"}.get(layer.get("status", ""),
                                                                  "suspicious")
    reason = {"clean": "every pinned item was re-hashed and found unchanged",
              "compromised": "pinned items were modified, removed or added since pinning",
              "suspicious": "some pinned items could not be checked"}[status]
    evidence = [f"{f.get('kind')}: {f.get('key')}" for f in (layer.get("findings") or [])[:5]]
    return layer_status(status, str(layer.get("summary", "")), reason,
                        key_numbers={k: counts.get(k, 0) for k in
                                     ("items", "modified", "missing", "new", "unverifiable")},
                        evidence=evidence)


def quarantine_status(scan_verdict: Mapping[str, Any], n_samples: int) -> dict[str, Any]:
    """Classes judged poisoned are compromised; a dataset-wide split, or isolated flagged
    samples on more than :data:`ISOLATED_SHARE` of the data without a poisoned class, are
    suspicious."""
    classes = list(scan_verdict.get("poisoned_classes") or [])
    n_flagged = int(scan_verdict.get("n_flagged") or 0)
    numbers = {"n_flagged": n_flagged, "n_samples": n_samples, "poisoned_classes": classes}
    if classes:
        names = ", ".join(f"class {c}" for c in classes)
        return layer_status("compromised", f"{names} poisoned; {n_flagged} of {n_samples} "
                            "samples flagged", "at least two detectors found a separable "
                            "sub-population in the class", key_numbers=numbers)
    if scan_verdict.get("dataset_wide"):
        return layer_status("suspicious", f"most classes split in two; {n_flagged} samples "
                            "flagged", "the whole dataset looks poisoned (all-to-all pattern)",
                            key_numbers=numbers)
    if n_flagged > ISOLATED_SHARE * n_samples:
        return layer_status("suspicious", f"no class judged poisoned; {n_flagged} isolated "
                            "samples flagged for review", "several detectors agree on more "
                            f"than {ISOLATED_SHARE:.0%} of the samples, but no class holds a "
                            "separable group", key_numbers=numbers)
    review = f"; {n_flagged} isolated samples flagged for review" if n_flagged else ""
    return layer_status("clean", f"no poisoning found in {n_samples} samples{review}",
                        "no detector pair found a separable sub-population in any class"
                        + (f" (isolated flags on at most {ISOLATED_SHARE:.0%} of the samples "
                           "are the scan's noise level)" if n_flagged else ""),
                        key_numbers=numbers)


def model_audit_status(audit_verdict: Mapping[str, Any],
                       threshold: float = 2.0) -> dict[str, Any]:
    """A flagged target class is compromised; a class the norm-ratio guard kept from being
    flagged is suspicious when its anomaly index (either search) is above twice
    ``threshold`` (just above it is common on clean models whose class norms cluster tightly:
    2.97 on a clean digits CNN with a 20-step search); otherwise clean."""
    ev = audit_verdict.get("evidence") or {}
    numbers = {"target_class": audit_verdict.get("target_class"),
               "confidence": audit_verdict.get("confidence"),
               "anomaly_index": ev.get("anomaly_index"),
               "reversed_trigger_asr": ev.get("reversed_trigger_asr")}
    if audit_verdict.get("backdoored"):
        return layer_status("compromised", f"backdoor to class {audit_verdict['target_class']}",
                            str(audit_verdict.get("summary", "")), key_numbers=numbers)
    top = ev.get("most_anomalous_class")
    index = max(float(ev.get("anomaly_index") or 0.0),
                float(ev.get("additive_anomaly_index") or 0.0))
    if index > 2 * threshold:
        return layer_status("suspicious", f"class {top}'s reversed trigger is an outlier "
                            f"(anomaly index {index:.2f} > {2 * threshold:g}) but not small "
                            "enough to flag", str(audit_verdict.get("summary", "")),
                            key_numbers={**numbers, "target_class": top})
    return layer_status("clean", "no backdoor found", str(audit_verdict.get("summary", "")),
                        key_numbers=numbers)


def meta_classifier_status(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A zoo meta model's prediction: above its threshold is suspicious (a statistical
    judgement of the weights that names no trigger or class), otherwise clean."""
    p, thr = float(entry["p_backdoored"]), float(entry["threshold"])
    numbers = {"p_backdoored": p, "threshold": thr}
    if entry.get("backdoored"):
        return layer_status("suspicious", f"the meta-classifier reads the weights as "
                            f"backdoored (P {p:.2f} > threshold {thr:.2f})",
                            "zoo meta model", key_numbers=numbers)
    return layer_status("clean", f"the meta-classifier reads the weights as clean (P {p:.2f} "
                        f"<= threshold {thr:.2f})", "zoo meta model", key_numbers=numbers)


def guarded_training_status(layer: Mapping[str, Any]) -> dict[str, Any]:
    """ABL whose seed expansion accepted a poison cluster in a class is compromised; gradient
    outlier classes are suspicious; otherwise clean (ABL's fixed 1% isolation share and the
    trimmed share are rules, not evidence)."""
    info = layer.get("info") or {}
    expansion = info.get("seed_expansion") or {}
    accepted = [int(c) for c, v in (expansion.get("classes") or {}).items()
                if isinstance(v, Mapping) and v.get("accepted")]
    monitor = layer.get("gradient_monitor") or {}
    grad_classes = list(monitor.get("suspicious_classes") or [])
    n_iso = (layer.get("abl") or {}).get("n_isolated")
    numbers = {"defense": layer.get("defense"), "n_isolated": n_iso,
               "poison_clusters_in_classes": accepted}
    if accepted:
        names = ", ".join(f"class {c}" for c in accepted)
        return layer_status("compromised", f"ABL isolated {n_iso} samples; a poison cluster in "
                            f"{names}", "the lowest-loss samples after gradient ascent formed "
                            "a separable cluster in their class", key_numbers=numbers)
    if grad_classes:
        return layer_status("suspicious", "gradient-norm outliers in class(es) "
                            + ", ".join(str(c) for c in grad_classes),
                            "per-sample gradient norms of these classes are robust outliers",
                            key_numbers=numbers)
    return layer_status("clean", f"{layer.get('defense')} training found no poison population",
                        "no isolated group formed a separable cluster", key_numbers=numbers)


def runtime_status(layer: Mapping[str, Any] | None, frr: float,
                   n_screened: int) -> dict[str, Any]:
    """Clean when the share of screened training inputs that STRIP flags is within what its
    false-rejection rate explains (binomial upper tail p >= 0.001); suspicious otherwise."""
    if layer is None or n_screened == 0:
        return skipped("calibrated for `serve`, but there were no inputs to screen "
                       "(give --data)")
    from scipy.stats import binom

    n_sus = int(layer.get("n_suspicious") or 0)
    p = float(binom.sf(n_sus - 1, n_screened, max(frr, 1e-6))) if n_sus else 1.0
    numbers = {"n_screened": n_screened, "n_flagged": n_sus, "target_frr": frr,
               "p_value": round(p, 6)}
    summary = f"{n_sus} of {n_screened} training inputs flagged by STRIP"
    if p < 1e-3:
        return layer_status("suspicious", summary, f"more than a {frr:.1%} false-rejection "
                            f"rate explains (binomial p = {p:.2g})", key_numbers=numbers)
    return layer_status("clean", summary, f"within the {frr:.1%} false-rejection rate "
                        f"(binomial p = {p:.2g})", key_numbers=numbers)
