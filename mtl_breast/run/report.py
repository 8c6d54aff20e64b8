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

What each plot shows is decided here; `mtl_breast.figures` draws it (on the Agg canvas, never through pyplot).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mtl_breast.figures import (
    BarPanel,
    Overlay,
    bar_panels_figure,
    format_value,
    overlays_figure,
    per_case_figure,
    reliability_figure,
    save_png,
)
from mtl_breast.files import write_text
from mtl_breast.metrics.intervals import SMALL_GROUP_RULE
from mtl_breast.metrics.subgroups import AGE_LABELS, DENSITY_LABELS, FAIRNESS_VARIABLES, MENOPAUSE_LABELS

_ORDER = {"age": AGE_LABELS, "menopausal_status": MENOPAUSE_LABELS, "breast_density": DENSITY_LABELS}
_NAMES = {"age": "Age", "menopausal_status": "Menopausal status", "breast_density": "Breast density"}
_SMALL_MARK = "†"
_fmt = format_value  # the plots' number format, so the tables read as the plots do
_SMALL_NOTE = f"hatched = too few cases to judge ({SMALL_GROUP_RULE}); error bars = 95% intervals"


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


def _ordered(variable: str, groups: dict) -> list[str]:
    order = _ORDER.get(variable, ())
    return sorted(groups, key=lambda g: (order.index(g) if g in order else len(order), g))


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


def _subgroup_rows(part: dict, panels: Callable[[str, dict, list[str]], list[BarPanel]]) -> list[list[BarPanel]]:
    """One row of bar panels per fairness variable: ``panels(variable, groups, order)`` from ``part["by_variable"]``
    (``order``: the group names as shown)."""
    rows = []
    for variable in FAIRNESS_VARIABLES:
        groups = part["by_variable"].get(variable, {})
        rows.append(panels(variable, groups, _ordered(variable, groups)))
    return rows


def _plot_seg_subgroups(seg: dict, path: Path) -> Path:
    def panels(variable: str, groups: dict, order: list[str]) -> list[BarPanel]:
        fair = _fmt(_seg_fairness(groups))
        return [BarPanel(groups, order, {name: [_num(groups[g][key]) for g in order]},
                         f"{_NAMES[variable]}: {name} (fairness {fair})", None,
                         errors={name: [_ci(groups[g], key) for g in order]})
                for key, name in (("dsc", "mean DSC"), ("norm_hd", "mean NormHD"))]

    title = "Segmentation by subgroup (higher DSC, lower NormHD is better)"
    return save_png(bar_panels_figure(_subgroup_rows(seg, panels), title, _SMALL_NOTE, 2.6), path)


def _plot_seg_per_case(seg: dict, path: Path) -> Path:
    dsc = [_num(m["dsc"]) for m in seg["per_case"].values()]
    nhd = [_num(m["norm_hd"]) for m in seg["per_case"].values()]
    return save_png(per_case_figure(dsc, nhd, seg["dsc"], seg["norm_hd"]), path)


def _plot_pcr_subgroups(cls: dict, path: Path) -> Path:
    def panels(variable: str, groups: dict, order: list[str]) -> list[BarPanel]:
        series = {"TPR": [_num(groups[g]["tpr"]) for g in order], "FPR": [_num(groups[g]["fpr"]) for g in order]}
        errors = {name: [_ci(groups[g], name.lower()) for g in order] for name in series}
        title = f"{_NAMES[variable]}: disparity (TPR range + FPR range) = {_fmt(_eo_disparity(groups))}"
        return [BarPanel(groups, order, series, title, (0, 1.3), errors=errors)]

    title = "pCR true- and false-positive rates by subgroup (equal bars = fair)"
    return save_png(bar_panels_figure(_subgroup_rows(cls, panels), title, _SMALL_NOTE, 2.4), path)


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
        overlays: `figures.make_overlay(...)` slices to show, e.g. best and worst case.
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
        images["overlays"] = save_png(overlays_figure(list(overlays)), out_dir / "overlays.png")
    if scores.get("classification"):
        images["pcr_subgroups"] = _plot_pcr_subgroups(scores["classification"], out_dir / "pcr_subgroups.png")
    if reliability is not None and np.asarray(reliability[2]).sum() > 0:
        images["reliability"] = save_png(reliability_figure(reliability), out_dir / "reliability.png")
    path = out_dir / "report.md"
    return write_text(path, _markdown(scores, images))
