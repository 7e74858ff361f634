"""Matplotlib figures for the HTML report, each returned as a base64-encoded PNG string.

Every function takes plain JSON-report pieces, never raises on degenerate input (no samples,
no flagged samples, constant scores, a single class) and returns ``None`` when there is nothing
worth drawing.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

DPI = 150
FLAGGED = "#d62728"
CLEAN = "#8c8c8c"


def fig_to_base64(fig: Any, tight: bool = True) -> str:
    """Save ``fig`` as PNG, close it and return the base64 text (no ``data:`` prefix)."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight" if tight else None)
    finally:
        plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _grid(n: int, max_cols: int) -> tuple[int, int]:
    cols = max(1, min(max_cols, n))
    return math.ceil(max(n, 1) / cols), cols


def _class_sort_key(label: str) -> tuple[int, float, str]:
    try:
        return (0, float(label), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(label))


def _lookup(values: Sequence[Any] | None, idx: np.ndarray) -> np.ndarray:
    """``values[idx]`` as a bool array; out-of-range or missing entries read as False."""
    out = np.zeros(len(idx), dtype=bool)
    if not values:
        return out
    arr = np.asarray(values)
    ok = (idx >= 0) & (idx < len(arr))
    out[ok] = arr[idx[ok]].astype(bool)
    return out


def projection_grid(projections: Mapping[str, Mapping[str, Any]],
                    flagged: Sequence[int] | None,
                    is_poison: Sequence[int] | None = None,
                    poisoned_classes: Sequence[Any] = ()) -> str | None:
    """One small 2-D scatter per class, red = flagged; triangles = true poison when known."""
    labels = sorted(projections, key=_class_sort_key)
    if not labels:
        return None
    poisoned = {str(c) for c in poisoned_classes}
    nrows, ncols = _grid(len(labels), 5)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.3 * ncols, 2.2 * nrows), squeeze=False)
    for ax in axes.flat[len(labels):]:
        ax.set_visible(False)
    for ax, label in zip(axes.flat, labels):
        p = projections[label] or {}
        x = np.asarray(p.get("x") or [], dtype=float)
        y = np.asarray(p.get("y") or [], dtype=float)
        idx = np.asarray(p.get("index") or [], dtype=np.int64)
        n = min(len(x), len(y), len(idx))
        x, y, idx = x[:n], y[:n], idx[:n]
        fl = _lookup(flagged, idx)
        ax.set_xticks([])
        ax.set_yticks([])
        colour = FLAGGED if label in poisoned else "black"
        ax.set_title(f"class {label}  ({int(fl.sum())}/{n} flagged)", fontsize=7, color=colour,
                     fontweight="bold" if label in poisoned else "normal")
        if n == 0:
            ax.text(0.5, 0.5, "no points", ha="center", va="center", fontsize=7,
                    transform=ax.transAxes)
            continue
        poison = _lookup(is_poison, idx) if is_poison else np.zeros(n, dtype=bool)
        for mask_f, c, z in ((False, CLEAN, 1), (True, FLAGGED, 2)):
            for mask_p, marker in ((False, "o"), (True, "^")):
                m = (fl == mask_f) & (poison == mask_p)
                if m.any():
                    ax.scatter(x[m], y[m], s=5 if not mask_p else 9, c=c, marker=marker,
                               alpha=0.6, linewidths=0, zorder=z)
    handles = [Line2D([], [], ls="", marker="o", color=CLEAN, label="not flagged"),
               Line2D([], [], ls="", marker="o", color=FLAGGED, label="flagged")]
    if is_poison:
        handles.append(Line2D([], [], ls="", marker="^", color="black", label="true poison"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7,
               frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig_to_base64(fig)


def score_histograms(scores: Mapping[str, Sequence[Any]],
                     thresholds: Mapping[str, Any],
                     flags: Mapping[str, Sequence[int]] | None = None,
                     flagged: Sequence[int] | None = None) -> str | None:
    """One histogram per detector, flagged stacked over unflagged, log y, threshold line."""
    names = list(scores)
    if not names:
        return None
    nrows, ncols = _grid(len(names), 3)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.4 * nrows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names):
        ax.set_title(name, fontsize=8)
        ax.tick_params(which="both", labelsize=6)
        s = np.asarray([np.nan if v is None else v for v in scores[name] or []], dtype=float)
        own = (flags or {}).get(name)
        fl = _lookup(own if own else flagged, np.arange(len(s)))
        ok = np.isfinite(s)
        s, fl = s[ok], fl[ok]
        if len(s) == 0:
            ax.text(0.5, 0.5, "no scores", ha="center", va="center", fontsize=7,
                    transform=ax.transAxes)
            continue
        thr = thresholds.get(name)
        has_thr = isinstance(thr, (int, float)) and not isinstance(thr, bool) and math.isfinite(thr)
        lo, hi = float(s.min()), float(s.max())
        if has_thr:
            lo, hi = min(lo, float(thr)), max(hi, float(thr))
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        bins = np.linspace(lo, hi, 41)
        # stepfilled: two polygons per panel instead of 80 bar patches (seconds on a loaded
        # machine for a five-detector report)
        counts, _, _ = ax.hist([s[~fl], s[fl]], bins=bins, stacked=True, color=[CLEAN, FLAGGED],
                               label=["not flagged", "flagged"], histtype="stepfilled")
        top = float(np.asarray(counts).max())
        if top > 0:
            ax.set_yscale("log")
            ax.set_ylim(0.7, top * 8)  # headroom for the legend
        if has_thr:
            ax.axvline(float(thr), color="black", ls="--", lw=1, label=f"threshold {thr:g}")
        ax.set_xlabel("score", fontsize=6)
        ax.legend(fontsize=5, frameon=False, loc="upper left")
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.12 / nrows + 0.04,
                        top=1 - 0.12 / nrows, wspace=0.25, hspace=0.6)
    return fig_to_base64(fig)


