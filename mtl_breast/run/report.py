"""The scored report: `report.md` with a headline table and plots read at a glance.

Plots (PNG, next to report.md, each written atomically):
    seg_subgroups.png   mean DSC and NormHD per group of each fairness variable
    seg_per_case.png    distribution of per-case DSC and NormHD
    pcr_subgroups.png   TPR and FPR per group of each fairness variable
    reliability.png     reliability diagram of the pCR probabilities
    overlays.png        expert (green) and predicted (red) contours on the first post-contrast phase, central
                        slice through the expert mask, for the best and worst cases; full slice and zoom

Uncertainty: when the scores carry them (`evaluate` writes them, `metrics.mamamia` describes the keys), every
subgroup bar is labelled with its case count ("40-50 (n=7)") and carries its 95% interval as an error bar; groups
too small to judge (`metrics.intervals.SMALL_GROUP_RULE`) are hatched and faded, and marked † in the tables,
which give n and the interval of every group; the headline numbers show their bootstrap intervals as [low, high].
Scores without these keys (e.g. `score_segmentation(..., intervals=False)`) are drawn as before.

Figures are drawn on `matplotlib.figure.Figure` with the Agg canvas directly, so nothing here touches pyplot's
global state or the process-wide backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from mtl_breast.figures import save_png
from mtl_breast.files import write_text
from mtl_breast.metrics.intervals import SMALL_GROUP_RULE
from mtl_breast.metrics.subgroups import AGE_LABELS, DENSITY_LABELS, FAIRNESS_VARIABLES, MENOPAUSE_LABELS

_ORDER = {"age": AGE_LABELS, "menopausal_status": MENOPAUSE_LABELS, "breast_density": DENSITY_LABELS}
_NAMES = {"age": "Age", "menopausal_status": "Menopausal status", "breast_density": "Breast density"}
_SMALL_MARK = "†"
_SMALL_NOTE = f"hatched = too few cases to judge ({SMALL_GROUP_RULE}); error bars = 95% intervals"


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


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def _ci(entry: dict, key: str) -> tuple[float, float]:
    """(low, high) of `entry[key + "_ci"]`, NaN where absent or null (older scores, empty denominators)."""
    pair = entry.get(f"{key}_ci") or (None, None)
    return _num(pair[0]), _num(pair[1])


def _fmt_ci(entry: dict, key: str) -> str:
    """`entry[key]` with its 95% interval, "0.712 [0.650, 0.770]", or the bare value when there is none."""
    low, high = _ci(entry, key)
    if math.isnan(low) and math.isnan(high):
        return _fmt(entry.get(key))
    return f"{_fmt(entry.get(key))} [{_fmt(low)}, {_fmt(high)}]"


def _tick(group: str, entry: dict) -> str:
    """Tick label of a subgroup bar: its name and, on a second line, its case count when known: "40-50\n(n=7)"."""
    return group if entry.get("n") is None else f"{group}\n(n={entry['n']})"


def _ordered(variable: str, groups: dict) -> list[str]:
    order = _ORDER.get(variable, ())
    return sorted(groups, key=lambda g: (order.index(g) if g in order else len(order), g))


def _bars(ax, groups: dict, order: list[str], series: dict[str, list[float]], title: str,
          ylim: tuple[float, float] | None, *, errors: dict[str, list[tuple[float, float]]] | None = None) -> None:
    """Grouped bars, one colour per series, each bar labelled with its value.

    Args:
        groups: {group: scores}; a group's ``n`` goes under its tick label, and a group flagged ``too_small`` is
            hatched and faded so it is not read like the others.
        order: `[G]` the groups, in the order shown.
        series: {name: `[G]` bar heights}.
        title: axes title.
        ylim: y range, or None to fit the bars, their intervals and the value labels.
        errors: {name: `[G]` (low, high)} 95% intervals drawn as error bars (NaN = none). They are drawn from
            low to high, not around the bar, because an official rate can lie outside its interval.
    """
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
        low, high = (np.array([pair[k] for pair in (errors or {}).get(name, [(np.nan, np.nan)] * len(values))],
                              dtype=float) for k in (0, 1))
        shown = np.isfinite(low) & np.isfinite(high)
        if shown.any():
            ax.errorbar(xs[shown], (low + high)[shown] / 2, yerr=(high - low)[shown] / 2, fmt="none",
                        ecolor="black", elinewidth=1, capsize=3)
        label_y = np.fmax(np.nan_to_num(values), np.where(shown, high, 0.0))  # above the bar and its whisker
        for xi, yi, v in zip(xs, label_y, values, strict=True):
            ax.annotate(_fmt(v), (xi, yi), xytext=(0, 2), textcoords="offset points", ha="center", fontsize=7)
        tops += [float(np.nanmax(label_y))] if len(label_y) else []
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_title(title, fontsize=9)
    if ylim is None:  # leave head room for the value labels
        top = max(tops)
        ylim = (0.0, 1.15 * top if top > 0 else 1.0)
    ax.set_ylim(*ylim)
    if len(series) > 1:
        ax.legend(handles=legend, fontsize=7, loc="upper right", ncols=len(legend))


def _seg_fairness(groups: dict) -> float:
    if not groups:
        return math.nan
    dsc = [_num(g["dsc"]) for g in groups.values()]
    nhd = [_num(g["norm_hd"]) for g in groups.values()]
    return 1.0 - 0.5 * ((max(dsc) - min(dsc)) + (max(nhd) - min(nhd)))


def _eo_disparity(groups: dict) -> float:
    if not groups:
        return math.nan
    tpr = [_num(g["tpr"]) for g in groups.values()]
    fpr = [_num(g["fpr"]) for g in groups.values()]
    return (max(tpr) - min(tpr)) + (max(fpr) - min(fpr))


def _plot_subgroups(part: dict, path: Path, title: str, row_height: float, columns: int,
                    draw: Callable[[list, str, dict, list[str]], None]) -> Path:
    """One row of ``columns`` axes per fairness variable, filled by ``draw(axes, variable, groups, order)`` from
    ``part["by_variable"]`` (``order``: the group names as shown), under ``title`` and above the small-group note."""
    fig = Figure(figsize=(9, row_height * len(FAIRNESS_VARIABLES)))
    axes = fig.subplots(len(FAIRNESS_VARIABLES), columns, squeeze=False)
    for row, variable in enumerate(FAIRNESS_VARIABLES):
        groups = part["by_variable"].get(variable, {})
        draw(axes[row], variable, groups, _ordered(variable, groups))
    fig.suptitle(title)
    fig.text(0.5, 0.005, _SMALL_NOTE, ha="center", va="bottom", fontsize=7)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    return save_png(fig, path)


def _plot_seg_subgroups(seg: dict, path: Path) -> Path:
    def draw(axes, variable: str, groups: dict, order: list[str]) -> None:
        fair = _fmt(_seg_fairness(groups))
        for ax, (key, name) in zip(axes, (("dsc", "mean DSC"), ("norm_hd", "mean NormHD")), strict=True):
            _bars(ax, groups, order, {name: [_num(groups[g][key]) for g in order]},
                  f"{_NAMES[variable]}: {name} (fairness {fair})", None,
                  errors={name: [_ci(groups[g], key) for g in order]})

    return _plot_subgroups(seg, path, "Segmentation by subgroup (higher DSC, lower NormHD is better)", 2.6, 2, draw)


def _plot_seg_per_case(seg: dict, path: Path) -> Path:
    dsc = [_num(m["dsc"]) for m in seg["per_case"].values()]
    nhd = [_num(m["norm_hd"]) for m in seg["per_case"].values()]
    fig = Figure(figsize=(9, 3))
    left, right = fig.subplots(1, 2)
    left.hist(dsc, bins=np.linspace(0, 1, 21), color="tab:green")
    left.set(title=f"DSC per case (mean {_fmt(seg['dsc'])})", xlabel="DSC", ylabel="cases")
    right.hist(nhd, bins=20, color="tab:red")
    right.set(title=f"NormHD per case (mean {_fmt(seg['norm_hd'])})", xlabel="NormHD (1 = empty vs non-empty)")
    fig.tight_layout()
    return save_png(fig, path)


def _plot_pcr_subgroups(cls: dict, path: Path) -> Path:
    def draw(axes, variable: str, groups: dict, order: list[str]) -> None:
        series = {"TPR": [_num(groups[g]["tpr"]) for g in order], "FPR": [_num(groups[g]["fpr"]) for g in order]}
        errors = {name: [_ci(groups[g], name.lower()) for g in order] for name in series}
        title = f"{_NAMES[variable]}: disparity (TPR range + FPR range) = {_fmt(_eo_disparity(groups))}"
        _bars(axes[0], groups, order, series, title, (0, 1.3), errors=errors)

    title = "pCR true- and false-positive rates by subgroup (equal bars = fair)"
    return _plot_subgroups(cls, path, title, 2.4, 1, draw)


def _plot_reliability(reliability: tuple, path: Path) -> Path:
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
    return save_png(fig, path)


def _zoom_box(overlay: Overlay, margin: int = 12) -> tuple[slice, slice]:
    both = overlay.expert | overlay.pred
    if not both.any():
        return slice(None), slice(None)
    rows, cols = np.flatnonzero(both.any(axis=1)), np.flatnonzero(both.any(axis=0))
    h, w = both.shape
    return (slice(max(rows[0] - margin, 0), min(rows[-1] + margin + 1, h)),
            slice(max(cols[0] - margin, 0), min(cols[-1] + margin + 1, w)))


def _plot_overlays(overlays: list[Overlay], path: Path) -> Path:
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
    return save_png(fig, path)


def _variable_rows(by_variable: dict, summary) -> list[str]:
    """One markdown row per fairness variable: its groups and `summary(groups)`."""
    rows = []
    for v in FAIRNESS_VARIABLES:
        groups = by_variable.get(v, {})
        rows.append(f"| {_NAMES[v]} | {', '.join(_ordered(v, groups)) or 'none'} | {_fmt(summary(groups))} |")
    return rows


def _group_rows(by_variable: dict, cells) -> list[str]:
    """One markdown row per subgroup: variable, group, n, `cells(entry)` and the too-small mark."""
    rows = []
    for v in FAIRNESS_VARIABLES:
        groups = by_variable.get(v, {})
        for g in _ordered(v, groups):
            entry = groups[g]
            mark = f"{_SMALL_MARK} too few cases" if entry.get("too_small") else ""
            rows.append(f"| {_NAMES[v]} | {g} | {_fmt(entry.get('n'))} | {' | '.join(cells(entry))} | {mark} |")
    return rows


def _interval_lines(part: dict, what: str) -> list[str]:
    """The sentence saying how the intervals of a table were made and what the † mark means."""
    method = part.get("intervals")
    if not method:
        return []
    small = any(e.get("too_small") for groups in part["by_variable"].values() for e in groups.values())
    lines = [f"{what}; [low, high] = {100 * method['level']:.0f}% interval ({method['means']} for means and "
             f"headline scores, {method['resamples']} resamples, seed {method['seed']}; {method['rates']} interval "
             "for rates)."]
    if small:
        lines += ["", f"{_SMALL_MARK} Too few cases to judge ({method['too_small']}): shown hatched in the plots; "
                  "their numbers are too uncertain to compare groups on."]
    return ["", *lines]


def _missing_lines(scores: dict, shown: int = 50) -> list[str]:
    """The "Missing predictions" section: cases scored as failures because they have no prediction."""
    missing = scores.get("missing_predictions")
    if not missing:
        return []
    total = (scores.get("scored_cases") or {}).get("n")
    lines = ["## Missing predictions", "",
             f"**{len(missing)}{f' of {total}' if total else ''} scored case(s) have no prediction** and are scored "
             "as the challenge scores a failed case: segmentation as an empty mask (DSC 0, HD95 infinite, NormHD 1), "
             "pCR as 0 with score 0. They are listed in scores.json (`missing_predictions`).", ""]
    for part, name in (("segmentation", "Segmentation"), ("classification", "pCR")):
        ids = (scores.get(part) or {}).get("missing_predictions") or []
        if ids:
            more = f" ... and {len(ids) - shown} more" if len(ids) > shown else ""
            lines.append(f"- {name} ({len(ids)}): {', '.join(ids[:shown])}{more}")
    return lines + [""]


def _markdown(scores: dict, images: dict[str, Path]) -> str:
    lines = ["# MAMA-MIA scores", "", *_missing_lines(scores)]
    seg, cls = scores.get("segmentation"), scores.get("classification")
    if seg:
        lines += ["## Segmentation", "", "| cases | DSC | NormHD | performance | fairness | ranking |",
                  "|---:|---:|---:|---:|---:|---:|",
                  f"| {len(seg['per_case'])} | {_fmt_ci(seg, 'dsc')} | {_fmt_ci(seg, 'norm_hd')} | "
                  f"{_fmt_ci(seg, 'performance')} | {_fmt(seg['fairness'])} | {_fmt(seg['ranking'])} |", "",
                  "| variable | groups | fairness |", "|---|---|---:|"]
        lines += _variable_rows(seg["by_variable"], _seg_fairness)
        lines += ["", "| variable | group | n | mean DSC | mean NormHD | |", "|---|---|---:|---:|---:|---|"]
        lines += _group_rows(seg["by_variable"], lambda e: (_fmt_ci(e, "dsc"), _fmt_ci(e, "norm_hd")))
        lines += _interval_lines(seg, "n = cases of the group")
        worst = sorted(seg["per_case"].items(), key=lambda kv: _num(kv[1]["dsc"]))[:10]
        lines += ["", "Lowest DSC (HD95 in voxels unless scored spacing-aware; n/a = one mask empty):", "",
                  "| case | DSC | HD95 | NormHD |", "|---|---:|---:|---:|"]
        lines += [f"| {pid} | {_fmt(m['dsc'])} | {_fmt(m['hd95'])} | {_fmt(m['norm_hd'])} |" for pid, m in worst]
        lines.append("")
    else:
        lines += ["## Segmentation", "", "Not scored (no predicted masks).", ""]
    if cls:
        lines += ["## pCR", "", "| cases (pCR / no pCR) | balanced accuracy | AUC | fairness (1 - EO) | ranking |",
                  "|---:|---:|---:|---:|---:|",
                  f"| {_fmt(cls.get('n'))} ({_fmt(cls.get('n_pos'))} / {_fmt(cls.get('n_neg'))}) | "
                  f"{_fmt_ci(cls, 'balanced_accuracy')} | {_fmt_ci(cls, 'auc')} | {_fmt(cls['fairness'])} | "
                  f"{_fmt(cls['ranking'])} |", "", "| variable | groups | TPR range + FPR range |", "|---|---|---:|"]
        lines += _variable_rows(cls["by_variable"], _eo_disparity)
        lines += ["", "| variable | group | n | pCR / no pCR | TPR | FPR | |", "|---|---|---:|---:|---:|---:|---|"]
        lines += _group_rows(cls["by_variable"], lambda e: (f"{_fmt(e.get('n_pos'))} / {_fmt(e.get('n_neg'))}",
                                                            _fmt_ci(e, "tpr"), _fmt_ci(e, "fpr")))
        lines += _interval_lines(cls, "TPR and FPR as the challenge counts them (both 0 when a group holds one "
                                 "label); their intervals bound TP out of the group's pCR cases and FP out of its "
                                 "no-pCR cases")
        lines.append("")
    else:
        lines += ["## pCR", "", "Not scored (no predictions.csv).", ""]
    captions = {"seg_subgroups": "Segmentation by subgroup", "seg_per_case": "Per-case segmentation",
                "overlays": "Best and worst cases", "pcr_subgroups": "pCR rates by subgroup",
                "reliability": "pCR calibration"}
    for key, path in images.items():
        lines += [f"### {captions[key]}", "", f"![{captions[key]}]({path.name})", ""]
    if scores.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in scores["notes"]] + [""]
    return "\n".join(lines)


def write_report(
    scores: dict, out_dir: str | Path, *, overlays: list[Overlay] | None = None, reliability: tuple | None = None
) -> Path:
    """Write `report.md` and its PNG plots into `out_dir`.

    Args:
        scores: the `evaluate` / scores.json dict ("segmentation" and/or "classification", optional "notes").
        out_dir: output folder (created).
        overlays: `make_overlay(...)` slices to show, e.g. best and worst case.
        reliability: `(mean_prob, frac_pos, counts)` as returned by `metrics.classification.reliability_curve`.

    Returns:
        Path of report.md.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images: dict[str, Path] = {}
    if scores.get("segmentation"):
        images["seg_subgroups"] = _plot_seg_subgroups(scores["segmentation"], out_dir / "seg_subgroups.png")
        images["seg_per_case"] = _plot_seg_per_case(scores["segmentation"], out_dir / "seg_per_case.png")
    if overlays:
        images["overlays"] = _plot_overlays(list(overlays), out_dir / "overlays.png")
    if scores.get("classification"):
        images["pcr_subgroups"] = _plot_pcr_subgroups(scores["classification"], out_dir / "pcr_subgroups.png")
    if reliability is not None and np.asarray(reliability[2]).sum() > 0:
        images["reliability"] = _plot_reliability(reliability, out_dir / "reliability.png")
    path = out_dir / "report.md"
    return write_text(path, _markdown(scores, images))
