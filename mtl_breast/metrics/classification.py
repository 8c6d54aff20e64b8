"""pCR metrics: balanced accuracy, ROC AUC (alone, with its bootstrap interval, and the paired difference of two
scores), equalized-odds fairness, threshold choice and calibration.

The challenge rules (from the official task-2 scoring script):

- balanced accuracy as `sklearn.metrics.balanced_accuracy_score`: mean recall over the classes present in
  the truth;
- per subgroup, TPR = TP / (TP + FN) and FPR = FP / (FP + TN), each 0 when its denominator is 0, and both
  0 when truth and prediction of the group together hold a single label (the official
  `confusion_matrix(...).ravel()` fails to unpack then and the script falls back to 0, 0);
- disparity of a variable = (max - min TPR) + (max - min FPR) over its groups; EO = clip(mean over
  variables, 0, 1); fairness = 1 - EO.

Missing truth counting as 0 is a rule of the challenge score (`mamamia.score_classification` applies
it); the general-purpose functions here leave out cases whose truth is NaN.
"""
# References:
#   LidiaGarrucho/MAMA-MIA, src/challenge/scoring_task2.py (balanced accuracy, TPR/FPR, equalized odds)
#   Guo et al. 2017, "On Calibration of Modern Neural Networks" (temperature scaling)

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy.optimize import minimize_scalar
from scipy.stats import rankdata

from mtl_breast.metrics.intervals import bootstrap_interval


def _labels(y: ArrayLike, name: str) -> np.ndarray:
    """A 0/1 float vector (NaN kept); anything else is an error."""
    arr = np.asarray(y, dtype=float).reshape(-1)
    bad = ~np.isnan(arr) & (arr != 0) & (arr != 1)
    if bad.any():
        raise ValueError(f"{name} must hold 0/1 labels (NaN = unknown); got {np.unique(arr[bad])[:5]}")
    return arr


def _hard(y: np.ndarray) -> np.ndarray:
    """Hard 0/1 predictions; a NaN prediction is an error (the challenge fills missing ones with 0 first)."""
    y = _labels(y, "y_pred")
    if np.isnan(y).any():
        raise ValueError("y_pred holds NaN; hard predictions must be 0 or 1")
    return y


def _paired(y_true: ArrayLike, other: ArrayLike, name: str) -> tuple[np.ndarray, np.ndarray]:
    yt = _labels(y_true, "y_true")
    o = np.asarray(other, dtype=float).reshape(-1)
    if yt.shape != o.shape:
        raise ValueError(f"y_true has {yt.size} values but {name} has {o.size}")
    return yt, o


