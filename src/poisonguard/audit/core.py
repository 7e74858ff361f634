"""The model audit: Neural Cleanse over all classes, a dormant-neuron scan with the recovered
trigger, and a verdict (backdoored or not, target class, confidence, evidence)."""

from __future__ import annotations

import datetime as _dt
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from poisonguard.audit.dormant import DormantResult, default_layer, dormant_neurons
from poisonguard.audit.model import AuditModel, check_clean_data, to_data_tensor
from poisonguard.audit.neural_cleanse import CleanseConfig, CleanseResult, neural_cleanse
from poisonguard.data.labeled import LabeledData
from poisonguard.errors import DataError
from poisonguard.io import atomic_save_npz
from poisonguard.types import jsonable

DORMANT_PROBE = 200


@dataclass
class AuditResult:
    cleanse: CleanseResult
    dormant: DormantResult | None
    verdict: dict[str, Any]
    n_classes: int
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def _repr_html_(self) -> str:
        """The verdict banner and layer cards, for notebooks."""
        from poisonguard.report.html import banner_and_cards
        from poisonguard.verdict import model_audit_status, set_verdict

        status = model_audit_status(self.verdict, self.cleanse.config.threshold)
        return banner_and_cards(set_verdict({"command": "audit_model (Python)"},
                                            {"model_audit": status}))


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(min(v, 50.0), -50.0)))


def make_verdict(nc: CleanseResult, dormant: DormantResult | None = None) -> dict[str, Any]:
    """Backdoored when a class is flagged by the mask search or by the additive search; the
    target leads ``nc.flagged``: the class with the highest score (the sum of its two anomaly
    indices) among those above the threshold in either search (``combine_flags``). Confidence
    grows with the distance of the target's larger anomaly index from the threshold."""
    thr = nc.config.threshold
    top = nc.most_anomalous()
    med = float(np.median(nc.norms))
    evidence: dict[str, Any] = {
        "anomaly_index": round(float(nc.anomaly[top]), 3),
        "mask_l1": round(float(nc.norms[top]), 3), "median_mask_l1": round(med, 3),
        "mask_ratio_to_median": round(float(nc.norms[top]) / max(med, 1e-9), 4),
        "reversed_trigger_asr": round(float(nc.reversed_asr[top]), 4),
        "flagged_classes": list(nc.flagged), "most_anomalous_class": top}
    add = nc.add_norms is not None and nc.add_anomaly is not None
    if add:
        add_med = float(np.median(nc.add_norms))
        evidence.update({
            "additive_anomaly_index": round(float(nc.add_anomaly[top]), 3),
            "additive_l2": round(float(nc.add_norms[top]), 4),
            "additive_ratio_to_median": round(float(nc.add_norms[top]) / max(add_med, 1e-12),
                                              4),
            "score": round(float(nc.score[top]), 3),
            "mask_flagged_classes": list(nc.mask_flagged),
            "additive_flagged_classes": list(nc.add_flagged)})
    if dormant is not None:
        evidence["dormant_units_woken_by_trigger"] = len(dormant.units)

    def deciding(k: int) -> float:
        if not add:
            return float(nc.anomaly[k])
        return max(float(nc.anomaly[k]), float(nc.add_anomaly[k]))

    if nc.flagged:
        target = nc.flagged[0]
        conf = _sigmoid(1.5 * (deciding(target) - thr))
        if not add or nc.anomaly[target] >= nc.add_anomaly[target]:
            share = float(nc.norms[target]) / max(med, 1e-9)
            how = (f"a trigger covering {nc.norms[target]:.1f} pixels, {share:.0%} of the median "
                   f"class's (anomaly index {nc.anomaly[target]:.2f} > {thr:g})")
        else:
            share = float(nc.add_norms[target]) / max(float(np.median(nc.add_norms)), 1e-12)
            how = (f"an additive perturbation of L2 norm {nc.add_norms[target]:.3f} (data range "
                   f"= 1), {share:.0%} of the median class's (anomaly index "
                   f"{nc.add_anomaly[target]:.2f} > {thr:g})")
        summary = f"BACKDOOR FOUND: class {target} is reached by {how}"
        return {"backdoored": True, "target_class": int(target), "confidence": round(conf, 4),
                "summary": summary, "evidence": evidence}
    conf = _sigmoid(1.5 * (thr - deciding(top)))
    summary = (f"no backdoor found: the smallest reversed trigger (class {top}, "
               f"{nc.norms[top]:.1f} pixels) has anomaly index {nc.anomaly[top]:.2f}"
               + (f", its additive perturbation {nc.add_anomaly[top]:.2f}" if add else "")
               + f" (threshold {thr:g}, each with a norm-ratio guard)")
    return {"backdoored": False, "target_class": None, "confidence": round(conf, 4),
            "summary": summary, "evidence": evidence}


