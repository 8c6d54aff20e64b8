"""MAMA-MIA challenge scores (DESIGN.md section 7): segmentation and pCR, performance and fairness.

`score_segmentation` and `score_classification` work on tables and return the challenge numbers;
`mtl_breast.run.evaluate` reads a prediction folder and a MAMA-MIA root, scores with them, and writes
`scores.json` and `report.md` (its docstring lists how files and missing predictions are read).

Choices where the official scripts are silent or broken (all deliberate, documented here):

- Group means are computed over patients indexed by patient_id. (The official task-1 script writes the
  per-case metrics into new rows keyed by patient_id next to a 0..N-1 index, so every group mean is NaN.)
- Only groups that hold at least one case enter a max-min disparity (the official `groupby` on a
  categorical age column also lists empty age bins). A variable with no labelled case at all is left out
  of the fairness mean (the official scripts crash on it); fairness is NaN (null) when none is left.
- Non-finite numbers are written to JSON as null: `hd95` is null exactly when it is infinite (one mask
  empty; `norm_hd` is then 1), `auc` is null when it is undefined (one class only).

Uncertainty (`intervals=True`, which `evaluate` always asks for; `metrics.intervals` has the methods and the
small-group rule). The scores themselves do not change; keys are only added:

- headline: `n` cases and `<score>_ci` = [low, high], a 95% percentile bootstrap over cases (seeded, 2000
  resamples) of dsc, norm_hd and performance, or of balanced_accuracy and auc (with `n_pos`, `n_neg`);
- every subgroup entry: `n`, `too_small`, and `dsc_ci` / `norm_hd_ci` (bootstrap of the group mean) or `n_pos`,
  `n_neg`, `tpr_ci` (Wilson, TP out of the group's positives) / `fpr_ci` (Wilson, FP out of its negatives). An
  interval is null when its denominator is 0. The Wilson interval is that of the observed proportion: where the
  official rule zeroes both rates of a single-label group, the reported 0 can lie outside it, and such a group
  lacks one class, so it is always `too_small`;
- `intervals`: how they were made ({"level", "means", "rates", "resamples", "seed", "too_small"}).
"""
# References:
#   LidiaGarrucho/MAMA-MIA, src/challenge/scoring_task1.py (segmentation performance, fairness, ranking)
#   LidiaGarrucho/MAMA-MIA, src/challenge/scoring_task2.py (pCR balanced accuracy, equalized odds, ranking)

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from mtl_breast.metrics.classification import auc_with_interval, balanced_accuracy, equalized_odds, roc_auc
from mtl_breast.metrics.intervals import (
    bootstrap_interval,
    describe,
    group_means,
    group_rates,
    percentile_interval,
    resample_indices,
)
from mtl_breast.metrics.subgroups import FAIRNESS_VARIABLES

ALPHA = 0.5  # weight of fairness against performance in the ranking score


def _aligned_groups(groups: pd.DataFrame, index: pd.Index) -> pd.DataFrame:
    """Subgroup labels in the order of `index`; patients absent from `groups` have no label at all."""
    missing = [v for v in FAIRNESS_VARIABLES if v not in groups.columns]
    if missing:
        raise ValueError(f"groups lacks columns {missing}; build it with subgroup_table()")
    return groups.reindex(index)[list(FAIRNESS_VARIABLES)]


def _segmentation_intervals(dsc: np.ndarray, nhd: np.ndarray, seed: int) -> dict[str, Any]:
    """Headline `n` and bootstrap intervals of mean DSC, mean NormHD and performance.

    Args:
        dsc, nhd: `[N]` per-case DSC and NormHD (finite: NormHD is 1 where HD95 is infinite).
        seed: resampling seed; the three intervals share the same resamples.
    """
    idx = resample_indices(len(dsc), seed=seed)  # [RESAMPLES, N]
    mean_dsc, mean_nhd = dsc[idx].mean(axis=1), nhd[idx].mean(axis=1)
    return {"n": len(dsc), "dsc_ci": percentile_interval(mean_dsc), "norm_hd_ci": percentile_interval(mean_nhd),
            "performance_ci": percentile_interval(0.5 * (mean_dsc + (1.0 - mean_nhd))),
            "intervals": describe(seed)}