def balanced_accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Mean per-class recall over the classes present in `y_true` (sklearn's definition).

    Args:
        y_true: `[N]` 0/1 truth; NaN entries are left out.
        y_pred: `[N]` 0/1 hard predictions.

    Returns:
        balanced accuracy, NaN when no case has a known truth.
    """
    yt, yp = _paired(y_true, y_pred, "y_pred")
    keep = ~np.isnan(yt)
    yt, yp = yt[keep], _hard(yp[keep])
    if yt.size == 0:
        return float("nan")
    recalls = [float(np.mean(yp[yt == c] == c)) for c in (0.0, 1.0) if (yt == c).any()]
    return float(np.mean(recalls))


def roc_auc(y_true: ArrayLike, score: ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney form, ties count one half).

    Args:
        y_true: `[N]` 0/1 truth; NaN entries are left out.
        score: `[N]` any monotone score (probability or logit); NaN entries are left out.

    Returns:
        AUC, NaN when fewer than two classes remain.
    """
    yt, s = _paired(y_true, score, "score")
    keep = ~np.isnan(yt) & ~np.isnan(s)
    yt, s = yt[keep], s[keep]
    n_pos = int((yt == 1).sum())
    n_neg = yt.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)  # average ranks handle ties
    return float((ranks[yt == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc_with_interval(y: Sequence[float], score: Sequence[float], *, seed: int = 0) -> dict[str, float]:
    """``{"auc", "low", "high"}``: ROC AUC and its 95% bootstrap interval over cases (`intervals.bootstrap_interval`;
    resamples holding one class have no AUC and are left out)."""
    y, score = np.asarray(y, dtype=np.float64), np.asarray(score, dtype=np.float64)
    low, high = bootstrap_interval(lambda i: roc_auc(y[i], score[i]), len(y), seed=seed)
    return {"auc": roc_auc(y, score), "low": low, "high": high}


def paired_auc_difference(y: Sequence[float], score: Sequence[float], other: Sequence[float], *,
                          seed: int = 0) -> dict[str, float]:
    """``{"difference", "low", "high"}``: AUC of ``score`` minus AUC of ``other`` on the same cases, with a 95%
    bootstrap interval that resamples the cases once for both (so what the two share cancels)."""
    y = np.asarray(y, dtype=np.float64)
    score, other = np.asarray(score, dtype=np.float64), np.asarray(other, dtype=np.float64)
    if not len(y) == len(score) == len(other):
        raise ValueError(f"need one score per case: {len(y)} labels, {len(score)} and {len(other)} scores")
    low, high = bootstrap_interval(lambda i: roc_auc(y[i], score[i]) - roc_auc(y[i], other[i]), len(y), seed=seed)
    return {"difference": roc_auc(y, score) - roc_auc(y, other), "low": low, "high": high}


def tpr_fpr(y_true: ArrayLike, y_pred: ArrayLike) -> tuple[float, float]:
    """True- and false-positive rates of one subgroup under the challenge's rules.

    Args:
        y_true: `[N]` 0/1 truth of the group's cases; NaN entries are left out.
        y_pred: `[N]` 0/1 hard predictions.

    Returns:
        (tpr, fpr); a rate is 0 when its denominator is 0, and both are 0 when truth and prediction together
        hold a single label (or the group is empty).
    """
    yt, yp = _paired(y_true, y_pred, "y_pred")
    keep = ~np.isnan(yt)
    yt, yp = yt[keep], _hard(yp[keep])
    if np.unique(np.concatenate([yt, yp])).size < 2:
        return 0.0, 0.0
    tp = int(((yt == 1) & (yp == 1)).sum())
    fn = int(((yt == 1) & (yp == 0)).sum())
    fp = int(((yt == 0) & (yp == 1)).sum())
    tn = int(((yt == 0) & (yp == 0)).sum())
    return (tp / (tp + fn) if tp + fn else 0.0), (fp / (fp + tn) if fp + tn else 0.0)


def _group_index(groups: Mapping[str, Sequence]) -> dict[str, dict[str, np.ndarray]]:
    """{variable: {group label: case indices}}; None/NaN labels drop out of that variable."""
    index: dict[str, dict[str, np.ndarray]] = {}
    for variable, labels in groups.items():
        names = np.array([None if pd.isna(lab) else str(lab) for lab in labels], dtype=object)
        index[variable] = {g: np.flatnonzero(names == g) for g in sorted({g for g in names if g is not None})}
    return index


def _equalized_odds(yt: np.ndarray, yp: np.ndarray, index: dict[str, dict[str, np.ndarray]]) -> dict:
    by_variable, disparity = {}, {}
    for variable, members in index.items():
        rates = {g: tpr_fpr(yt[idx], yp[idx]) for g, idx in members.items()}
        by_variable[variable] = {g: {"tpr": t, "fpr": f} for g, (t, f) in rates.items()}
        if rates:  # a variable nobody has a value for cannot show a disparity; it is left out of the mean
            tprs, fprs = [t for t, _ in rates.values()], [f for _, f in rates.values()]
            disparity[variable] = (max(tprs) - min(tprs)) + (max(fprs) - min(fprs))
    eo = float(np.clip(np.mean(list(disparity.values())), 0.0, 1.0)) if disparity else float("nan")
    return {"fairness": 1.0 - eo, "disparity": disparity, "by_variable": by_variable}


def equalized_odds(y_true: ArrayLike, y_pred: ArrayLike, groups: Mapping[str, Sequence]) -> dict:
    """Equalized-odds fairness of hard predictions across subgroup variables.

    Args:
        y_true: `[N]` 0/1 truth (the challenge fills unknown truth with 0 before calling).
        y_pred: `[N]` 0/1 hard predictions.
        groups: {variable: `[N]` group labels}, None/NaN where a case has no value for that variable.

    Returns:
        {"fairness": 1 - clip(mean disparity, 0, 1), "disparity": {variable: float},
        "by_variable": {variable: {group: {"tpr", "fpr"}}}}. Variables with no labelled case are left out
        of the mean; fairness is NaN when none is left.
    """
    yt, yp = _paired(y_true, y_pred, "y_pred")
    for variable, labels in groups.items():
        if len(labels) != yt.size:
            raise ValueError(f"groups[{variable!r}] has {len(labels)} labels for {yt.size} cases")
    return _equalized_odds(yt, _hard(yp), _group_index(groups))


def choose_threshold(
    y_true: ArrayLike,
    score: ArrayLike,
    objective: Literal["balanced_accuracy", "ranking"] = "balanced_accuracy",
    groups: Mapping[str, Sequence] | None = None,
) -> float:
    """Threshold on `score` (predict pCR when score >= threshold) that maximises a challenge objective.

    Candidates are the midpoints between consecutive distinct scores, so at least one validation case falls
    on each side: a constant prediction scores fairness 1 and balanced accuracy 0.5 (ranking 0.75) whatever
    the model, and is never chosen. Ties go to the middle candidate of the best ones.

    Args:
        y_true: `[N]` 0/1 validation truth; cases with NaN truth or NaN score are left out.
        score: `[N]` probabilities or logits.
        objective: "balanced_accuracy", or "ranking" = 0.5 * BA + 0.5 * equalized-odds fairness.
        groups: {variable: `[N]` group labels} (e.g. `subgroup_table(...)` columns aligned with y_true);
            required for "ranking".

    Returns:
        the threshold, in the units of `score`; the single distinct score itself when there is only one.
    """
    if objective not in ("balanced_accuracy", "ranking"):
        raise ValueError(f"objective must be 'balanced_accuracy' or 'ranking', not {objective!r}")
    if objective == "ranking" and groups is None:
        raise ValueError("objective='ranking' needs the subgroup labels (groups=...)")
    yt, s = _paired(y_true, score, "score")
    keep = ~np.isnan(yt) & ~np.isnan(s)
    if not keep.any():
        raise ValueError("no validation case with both a known label and a score")
    yt, s = yt[keep], s[keep]
    distinct = np.unique(s)
    if distinct.size == 1:
        return float(distinct[0])
    candidates = (distinct[:-1] + distinct[1:]) / 2
    if objective == "ranking":
        kept = np.flatnonzero(keep)
        index = _group_index({v: [list(labels)[i] for i in kept] for v, labels in groups.items()})
    values = np.empty(candidates.size)
    for i, t in enumerate(candidates):
        pred = (s >= t).astype(float)
        ba = balanced_accuracy(yt, pred)
        if objective == "ranking":
            fairness = _equalized_odds(yt, pred, index)["fairness"]
            values[i] = 0.5 * ba + 0.5 * (1.0 if np.isnan(fairness) else fairness)
        else:
            values[i] = ba
    best = np.flatnonzero(values >= values.max() - 1e-12)
    return float(candidates[best[len(best) // 2]])


def reliability_curve(
    y_true: ArrayLike, prob: ArrayLike, bins: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Calibration of pCR probabilities in equal-width bins over [0, 1].

    Args:
        y_true: `[N]` 0/1 truth; NaN entries are left out (an unknown outcome is not a negative here).
        prob: `[N]` predicted probabilities in [0, 1].
        bins: number of bins.

    Returns:
        (mean predicted probability, observed pCR fraction, case count), each `[bins]`; NaN for empty bins.
    """
    yt, p = _paired(y_true, prob, "prob")
    keep = ~np.isnan(yt) & ~np.isnan(p)
    yt, p = yt[keep], p[keep]
    if ((p < 0) | (p > 1)).any():
        raise ValueError("reliability_curve needs probabilities in [0, 1]; apply a sigmoid to logits first")
    which = np.minimum((p * bins).astype(int), bins - 1)  # p == 1 belongs to the last bin
    counts = np.bincount(which, minlength=bins).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_prob = np.bincount(which, weights=p, minlength=bins) / counts
        frac_pos = np.bincount(which, weights=yt, minlength=bins) / counts
    return mean_prob, frac_pos, counts.astype(int)


def temperature_scale(logits: ArrayLike, y_true: ArrayLike) -> float:
    """Temperature T > 0 minimising the binary NLL of sigmoid(logits / T) on validation data.

    Args:
        logits: `[N]` raw pCR logits.
        y_true: `[N]` 0/1 truth; NaN entries are left out.

    Returns:
        T (divide logits by it before the sigmoid), searched over [exp(-5), exp(5)].
    """
    yt, z = _paired(y_true, logits, "logits")
    keep = ~np.isnan(yt)
    yt, z = yt[keep], z[keep]
    if yt.size == 0 or not np.isfinite(z).all():
        raise ValueError("temperature_scale needs finite logits and at least one known label")

    def nll(log_t: float) -> float:
        zt = z / np.exp(log_t)
        return float(np.mean(np.logaddexp(0.0, zt) - yt * zt))  # stable -log-likelihood of a Bernoulli

    result = minimize_scalar(nll, bounds=(-5.0, 5.0), method="bounded", options={"xatol": 1e-6})
    return float(np.exp(result.x))