def _image(thumb: Mapping[str, Any]) -> np.ndarray | None:
    shape = [int(v) for v in thumb.get("shape") or []]
    pixels = np.asarray(thumb.get("pixels") or [], dtype=float)
    if not shape or int(np.prod(shape)) != pixels.size or pixels.size == 0:
        return None
    img = pixels.reshape(shape)
    if img.ndim == 3 and img.shape[-1] not in (1, 3, 4) and img.shape[0] in (1, 3, 4):
        img = np.moveaxis(img, 0, -1)  # channels-first
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[-1] not in (3, 4)):
        return None
    if img.max() > 1.0:
        img = img / 255.0
    return np.clip(img, 0.0, 1.0)


def thumbnail_grid(thumbnails: Sequence[Mapping[str, Any]],
                   is_poison: Sequence[int] | None = None, max_n: int = 48) -> str | None:
    """The most suspicious samples as a grid of images captioned with label and confidence."""
    items = [(t, img) for t in list(thumbnails or [])[:max_n] if (img := _image(t)) is not None]
    if not items:
        return None
    nrows, ncols = _grid(len(items), 8)
    # one mosaic image on one axes (48 axes took seconds on a loaded machine): tiles of the
    # largest image's size, captions above each tile
    h = max(img.shape[0] for _, img in items)
    w = max(img.shape[1] for _, img in items)
    colour = any(img.ndim == 3 for _, img in items)
    gap, cap = max(1, w // 8), max(2, h // 2)
    tile_h, tile_w = h + cap, w + gap
    mosaic = np.ones((nrows * tile_h + gap, ncols * tile_w, 3) if colour else
                     (nrows * tile_h + gap, ncols * tile_w))
    width = 0.85 * ncols
    fig, ax = plt.subplots(figsize=(width, width * mosaic.shape[0] / mosaic.shape[1] + 0.1))
    ax.axis("off")
    for k, (t, img) in enumerate(items):
        r, c = divmod(k, ncols)
        y0, x0 = r * tile_h + cap, c * tile_w
        if colour and img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=-1)
        mosaic[y0:y0 + img.shape[0], x0:x0 + img.shape[1]] = img[..., :3] if colour else img
        conf = t.get("confidence")
        conf_s = f"c={conf:.2f}" if isinstance(conf, (int, float)) else "c=-"
        if isinstance(t.get("votes"), int) and t.get("n_detectors"):
            conf_s = f"{t['votes']}/{t['n_detectors']} votes"  # what the confidence counts
        idx = t.get("index")
        poison = (is_poison is not None and isinstance(idx, int) and 0 <= idx < len(is_poison)
                  and bool(is_poison[idx]))
        label = f"#{t.get('id', idx)}\ny={t.get('label')} {conf_s}" + (" [P]" if poison else "")
        ax.text(x0 + w / 2 - 0.5, y0 - 0.6, label, ha="center", va="bottom", fontsize=4.5,
                color=FLAGGED if t.get("flagged") else "black")
    ax.imshow(mosaic, cmap=None if colour else "gray", vmin=0.0, vmax=1.0,
              interpolation="nearest", aspect="equal")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.99)
    return fig_to_base64(fig, tight=False)
