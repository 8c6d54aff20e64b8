"""Every figure the package draws, and writing one to a PNG file that a reader never sees half-written.

The callers decide what a figure shows; this module draws it:

- training (`tasks`): `reconstruction_figure` (MAE input, masked input and reconstruction per phase) and
  `overlay_figure` (a validation case's expert and predicted outlines), saved and sent to TensorBoard;
- `mtl-breast plot` (`run.plot`): `curves_figure`, the logged scalars of a run against the step;
- the scored report (`run.report`): `bar_panels_figure` (subgroup bars with their case counts and intervals),
  `per_case_figure`, `reliability_figure` and `overlays_figure` (the `make_overlay` slices of the best and worst
  cases). `format_value` is the number format of their labels, which the report's tables share.

Figures are built on `matplotlib.figure.Figure` with the Agg canvas, never through pyplot: nothing here touches
pyplot's list of open figures (which keeps every figure alive until closed) or the process-wide backend.
This module imports only `files` from the package, so every layer may draw.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from mtl_breast.files import atomic_path

__all__ = ["BarPanel", "Overlay", "bar_panels_figure", "curves_figure", "format_value", "make_overlay",
           "overlay_figure", "overlays_figure", "per_case_figure", "reconstruction_figure", "reliability_figure",
           "save_png"]


def save_png(fig: Figure, path: Path, dpi: int = 100) -> Path:
    """Render `fig` to a temporary PNG in the target folder, then rename it to `path` (folder created).

    A failed or interrupted render leaves the previous file or none, and no temporary file.
    """
    path = Path(path)
    FigureCanvasAgg(fig)  # render with Agg whatever made the figure (a bare Figure() has no canvas of its own)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def format_value(value: Any) -> str:
    """A score as the report shows it: 3 decimals, ``n/a`` for None or NaN, ``inf``; anything else as text."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _no_ticks(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


# ---------------------------------------------------------------------------------------------------- training
def reconstruction_figure(image, masked, recon, phase_mask) -> Figure:
    """Central axial slice of each real phase: input | masked input | reconstruction.

    Args:
        image, masked, recon: ``[T, D, H, W]`` tensors (any device or dtype).
        phase_mask: ``[T]`` bool, False = padded phase (not shown).
    """
    phases = [t for t in range(image.shape[0]) if bool(phase_mask[t])]
    z = image.shape[1] // 2
    fig = Figure(figsize=(6, 2 * len(phases)))
    axes = fig.subplots(len(phases), 3, squeeze=False)
    lo, hi = float(image.min()), float(image.max())
    for row, t in enumerate(phases):
        for col, (vol, title) in enumerate([(image, "input"), (masked, "masked"), (recon, "reconstruction")]):
            ax = axes[row][col]
            ax.imshow(vol[t, z].detach().cpu().float().numpy(), cmap="gray", vmin=lo, vmax=hi)
            _no_ticks(ax)
            if row == 0:
                ax.set_title(title, fontsize=9)
            if col == 0:
                ax.set_ylabel(f"phase {t}", fontsize=9)
    fig.tight_layout()
    return fig


def overlay_figure(image: np.ndarray, truth: np.ndarray, prob: np.ndarray, title: str) -> Figure:
    """The slice with the most tumour of one validation case: the image with the expert (green) and the
    predicted (red, probability >= 0.5) outlines, and the predicted probability.

    Args:
        image: ``[D, H, W]`` first post-contrast phase.
        truth: ``[D, H, W]`` expert mask.
        prob: ``[D, H, W]`` predicted tumour probability.
    """
    area = truth.reshape(truth.shape[0], -1).sum(1) + (prob >= 0.5).reshape(prob.shape[0], -1).sum(1)
    z = int(np.argmax(area)) if area.any() else truth.shape[0] // 2
    fig = Figure(figsize=(6, 3))
    axes = fig.subplots(1, 2)
    axes[0].imshow(image[z], cmap="gray")
    for mask, colour in ((truth[z], "lime"), (prob[z] >= 0.5, "red")):
        if mask.any() and not mask.all():
            axes[0].contour(mask.astype(float), levels=[0.5], colors=colour, linewidths=1)
    axes[1].imshow(prob[z], cmap="magma", vmin=0, vmax=1)
    axes[0].set_title(f"{title}: expert (green), model (red)", fontsize=8)
    axes[1].set_title("tumour probability", fontsize=8)
    for ax in axes:
        _no_ticks(ax)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------ training curves
