"""95% intervals: Wilson on hand-computed rates, a seeded percentile bootstrap, and the small-group rule."""

import math

import numpy as np
import pytest

from mtl_breast.metrics.intervals import (
    bootstrap_interval,
    group_means,
    group_rates,
    mean_interval,
    resample_indices,
    too_small,
    wilson_interval,
)


def test_wilson_interval_hand_values():
    # z = 1.95996; 0/10: (0, z^2 / (10 + z^2)) = (0, 0.27753); 5/10: 0.5 -/+ z * sqrt(2.5 + z^2/4) / (10 + z^2)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-3)
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-3)
    assert wilson_interval(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-3)
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(0, 10)[0] == 0.0  # exact, not 1 - 1e-16
    assert wilson_interval(1, 10) == pytest.approx((0.01788, 0.40415), abs=1e-3)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))  # no denominator: no rate, no interval
    with pytest.raises(ValueError, match="k <= n"):
        wilson_interval(3, 2)


def test_wilson_interval_narrows_with_more_cases():
    widths = [np.subtract(*wilson_interval(n // 2, n)[::-1]) for n in (10, 40, 160)]
    assert widths[0] > widths[1] > widths[2]
    assert 1.7 < widths[1] / widths[2] < 2.1  # ~ 1 / sqrt(n) once n is large


def test_bootstrap_is_seeded_and_contains_the_mean():
    x = np.random.default_rng(0).normal(size=30)
    lo, hi = mean_interval(x)
    assert lo < x.mean() < hi
    assert mean_interval(x) == (lo, hi)  # the same inputs give the same numbers
    assert mean_interval(x, seed=1) != (lo, hi)
    np.testing.assert_array_equal(resample_indices(30, 50, seed=3), resample_indices(30, 50, seed=3))
    # The vectorised mean and the general bootstrap draw the same resamples.
    assert bootstrap_interval(lambda i: float(x[i].mean()), len(x)) == pytest.approx((lo, hi))
    assert mean_interval(np.full(5, 0.7)) == pytest.approx((0.7, 0.7))
    assert all(math.isnan(v) for v in mean_interval([]))


def test_bootstrap_interval_narrows_with_more_cases():
    rng = np.random.default_rng(1)
    small, large = rng.normal(size=20), rng.normal(size=320)
    (ls, hs), (ll, hl) = mean_interval(small), mean_interval(large)
    assert hl - ll < (hs - ls) / 2.5  # 16x the cases: about a quarter of the width


def test_bootstrap_interval_leaves_out_undefined_resamples():
    calls = []

    def stat(i):
        calls.append(i)
        return math.nan if len(calls) % 2 else 1.0

    assert bootstrap_interval(stat, 4, samples=10) == (1.0, 1.0)
    assert all(math.isnan(v) for v in bootstrap_interval(lambda i: math.nan, 4, samples=10))


def test_small_group_rule():
    assert too_small(9) and not too_small(10)
    assert too_small(20, n_pos=4, n_neg=16) and too_small(20, n_pos=16, n_neg=4)
    assert not too_small(20, n_pos=5, n_neg=15)


def test_group_rates_use_the_right_denominators():
    # positives C0-C2 (TP 2 of 3), negatives C3-C4 (FP 1 of 2)
    entry = group_rates([1, 1, 1, 0, 0], [1, 0, 1, 1, 0])
    assert (entry["n"], entry["n_pos"], entry["n_neg"], entry["too_small"]) == (5, 3, 2, True)
    assert entry["tpr_ci"] == wilson_interval(2, 3) and entry["fpr_ci"] == wilson_interval(1, 2)
    only_neg = group_rates([0] * 12, [0] * 11 + [1])
    assert math.isnan(only_neg["tpr_ci"][0]) and only_neg["fpr_ci"] == wilson_interval(1, 12)
    assert only_neg["too_small"]  # no positive: the TPR rests on nothing


def test_group_means():
    values = {"dsc": np.linspace(0, 1, 12), "norm_hd": np.zeros(12)}
    entry = group_means(values)
    assert entry["n"] == 12 and not entry["too_small"]
    assert entry["dsc_ci"] == mean_interval(values["dsc"]) and entry["norm_hd_ci"] == (0.0, 0.0)
