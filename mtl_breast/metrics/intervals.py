"""95% intervals for the scores a report shows: Wilson for rates, percentile bootstrap for means and scores.

Why two methods:

- a rate k/n (TPR over the positives of a group, FPR over its negatives) has a closed-form interval. Wilson's
  score interval stays inside [0, 1] and is not degenerate at 0/n or n/n, unlike the normal approximation
  (0/10 would give [0, 0]), so a perfect rate on a small group still shows its uncertainty;
- a mean of per-case values (DSC, NormHD) or a score of the whole set (balanced accuracy, AUC) has no simple
  distribution: resample the cases with replacement and take the percentiles of the statistic.

Every bootstrap is seeded, so the same inputs give the same interval. `resample_indices` draws one resample
at a time (`rng.integers(0, n, n)`), the order the baselines' bootstrap always used, so intervals computed
before this module existed do not move.

Small groups (`too_small`): an interval from a handful of cases is mostly width; a group is marked too small to
judge when it holds fewer than `MIN_GROUP_CASES` (10) cases, or, for pCR rates, fewer than `MIN_CLASS_CASES` (5)
cases with pCR or without pCR (the denominators of TPR and FPR). The numbers are still reported.
"""
# References:
#   Wilson 1927, "Probable inference, the law of succession, and statistical inference" (score interval)
#   Efron & Tibshirani 1993, "An Introduction to the Bootstrap", ch. 13 (percentile interval)

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import norm

__all__ = ["LEVEL", "MIN_CLASS_CASES", "MIN_GROUP_CASES", "RESAMPLES", "SMALL_GROUP_RULE", "bootstrap_interval",
           "describe", "group_means", "group_rates", "mean_interval", "percentile_interval", "resample_indices",
           "too_small", "wilson_interval"]

LEVEL = 0.95  # coverage of every interval written to scores.json
RESAMPLES = 2000  # bootstrap resamples: the 2.5 % tail then rests on 50 values
MIN_GROUP_CASES = 10  # a group with fewer cases is too small to judge
MIN_CLASS_CASES = 5  # ... and so is a pCR group with fewer positives (TPR) or negatives (FPR)
SMALL_GROUP_RULE = (f"fewer than {MIN_GROUP_CASES} cases, or for pCR rates fewer than {MIN_CLASS_CASES} cases "
                    "with pCR or without pCR")


def wilson_interval(k: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n.

    Args:
        k: successes (e.g. true positives), 0 <= k <= n.
        n: trials (e.g. positives of the group, the TPR denominator).
        level: coverage, e.g. 0.95.

    Returns:
        (low, high) within [0, 1]; (NaN, NaN) when n == 0 (no rate to bound).
    """
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval needs 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return float("nan"), float("nan")
    z = float(norm.ppf(0.5 + level / 2))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # At k = 0 or k = n the exact bound is 0 or 1; write it so rather than as 1 - 1e-16.
    return (0.0 if k == 0 else float(centre - half)), (1.0 if k == n else float(centre + half))


def resample_indices(n: int, samples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """Bootstrap resamples of n cases: `[samples, n]` indices drawn with replacement, seeded."""
    rng = np.random.default_rng(seed)
    if n == 0:
        return np.zeros((samples, 0), dtype=np.int64)
    return np.stack([rng.integers(0, n, n) for _ in range(samples)])


def percentile_interval(values: ArrayLike, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates `[samples]`; non-finite replicates are left out.

    Returns:
        (low, high); (NaN, NaN) when no replicate is finite.
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    values = values[np.isfinite(values)]
    if not len(values):
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2 * 100
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def bootstrap_interval(statistic: Callable[[np.ndarray], float], n: int, *, samples: int = RESAMPLES,
                       seed: int = 0, level: float = LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(indices)`` over ``n`` cases resampled with replacement.

    Resamples where the statistic is undefined (NaN, e.g. an AUC of a one-class resample) are left out.

    Args:
        statistic: maps `[n]` case indices (one resample) to a number, e.g. the balanced accuracy of those cases.
        n: number of cases.
        samples: number of resamples.
        seed: seed of the resampling; the same seed gives the same interval.
        level: coverage.

    Returns:
        (low, high); (NaN, NaN) when the statistic is undefined on every resample.
    """
    return percentile_interval([statistic(i) for i in resample_indices(n, samples, seed)], level)


def mean_interval(values: ArrayLike, *, samples: int = RESAMPLES, seed: int = 0,
                  level: float = LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-case values (vectorised `bootstrap_interval`).

    Args:
        values: `[N]` per-case values, e.g. DSC or NormHD of the cases of one subgroup.

    Returns:
        (low, high) in the units of `values`; (NaN, NaN) when N == 0.
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if not len(values):
        return float("nan"), float("nan")
    return percentile_interval(values[resample_indices(len(values), samples, seed)].mean(axis=1), level)


def too_small(n: int, n_pos: int | None = None, n_neg: int | None = None) -> bool:
    """Whether a group is too small to judge (`SMALL_GROUP_RULE`).

    Args:
        n: cases in the group.
        n_pos, n_neg: cases with / without pCR, for groups that report TPR and FPR; None for DSC/NormHD groups.
    """
    if n < MIN_GROUP_CASES:
        return True
    return any(c is not None and c < MIN_CLASS_CASES for c in (n_pos, n_neg))


def group_means(values: Mapping[str, ArrayLike], seed: int = 0) -> dict[str, Any]:
    """What a subgroup of per-case means needs next to its means: n, `<key>_ci` per key, and `too_small`.

    Args:
        values: {metric name: `[n]` per-case values of the group's cases}, e.g. {"dsc": ..., "norm_hd": ...}.
        seed: bootstrap seed (every key gets the same resamples).
    """
    arrays = {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in values.items()}
    n = len(next(iter(arrays.values()), []))
    return {"n": n, **{f"{k}_ci": mean_interval(v, seed=seed) for k, v in arrays.items()}, "too_small": too_small(n)}


def group_rates(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, Any]:
    """What a subgroup of TPR/FPR needs next to its rates: counts, Wilson intervals and `too_small`.

    Args:
        y_true: `[n]` 0/1 truth of the group's cases (unknown already counted as 0).
        y_pred: `[n]` 0/1 hard predictions.

    Returns:
        {"n", "n_pos", "n_neg", "tpr_ci": Wilson of TP out of the positives, "fpr_ci": Wilson of FP out of the
        negatives, "too_small"}; an interval is (NaN, NaN) when its denominator is 0.
    """
    yt, yp = np.asarray(y_true, dtype=np.float64).reshape(-1), np.asarray(y_pred, dtype=np.float64).reshape(-1)
    pos, neg = yt == 1, yt == 0
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    return {"n": len(yt), "n_pos": n_pos, "n_neg": n_neg,
            "tpr_ci": wilson_interval(int((yp[pos] == 1).sum()), n_pos),
            "fpr_ci": wilson_interval(int((yp[neg] == 1).sum()), n_neg), "too_small": too_small(len(yt), n_pos, n_neg)}


def describe(seed: int = 0) -> dict[str, Any]:
    """How the intervals were made, written next to them in scores.json so a reader need not open this file."""
    return {"level": LEVEL, "means": "percentile bootstrap over cases", "rates": "Wilson score",
            "resamples": RESAMPLES, "seed": seed, "too_small": SMALL_GROUP_RULE}
