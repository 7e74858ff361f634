"""The HTML section of the ``model_audit`` layer: verdict details, per-class mask norms and
anomaly indices, the recovered triggers (mask, pattern, mask x pattern) and dormant units."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def trigger_figure(triggers: list[Mapping[str, Any]]) -> str | None:
    """One row per class: mask, pattern, mask * pattern; base64 PNG (None if nothing to draw)."""
    from poisonguard.report.plots import fig_to_base64, plt

    rows = []
    for t in triggers:
        try:
            m = np.asarray(t["mask"], dtype=float)
            p = np.asarray(t["pattern"], dtype=float)
            s = np.asarray(t["trigger"], dtype=float)
        except (KeyError, TypeError, ValueError):
            continue
        if m.ndim < 2 or p.ndim < 2:
            continue
        rows.append((t, m, p, s))
    if not rows:
        return None
    fig, axes = plt.subplots(len(rows), 3, figsize=(6.0, 2.1 * len(rows)), squeeze=False)
    for (t, m, p, s), ax in zip(rows, axes):
        grey = p.ndim == 2 or p.shape[-1] == 1
        ax[0].imshow(m, cmap="magma", vmin=0, vmax=1)
        ax[1].imshow(np.squeeze(p), cmap="gray" if grey else None, vmin=0, vmax=1)
        ax[2].imshow(np.squeeze(s), cmap="gray" if grey else None, vmin=0, vmax=1)
        ax[0].set_title(f"class {t.get('class')}: mask (L1 {t.get('mask_l1')})", fontsize=8)
        ax[1].set_title("pattern", fontsize=8)
        ax[2].set_title("mask × pattern", fontsize=8)
        for a in ax:
            a.set_xticks([])
            a.set_yticks([])
    fig.tight_layout()
    return fig_to_base64(fig)


def model_audit_section(r: Mapping[str, Any]) -> str:
    from poisonguard.report.html import _e, _fmt, _img, _table, _td, _value

    layer = (r.get("layers") or {}).get("model_audit")
    if not isinstance(layer, Mapping):
        return ""
    verdict = layer.get("verdict") or r.get("verdict") or {}
    out = ['<section id="model_audit"><h2>Model audit</h2>']
    out.append(_value({k: verdict.get(k) for k in ("backdoored", "target_class", "confidence",
                                                   "evidence") if k in verdict}))
    nc = layer.get("neural_cleanse") or {}
    classes = layer.get("classes") or []
    if classes:
        rows, row_classes = [], []
        for c in classes:
            ev = c.get("evidence") or {}
            rows.append([_td(c.get("label")), _td(ev.get("mask_l1")),
                         _td(ev.get("anomaly_index")), _td(ev.get("reversed_asr")),
                         _td(ev.get("additive_l2")), _td(ev.get("additive_anomaly_index")),
                         _td(ev.get("steps")), _td("flagged" if c.get("suspicious") else "")])
            row_classes.append("poisoned" if c.get("suspicious") else "")
        out.append("<h3>Neural Cleanse: reversed trigger per class</h3>")
        out.append(f'<p class="muted">anomaly index on log mask norms, flagged above '
                   f'{_e(_fmt(nc.get("threshold")))} with a mask at most '
                   f'{_e(_fmt(nc.get("max_ratio")))} of the median '
                   f'({_e(_fmt(nc.get("median_mask_l1")))} px); '
                   f'{_e(_fmt(nc.get("runtime_s")))} s</p>')
        add = nc.get("additive") or {}
        if add:
            out.append(f'<p class="muted">additive search: smallest universal additive '
                       f'perturbation per class (L2, data range = 1), flagged above the same '
                       f'threshold with a norm at most {_e(_fmt(add.get("max_ratio")))} of the '
                       f'median ({_e(_fmt(add.get("median_l2")))})</p>')
        out.append(_table(["class", "mask L1 (px)", "anomaly index", "reversed-trigger ASR",
                           "additive L2", "additive anomaly index", "steps", ""], rows,
                          row_classes))
    mm = layer.get("max_margin") or {}
    if mm.get("margins"):
        top = mm.get("top") if mm.get("flagged") else None
        dom = mm.get("domain") or {}
        where = (f"{'x'.join(str(v) for v in dom.get('shape') or [])} in "
                 f"[{', '.join(_fmt(v) for v in dom.get('range') or [])}] "
                 f"(from {dom.get('source')})")
        rows = [[_td(k), _td(v), _td("flagged" if k == top else "")]
                for k, v in enumerate(mm["margins"])]
        out.append("<h3>Max-margin search (data-free)</h3>")
        out.append(f'<p class="muted">largest classification margin each class reaches from '
                   f'the input domain {_e(where)}; the largest against a '
                   f'Gamma fitted to the others: p = {_e(_fmt(mm.get("p_value")))}; '
                   f'feature prior {"on" if mm.get("prior_used") else "off"}; '
                   f'{_e(_fmt(mm.get("runtime_s")))} s</p>')
        out.append(_table(["class", "max margin", ""], rows,
                          ["poisoned" if k == top else "" for k in range(len(rows))]))
    triggers = layer.get("triggers") or []
    if triggers:
        out.append("<h3>Recovered trigger(s)</h3>")
        out.append(_img(trigger_figure(list(triggers)), "recovered triggers",
                        "no trigger image to draw"))
    dormant = layer.get("dormant_neurons")
    if dormant:
        out.append(f"<h3>Dormant units at {_e(dormant.get('layer'))}</h3>")
        out.append(_value({k: v for k, v in dormant.items() if k != "layer"}))
    if layer.get("meta_classifier"):
        out.append(f"<h3>Meta-classifier (zoo meta model)</h3>{_value(layer['meta_classifier'])}")
    if layer.get("repair"):
        out.append(f"<h3>Repair</h3>{_value(layer['repair'])}")
    return "".join(out) + "</section>"
