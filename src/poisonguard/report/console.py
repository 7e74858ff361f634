"""Console summary rendered from the canonical JSON report."""

from __future__ import annotations

from typing import Any


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), line]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells[1:]]
    return "\n".join(out)


def render_console(report: dict[str, Any]) -> str:
    """A short plain-text summary: verdict, per-class table, per-detector metrics, timings."""
    v = report["verdict"]
    data = report["data"]
    lines = [f"poisonguard {report['tool']['version']} — {report['command']} of "
             f"{data['n_samples']} samples, {data['n_classes']} classes "
             f"(sha256 {data['fingerprint'][:12]}…)",
             f"VERDICT: {v['summary']}", ""]
    q = report.get("layers", {}).get("quarantine")
    if q:
        det_names = [d["name"] for d in q["detectors"]]
        rows = []
        for c in q["classes"]:
            marks = ["x" if (c["evidence"].get(n) or {}).get("suspicious") else "."
                     for n in det_names]
            rows.append([c["label"], c["n_samples"], *marks, c["verdict"], c["n_flagged"]])
        short = [n.replace("activation_clustering", "AC").replace("spectral_signatures", "SS")
                 .replace("loss_outliers", "loss").replace("trigger_template", "template")
                 for n in det_names]
        lines += ["Per class (x = detector calls the class suspicious):",
                  _table(["class", "n", *short, "verdict", "flagged"], rows), ""]
        if "metrics" in q:
            rows = [[name, m.get("precision"), m.get("recall"), m.get("f1"), m.get("fpr"),
                     m.get("auroc"), m.get("n_flagged")] for name, m in q["metrics"].items()]
            lines += ["Against ground truth:",
                      _table(["detector", "precision", "recall", "F1", "FPR", "AUROC",
                              "flagged"], rows), ""]
        rt = q.get("retrain")
        if rt:
            b, a = rt["before"], rt["after"]
            lines += ["Sanitise and retrain:",
                      _table(["model", "train size", "clean acc", "ASR"],
                             [["as given", rt["n_train_before"], b["clean_accuracy"], b["asr"]],
                              ["sanitised", rt["n_train_after"], a["clean_accuracy"],
                               a["asr"]]]
                             + ([["flagged unlearned", rt.get("n_train_unlearned"),
                                  rt["unlearned"]["clean_accuracy"], rt["unlearned"]["asr"]]]
                                if rt.get("unlearned") else [])), ""]
    t = report.get("timings", {})
    if t:
        lines.append("Timings: " + ", ".join(f"{k} {_fmt(val)}" for k, val in t.items()))
    return "\n".join(lines)
