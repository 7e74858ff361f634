"""The HTML report view: self-contained, escaped, robust to optional and unknown sections."""

from __future__ import annotations

import base64
import copy
import re
from typing import Any

import numpy as np
import pytest

from poisonguard.report import plots
from poisonguard.report.html import render_html

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _finding(label: Any, suspicious: bool, n: int, n_flagged: int) -> dict[str, Any]:
    return {"label": label, "suspicious": suspicious, "n_samples": n, "n_flagged": n_flagged,
            "evidence": {"separation": 4.2 if suspicious else 1.1, "sizes": [0.3, 0.7]}}


def make_report(n_classes: int = 3, n: int = 30, metrics: bool = True, retrain: bool = True,
                thumbnails: bool = True, truth: bool = True,
                det_names: tuple[str, ...] = ("activation_clustering", "spectral_signatures"),
                summary: str = "POISONING FOUND: class(es) [0] hold a separable sub-population",
                ) -> dict[str, Any]:
    """A small but schema-complete synthetic scan report."""
    rng = np.random.default_rng(0)
    labels = np.arange(n) % n_classes
    is_poison = (labels == 0) & (np.arange(n) < n // 2)
    flagged = is_poison & (rng.random(n) < 0.8)
    scores = {d: np.round(rng.normal(size=n) + 4 * is_poison, 4).tolist() for d in det_names}
    flags = {d: flagged.astype(int).tolist() for d in det_names}
    counts = {str(c): int((labels == c).sum()) for c in range(n_classes)}

    def det(name: str, threshold: float | None) -> dict[str, Any]:
        return {"name": name, "n_flagged": int(flagged.sum()), "threshold": threshold,
                "threshold_rule": {"rule": "robust z > tail_z", "tail_z": 4.0},
                "params": {"n_components": 10, "seed": 0}, "runtime_s": 0.01,
                "suspicious_classes": [0],
                "findings": [_finding(c, c == 0, counts[str(c)],
                                      int(flagged[labels == c].sum())) for c in range(n_classes)]}

    detectors = [det(d, 4.0 if i == 0 else None) for i, d in enumerate(det_names)]
    classes = [{"label": c, "verdict": "poisoned" if c == 0 else "clean",
                "detectors": list(det_names) if c == 0 else [], "n_samples": counts[str(c)],
                "n_flagged": int(flagged[labels == c].sum()),
                "evidence": {d["name"]: d["findings"][c] for d in detectors}}
               for c in range(n_classes)]
    projections = {str(c): {"index": np.flatnonzero(labels == c).tolist(),
                            "x": rng.normal(size=counts[str(c)]).round(3).tolist(),
                            "y": rng.normal(size=counts[str(c)]).round(3).tolist()}
                   for c in range(n_classes)}
    thumbs = [{"index": int(i), "id": int(i), "label": int(labels[i]), "confidence": 0.5,
               "flagged": bool(flagged[i]), "shape": [8, 8],
               "pixels": rng.integers(0, 256, 64).tolist()} for i in range(8)]
    quarantine: dict[str, Any] = {
        "model": {"sacrificial": True, "layer": "embed", "training": None},
        "detectors": detectors,
        "cross_reference": {**det("cross_reference", None), "params": {}},
        "classes": classes,
    }
    report: dict[str, Any] = {
        "schema_version": "1.0", "tool": {"name": "poisonguard", "version": "0.1.0"},
        "created": "2026-01-01T00:00:00+00:00", "command": "scan",
        "environment": {"python": "3.11", "numpy": "2.0"}, "seeds": {"scan": 0},
        "config": {"seed": 0, "detectors": list(det_names)},
        "data": {"fingerprint": "ab" * 32, "n_samples": n, "n_classes": n_classes,
                 "sample_shape": [8, 8], "dtype": "uint8", "class_counts": counts},
        "verdict": {"poisoning_found": True, "poisoned_classes": [0],
                    "n_flagged": int(flagged.sum()), "summary": summary},
        "layers": {"quarantine": quarantine},
        "samples": {"index": list(range(n)), "id": list(range(n)), "label": labels.tolist(),
                    "scores": scores, "flags": flags, "confidence": [0.0] * n,
                    "flagged": flagged.astype(int).tolist()},
        "plots": {"projections": projections, "thumbnails": thumbs if thumbnails else []},
        "timings": {"total_s": 1.5, "detectors_s": 0.2},
    }
    if truth:
        report["samples"]["is_poison"] = is_poison.astype(int).tolist()
        report["ground_truth"] = {"attack": {"name": "badnets", "rate": 0.1, "target": 0},
                                  "n_poison": int(is_poison.sum())}
    if metrics:
        quarantine["metrics"] = {d: {"precision": 1.0, "recall": 0.8, "f1": 0.889, "fpr": 0.0,
                                     "auroc": 0.95, "n_flagged": int(flagged.sum())}
                                 for d in (*det_names, "cross_reference")}
    if retrain:
        quarantine["retrain"] = {"before": {"clean_accuracy": 0.99, "asr": 0.97},
                                 "after": {"clean_accuracy": 0.985, "asr": 0.05},
                                 "n_train_before": n, "n_train_after": n - int(flagged.sum())}
    return report


def _pngs(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)",
                                                    page)]


