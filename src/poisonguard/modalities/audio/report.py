"""The audio scan's report (the scan report plus the audio modality's fields) and its files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from poisonguard.modalities.audio import AudioModality
from poisonguard.modalities.audio.scan import AudioScanResult


def build_audio_report(result: AudioScanResult, command: str = "scan",
                       metrics: dict[str, Any] | None = None,
                       truth: np.ndarray | None = None) -> dict[str, Any]:
    """:func:`~poisonguard.report.builder.build_scan_report` with ``data.modality`` "audio",
    ``verdict.triggers`` (``[{"class", "modality": "audio", "band_hz", "time_s", ...}]``) and
    ``plots.audio_evidence`` (flagged clips)."""
    from poisonguard.report.builder import build_scan_report
    from poisonguard.types import jsonable

    n_removed = int(result.flags.sum())
    report = build_scan_report(result, command, metrics=metrics,
                               sanitize_info={"n_removed": n_removed,
                                              "n_kept": len(result.data) - n_removed,
                                              "removed_file": "flagged.csv",
                                              "sanitized_file": "sanitized.npz"})
    report["data"].update(result.audio_info)
    report["data"]["sample_shape"] = [int(result.data.x.shape[1])]
    report["verdict"]["triggers"] = jsonable(result.triggers)
    if result.triggers:
        report["verdict"]["summary"] += "; trigger(s) " + ", ".join(
            f"{t['band_hz'][0]:.0f}-{t['band_hz'][1]:.0f} Hz at {t['time_s'][0]:.2f}-"
            f"{t['time_s'][1]:.2f} s in class {t['class']}" for t in result.triggers)
    report["plots"]["audio_evidence"] = AudioModality().render_evidence(
        result.data, result.flags, result.triggers)
    report["layers"]["quarantine"]["model"]["arch"] = result.train.arch if result.train else None
    if truth is not None:
        report["samples"]["is_poison"] = truth.astype(int).tolist()
    return jsonable(report)


def write_audio_outputs(out: Path, result: AudioScanResult, report: dict[str, Any]) -> None:
    """report.json/html, flagged.csv (id = path relative to ROOT, or the npz id) and
    sanitized.npz (x, lengths, y, ids, sample_rate) into ``out``."""
    from poisonguard.io import (
        atomic_save_npz,
        atomic_write_csv,
        atomic_write_json,
        atomic_write_text,
    )
    from poisonguard.pipeline import sanitize
    from poisonguard.report.html import render_html

    out.mkdir(parents=True, exist_ok=True)
    _, removed = sanitize(result)
    atomic_write_csv(out / "flagged.csv", ["index", "id", "label", "confidence", "detectors"],
                     [[r["index"], str(result.data.ids[r["index"]]), r["label"],
                       r["confidence"], ";".join(r["detectors"])] for r in removed])
    keep = ~result.flags
    d = result.data
    atomic_save_npz(out / "sanitized.npz", x=d.x[keep], lengths=d.lengths[keep], y=d.y[keep],
                    ids=d.ids[keep].astype(str), sample_rate=np.int64(d.sample_rate))
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.html", render_html(report))
