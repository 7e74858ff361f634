"""Build the canonical JSON report (a plain dict) of a quarantine scan."""

from __future__ import annotations

import datetime as _dt
import platform
from typing import Any

import numpy as np

from poisonguard import SCHEMA_VERSION, __version__
from poisonguard.attacks.base import PoisonedData
from poisonguard.types import jsonable

MAX_PROJECTION_PER_CLASS = 1500
N_THUMBNAILS = 48


def environment() -> dict[str, str]:
    import sklearn
    import torch

    return {"python": platform.python_version(), "platform": platform.platform(),
            "numpy": np.__version__, "torch": torch.__version__,
            "scikit-learn": sklearn.__version__}


def _projections(result: Any, seed: int) -> dict[str, Any]:
    """Per class: 2-D PCA of the representations (subsampled, flagged samples kept)."""
    from poisonguard.detect.common import top_principal

    rng = np.random.default_rng(seed)
    out = {}
    for c in np.unique(result.data.y):
        idx = np.flatnonzero(result.data.y == c)
        flagged = idx[result.flags[idx]]
        rest = idx[~result.flags[idx]]
        budget = max(MAX_PROJECTION_PER_CLASS - len(flagged), MAX_PROJECTION_PER_CLASS // 2)
        if len(rest) > budget:
            rest = rng.choice(rest, budget, replace=False)
        if len(flagged) > MAX_PROJECTION_PER_CLASS:
            flagged = rng.choice(flagged, MAX_PROJECTION_PER_CLASS, replace=False)
        keep = np.sort(np.concatenate([flagged, rest]))
        x = result.representations[idx].astype(np.float64)
        mean = x.mean(0)
        comps, _ = top_principal(x - mean, 2)
        xy = (result.representations[keep] - mean) @ comps.T
        if xy.shape[1] < 2:
            xy = np.hstack([xy, np.zeros((len(xy), 2 - xy.shape[1]))])
        out[str(int(c))] = {"index": keep.tolist(), "x": np.round(xy[:, 0], 4).tolist(),
                            "y": np.round(xy[:, 1], 4).tolist()}
    return out


def _thumbnails(result: Any) -> list[dict[str, Any]]:
    x = result.data.x
    if x.ndim not in (3, 4):
        return []
    conf = result.combined.scores
    votes = result.combined.extras.get("votes")
    n_voters = len(result.combined.extras.get("detector_flags") or {})
    order = np.lexsort((-np.abs(result.detectors[0].scores), -conf))[:N_THUMBNAILS]
    thumbs = []
    for i in order:
        img = x[i]
        if img.dtype != np.uint8:
            img = np.clip(img * 255.0, 0, 255).astype(np.uint8)
        thumbs.append({"index": int(i), "id": result.data.ids[i].item(),
                       "label": int(result.data.y[i]), "confidence": float(conf[i]),
                       "votes": None if votes is None else int(votes[i]),
                       "n_detectors": n_voters,
                       "flagged": bool(result.flags[i]), "shape": list(img.shape),
                       "pixels": img.reshape(-1).tolist()})
    return thumbs


def build_scan_report(result: Any, command: str = "scan", poisoned: PoisonedData | None = None,
                      sanitize_info: dict[str, Any] | None = None,
                      retrain: dict[str, Any] | None = None,
                      metrics: dict[str, Any] | None = None,
                      extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The canonical report of a scan (see README, "Report schema")."""
    data = result.data
    combined = result.combined
    per_det = combined.extras["detector_flags"]
    classes = []
    for f in combined.findings:
        det_evidence = {r.name: next((x.to_dict() for x in r.findings if x.label == f.label),
                                     None) for r in result.detectors}
        why = [f"{name}: {ev['evidence'].get('reason', 'called the class suspicious')}"
               for name, ev in det_evidence.items()
               if ev is not None and ev["suspicious"]]
        classes.append({"label": f.label, "verdict": f.evidence["verdict"],
                        "detectors": f.evidence["detectors"], "why": why,
                        "n_samples": f.n_samples, "n_flagged": f.n_flagged,
                        "evidence": det_evidence})
    poisoned_classes = combined.suspicious_classes
    n_flagged = int(result.flags.sum())
    wide = [r.name for r in result.detectors if r.extras.get("dataset_wide")]
    dataset_wide = None
    if wide:
        dataset_wide = {"detectors": wide, "message": (
            "most classes hold a sub-population the detectors set apart: the whole dataset "
            "looks poisoned in the way all-to-all attacks poison it (a minority of every "
            "class)")}
    if wide and not poisoned_classes:
        summary = (f"SUSPICIOUS: {dataset_wide['message']}; {n_flagged} of {len(data)} "
                   "samples flagged")
    elif poisoned_classes:
        summary = (f"POISONING FOUND: class(es) {poisoned_classes} hold a separable "
                   f"sub-population; {n_flagged} of {len(data)} samples flagged"
                   + (f"; {dataset_wide['message']}" if dataset_wide else ""))
    elif n_flagged:
        summary = (f"no class judged poisoned; {n_flagged} isolated samples flagged by several "
                   "detectors for review")
    else:
        summary = "no poisoning found"
    train_info = None
    if result.train is not None:
        train_info = {"arch": result.train.arch, "arch_kwargs": result.train.arch_kwargs,
                      "config": result.train.config.to_dict(), "history": result.train.history,
                      "wall_s": round(result.train.wall_s, 3)}
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "poisonguard", "version": __version__},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "environment": environment(),
        "seeds": {"scan": result.config.seed},
        "config": result.config.to_dict(),
        "data": {"fingerprint": data.fingerprint(), "n_samples": len(data),
                 "n_classes": data.n_classes, "sample_shape": list(data.x.shape[1:]),
                 "dtype": str(data.x.dtype), "class_counts": data.class_counts()},
        "verdict": {"poisoning_found": bool(poisoned_classes or dataset_wide),
                    "poisoned_classes":
                    poisoned_classes, "n_flagged": n_flagged, "summary": summary,
                    "dataset_wide": dataset_wide},
        "layers": {
            "quarantine": {
                "model": {"sacrificial": result.train is not None, "layer":
                          result.classifier.layer, "training": train_info},
                "detectors": [r.summary() for r in result.detectors],
                "skipped_detectors": dict(getattr(result, "skipped", {})),
                "cross_reference": combined.summary(),
                "classes": classes,
            },
        },
        "samples": {
            "index": list(range(len(data))),
            "id": data.ids.tolist(),
            "label": data.y.tolist(),
            "scores": {r.name: np.round(r.scores, 4).tolist() for r in result.detectors},
            "flags": {n: f.astype(int).tolist() for n, f in per_det.items()},
            "confidence": np.round(combined.scores, 4).tolist(),
            "flagged": result.flags.astype(int).tolist(),
        },
        "plots": {"projections": _projections(result, result.config.seed),
                  "thumbnails": _thumbnails(result)},
        "timings": dict(result.timings),
    }
    if sanitize_info is not None:
        report["layers"]["quarantine"]["sanitize"] = sanitize_info
    if retrain is not None:
        report["layers"]["quarantine"]["retrain"] = {k: v for k, v in retrain.items()
                                                     if not k.startswith("_")}
    if poisoned is not None:
        report["ground_truth"] = {"attack": poisoned.attack,
                                  "n_poison": int(poisoned.is_poison.sum())}
        report["samples"]["is_poison"] = poisoned.is_poison.astype(int).tolist()
    if metrics is not None:
        report["layers"]["quarantine"]["metrics"] = metrics
    if extra:
        report.update(extra)
    from poisonguard.verdict import quarantine_status, set_verdict

    set_verdict(report, {"quarantine": quarantine_status(report["verdict"], len(data))})
    return jsonable(report)


def build_training_report(result: Any, data: Any, command: str = "train",
                          evaluation: dict[str, Any] | None = None,
                          metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """The canonical report of a guarded training run (layer ``guarded_training``)."""
    guard = result.config
    layer: dict[str, Any] = {
        "defense": guard.defense, "config": guard.to_dict(),
        "train_config": result.train.config.to_dict(), "history": result.train.history,
        "wall_s": round(result.wall_s, 3), "info": result.info,
    }
    suspects = result.suspects()
    if result.drop_counts is not None:
        layer["trim"] = {"fraction": result.trim_fraction,
                         "samples_ever_dropped": int((result.drop_counts > 0).sum()),
                         "max_drops": int(result.drop_counts.max(initial=0))}
    if result.isolated is not None:
        layer["abl"] = {"n_isolated": int(result.isolated.sum()),
                        "isolated_index": np.flatnonzero(result.isolated).tolist()}
    if result.monitor is not None:
        layer["gradient_monitor"] = result.monitor.summary()
    if evaluation is not None:
        layer["evaluation"] = evaluation
    if metrics is not None:
        layer["metrics"] = metrics
    n_sus = 0 if suspects is None else int(suspects.sum())
    summary = (f"{guard.defense} training; {n_sus} sample(s) singled out"
               + (" (isolated)" if result.isolated is not None else ""))
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "poisonguard", "version": __version__},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command, "environment": environment(),
        "seeds": {"train": result.train.config.seed},
        "config": guard.to_dict(),
        "data": {"fingerprint": data.fingerprint(), "n_samples": len(data),
                 "n_classes": data.n_classes, "sample_shape": list(data.x.shape[1:]),
                 "dtype": str(data.x.dtype), "class_counts": data.class_counts()},
        "verdict": {"poisoning_found": bool(result.monitor is not None
                                            and result.monitor.suspicious_classes),
                    "poisoned_classes": (result.monitor.suspicious_classes
                                         if result.monitor is not None else []),
                    "n_flagged": n_sus, "summary": summary},
        "layers": {"guarded_training": layer},
        "timings": {"training_s": round(result.wall_s, 3)},
    }
    from poisonguard.verdict import guarded_training_status, set_verdict

    status = guarded_training_status(jsonable(layer))
    report["verdict"]["poisoning_found"] = status["status"] != "clean"
    if status["status"] != "clean":
        report["verdict"]["summary"] = f"{summary}: {status['summary']}"
    set_verdict(report, {"guarded_training": status})
    return jsonable(report)
