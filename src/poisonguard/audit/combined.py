"""The audit's two routes and their verdict: data-free (the max-margin search alone) and with
trusted clean data (Neural Cleanse, dormant units and the max-margin search, combined).

Combined rule: the model is backdoored when either detector flags it. The target is Neural
Cleanse's when it flags (its triggers are fitted on real data), else the max-margin one's. Each
detector's own verdict and evidence is kept under ``evidence.detectors``.
"""

from __future__ import annotations

import datetime as _dt
import time
from typing import Any

from poisonguard.audit.core import AuditResult, audit_model
from poisonguard.audit.mmbd import InputDomain, MarginConfig, MarginResult, max_margin_audit
from poisonguard.audit.model import AuditModel
from poisonguard.audit.neural_cleanse import CleanseConfig
from poisonguard.data.labeled import LabeledData
from poisonguard.types import jsonable


def _brief(v: dict[str, Any]) -> dict[str, Any]:
    return {k: v.get(k) for k in ("backdoored", "target_class", "confidence", "summary")}


def combine_verdicts(nc: dict[str, Any], mm: dict[str, Any]) -> dict[str, Any]:
    """One verdict from Neural Cleanse's (``nc``) and the max-margin search's (``mm``)."""
    evidence = dict(nc.get("evidence") or {})
    evidence["detectors"] = {"neural_cleanse": {**_brief(nc), "evidence": nc.get("evidence")},
                             "max_margin": {**_brief(mm), "evidence": mm.get("evidence")}}
    deciders = [n for n, v in (("neural_cleanse", nc), ("max_margin", mm)) if v["backdoored"]]
    if not deciders:
        return {"backdoored": False, "target_class": None,
                "confidence": round(min(nc["confidence"], mm["confidence"]), 4),
                "summary": f"{nc['summary']}; max-margin: {mm['summary']}",
                "evidence": evidence, "decided_by": []}
    lead = nc if nc["backdoored"] else mm
    summary = lead["summary"]
    if len(deciders) == 2:
        agree = nc["target_class"] == mm["target_class"]
        summary += ("; the max-margin search agrees" if agree else
                    f"; the max-margin search points at class {mm['target_class']}")
    elif lead is mm:
        summary += " (Neural Cleanse found no small trigger)"
    else:
        summary += " (the max-margin search found no outlier)"
    return {"backdoored": True, "target_class": lead["target_class"],
            "confidence": lead["confidence"], "summary": summary, "evidence": evidence,
            "decided_by": deciders}


def combined_audit(model: AuditModel, clean: LabeledData, cleanse: CleanseConfig | None,
                   margin: MarginConfig | None, domain: InputDomain, layer: str | None = None
                   ) -> tuple[AuditResult, MarginResult]:
    """Neural Cleanse (+ dormant units) and the max-margin search; the result's verdict is
    :func:`combine_verdicts` of both."""
    result = audit_model(model, clean, cleanse, layer=layer)
    t0 = time.perf_counter()
    mm = max_margin_audit(model, domain, margin)
    result.timings["max_margin_s"] = round(time.perf_counter() - t0, 3)
    result.timings["audit_s"] = round(result.timings["audit_s"] + mm.runtime_s, 3)
    result.verdict = combine_verdicts(result.verdict, mm.verdict())
    return result, mm


def margin_layer(mm: MarginResult) -> dict[str, Any]:
    """The ``max_margin`` entry of the model-audit layer."""
    return {**mm.summary(), "method": "MM-BD max classification margin (Wang et al., S&P "
                                      "2024) with a batch-norm feature prior"}


def data_free_report(mm: MarginResult, model: AuditModel) -> dict[str, Any]:
    """The canonical report of a data-free audit (no ``data`` section: no samples were used)."""
    from poisonguard import SCHEMA_VERSION, __version__
    from poisonguard.report.builder import environment
    from poisonguard.verdict import model_audit_status, set_verdict

    verdict = mm.verdict()
    verdict["evidence"] = {**verdict["evidence"],
                           "detectors": {"max_margin": {**_brief(verdict),
                                                        "evidence": dict(verdict["evidence"])}}}
    verdict["decided_by"] = ["max_margin"] if verdict["backdoored"] else []
    layer = {"model": {"path": str(model.path), "kind": model.kind,
                       "n_classes": int(len(mm.margins)), "input_layout": model.spec.layout},
             "max_margin": margin_layer(mm),
             "notes": ["data-free audit: no clean samples given, so Neural Cleanse and the "
                       "dormant-unit scan did not run (give --clean DATA.npz to add them)"]}
    report = {"schema_version": SCHEMA_VERSION,
              "tool": {"name": "poisonguard", "version": __version__},
              "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "command": "audit-model", "environment": environment(),
              "verdict": verdict, "layers": {"model_audit": layer},
              "timings": {"max_margin_s": round(mm.runtime_s, 3),
                          "audit_s": round(mm.runtime_s, 3)}}
    set_verdict(report, {"model_audit": model_audit_status(verdict)})
    return jsonable(report)


def audit_with_optional_clean(model: AuditModel, domain: InputDomain,
                              clean: LabeledData | None = None,
                              cleanse: CleanseConfig | None = None,
                              margin: MarginConfig | None = None) -> dict[str, Any]:
    """The verdict ``audit-model`` gives, with or without clean data (for benchmarks)."""
    if clean is None:
        return max_margin_audit(model, domain, margin).verdict()
    result, _ = combined_audit(model, clean, cleanse, margin, domain, layer=None)
    return result.verdict
