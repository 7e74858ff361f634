"""The tabular scan's report (the scan report plus the tabular modality's fields) and its
files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from poisonguard.modalities.tabular import TabularModality
from poisonguard.modalities.tabular.attacks import write_tabular_csv
from poisonguard.modalities.tabular.scan import TabularScanResult


def build_tabular_report(result: TabularScanResult, command: str = "scan",
                         metrics: dict[str, Any] | None = None,
                         truth: np.ndarray | None = None) -> dict[str, Any]:
    """:func:`~poisonguard.report.builder.build_scan_report` with ``data.modality``
    "tabular", the columns, encodings and missing counts, ``verdict.triggers`` (``[{"class",
    "label", "modality": "tabular", "rule", "conditions": [{"column", "op", "value"}], ...}]``)
    and ``plots.tabular_evidence`` (flagged rows in the file's values)."""
    from poisonguard.report.builder import build_scan_report
    from poisonguard.types import jsonable

    n_removed = int(result.flags.sum())
    report = build_scan_report(result, command, metrics=metrics,
                               sanitize_info={"n_removed": n_removed,
                                              "n_kept": len(result.data) - n_removed,
                                              "removed_file": "flagged.csv",
                                              "sanitized_file": "sanitized.csv"})
    report["data"].update(result.tabular_info)
    report["verdict"]["triggers"] = jsonable(result.triggers)
    if result.triggers:
        report["verdict"]["summary"] += "; trigger rule(s) " + ", ".join(
            f"{t['rule']} in class {t['label']!r}" for t in result.triggers)
    report["plots"]["tabular_evidence"] = TabularModality().render_evidence(
        result.data, result.flags, result.triggers)
    report["layers"]["quarantine"]["model"]["arch"] = result.train.arch if result.train else None
    if truth is not None:
        report["samples"]["is_poison"] = truth.astype(int).tolist()
    return jsonable(report)


def write_tabular_outputs(out: Path, result: TabularScanResult, report: dict[str, Any],
                          label_column: str = "label", id_column: str | None = None) -> None:
    """report.json/html, flagged.csv (``index`` = 0-based data row; the rule that flagged it)
    and sanitized.csv (the kept rows in the file's values) into ``out``."""
    from poisonguard.io import atomic_write_csv, atomic_write_json, atomic_write_text
    from poisonguard.pipeline import sanitize
    from poisonguard.report.html import render_html

    out.mkdir(parents=True, exist_ok=True)
    sanitized, removed = sanitize(result)
    rules = {int(t["class"]): t["rule"] for t in result.triggers}
    atomic_write_csv(out / "flagged.csv",
                     ["index", "id", "label", "confidence", "detectors", "rule"],
                     [[r["index"], r["id"], result.data.original_label(r["label"]),
                       r["confidence"], ";".join(r["detectors"]), rules.get(r["label"], "")]
                      for r in removed])
    write_tabular_csv(out / "sanitized.csv", sanitized, label_column, id_column)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.html", render_html(report))