def score_segmentation(
    per_case: pd.DataFrame, groups: pd.DataFrame, *, intervals: bool = False, seed: int = 0
) -> dict[str, Any]:
    """Task-1 scores from per-case metrics.

    Args:
        per_case: indexed by patient_id, columns dsc and norm_hd (hd95 optional, copied to the output).
        groups: `subgroup_table(...)` output, indexed by patient_id.
        intervals: also return case counts and 95% intervals (module docstring); off by default because a
            validation loop needs only the scores.
        seed: bootstrap seed when `intervals`.

    Returns:
        {"dsc", "norm_hd", "performance", "fairness", "ranking", "per_case": {pid: {"dsc", "hd95",
        "norm_hd"}}, "by_variable": {variable: {group: {"dsc", "norm_hd"}}}}, where
        performance = 0.5 * (mean DSC + 1 - mean NormHD), fairness = mean over variables of
        1 - 0.5 * (range of group-mean DSC + range of group-mean NormHD), ranking = 0.5 * (performance + fairness).
    """
    if per_case.empty:
        raise ValueError("score_segmentation needs at least one case")
    if per_case.index.has_duplicates:
        raise ValueError(f"duplicate patient_id in per_case: {per_case.index[per_case.index.duplicated()].tolist()}")
    dsc = per_case["dsc"].astype(float)
    nhd = per_case["norm_hd"].astype(float)
    performance = 0.5 * (dsc.mean() + (1.0 - nhd.mean()))
    labels = _aligned_groups(groups, per_case.index)
    by_variable: dict[str, dict[str, dict[str, float]]] = {}
    fairness_v = []
    for variable in FAIRNESS_VARIABLES:
        table = pd.DataFrame({"dsc": dsc, "norm_hd": nhd, "group": labels[variable]}).dropna(subset=["group"])
        means = table.groupby(table["group"].astype(str), sort=True)[["dsc", "norm_hd"]].mean()
        by_variable[variable] = {g: {"dsc": float(r.dsc), "norm_hd": float(r.norm_hd)} for g, r in means.iterrows()}
        if intervals:
            for g, rows in table.groupby(table["group"].astype(str), sort=True):
                by_variable[variable][g].update(group_means({k: rows[k].to_numpy() for k in ("dsc", "norm_hd")}, seed))
        if len(means):
            spread = (means["dsc"].max() - means["dsc"].min()) + (means["norm_hd"].max() - means["norm_hd"].min())
            fairness_v.append(1.0 - 0.5 * spread)
    fairness = float(np.mean(fairness_v)) if fairness_v else math.nan
    hd = per_case["hd95"].astype(float) if "hd95" in per_case else pd.Series(math.nan, index=per_case.index)
    extra = _segmentation_intervals(dsc.to_numpy(), nhd.to_numpy(), seed) if intervals else {}
    return {
        "dsc": float(dsc.mean()),
        "norm_hd": float(nhd.mean()),
        "performance": float(performance),
        "fairness": fairness,
        "ranking": float((1 - ALPHA) * performance + ALPHA * fairness),
        "per_case": {
            str(pid): {"dsc": float(dsc[pid]), "hd95": float(hd[pid]), "norm_hd": float(nhd[pid])}
            for pid in per_case.index
        },
        "by_variable": by_variable,
        **extra,
    }


def _classification_intervals(yt: np.ndarray, yp: np.ndarray, s: np.ndarray | None, seed: int) -> dict[str, Any]:
    """Headline counts and bootstrap intervals of balanced accuracy and AUC.

    Args:
        yt, yp: `[N]` 0/1 truth (unknown already 0) and hard predictions.
        s: `[N]` scores for the AUC, or None. Resamples holding one class only leave the AUC undefined and are
            left out of its interval.
        seed: resampling seed; both intervals share the same resamples.
    """
    n_pos = int((yt == 1).sum())
    ba_ci = bootstrap_interval(lambda i: balanced_accuracy(yt[i], yp[i]), len(yt), seed=seed)
    auc = None if s is None else auc_with_interval(yt, s, seed=seed)  # the same resamples as the BA interval
    auc_ci = (math.nan, math.nan) if auc is None else (auc["low"], auc["high"])
    return {"n": len(yt), "n_pos": n_pos, "n_neg": len(yt) - n_pos, "balanced_accuracy_ci": ba_ci, "auc_ci": auc_ci,
            "intervals": describe(seed)}


def score_classification(
    y_true: pd.Series, y_pred: pd.Series, score: pd.Series | None, groups: pd.DataFrame, *, intervals: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Task-2 scores of hard pCR predictions.

    Args:
        y_true: pCR truth indexed by patient_id (the cases scored); NaN (unknown) counts as 0.
        y_pred: 0/1 predictions indexed by patient_id; a case without one counts as 0.
        score: probabilities/logits for the AUC (not part of the ranking), or None.
        groups: `subgroup_table(...)` output, indexed by patient_id.
        intervals: also return case counts and 95% intervals (module docstring).
        seed: bootstrap seed when `intervals`.

    Returns:
        {"balanced_accuracy", "fairness", "ranking", "auc", "by_variable": {variable: {group: {"tpr", "fpr"}}}},
        with fairness = 1 - clip(mean over variables of (TPR range + FPR range), 0, 1) and
        ranking = 0.5 * (balanced accuracy + fairness).
    """
    if y_true.empty:
        raise ValueError("score_classification needs at least one case")
    index = y_true.index
    yt = y_true.astype(float).fillna(0.0).to_numpy()
    yp = y_pred.reindex(index).astype(float).fillna(0.0).to_numpy()
    ba = balanced_accuracy(yt, yp)
    labels = _aligned_groups(groups, index)
    eo = equalized_odds(yt, yp, {v: labels[v].tolist() for v in FAIRNESS_VARIABLES})
    s = None if score is None else score.reindex(index).astype(float).to_numpy()
    auc = math.nan if s is None else roc_auc(yt, s)
    extra = {}
    if intervals:
        extra = _classification_intervals(yt, yp, s, seed)
        for variable in FAIRNESS_VARIABLES:
            named = labels[variable].notna().to_numpy()
            names = labels[variable].astype(str).to_numpy()
            for g, entry in eo["by_variable"][variable].items():
                member = named & (names == g)
                entry.update(group_rates(yt[member], yp[member]))
    return {
        "balanced_accuracy": ba,
        "fairness": eo["fairness"],
        "ranking": float((1 - ALPHA) * ba + ALPHA * eo["fairness"]),
        "auc": auc,
        "by_variable": eo["by_variable"],
        **extra,
    }


