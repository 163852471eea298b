"""Plots shared by the notebooks: masks over images, timing bars, latency-mIoU scatter.

Figures are small (modest dpi) so committed notebooks stay light.
"""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np

from . import evaluate

plt.rcParams.update({"figure.dpi": 72, "savefig.dpi": 72})


def overlay(image: np.ndarray, masks: np.ndarray, alpha: float = 0.55, seed: int = 1) -> np.ndarray:
    """The image with each mask painted in its own colour (masks: N x H x W bool)."""
    rng = np.random.default_rng(seed)
    out = image.astype(np.float32).copy()
    for m in masks:
        color = rng.integers(40, 256, 3)
        out[m] = (1 - alpha) * out[m] + alpha * color
    return out.clip(0, 255).astype(np.uint8)


def show_masks(image: np.ndarray, masks: np.ndarray, ax=None, points: np.ndarray | None = None,
               boxes: np.ndarray | None = None, title: str = "", truth: np.ndarray | None = None) -> plt.Axes:
    """Draw masks over an image, with the prompt points (stars) and boxes that produced them.

    With `truth` (one ground-truth mask per predicted mask, same order), each object's true
    outline is drawn in white over the predicted fill and labelled with its IoU, so a student
    can judge each mask (notebook 00, "Segmenting from points and boxes")."""
    ax = ax or plt.gca()
    ax.imshow(overlay(image, masks))
    if truth is not None:
        for pred, gt in zip(masks, truth):
            ax.contour(gt.astype(float), levels=[0.5], colors="white", linewidths=1.0)
            ys, xs = np.nonzero(gt)
            if len(xs):
                ax.text(xs.mean(), ys.min() - 2, f"{evaluate.iou(pred, gt):.2f}", color="white", fontsize=7,
                        ha="center", va="bottom", bbox=dict(fc="black", alpha=0.55, pad=1, lw=0))
    if points is not None and len(points):
        pts = np.asarray(points)
        ax.scatter(pts[:, 0], pts[:, 1], marker="*", s=90, c="yellow", edgecolors="black", linewidths=0.8)
    for x0, y0, x1, y1 in (boxes if boxes is not None else []):
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="yellow", lw=1.2))
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    return ax


def bar_seconds(labels: Sequence[str], medians: Sequence[float], spreads: Sequence[float] | None = None,
                title: str = "", ax=None) -> plt.Axes:
    """Horizontal bars of median seconds with the spread as error bars."""
    ax = ax or plt.figure(figsize=(6, 0.5 + 0.45 * len(labels))).gca()
    ax.barh(list(labels), list(medians), xerr=None if spreads is None else list(spreads), color="#4c72b0")
    ax.set_xlabel("seconds (median)")
    ax.set_title(title, fontsize=10)
    ax.invert_yaxis()
    return ax


