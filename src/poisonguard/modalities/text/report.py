"""The text scan's report (the scan report plus the text modality's fields) and its files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from poisonguard.attacks.base import PoisonedData
from poisonguard.modalities.text import flagged_posts
from poisonguard.modalities.text.data import original_labels, write_text_csv
from poisonguard.modalities.text.scan import TextScanResult


def build_text_report(result: TextScanResult, command: str = "scan",
                      poisoned: PoisonedData | None = None,
                      metrics: dict[str, Any] | None = None,
                      truth: np.ndarray | None = None) -> dict[str, Any]:
    """:func:`~poisonguard.report.builder.build_scan_report` with ``data.modality`` "text",
    the label map and truncation counts, ``verdict.triggers`` (``[{"class", "modality",
    "tokens", ...}]``) and ``plots.text_evidence`` (flagged posts, trigger spans marked)."""
    from poisonguard.report.builder import build_scan_report
    from poisonguard.types import jsonable

    n_removed = int(result.flags.sum())
    report = build_scan_report(result, command, poisoned=poisoned, metrics=metrics,
                               sanitize_info={"n_removed": n_removed,
                                              "n_kept": len(result.data) - n_removed,
                                              "removed_file": "flagged.csv",
                                              "sanitized_file": "sanitized.csv"})
    report["data"].update(result.text_info)
    report["data"]["sample_shape"] = []
    report["data"]["dtype"] = "str"
    report["verdict"]["triggers"] = jsonable(result.triggers)
    if result.triggers:
        report["verdict"]["summary"] += "; trigger(s) " + ", ".join(
            f"{' '.join(t['tokens'])!r} in class {t['class']}" for t in result.triggers)
    report["plots"]["text_evidence"] = flagged_posts(result.data, result.flags,
                                                     result.triggers)
    report["layers"]["quarantine"]["model"]["arch"] = result.train.arch if result.train else None
    if truth is not None and poisoned is None:
        report["samples"]["is_poison"] = truth.astype(int).tolist()
    return jsonable(report)


def write_text_outputs(out: Path, result: TextScanResult, report: dict[str, Any]) -> None:
    """report.json/html, flagged.csv (index = 0-based row) and sanitized.csv into ``out``."""
    from poisonguard.io import atomic_write_csv, atomic_write_json, atomic_write_text
    from poisonguard.pipeline import sanitize
    from poisonguard.report.html import render_html

    out.mkdir(parents=True, exist_ok=True)
    sanitized, removed = sanitize(result)
    atomic_write_csv(out / "flagged.csv",
                     ["index", "id", "label", "confidence", "detectors", "text"],
                     [[r["index"], r["id"], r["label"], r["confidence"],
                       ";".join(r["detectors"]), str(result.data.x[r["index"]])]
                      for r in removed])
    write_text_csv(out / "sanitized.csv", sanitized.x.tolist(), original_labels(sanitized),
                   {"id": sanitized.ids.tolist()})
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.html", render_html(report))