def curves_figure(name: str, tags: Sequence[str], series: Mapping[str, Sequence[tuple[int, float]]]) -> Figure:
    """The logged scalars ``tags`` against the step: all on one axes (a legend, log scale when every value is
    positive and ``name`` is "losses"), or one axes each, three to a row, when ``name`` is "validation".

    Args:
        name: "losses", "learning_rate" or "validation" (the title of a shared axes).
        tags: the scalars drawn, in order.
        series: {tag: [(step, value)] sorted by step}.
    """
    cols = min(len(tags), 3) if name == "validation" else 1
    rows = math.ceil(len(tags) / cols) if name == "validation" else 1
    fig = Figure(figsize=(4.5 * cols, 3 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, tag in enumerate(tags):
        ax = axes[i // cols][i % cols] if name == "validation" else axes[0][0]
        steps, values = zip(*series[tag], strict=True)
        style = "o-" if len(steps) < 30 else "-"
        ax.plot(steps, values, style, markersize=3, linewidth=1, label=tag)
        ax.set_xlabel("step")
        if name == "validation":
            ax.set_title(tag, fontsize=9)
    for j in range(len(tags), rows * cols):
        axes[j // cols][j % cols].axis("off")
    if name == "losses" and all(v > 0 for tag in tags for _, v in series[tag]):
        axes[0][0].set_yscale("log")  # losses fall over decades; log only when every curve is positive
    if name != "validation":
        axes[0][0].legend(fontsize=8)
        axes[0][0].set_title(name.replace("_", " "), fontsize=10)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------------- the report
@dataclass
class BarPanel:
    """One axes of grouped bars, one colour per series, each bar labelled with its value.

    Attributes:
        groups: {group: scores}; a group's ``n`` goes under its tick label, and a group flagged ``too_small`` is
            hatched and faded so it is not read like the others.
        order: `[G]` the groups, in the order shown.
        series: {name: `[G]` bar heights}.
        title: axes title.
        ylim: y range, or None to fit the bars, their intervals and the value labels.
        errors: {name: `[G]` (low, high)} 95% intervals drawn as error bars (NaN = none). They are drawn from
            low to high, not around the bar, because an official rate can lie outside its interval.
    """

    groups: Mapping[str, Mapping[str, Any]]
    order: list[str]
    series: dict[str, list[float]]
    title: str
    ylim: tuple[float, float] | None = None
    errors: dict[str, list[tuple[float, float]]] = field(default_factory=dict)


def _tick(group: str, entry: Mapping[str, Any]) -> str:
    """Tick label of a subgroup bar: its name and, on a second line, its case count when known: "40-50\n(n=7)"."""
    return group if entry.get("n") is None else f"{group}\n(n={entry['n']})"


def _bars(ax, panel: BarPanel) -> None:
    groups, order, series = panel.groups, panel.order, panel.series
    labels = [_tick(g, groups[g]) for g in order]
    small = [bool(groups[g].get("too_small")) for g in order]
    x = np.arange(len(labels))
    width = 0.8 / max(len(series), 1)
    tops, legend = [0.0], []
    for i, (name, values) in enumerate(series.items()):
        xs = x + (i - (len(series) - 1) / 2) * width
        bars = ax.bar(xs, np.nan_to_num(values), width)
        colour = f"C{i}"
        legend.append(Patch(facecolor=colour, label=name))  # the plain style, whichever bar comes first
        for bar, is_small in zip(bars, small, strict=True):
            bar.set_facecolor(colour)
            if is_small:
                bar.set(hatch="///", alpha=0.45, edgecolor="dimgrey")
        low, high = (np.array([pair[k] for pair in panel.errors.get(name, [(np.nan, np.nan)] * len(values))],
                              dtype=float) for k in (0, 1))
        shown = np.isfinite(low) & np.isfinite(high)
        if shown.any():
            ax.errorbar(xs[shown], (low + high)[shown] / 2, yerr=(high - low)[shown] / 2, fmt="none",
                        ecolor="black", elinewidth=1, capsize=3)
        label_y = np.fmax(np.nan_to_num(values), np.where(shown, high, 0.0))  # above the bar and its whisker
        for xi, yi, v in zip(xs, label_y, values, strict=True):
            ax.annotate(format_value(v), (xi, yi), xytext=(0, 2), textcoords="offset points", ha="center",
                        fontsize=7)
        tops += [float(np.nanmax(label_y))] if len(label_y) else []
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_title(panel.title, fontsize=9)
    ylim = panel.ylim
    if ylim is None:  # leave head room for the value labels
        top = max(tops)
        ylim = (0.0, 1.15 * top if top > 0 else 1.0)
    ax.set_ylim(*ylim)
    if len(series) > 1:
        ax.legend(handles=legend, fontsize=7, loc="upper right", ncols=len(legend))


def bar_panels_figure(rows: Sequence[Sequence[BarPanel]], title: str, note: str, row_height: float) -> Figure:
    """One row of `BarPanel` axes per entry of ``rows`` (e.g. one per fairness variable), under ``title`` and
    above ``note`` (small print, e.g. what the hatching and the error bars mean)."""
    fig = Figure(figsize=(9, row_height * len(rows)))
    axes = fig.subplots(len(rows), max(len(r) for r in rows), squeeze=False)
    for row, panels in enumerate(rows):
        for col, panel in enumerate(panels):
            _bars(axes[row][col], panel)
    fig.suptitle(title)
    fig.text(0.5, 0.005, note, ha="center", va="bottom", fontsize=7)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    return fig


def per_case_figure(dsc: Sequence[float], norm_hd: Sequence[float], mean_dsc: Any, mean_norm_hd: Any) -> Figure:
    """Histograms of per-case DSC and NormHD, their means in the titles."""
    fig = Figure(figsize=(9, 3))
    left, right = fig.subplots(1, 2)
    left.hist(dsc, bins=np.linspace(0, 1, 21), color="tab:green")
    left.set(title=f"DSC per case (mean {format_value(mean_dsc)})", xlabel="DSC", ylabel="cases")
    right.hist(norm_hd, bins=20, color="tab:red")
    right.set(title=f"NormHD per case (mean {format_value(mean_norm_hd)})", xlabel="NormHD (1 = empty vs non-empty)")
    fig.tight_layout()
    return fig


def reliability_figure(reliability: tuple) -> Figure:
    """Reliability diagram of pCR probabilities and the case count per bin.

    Args:
        reliability: ``(mean_prob, frac_pos, counts)`` per bin, as `metrics.classification.reliability_curve`
            returns them.
    """
    mean_prob, frac_pos, counts = (np.asarray(a, dtype=float) for a in reliability)
    bins = counts.size
    fig = Figure(figsize=(5, 6))
    top, bottom = fig.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    top.plot([0, 1], [0, 1], ls="--", color="grey", label="perfectly calibrated")
    filled = counts > 0
    top.plot(mean_prob[filled], frac_pos[filled], "o-", color="tab:blue", label="model")
    ece = float(np.nansum(np.abs(mean_prob - frac_pos) * counts) / max(counts.sum(), 1))
    top.set(ylabel="observed pCR fraction", xlim=(0, 1), ylim=(0, 1), title=f"pCR reliability (ECE {ece:.3f})")
    top.legend(fontsize=8)
    centres = (np.arange(bins) + 0.5) / bins
    bottom.bar(centres, counts, width=1 / bins, color="tab:blue", alpha=0.6)
    bottom.set(xlabel="predicted pCR probability", ylabel="cases")
    fig.tight_layout()
    return fig


@dataclass
class Overlay:
    """One 2-D slice to show: image (or None), expert and predicted masks, all `[H, W]`."""

    patient_id: str
    title: str
    image: np.ndarray | None
    expert: np.ndarray
    pred: np.ndarray


def make_overlay(
    patient_id: str, expert: np.ndarray, pred: np.ndarray, image: np.ndarray | None = None, title: str = ""
) -> Overlay:
    """Cut the central slice through the expert mask.

    Args:
        patient_id: case shown.
        expert: expert mask `[D, H, W]` (D = slice axis of the SimpleITK array).
        pred: predicted mask `[D, H, W]`.
        image: first post-contrast phase `[D, H, W]` on the same grid, or None (masks on black).
        title: caption, e.g. "worst: DUKE_001 (DSC 0.12)".

    Returns:
        The median slice among those holding expert voxels (the predicted mask's when the expert one is empty).
    """
    expert, pred = np.asarray(expert) > 0, np.asarray(pred) > 0
    if expert.shape != pred.shape or (image is not None and np.shape(image) != expert.shape):
        raise ValueError(f"case {patient_id}: expert {expert.shape}, prediction {pred.shape} and image "
                         f"{None if image is None else np.shape(image)} must share one grid")
    reference = expert if expert.any() else pred
    slices = np.flatnonzero(reference.reshape(reference.shape[0], -1).any(axis=1))
    z = int(slices[len(slices) // 2]) if slices.size else reference.shape[0] // 2
    plane = None if image is None else np.asarray(image, dtype=np.float32)[z]
    return Overlay(patient_id, title or patient_id, plane, expert[z], pred[z])


def _zoom_box(overlay: Overlay, margin: int = 12) -> tuple[slice, slice]:
    both = overlay.expert | overlay.pred
    if not both.any():
        return slice(None), slice(None)
    rows, cols = np.flatnonzero(both.any(axis=1)), np.flatnonzero(both.any(axis=0))
    h, w = both.shape
    return (slice(max(rows[0] - margin, 0), min(rows[-1] + margin + 1, h)),
            slice(max(cols[0] - margin, 0), min(cols[-1] + margin + 1, w)))


def overlays_figure(overlays: Sequence[Overlay]) -> Figure:
    """Expert (green) and predicted (red) contours on each overlay's slice: the full slice and a zoom."""
    fig = Figure(figsize=(8, 4 * len(overlays)))
    axes = fig.subplots(len(overlays), 2, squeeze=False)
    for row, overlay in enumerate(overlays):
        for col, box in enumerate(((slice(None), slice(None)), _zoom_box(overlay))):
            ax = axes[row][col]
            background = overlay.image if overlay.image is not None else np.zeros(overlay.expert.shape)
            lo, hi = np.percentile(background, [1, 99.5]) if overlay.image is not None else (0, 1)
            ax.imshow(background[box], cmap="gray", vmin=lo, vmax=max(hi, lo + 1e-6), interpolation="nearest")
            for mask, colour in ((overlay.expert, "lime"), (overlay.pred, "red")):
                if mask[box].any():
                    ax.contour(mask[box].astype(float), levels=[0.5], colors=colour, linewidths=1.2)
            ax.set_axis_off()
            ax.set_title(overlay.title if col == 0 else "zoom (green expert, red prediction)", fontsize=9)
    fig.tight_layout()
    return fig