def latency_miou(rows: Sequence[dict], ax=None, title: str = "latency vs mIoU") -> plt.Axes:
    """Scatter of median latency (x) against mIoU (y), one labelled point per variant."""
    ax = ax or plt.figure(figsize=(5.5, 4)).gca()
    for r in rows:
        if r.get("median_s") is None or r.get("miou") is None:
            continue
        ax.scatter(r["median_s"], r["miou"], s=40)
        ax.annotate(str(r.get("name", r.get("variant", ""))), (r["median_s"], r["miou"]), fontsize=8,
                    xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("encoder latency, seconds (median)")
    ax.set_ylabel("mIoU")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return ax


# label offsets tried in turn (points from the marker): beside it first, then further up and down
_LABEL_OFFSETS = [(5, 3), (5, -10), (-5, 3), (-5, -10)] + [(8, dy) for k in range(1, 7) for dy in (12 * k + 3, -12 * k - 10)]


def place_labels(ax: plt.Axes, xs: Sequence[float], ys: Sequence[float], labels: Sequence[str],
                 fontsize: float = 8) -> list:
    """Label each point (data coordinates) where its text overlaps no other label, no marker and
    no legend, inside the axes: the first free offset of `_LABEL_OFFSETS`, with a thin leader line
    when the label had to move away from its point (the last offset if none is free).
    Deterministic (points taken left to right); call it after the axes' scales, limits and
    layout are final (notebook 05, section "Every variant, measured the same way")."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer() if hasattr(fig.canvas, "get_renderer") else fig._get_renderer()
    marks = [ax.transData.transform((x, y)) for x, y in zip(xs, ys)]
    frame = ax.get_window_extent(renderer)
    r = 3.5 * fig.dpi / 72  # a marker's half-width in pixels (markers of about 40 points^2)
    legend = ax.get_legend()
    taken = [legend.get_window_extent(renderer)] if legend is not None else []  # pixel boxes in use
    order = sorted(range(len(labels)), key=lambda i: (xs[i], -ys[i]))

    def label(i: int, dx: float, dy: float, leader: bool = False):
        line = dict(arrowprops=dict(arrowstyle="-", lw=0.5, color="grey", shrinkA=0, shrinkB=3)) if leader else {}
        return ax.annotate(labels[i], (xs[i], ys[i]), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                           ha="left" if dx > 0 else "right", va="bottom" if dy > 0 else "top", **line)

    out = []
    for i in order:
        ann = None
        for dx, dy in _LABEL_OFFSETS:
            if ann is not None:
                ann.remove()
            ann = label(i, dx, dy)
            box = _padded(ann.get_window_extent(renderer))
            hits_label = any(box.overlaps(t) for t in taken)
            hits_mark = any(box.x0 - r < mx < box.x1 + r and box.y0 - r < my < box.y1 + r for mx, my in marks)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not hits_label and not hits_mark:
                break
        if abs(dy) > 10:  # moved away from its point: a leader line shows whose label it is
            ann.remove()
            ann = label(i, dx, dy, leader=True)
            box = _padded(ann.get_window_extent(renderer))
        taken.append(box)
        out.append(ann)
    return out


def _padded(box, px: float = 6.0, py: float = 1.5):
    """A label's pixel box grown by a margin, so that neighbouring labels never touch."""
    from matplotlib.transforms import Bbox
    return Bbox.from_extents(box.x0 - px, box.y0 - py, box.x1 + px, box.y1 + py)


def frame_pareto(rows: Sequence[dict], best: dict, bar: float, ax: plt.Axes | None = None) -> plt.Axes:
    """Notebook 05's plot: frame latency (ms, log x) against mIoU for every variant, circles for
    PyTorch and squares for the edge runtimes, `best` in red, the Pareto front dashed and the
    chapter's mIoU bar dotted; labels placed by `place_labels`
    (notebook 05, section "Every variant, measured the same way")."""
    ax = ax or plt.figure(figsize=(7.5, 4.2)).gca()
    xs = [r["median_s"] * 1e3 for r in rows]
    ys = [r["miou"] for r in rows]
    for r, x, y in zip(rows, xs, ys):
        ax.scatter(x, y, s=40, marker="o" if r["runtime"] == "pytorch" else "s",
                   color="C3" if r["name"] == best["name"] else ("C0" if r["runtime"] == "pytorch" else "C2"), zorder=3)
    pareto, top = [], -1.0
    for r in sorted(rows, key=lambda r: r["median_s"]):
        if r["miou"] > top:
            pareto.append(r)
            top = r["miou"]
    ax.plot([r["median_s"] * 1e3 for r in pareto], [r["miou"] for r in pareto], "k--", lw=0.8, label="Pareto front")
    ax.axhline(bar, color="grey", lw=0.8, ls=":", label="reference mIoU - 3 points")
    ax.set_xscale("log")
    lo, hi = min(xs), max(xs)
    ax.set_xlim(lo / 1.25, hi * 1.6)  # room for the labels of the slowest points
    ax.margins(y=0.2)
    _readable_axes(ax)
    ax.set_xlabel("frame latency (ms, log scale)")
    ax.set_ylabel("mIoU (eval, one point per object)")
    ax.set_title("latency vs mIoU (circles PyTorch, squares edge runtimes, red the best deployable)", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    ax.figure.tight_layout()
    place_labels(ax, xs, ys, [r["name"] for r in rows])
    return ax


def _readable_axes(ax: plt.Axes, min_span: float = 0.02) -> None:
    """Log latency axis with plain numbers (also on minor ticks when the panel spans under a
    decade), and an mIoU axis at least `min_span` tall: variants that agree to 1e-7 (exact
    attention variants) sit on one line instead of being spread by an offset axis."""
    from matplotlib.ticker import FuncFormatter, NullFormatter
    ax.set_xscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    lo, hi = ax.get_xlim()
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain if hi / lo < 10 else NullFormatter())
    ax.tick_params(axis="x", which="both", labelsize=7)
    ax.ticklabel_format(axis="y", useOffset=False)
    y0, y1 = ax.get_ylim()
    if y1 - y0 < min_span:
        mid = (y0 + y1) / 2
        ax.set_ylim(mid - min_span / 2, mid + min_span / 2)


def _point_label(row: dict, chapter_rows: Sequence[dict]) -> str:
    """A point's name in its panel: the variant, or the model where variants repeat (04's students)."""
    variants = [r.get("variant", "") for r in chapter_rows if r.get("run") == row.get("run")]
    if variants.count(row.get("variant", "")) > 1:
        return str(row.get("model", row.get("variant", "")))
    return str(row.get("variant", ""))


def latency_miou_panels(rows: Sequence[dict], cols: int = 3) -> plt.Figure:
    """`edgelab report`'s plot: latency (log x) against mIoU, one panel per chapter.

    Only rows with both a latency and an mIoU (trained weights) appear; each chapter times its
    own thing (encoder, frame), so chapters get their own panels. Several runs (a sweep) are
    told apart by marker colour and a legend.
    """
    chapters = sorted({r["chapter"] for r in rows if r.get("median_s") and r.get("miou") is not None})
    if not chapters:
        fig = plt.figure(figsize=(5, 1.2))
        fig.text(0.5, 0.5, "no row has both a latency and an mIoU", ha="center", va="center")
        return fig
    runs = sorted({r.get("run") for r in rows})
    colours = {run: plt.cm.tab10(i % 10) for i, run in enumerate(runs)}
    n_cols = min(cols, len(chapters))
    n_rows = -(-len(chapters) // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.6 * n_cols, 3.6 * n_rows), squeeze=False)
    for ax, chapter in zip(axes.flat, chapters):
        shown = [r for r in rows if r["chapter"] == chapter and r.get("median_s") and r.get("miou") is not None]
        for r in shown:
            ax.scatter(r["median_s"] * 1e3, r["miou"], s=28, color=colours[r.get("run")],
                       label=r.get("run") if len(runs) > 1 else None)
            ax.annotate(_point_label(r, shown), (r["median_s"] * 1e3, r["miou"]), fontsize=7,
                        xytext=(3, 2), textcoords="offset points")
        _readable_axes(ax)
        ax.set_title(chapter, fontsize=9)
        ax.set_xlabel("latency, ms (median, log scale)", fontsize=8)
        ax.set_ylabel("mIoU", fontsize=8)
        ax.grid(alpha=0.3, which="both")
        if len(runs) > 1:
            handles, labels = ax.get_legend_handles_labels()
            seen = dict(zip(labels, handles))
            ax.legend(seen.values(), seen.keys(), fontsize=6)
    for ax in list(axes.flat)[len(chapters):]:
        ax.axis("off")
    fig.tight_layout()
    return fig