def test_full_report_is_self_contained() -> None:
    page = render_html(make_report())
    assert page.startswith("<!DOCTYPE html>")
    assert "POISONING FOUND: class(es) [0] hold a separable sub-population" in page
    pngs = _pngs(page)
    assert len(pngs) == 3 and all(p.startswith(PNG_MAGIC) for p in pngs)
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower() and "<link" not in page.lower()
    for text in ("Against ground truth", "attack success rate", "badnets", "AUROC", "tail_z"):
        assert text in page
    assert "verdict bad" in page


def test_escapes_untrusted_strings() -> None:
    evil = "<script>alert(1)</script>"
    r = make_report(det_names=("activation_clustering", evil), summary=f"found {evil}")
    r["layers"]["quarantine"]["classes"][1]["label"] = evil
    r["data"]["class_counts"][evil] = 3
    page = render_html(r)
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_optional_sections_absent() -> None:
    r = make_report(metrics=False, retrain=False, thumbnails=False, truth=False)
    r["verdict"].update(poisoning_found=False, poisoned_classes=[], summary="no poisoning found")
    page = render_html(r)
    assert page.startswith("<!DOCTYPE html>")
    assert "verdict ok" in page and "no poisoning found" in page
    assert 'id="metrics"' not in page and 'id="retrain"' not in page
    assert "Most suspicious samples" not in page  # no thumbnails: no empty subsection
    assert len(_pngs(page)) == 2


def test_unknown_layer_is_summarised() -> None:
    r = make_report()
    r["layers"]["runtime"] = {"far": 0.01, "entropies": list(range(1000)),
                              "windows": [{"start": i, "alarm": i % 7 == 0} for i in range(200)],
                              "nested": {"a": {"b": {"c": {"d": {"e": {"f": [1, 2]}}}}}}}
    page = render_html(r)
    assert "runtime" in page and "far" in page and "0.01" in page
    assert "1000 values" in page
    assert "998, 999" not in page and "500, 501" not in page
    assert "150 more rows not shown" in page


def test_degenerate_inputs_do_not_raise() -> None:
    r = make_report(n_classes=1, n=10, metrics=False, retrain=False)
    s = r["samples"]
    s["flagged"] = [0] * 10
    s["flags"] = {k: [0] * 10 for k in s["flags"]}
    s["scores"] = {k: [1.0] * 10 for k in s["scores"]}
    r["plots"]["projections"]["0"] = {"index": [], "x": [], "y": []}
    r["plots"]["thumbnails"][0]["shape"] = [3, 8, 8]   # channels-first, wrong size: skipped
    assert render_html(r).startswith("<!DOCTYPE html>")
    empty = copy.deepcopy(r)
    empty["samples"]["scores"] = {"a": [], "b": [float("nan")]}
    empty["plots"] = {"projections": {}, "thumbnails": []}
    page = render_html(empty)
    assert "Per-class 2-D projection" not in page  # nothing to draw: no empty subsection


@pytest.mark.parametrize("shape", [[8, 8], [8, 8, 1], [8, 8, 3], [3, 8, 8]])
def test_thumbnail_shapes(shape: list[int]) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, int(np.prod(shape))).tolist()
    thumb = {"index": 0, "id": 0, "label": 1, "confidence": 0.9, "flagged": True,
             "shape": shape, "pixels": pixels}
    b64 = plots.thumbnail_grid([thumb], is_poison=[1])
    assert b64 is not None and base64.b64decode(b64).startswith(PNG_MAGIC)
    assert plots.thumbnail_grid([]) is None
    assert plots.score_histograms({}, {}) is None
    assert plots.projection_grid({}, None) is None