def audit_model(model: AuditModel, clean: LabeledData, config: CleanseConfig | None = None,
                layer: str | None = None, dormant: bool = True) -> AuditResult:
    """Audit ``model`` with the trusted ``clean`` set."""
    k = check_clean_data(model, clean)
    t0 = time.perf_counter()
    nc = neural_cleanse(model, clean, k, config)
    timings = {"neural_cleanse_s": round(nc.runtime_s, 3)}
    dres = None
    notes = []
    layer = layer or default_layer(model)
    if dormant and layer is not None and isinstance(model.module, torch.jit.ScriptModule):
        notes.append("dormant-unit scan skipped: TorchScript modules take no forward hooks")
    elif dormant and layer is not None:
        t1 = time.perf_counter()
        target = nc.flagged[0] if nc.flagged else nc.most_anomalous()
        others = np.flatnonzero(clean.y != target)[:DORMANT_PROBE]
        clean_xd = to_data_tensor(clean.x)
        probe = nc.stamp(clean.x[others], target)
        dres = dormant_neurons(model, clean_xd, probe, layer)
        for u in dres.units:
            u["samples"] = [int(others[i]) for i in u["samples"]]
        timings["dormant_s"] = round(time.perf_counter() - t1, 3)
    timings["audit_s"] = round(time.perf_counter() - t0, 3)
    return AuditResult(cleanse=nc, dormant=dres, verdict=make_verdict(nc, dres), n_classes=k,
                       timings=timings, notes=notes)


def save_triggers(path: str | Path, nc: CleanseResult) -> Path:
    """Write every class's reversed mask/pattern with its statistics (reused by ``repair``)."""
    extra: dict[str, np.ndarray] = {}
    if nc.deltas is not None and nc.add_norms is not None and nc.add_anomaly is not None:
        extra = {"deltas": nc.deltas, "add_norms": nc.add_norms, "add_anomaly": nc.add_anomaly,
                 "add_asr": (nc.add_asr if nc.add_asr is not None
                             else np.zeros(nc.n_classes)),
                 "mask_flagged": np.asarray(nc.mask_flagged, dtype=np.int64),
                 "add_flagged": np.asarray(nc.add_flagged, dtype=np.int64)}
    return atomic_save_npz(path, masks=nc.masks, patterns=nc.patterns, norms=nc.norms,
                           anomaly=nc.anomaly, reversed_asr=nc.reversed_asr,
                           flagged=np.asarray(nc.flagged, dtype=np.int64),
                           value_range=np.asarray(nc.value_range, dtype=np.float64), **extra)


