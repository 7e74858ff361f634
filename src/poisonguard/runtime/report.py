"""The ``runtime`` layer of a report (STRIP over a dataset) and its entropy-histogram plot."""

from __future__ import annotations

import datetime as _dt
import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from poisonguard import SCHEMA_VERSION, __version__
from poisonguard.runtime.strip import StripFilter, StripResult, histogram, score_edges
from poisonguard.types import jsonable


def method_text(filt: Any) -> str:
    """What the filter does, in a sentence, for the report."""
    if isinstance(filt, StripFilter):
        return ("STRIP (Gao et al. 2019): a prediction that survives blending with clean "
                f"inputs is suspicious (blend {filt.config.blend}, statistic "
                f"{_statistics(filt)})")
    texts = {"scale-up": "SCALE-UP (Guo et al. 2023): prediction consistency when pixel "
                         "values are amplified",
             "ibd-psc": "IBD-PSC (Hou et al. 2024): prediction consistency when the model's "
                        "batch-norm layers are amplified",
             "feature": "feature-space distance (Mahalanobis) of the representation to the "
                        "clean inputs of the predicted class"}
    names = filt.name.split("+")
    return "; ".join(method_text(f) if not isinstance(f, str) else texts[f] for f in
                     ([*getattr(filt, "filters", [])] or names)) + \
        ("" if len(names) == 1 else " (union: flagged when any fires)")


def _target_frr(filt: Any) -> float:
    if isinstance(filt, StripFilter):
        return float(filt.config.target_frr)
    return float(filt.describe().get("target_frr") or 0.0)


def runtime_layer(filt: Any, result: StripResult,
                  evaluation: dict[str, Any] | None = None) -> dict[str, Any]:
    ent = result.entropy
    edges = score_edges(result.score)
    sus_pred = np.bincount(result.prediction[result.suspicious]) if result.suspicious.any() \
        else np.zeros(0, dtype=int)
    layer: dict[str, Any] = {
        "method": method_text(filt),
        "calibration": filt.describe(),
        "n_screened": int(len(ent)), "n_suspicious": int(result.suspicious.sum()),
        "suspicious_fraction": float(result.suspicious.mean()) if len(ent) else 0.0,
        "suspicious_by_prediction": {str(k): int(n) for k, n in enumerate(sus_pred) if n},
        "threshold": result.threshold,
        "score_histogram": {"edges": np.round(edges, 5).tolist(),
                            "counts": histogram(result.score, edges)},
        "flags_file": "flags.csv",
    }
    if evaluation is not None:
        layer["evaluation"] = evaluation
    return layer


def build_filter_report(filt: Any, x: np.ndarray, result: StripResult,
                        evaluation: dict[str, Any] | None, timings: dict[str, float],
                        command: str = "filter") -> dict[str, Any]:
    from poisonguard.report.builder import environment
    from poisonguard.verdict import runtime_status, set_verdict

    n_sus = int(result.suspicious.sum())
    frr = _target_frr(filt)
    if isinstance(filt, StripFilter):
        summary = (f"{n_sus} of {len(x)} inputs flagged by STRIP ({filt.config.blend}, "
                   f"{_statistics(filt)}; calibrated at {frr:.1%} FRR)")
    else:
        summary = f"{n_sus} of {len(x)} inputs flagged by {filt.name} (calibrated at {frr:.1%} FRR)"
    layer = runtime_layer(filt, result, evaluation)
    report = jsonable({
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "poisonguard", "version": __version__},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command, "environment": environment(),
        "seeds": {"strip": filt.config.seed} if isinstance(filt, StripFilter) else {},
        "config": filt.config.to_dict() if isinstance(filt, StripFilter) else filt.describe(),
        "data": {"fingerprint": hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest(),
                 "n_samples": int(len(x)), "sample_shape": list(x.shape[1:]),
                 "dtype": str(x.dtype)},
        "verdict": {"poisoning_found": bool(n_sus), "poisoned_classes": [], "n_flagged": n_sus,
                    "summary": summary},
        "layers": {"runtime": layer},
        "timings": timings,
    })
    status = runtime_status(layer, frr, len(x))
    status["summary"] = status["summary"].replace("training inputs", "inputs")
    return set_verdict(report, {"runtime": status})


def entropy_plot(layer: Mapping[str, Any]) -> str | None:
    """Base64 PNG: score histograms (screened data; clean vs triggered when evaluated) with the
    threshold at 0; None when the layer has no histogram."""
    from poisonguard.report.plots import fig_to_base64, plt

    panels = []
    h = layer.get("score_histogram")
    if isinstance(h, Mapping) and h.get("edges") and h.get("counts"):
        panels.append(("screened inputs", h["edges"], {"inputs": h["counts"]}))
    ev = layer.get("evaluation")
    if isinstance(ev, Mapping) and isinstance(ev.get("histogram"), Mapping):
        eh = ev["histogram"]
        if eh.get("edges"):
            panels.append(("clean vs triggered test inputs", eh["edges"],
                           {"clean": eh.get("clean") or [], "triggered": eh.get("triggered")
                            or []}))
    if not panels:
        return None
    thr = 0.0
    colours = {"inputs": "#1f77b4", "clean": "#8c8c8c", "triggered": "#d62728"}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.2), squeeze=False)
    for ax, (title, edges, series) in zip(axes[0], panels):
        e = np.asarray(edges, dtype=float)
        for name, counts in series.items():
            if len(counts) == len(e) - 1:
                ax.stairs(counts, e, fill=True, alpha=0.5, label=name, color=colours[name])
        if isinstance(thr, (int, float)) and np.isfinite(thr):
            ax.axvline(thr, color="k", ls="--", lw=1, label=f"threshold {thr:.3g}")
        ax.set_xlabel("score: test statistic minus its threshold (> 0 flagged)")
        ax.set_ylabel("inputs")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    return fig_to_base64(fig)


def runtime_section(r: Mapping[str, Any]) -> str:
    """The HTML section of the ``runtime`` layer (empty when the report has none)."""
    from poisonguard.report.html import _img, _value

    rt = (r.get("layers") or {}).get("runtime")
    if not isinstance(rt, Mapping):
        return ""
    hist = ("score_histogram", "histogram")
    rest = {k: ({kk: vv for kk, vv in x.items() if kk not in hist} if isinstance(x, Mapping)
                else x) for k, x in rt.items() if k not in hist}
    for sub in ("calibration",):
        if isinstance(rest.get(sub), Mapping) and "clean_entropy" in rest[sub]:
            ce = dict(rest[sub]["clean_entropy"])
            ce.pop("histogram", None)
            cs = {k: {kk: vv for kk, vv in v.items() if kk != "histogram"}
                  for k, v in (rest[sub].get("clean_stats") or {}).items()
                  if isinstance(v, Mapping)}
            rest[sub] = {**rest[sub], "clean_entropy": ce, "clean_stats": cs}
    return ('<section id="runtime"><h2>Runtime filter (STRIP)</h2>'
            '<p class="muted">Inputs whose score (a test statistic under blending minus its '
            "threshold, calibrated on clean inputs) is above the dashed line at 0 are "
            "flagged.</p>"
            f"{_img(entropy_plot(rt), 'score histograms', 'No score histogram.')}"
            f"{_value(rest)}</section>")


def _statistics(filt: StripFilter) -> str:
    """Each test's statistic, e.g. ``cut: probability, mix: log-odds``."""
    return ", ".join(f"{t}: {filt.config.statistic_for(t)}" for t in filt.config.tests)
