"""Self-contained HTML view (inline CSS, base64 PNG plots) rendered from the canonical report."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from itertools import islice
from typing import Any

from poisonguard.report import plots

KNOWN_TOP = {"schema_version", "tool", "created", "command", "environment", "seeds", "config",
             "data", "verdict", "layers", "samples", "plots", "timings", "ground_truth",
             "profile", "inputs", "cross_layer"}
LAYER_TITLES = {"provenance": "Provenance", "quarantine": "Quarantine scan",
                "guarded_training": "Guarded training", "model_audit": "Model audit",
                "runtime": "Runtime filter"}
BANNER_CLASS = {"clean": "ok", "suspicious": "warn", "compromised": "bad"}
KNOWN_QUARANTINE = {"model", "detectors", "cross_reference", "classes", "metrics", "retrain",
                    "sanitize"}
SECTIONS = (("layers", "Layers"), ("cross_layer", "Cross-layer evidence"), ("data", "Data"),
            ("classes", "Classes"), ("metrics", "Metrics"),
            ("retrain", "Sanitise/retrain"), ("plots", "Plots"), ("detectors", "Detectors"),
            ("model_audit", "Model audit"), ("runtime", "Runtime filter"),
            ("other", "Other layers"), ("run", "Run"))
MAX_INLINE = 16      # scalar lists up to this length are shown in full
MAX_ROWS = 50        # rows shown of a generic table
MAX_COLS = 12        # columns shown of a generic table
MAX_DEPTH = 5        # nesting rendered as tables; deeper levels as short JSON
MAX_STR = 2000       # characters shown of one string
FOLD_ROWS = 10       # generic tables longer than this are folded into <details>

CSS = """
body{font:14px/1.45 -apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;color:#222;
 margin:0;background:#f4f5f7}
main{max-width:1180px;margin:0 auto;padding:16px 24px 48px;background:#fff}
h1{font-size:22px;margin:8px 0 4px}h2{font-size:18px;margin:28px 0 8px;
 border-bottom:2px solid #e3e5e8;padding-bottom:4px}h3{font-size:15px;margin:18px 0 6px}
.meta{color:#555;font-size:13px}.meta code{font-size:12px}
.verdict{margin:14px 0;padding:12px 16px;border-radius:6px;color:#fff}
.verdict.bad{background:#c62828}.verdict.ok{background:#2e7d32}
.verdict strong{font-size:17px}.verdict p{margin:4px 0 0}
nav a{margin-right:12px;font-size:13px;color:#1565c0;text-decoration:none}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px}
th,td{border:1px solid #dde0e4;padding:3px 8px;text-align:left;vertical-align:top}
thead th{background:#eef0f3}table.kv th{background:#f7f8fa;font-weight:600;white-space:nowrap}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.poisoned td{background:#fdecea}tr.poisoned td:first-child{border-left:4px solid #c62828}
tr.strong td{font-weight:600}td.hit{color:#c62828;font-weight:600}
.muted{color:#888}.chips span{display:inline-block;margin:2px 4px 2px 0;padding:1px 8px;
 border-radius:10px;background:#eef0f3;font-size:12px}.chips span.bad{background:#fdecea;
 color:#c62828;font-weight:600}
.row{display:flex;flex-wrap:wrap;gap:24px}.row>div{min-width:220px}
img.plot{max-width:100%;height:auto;border:1px solid #eee;margin:4px 0}
details{margin:6px 0}summary{cursor:pointer;color:#1565c0}
code{background:#f3f4f6;padding:0 3px;border-radius:3px}
.det{border-left:3px solid #e3e5e8;padding-left:12px;margin:14px 0}
.verdict.warn{background:#b26a00}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:10px 0}
.card{flex:1 1 200px;border:1px solid #dde0e4;border-top:5px solid #9e9e9e;border-radius:6px;
 padding:8px 12px;font-size:13px}.card h3{margin:2px 0 4px;font-size:14px}
.card.clean{border-top-color:#2e7d32}.card.suspicious,.card.error{border-top-color:#b26a00}
.card.compromised{border-top-color:#c62828}.card.skipped{background:#fafafa;color:#666}
.card .status{font-weight:700;text-transform:uppercase;font-size:12px}
.card ul{margin:4px 0;padding-left:18px}
"""


# ----------------------------------------------------------------------------- formatting
def _e(value: Any) -> str:
    """HTML-escape the text of ``value``."""
    return html.escape(str(value), quote=True)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fmt(v: Any, digits: int = 4) -> str:
    """A short plain-text rendering of a scalar."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v.is_integer() and abs(v) < 1e15:
            return str(int(v))
        return f"{v:.{digits}g}"
    s = str(v)
    return s if len(s) <= MAX_STR else s[:MAX_STR] + f"… ({len(s)} characters)"


def _metric(v: Any) -> str:
    return f"{v:.3f}" if _is_num(v) and math.isfinite(v) else _fmt(v)


def _td(v: Any, digits: int = 4) -> str:
    cls = ' class="num"' if _is_num(v) else ""
    return f"<td{cls}>{_e(_fmt(v, digits))}</td>"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]],
           row_classes: Sequence[str] | None = None) -> str:
    """A table from escaped header text and pre-rendered ``<td>`` cells."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for i, cells in enumerate(rows):
        cls = row_classes[i] if row_classes and row_classes[i] else ""
        attr = f' class="{cls}"' if cls else ""
        body.append(f"<tr{attr}>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _short_json(v: Any, limit: int = 200) -> str:
    try:
        s = json.dumps(v, default=str)
    except (TypeError, ValueError):
        s = str(v)
    return s if len(s) <= limit else s[:limit] + "…"


def _value(v: Any, depth: int = 0) -> str:
    """Generic HTML for any JSON value; long arrays are summarised, never dumped."""
    if isinstance(v, Mapping):
        if not v:
            return '<span class="muted">(empty)</span>'
        if depth >= MAX_DEPTH:
            return f"<code>{_e(_short_json(v))}</code>"
        rows = "".join(f"<tr><th>{_e(k)}</th><td>{_value(x, depth + 1)}</td></tr>"
                       for k, x in islice(v.items(), MAX_ROWS))
        more = (f'<div class="muted">… {len(v) - MAX_ROWS} more entries</div>'
                if len(v) > MAX_ROWS else "")
        return f'<table class="kv">{rows}</table>{more}'
    if isinstance(v, (list, tuple)):
        return _list(v, depth)
    return _e(_fmt(v))


def _list(v: Sequence[Any], depth: int) -> str:
    if not v:
        return '<span class="muted">(none)</span>'
    if not any(isinstance(x, (Mapping, list, tuple)) for x in v):
        if len(v) <= MAX_INLINE:
            return _e(", ".join(_fmt(x) for x in v))
        nums = [float(x) for x in v if _is_num(x) and math.isfinite(x)]
        if len(nums) == len(v):
            return _e(f"{len(v)} values (min {_fmt(min(nums))}, mean "
                      f"{_fmt(sum(nums) / len(nums))}, max {_fmt(max(nums))})")
        return _e(", ".join(_fmt(x) for x in v[:8]) + f", … ({len(v)} items)")
    if all(isinstance(x, Mapping) for x in v) and depth < MAX_DEPTH:
        keys: list[str] = []
        for d in v[:MAX_ROWS]:
            keys += [k for k in d if k not in keys]
        shown = keys[:MAX_COLS]
        rows = [[f"<td>{_value(d.get(k), depth + 1)}</td>" for k in shown] for d in v[:MAX_ROWS]]
        out = _table([str(k) for k in shown], rows)
        notes = []
        if len(v) > MAX_ROWS:
            notes.append(f"{len(v) - MAX_ROWS} more rows not shown")
        if len(keys) > MAX_COLS:
            notes.append(f"{len(keys) - MAX_COLS} more columns not shown")
        if notes:
            out += f'<div class="muted">… {_e("; ".join(notes))}</div>'
        if len(v) > FOLD_ROWS:
            out = f"<details><summary>{len(v)} rows</summary>{out}</details>"
        return out
    if depth >= MAX_DEPTH:
        return f"<code>{_e(_short_json(v))}</code>"
    items = "".join(f"<li>{_value(x, depth + 1)}</li>" for x in v[:MAX_ROWS])
    more = f'<div class="muted">… {len(v) - MAX_ROWS} more items</div>' if len(v) > MAX_ROWS else ""
    return f"<ol>{items}</ol>{more}"


def _img(b64: str | None, alt: str, missing: str) -> str:
    if not b64:
        return f'<p class="muted">{_e(missing)}</p>'
    return f'<img class="plot" alt="{_e(alt)}" src="data:image/png;base64,{b64}">'


# ----------------------------------------------------------------------------- sections
def _overall_banner(v: Mapping[str, Any]) -> str:
    """The banner of a schema-2 report: verdict.overall, reflecting every layer."""
    overall = str(v.get("overall"))
    layers = v.get("layers") or {}
    ran = [k for k, x in layers.items() if isinstance(x, Mapping)
           and x.get("status") != "skipped"]
    skipped = [k for k in layers if k not in ran]
    detail = (f"layers run: {', '.join(ran) or 'none'}"
              + (f"; skipped: {', '.join(skipped)}" if skipped else ""))
    if v.get("summary") and v.get("summary") != v.get("overall_summary"):
        detail = f"{v['summary']}. {detail}"
    return (f'<div class="verdict {BANNER_CLASS.get(overall, "warn")}"><strong>'
            f"{_e(_fmt(v.get('overall_summary') or overall.upper()))}</strong>"
            f"<p>{_e(detail)}</p></div>")


def _key_numbers(entry: Mapping[str, Any]) -> str:
    nums = entry.get("key_numbers") or {}
    items = []
    for k, x in nums.items():
        if x is None or x == []:
            continue
        if "class" in k:  # "class 0", never a bare 0 that reads as "none"
            x = [f"class {i}" for i in x] if isinstance(x, list) else f"class {x}"
        shown = ", ".join(_fmt(i) for i in x) if isinstance(x, list) else _fmt(x)
        items.append(f"<li>{_e(k.replace('_', ' '))}: <b>{_e(shown)}</b></li>")
    return f"<ul>{''.join(items[:4])}</ul>" if items else ""


def _card_evidence(r: Mapping[str, Any], name: str, entry: Mapping[str, Any]) -> str:
    """The strongest evidence of a layer: changed sources, the flagged classes' counts, the
    reversed trigger of the target class."""
    items = [str(x) for x in entry.get("evidence") or []]
    layer = (r.get("layers") or {}).get(name) or {}
    if name == "quarantine" and entry.get("status") in ("suspicious", "compromised"):
        for c in layer.get("classes") or []:
            if c.get("n_flagged"):
                items.append(f"class {c.get('label')}: {c.get('n_flagged')} of "
                             f"{c.get('n_samples')} flagged ({c.get('verdict')})")
    out = ""
    if items:
        out = "<ul>" + "".join(f"<li>{_e(i)}</li>" for i in items[:5]) + "</ul>"
    if name == "model_audit" and entry.get("status") == "compromised":
        from poisonguard.audit.html_section import trigger_figure

        target = (entry.get("key_numbers") or {}).get("target_class")
        shown = [t for t in layer.get("triggers") or [] if t.get("class") == target]
        png = trigger_figure(shown[:1]) if shown else None
        if png:
            out += _img(png, f"reversed trigger of class {target}", "")
    return out


def layer_cards(r: Mapping[str, Any]) -> str:
    """One card per layer: status, summary, key numbers, reason."""
    layers = (r.get("verdict") or {}).get("layers") or {}
    cards = []
    for name, entry in layers.items():
        if not isinstance(entry, Mapping):
            continue
        status = str(entry.get("status"))
        cards.append(f'<div class="card {_e(status)}"><h3>{_e(LAYER_TITLES.get(name, name))}'
                     f'</h3><div class="status">{_e(status)}</div>'
                     f"<div>{_e(_fmt(entry.get('summary')))}</div>{_key_numbers(entry)}"
                     f"{_card_evidence(r, name, entry)}"
                     f'<div class="muted">{_e(_fmt(entry.get("reason")))}</div></div>')
    if not cards:
        return ""
    return f'<section id="layers"><h2>Layers</h2><div class="cards">{"".join(cards)}</div>' \
           "</section>"


def _cross_layer_section(r: Mapping[str, Any]) -> str:
    checks = [c for c in r.get("cross_layer") or [] if isinstance(c, Mapping)]
    if not checks:
        return ""
    rows = []
    for c in checks:
        agree = c.get("agree")
        mark = "agree" if agree is True else ("disagree" if agree is False else "n/a")
        rows.append([f"<td>{_e(_fmt(c.get('check')))}</td>",
                     f'<td class="{"hit" if agree is False else ""}">{mark}</td>',
                     f"<td>{_e(_fmt(c.get('detail')))}</td>"])
    return ('<section id="cross_layer"><h2>Cross-layer evidence</h2>'
            '<p class="muted">Where two layers speak about the same thing: agreement raises '
            "confidence, disagreement is shown.</p>"
            f"{_table(['check', 'layers agree?', 'detail'], rows)}</section>")


def banner_and_cards(r: Mapping[str, Any]) -> str:
    """The verdict banner and layer cards alone (with the page's CSS), for notebooks."""
    v = r.get("verdict") or {}
    banner = _overall_banner(v) if "overall" in v else _header(r)
    return f"<div><style>{CSS}</style>{banner}{layer_cards(r)}{_cross_layer_section(r)}</div>"


def _header(r: Mapping[str, Any]) -> str:
    tool = r.get("tool") or {}
    v = r.get("verdict") or {}
    bad = bool(v.get("poisoning_found") or v.get("backdoored"))
    data = r.get("data") or {}
    summary = v.get("summary") or ("POISONING FOUND" if bad else "no poisoning found")
    details = [f"{_fmt(v.get('n_flagged'))} of {_fmt(data.get('n_samples'))} samples flagged"]
    if "backdoored" in v:  # model audit
        details = [f"target class {_fmt(v.get('target_class'))}, confidence "
                   f"{_fmt(v.get('confidence'))}; {_fmt(data.get('n_samples'))} clean samples"]
    if v.get("poisoned_classes"):
        details.insert(0, "poisoned class(es): "
                       + ", ".join(_fmt(c) for c in v["poisoned_classes"]))
    if "overall" in v:
        banner = _overall_banner(v)
    else:  # schema 1 reports
        banner = (f'<div class="verdict {"bad" if bad else "ok"}"><strong>'
                  f"{_e(_fmt(summary))}</strong><p>{_e('; '.join(details))}</p></div>")
    profile = (r.get("profile") or {}).get("name")
    return (f"<header><h1>{_e(tool.get('name', 'poisonguard'))} report</h1>"
            f'<div class="meta">version <code>{_e(_fmt(tool.get("version")))}</code> · '
            f"command <code>{_e(_fmt(r.get('command')))}</code>"
            + (f" · profile <code>{_e(profile)}</code>" if profile else "")
            + f" · created {_e(_fmt(r.get('created')))} · schema "
            f"{_e(_fmt(r.get('schema_version')))}</div>{banner}</header>")


def _data_section(r: Mapping[str, Any]) -> str:
    d = r.get("data") or {}
    poisoned = {str(c) for c in (r.get("verdict") or {}).get("poisoned_classes") or []}
    shape = d.get("sample_shape")
    info = {"samples": d.get("n_samples"), "classes": d.get("n_classes"),
            "sample shape": " × ".join(str(s) for s in shape) if shape else "(scalar)",
            "dtype": d.get("dtype"), "fingerprint (sha256)": d.get("fingerprint")}
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(_fmt(x))}</td></tr>" for k, x in info.items())
    counts = d.get("class_counts") or {}
    chips = "".join(f'<span class="{"bad" if str(k) in poisoned else ""}">{_e(k)}: '
                    f"{_e(_fmt(n))}</span>" for k, n in counts.items())
    return (f'<section id="data"><h2>Data</h2><table class="kv">{rows}</table>'
            f'<h3>Class counts</h3><div class="chips">{chips or "–"}</div></section>')


def _true_poison_per_class(samples: Mapping[str, Any]) -> dict[str, int] | None:
    isp, labels = samples.get("is_poison"), samples.get("label")
    if not isp or not labels:
        return None
    out: dict[str, int] = {}
    for lab, p in zip(labels, isp):
        if p:
            out[str(lab)] = out.get(str(lab), 0) + 1
    return out


def _classes_section(r: Mapping[str, Any]) -> str:
    q = (r.get("layers") or {}).get("quarantine") or {}
    classes = q.get("classes") or []
    if not classes:
        return ""
    names = [d.get("name", "?") for d in q.get("detectors") or []]
    poisoned = {str(c) for c in (r.get("verdict") or {}).get("poisoned_classes") or []}
    truth = _true_poison_per_class(r.get("samples") or {})
    header = ["class", "n", *names, "cross-reference", "flagged"]
    if truth is not None:
        header.append("true poison")
    rows, row_cls = [], []
    for c in classes:
        cells = [f"<td>{_e(_fmt(c.get('label')))}</td>", _td(c.get("n_samples"))]
        ev = c.get("evidence") or {}
        for n in names:
            f = ev.get(n) or {}
            mark = "●" if f.get("suspicious") else "·"
            cls = "hit" if f.get("suspicious") else "muted"
            cells.append(f'<td class="{cls}">{mark} {_e(_fmt(f.get("n_flagged")))}</td>')
        bad = c.get("verdict") == "poisoned" or str(c.get("label")) in poisoned
        verdict = _fmt(c.get("verdict"))
        if c.get("detectors"):
            verdict += " (" + ", ".join(str(x) for x in c["detectors"]) + ")"
        cells += [f'<td class="{"hit" if bad else ""}">{_e(verdict)}</td>',
                  _td(c.get("n_flagged"))]
        if truth is not None:
            cells.append(_td(truth.get(str(c.get("label")), 0)))
        rows.append(cells)
        row_cls.append("poisoned" if bad else "")
    return (f'<section id="classes"><h2>Per class</h2><p class="muted">● = the detector calls the '
            f"class suspicious; numbers are samples flagged.</p>"
            f"{_table(header, rows, row_cls)}</section>")


def _metrics_section(r: Mapping[str, Any]) -> str:
    q = (r.get("layers") or {}).get("quarantine") or {}
    metrics, gt = q.get("metrics"), r.get("ground_truth")
    if not metrics and not gt:
        return ""
    out = ['<section id="metrics"><h2>Against ground truth</h2>']
    if metrics:
        cols = [("precision", "precision"), ("recall", "recall"), ("F1", "f1"), ("FPR", "fpr"),
                ("AUROC", "auroc")]
        rows, row_cls = [], []
        for name, m in metrics.items():
            m = m if isinstance(m, Mapping) else {}
            rows.append([f"<td>{_e(name)}</td>",
                         *(f'<td class="num">{_e(_metric(m.get(k)))}</td>' for _, k in cols),
                         _td(m.get("n_flagged"))])
            row_cls.append("strong" if name == "cross_reference" else "")
        out.append(_table(["detector", *(h for h, _ in cols), "flagged"], rows, row_cls))
    if gt:
        out.append(f"<h3>Ground truth</h3>{_value(gt)}")
    return "".join(out) + "</section>"


def _retrain_section(r: Mapping[str, Any]) -> str:
    q = (r.get("layers") or {}).get("quarantine") or {}
    rt, san = q.get("retrain"), q.get("sanitize")
    if not rt and not san:
        return ""
    out = ['<section id="retrain"><h2>Sanitise and retrain</h2>']
    if san:
        out.append(f"<h3>Sanitisation</h3>{_value(san)}")
    if rt:
        b, a = rt.get("before") or {}, rt.get("after") or {}
        rows = [[f"<td>{label}</td>", _td(n), *(f'<td class="num">{_e(_metric(m.get(k)))}</td>'
                                               for k in ("clean_accuracy", "asr"))]
                for label, n, m in (("as given", rt.get("n_train_before"), b),
                                    ("sanitised", rt.get("n_train_after"), a),
                                    ("flagged unlearned", rt.get("n_train_unlearned"),
                                     rt.get("unlearned")))
                if m is not None]
        out.append(_table(["model", "train size", "clean accuracy", "attack success rate"],
                          rows))
        rest = {k: x for k, x in rt.items()
                if k not in {"before", "after", "n_train_before", "n_train_after", "unlearned",
                             "n_train_unlearned"}}
        if rest:
            out.append(f"<details><summary>retraining details</summary>{_value(rest)}</details>")
    return "".join(out) + "</section>"


def _plots_section(r: Mapping[str, Any]) -> str:
    p = r.get("plots") or {}
    s = r.get("samples") or {}
    q = (r.get("layers") or {}).get("quarantine") or {}
    poisoned = (r.get("verdict") or {}).get("poisoned_classes") or []
    is_poison = s.get("is_poison")
    thresholds = {d.get("name"): d.get("threshold") for d in q.get("detectors") or []}
    proj = plots.projection_grid(p.get("projections") or {}, s.get("flagged"), is_poison,
                                 poisoned)
    hist = plots.score_histograms(s.get("scores") or {}, thresholds, s.get("flags"),
                                  s.get("flagged"))
    thumbs = plots.thumbnail_grid(p.get("thumbnails") or [], is_poison)
    poison_note = " Triangles are true poisons." if is_poison else ""
    parts = []
    if proj:
        parts.append("<h3>Per-class 2-D projection of the representations</h3>"
                     f'<p class="muted">Red = flagged; poisoned classes have red titles.'
                     f"{poison_note}</p>{_img(proj, 'per-class projections', '')}")
    if hist:
        parts.append("<h3>Detector score distributions</h3>"
                     '<p class="muted">Flagged samples stacked in red; dashed line = '
                     f"threshold.</p>{_img(hist, 'score histograms', '')}")
    if thumbs:
        parts.append("<h3>Most suspicious samples</h3>"
                     '<p class="muted">Ordered by cross-reference confidence (the share of '
                     "detector votes); red captions = flagged; [P] = true poison.</p>"
                     f"{_img(thumbs, 'most suspicious samples', '')}")
    posts = p.get("text_evidence") or []
    if posts:
        parts.append("<h3>Flagged posts</h3>"
                     '<p class="muted">Trigger tokens of the post\'s class highlighted; posts '
                     "carrying a trigger first.</p>" + _text_evidence(posts))
    if not parts:  # nothing to draw: no empty section
        return ""
    return '<section id="plots"><h2>Plots</h2>' + "".join(parts) + "</section>"


def _text_evidence(posts: Sequence[Mapping[str, Any]]) -> str:
    """A table of flagged posts, trigger spans wrapped in <mark>."""
    rows = []
    for post in posts:
        text, out, at = str(post.get("text", "")), [], 0
        for start, end in post.get("highlight") or []:
            out += [_e(text[at:start]), f"<mark>{_e(text[start:end])}</mark>"]
            at = end
        out.append(_e(text[at:]))
        rows.append([f"<td>{_e(post.get('index'))}</td>", f"<td>{_e(post.get('label'))}</td>",
                     f"<td>{''.join(out)}</td>"])
    return _table(["index", "label", "post"], rows)


def _detector_block(d: Mapping[str, Any]) -> str:
    head = {"samples flagged": d.get("n_flagged"), "threshold": d.get("threshold"),
            "runtime (s)": d.get("runtime_s"),
            "suspicious classes": ", ".join(f"class {_fmt(c)}"
                                            for c in d.get("suspicious_classes") or [])
            or "none"}
    extra = {k: x for k, x in d.items() if k not in {
        "name", "n_flagged", "threshold", "threshold_rule", "params", "runtime_s",
        "suspicious_classes", "findings"}}
    head_rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(_fmt(x))}</td></tr>"
                        for k, x in head.items())
    out = [f'<div class="det"><h3>{_e(d.get("name", "?"))}</h3><div class="row">'
           f'<div><table class="kv">{head_rows}</table></div>'
           f"<div><b>threshold rule</b>{_value(d.get('threshold_rule') or {})}</div>"
           f"<div><b>parameters</b>{_value(d.get('params') or {})}</div></div>"]
    if extra:
        out.append(_value(extra))
    findings = [f for f in d.get("findings") or [] if isinstance(f, Mapping)]
    if findings:
        keys: list[str] = []
        for f in findings:
            keys += [k for k in f.get("evidence") or {} if k not in keys]
        rows, row_cls = [], []
        for f in findings:
            ev = f.get("evidence") or {}
            rows.append([f"<td>{_e(_fmt(f.get('label')))}</td>",
                         f'<td class="{"hit" if f.get("suspicious") else ""}">'
                         f"{_e(_fmt(bool(f.get('suspicious'))))}</td>",
                         _td(f.get("n_samples")), _td(f.get("n_flagged")),
                         *(f"<td>{_value(ev.get(k), MAX_DEPTH - 1)}</td>" for k in keys)])
            row_cls.append("poisoned" if f.get("suspicious") else "")
        out.append(f"<details><summary>per-class evidence ({len(findings)} classes)</summary>"
                   f"{_table(['class', 'suspicious', 'n', 'flagged', *keys], rows, row_cls)}"
                   "</details>")
    return "".join(out) + "</div>"


def _detectors_section(r: Mapping[str, Any]) -> str:
    q = (r.get("layers") or {}).get("quarantine") or {}
    dets = [d for d in q.get("detectors") or [] if isinstance(d, Mapping)]
    if isinstance(q.get("cross_reference"), Mapping):
        dets.append(q["cross_reference"])
    if not dets and not q:
        return ""
    out = ['<section id="detectors"><h2>Detectors</h2>', *(_detector_block(d) for d in dets)]
    if q.get("model"):
        out.append(f"<h3>Quarantine model</h3>{_value(q['model'])}")
    rest = {k: x for k, x in q.items() if k not in KNOWN_QUARANTINE}
    if rest:
        out.append(f"<h3>Other quarantine outputs</h3>{_value(rest)}")
    return "".join(out) + "</section>"


def _model_audit_section(r: Mapping[str, Any]) -> str:
    from poisonguard.audit.html_section import model_audit_section

    return model_audit_section(r)


def _runtime_section(r: Mapping[str, Any]) -> str:
    from poisonguard.runtime.report import runtime_section

    return runtime_section(r)


def _other_section(r: Mapping[str, Any]) -> str:
    layers = {k: x for k, x in (r.get("layers") or {}).items()
              if k not in ("quarantine", "model_audit", "runtime")}
    top = {k: x for k, x in r.items() if k not in KNOWN_TOP}
    if not layers and not top:
        return ""
    out = ['<section id="other"><h2>Other layers</h2>']
    out += [f"<h3>{_e(k)}</h3>{_value(x)}" for k, x in layers.items()]
    out += [f"<h3>{_e(k)}</h3>{_value(x)}" for k, x in top.items()]
    return "".join(out) + "</section>"


def _run_section(r: Mapping[str, Any]) -> str:
    parts = ['<section id="run"><h2>Timings and environment</h2><div class="row">']
    for title, key in (("Timings", "timings"), ("Environment", "environment"),
                       ("Seeds", "seeds")):
        if r.get(key):
            parts.append(f"<div><h3>{title}</h3>{_value(r[key])}</div>")
    parts.append("</div>")
    prof = r.get("profile")
    if isinstance(prof, Mapping):
        ran = "".join(f"<li>{_e(x)}</li>" for x in prof.get("ran") or [])
        parts.append(f"<h3>Profile {_e(_fmt(prof.get('name')))}: what ran</h3><ol>{ran}</ol>"
                     f"<details><summary>profile settings</summary>"
                     f"{_value(prof.get('settings') or {})}</details>")
    if r.get("inputs"):
        parts.append(f"<h3>Inputs</h3>{_value(r['inputs'])}")
    if r.get("config"):
        parts.append(f"<details><summary>Configuration</summary>{_value(r['config'])}"
                     "</details>")
    return "".join(parts) + "</section>"


def render_html(report: dict[str, Any]) -> str:
    """Render the canonical JSON report as one self-contained HTML page (no external assets)."""
    name = (report.get("tool") or {}).get("name", "poisonguard")
    v = report.get("verdict") or {}
    title = f"{name} report — {v.get('overall_summary') or v.get('summary', '')}"
    body = "".join(section(report) for section in (
        layer_cards, _cross_layer_section, _data_section, _classes_section, _metrics_section,
        _retrain_section, _plots_section, _detectors_section, _model_audit_section,
        _runtime_section, _other_section, _run_section))
    nav = "".join(f'<a href="#{a}">{t}</a>' for a, t in SECTIONS if f'<section id="{a}"' in body)
    body = f"{_header(report)}<nav>{nav}</nav>{body}"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{CSS}</style></head>"
            f"<body><main>{body}</main></body></html>\n")