def load_triggers(path: str | Path) -> CleanseResult:
    """Read a ``triggers.npz`` written by ``save_triggers`` (no pickles); ``path`` may also be
    the ``audit-model`` output folder that holds it."""
    if Path(path).is_dir():
        if not (Path(path) / "triggers.npz").is_file():
            raise DataError(f"{path}: folder has no triggers.npz (an audit-model output "
                            "folder holds one)")
        path = Path(path) / "triggers.npz"
    try:
        with np.load(path, allow_pickle=False) as arc:
            arrays = {k: arc[k] for k in arc.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable triggers file ({exc})") from None
    missing = {"masks", "patterns", "norms", "anomaly", "flagged"} - set(arrays)
    if missing:
        raise DataError(f"{path}: triggers file lacks {sorted(missing)}")
    k = len(arrays["norms"])
    vr = arrays.get("value_range", np.array([0.0, 1.0]))
    flagged = [int(v) for v in arrays["flagged"]]
    nc = CleanseResult(masks=arrays["masks"].astype(np.float32),
                       patterns=arrays["patterns"].astype(np.float32), norms=arrays["norms"],
                       anomaly=arrays["anomaly"],
                       reversed_asr=arrays.get("reversed_asr", np.zeros(k)),
                       reached=np.ones(k, dtype=bool), steps=np.zeros(k, dtype=int),
                       flagged=flagged, runtime_s=0.0, config=CleanseConfig(additive=False),
                       value_range=(float(vr[0]), float(vr[1])),
                       mask_flagged=[int(v) for v in arrays.get("mask_flagged", flagged)])
    if "deltas" in arrays and "add_norms" in arrays and "add_anomaly" in arrays:
        nc.deltas = arrays["deltas"].astype(np.float32)
        nc.add_norms = arrays["add_norms"]
        nc.add_anomaly = arrays["add_anomaly"]
        nc.add_asr = arrays.get("add_asr")
        nc.add_flagged = [int(v) for v in arrays.get("add_flagged", [])]
        nc.config = CleanseConfig()
    return nc


def trigger_images(nc: CleanseResult, classes: list[int]) -> list[dict[str, Any]]:
    """Masks (0..1) and patterns (0..1, scaled from the data range) of ``classes``, as lists
    for the report and its HTML view."""
    lo, hi = nc.value_range
    out = []
    for k in classes:
        m = np.squeeze(nc.masks[k])
        p = (nc.patterns[k] - lo) / max(hi - lo, 1e-9)
        out.append({"class": int(k), "mask_l1": round(float(nc.norms[k]), 3),
                    "anomaly_index": round(float(nc.anomaly[k]), 3),
                    "mask": np.round(m, 3).tolist(),
                    "pattern": np.round(np.clip(p, 0, 1), 3).tolist(),
                    "trigger": np.round(np.clip(p * nc.masks[k], 0, 1), 3).tolist()})
    return out


def build_audit_report(result: AuditResult, clean: LabeledData, model: AuditModel,
                       command: str = "audit-model", repair: dict[str, Any] | None = None,
                       margin: Any = None) -> dict[str, Any]:
    """The canonical report (schema as the scan's; the audit lives in layers.model_audit);
    ``margin`` (a :class:`~poisonguard.audit.mmbd.MarginResult`) adds the max-margin search."""
    from poisonguard import SCHEMA_VERSION, __version__
    from poisonguard.report.builder import environment

    nc = result.cleanse
    shown = list(nc.flagged) or [nc.most_anomalous()]
    layer = {
        "model": {"path": str(model.path), "kind": model.kind, "n_classes": result.n_classes,
                  "input_layout": model.spec.layout},
        "neural_cleanse": nc.summary(),
        "classes": [f.to_dict() for f in nc.findings(clean.y)],
        "triggers": trigger_images(nc, shown),
        "dormant_neurons": result.dormant.summary() if result.dormant is not None else None,
    }
    if margin is not None:
        from poisonguard.audit.combined import margin_layer

        layer["max_margin"] = margin_layer(margin)
    if result.notes:
        layer["notes"] = list(result.notes)
    if repair is not None:
        layer["repair"] = repair
    report = {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "poisonguard", "version": __version__},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "environment": environment(),
        "data": {"fingerprint": clean.fingerprint(), "n_samples": len(clean),
                 "n_classes": clean.n_classes, "sample_shape": list(clean.x.shape[1:]),
                 "dtype": str(clean.x.dtype), "class_counts": clean.class_counts()},
        "verdict": result.verdict,
        "layers": {"model_audit": layer},
        "timings": result.timings,
    }
    from poisonguard.verdict import model_audit_status, set_verdict

    set_verdict(report, {"model_audit": model_audit_status(result.verdict,
                                                           nc.config.threshold)})
    return jsonable(report)
