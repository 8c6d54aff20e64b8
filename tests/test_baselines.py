"""Baselines (logistic regression on kinetic features), bootstrap intervals and the kinetics bench scripts."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_bench_script

from mtl_breast.baselines import LogisticBaseline, case_features
from mtl_breast.data.dataset import acquisition_vector
from mtl_breast.metrics.classification import auc_with_interval, paired_auc_difference, roc_auc
from mtl_breast.metrics.intervals import bootstrap_interval
from mtl_breast.models.heads import PCRHead
from mtl_breast.models.kinetics import (
    CONCENTRATION_FEATURES,
    FEATURE_SETS,
    INNER_RIM_FEATURES,
    KINETIC_FEATURES,
    RIM_FEATURES,
    tumour_concentration,
    tumour_kinetics,
    tumour_rim_concentration,
)

ROOT = Path(__file__).resolve().parents[1]


def test_logistic_baseline_recovers_a_known_model():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 2))
    p = 1 / (1 + np.exp(-(0.5 + 2.0 * x[:, 0] - 1.0 * x[:, 1])))
    y = (rng.random(4000) < p).astype(float)
    rows = [{"a": a, "b": b} for a, b in x]
    fitted = LogisticBaseline(("a", "b"), l2=0.0).fit(rows, y)
    # Coefficients are on standardised features: undo the scaling to compare.
    assert fitted.coef_[1] / fitted.std_[0] == pytest.approx(2.0, abs=0.15)
    assert fitted.coef_[2] / fitted.std_[1] == pytest.approx(-1.0, abs=0.1)
    assert np.corrcoef(fitted.predict_proba(rows), p)[0, 1] > 0.99
    with pytest.raises(ValueError, match="both pCR classes"):
        LogisticBaseline(("a",)).fit(rows[:3], [1.0, 1.0, 1.0])
    with pytest.raises(RuntimeError):
        LogisticBaseline(("a",)).predict_proba(rows)


def test_bootstrap_interval_covers_the_statistic_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    small, large = rng.normal(size=50), rng.normal(size=2000)
    lo_s, hi_s = bootstrap_interval(lambda i: float(small[i].mean()), len(small), samples=500)
    lo_l, hi_l = bootstrap_interval(lambda i: float(large[i].mean()), len(large), samples=500)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 3
    # A perfect score has a degenerate interval; one-class resamples are left out, not counted.
    y = np.array([0, 0, 1, 1, 0, 1])
    row = auc_with_interval(y, y.astype(float))
    assert row["auc"] == 1.0 and row["low"] == row["high"] == 1.0


def test_paired_auc_difference_is_tighter_than_two_separate_intervals():
    rng = np.random.default_rng(3)
    y = (rng.random(150) < 0.4).astype(float)
    shared = y + rng.normal(scale=1.0, size=150)  # what both predictors see
    better, worse = shared + rng.normal(scale=0.2, size=150), shared + rng.normal(scale=1.5, size=150)
    paired = paired_auc_difference(y, better, worse)
    assert paired["difference"] == pytest.approx(roc_auc(y, better) - roc_auc(y, worse))
    assert 0 < paired["low"] < paired["difference"] < paired["high"]
    a, b = auc_with_interval(y, better), auc_with_interval(y, worse)
    assert paired["high"] - paired["low"] < (a["high"] - a["low"]) + (b["high"] - b["low"])
    assert paired_auc_difference(y, better, better)["difference"] == 0.0
    with pytest.raises(ValueError, match="one score per case"):
        paired_auc_difference(y, better, worse[:-1])


def test_case_features_are_the_kinetics_of_the_tumour_window():
    image = torch.rand(3, 40, 40, 40)
    mask = torch.zeros(40, 40, 40)
    mask[30:36, 4:10, 20:26] = 1
    image[1:, mask.bool()] += torch.tensor([2.0, 1.5])[:, None]
    feats = case_features(image, mask, torch.tensor([0.0, 90.0, 180.0]), (16, 16, 16))
    # Centred on the cube (32.5, 6.5, 22.5): starts 25, -1, 15, shifted inside the volume to 24, 0, 15.
    window = image[:, 24:40, 0:16, 15:31]
    expected = tumour_kinetics(window[None], mask[24:40, 0:16, 15:31][None, None],
                               phase_time=torch.tensor([[0.0, 90.0, 180.0]]))[0]
    torch.testing.assert_close(torch.tensor([feats[k] for k in KINETIC_FEATURES]), expected)
    assert set(FEATURE_SETS["kinetic"]) < set(KINETIC_FEATURES)
    # Without the case's acquisition vector the concentration columns are there but unknown.
    concentration_names = CONCENTRATION_FEATURES + RIM_FEATURES + INNER_RIM_FEATURES
    assert set(feats) == set(KINETIC_FEATURES) | set(concentration_names)
    assert all(math.isnan(feats[k]) for k in concentration_names if k != "log_volume")
    acquisition = acquisition_vector({"mean": 0.0, "std": 1.0}, {"field_strength": 1.5})
    with_acq = case_features(image + 1.0, mask, torch.tensor([0.0, 90.0, 180.0]), (16, 16, 16), acquisition)
    expected = tumour_concentration((window + 1.0)[None], mask[24:40, 0:16, 15:31][None, None], None,
                                    torch.tensor([[0.0, 90.0, 180.0]]), acquisition[None])[0]
    torch.testing.assert_close(torch.tensor([with_acq[k] for k in CONCENTRATION_FEATURES]), expected)
    expected = tumour_rim_concentration((window + 1.0)[None], mask[24:40, 0:16, 15:31][None, None], None,
                                        torch.tensor([[0.0, 90.0, 180.0]]), acquisition[None])[0]
    torch.testing.assert_close(torch.tensor([with_acq[k] for k in RIM_FEATURES]), expected)
    expected = tumour_rim_concentration((window + 1.0)[None], mask[24:40, 0:16, 15:31][None, None], None,
                                        torch.tensor([[0.0, 90.0, 180.0]]), acquisition[None], surface_layers=1)[0]
    torch.testing.assert_close(torch.tensor([with_acq[k] for k in INNER_RIM_FEATURES]), expected)


def test_kinetic_pathway_initialised_from_a_logistic_regression():
    head = PCRHead(embed_dim=8, kinetic=True, kinetic_features="curve")
    head.init_kinetic(mean=[1.0] * 6, std=[2.0] * 6, weight=[0.5, 0, 0, 0, 0, 0], bias=-0.3)
    tokens = torch.zeros(1, 2, 8, 8)
    image, prob = torch.zeros(1, 2, 8, 8, 8), torch.zeros(1, 1, 8, 8, 8)
    prob[..., 2:6, 2:6, 2:6] = 1.0
    logit = head(tokens, seg_prob=prob, grid=(2, 2, 2), image=image)
    volume = tumour_kinetics(image, prob)[0, 0]
    token_part = head.fc(head.norm(torch.zeros(1, 8)))[0, 0]  # zero tokens pool to zero
    torch.testing.assert_close(logit[0], token_part + 0.5 * (volume - 1.0) / 2.0)
    assert float(head.fc.bias.detach()) == pytest.approx(-0.3)
    assert {"pcr_head.kinetic_mean", "pcr_head.kinetic_std"} <= {f"pcr_head.{k}" for k in head.state_dict()}
    with pytest.raises(ValueError):
        head.init_kinetic(mean=[0.0] * 6, std=[0.0] * 6, weight=[0.0] * 6, bias=0.0)
    with pytest.raises(ValueError, match="need 5 means"):  # the concentration set has 5 features
        PCRHead(embed_dim=8, kinetic=True, kinetic_features="concentration").init_kinetic([0.0] * 6, [1.0] * 6,
                                                                                        [0.0] * 6, 0.0)
    with pytest.raises(ValueError, match="no kinetic pathway"):
        PCRHead(embed_dim=8).init_kinetic([0.0] * 6, [1.0] * 6, [0.0] * 6, 0.0)


def test_tofts_fit_recovers_kep_of_a_noise_free_curve():
    from mtl_breast.phantoms.physics import tofts_concentration

    ceiling = load_bench_script("kinetics_ceiling")
    times = np.array([0.0, 90.0, 180.0, 270.0, 360.0])
    for kep in (0.3, 1.7, 6.0):
        conc = np.asarray(tofts_concentration(np.array([1.0]), np.array([1.0 / kep]), np.array([0.0]), list(times),
                                              15.0)).reshape(-1)
        amplitude, fitted = ceiling.tofts_fit(0.4 * conc, times)
        assert fitted == pytest.approx(kep, rel=0.1) and amplitude == pytest.approx(0.4, rel=0.15)


def test_concentration_tofts_fit_recovers_ktrans_kep_and_arrival_from_the_grid():
    from mtl_breast.phantoms.physics import tofts_concentration

    ceiling = load_bench_script("kinetics_ceiling")
    times = np.array([0.0, 90.0, 180.0, 270.0, 360.0])
    for ktrans, kep, arrival in ((0.3, 0.5, 20.0), (1.2, 4.0, 10.0)):
        conc = np.asarray(tofts_concentration(np.array([ktrans]), np.array([ktrans / kep]), np.array([0.05]),
                                              list(times), arrival)).reshape(-1)
        fitted_ktrans, fitted_kep = ceiling.tofts_fit(conc, times, (10.0, 15.0, 20.0, 25.0), with_vp=True,
                                                      nonnegative=True)
        # kep on a grid 12% apart, Ktrans solved at that kep.
        assert fitted_kep == pytest.approx(kep, rel=0.1) and fitted_ktrans == pytest.approx(ktrans, rel=0.15)


def test_enhancing_concentration_curve_inverts_the_signal_equation():
    """Phantom-style signal of a known concentration in a tumour a quarter of which barely enhances: the curve is
    the concentration of the enhancing part, the weak quarter left out."""
    import torch

    from mtl_breast.phantoms.physics import spgr_signal

    ceiling = load_bench_script("kinetics_ceiling")
    conc = np.array([0.0, 0.6, 0.5, 0.4])[:, None, None, None] * np.ones((4, 4, 4, 4))
    conc[:, :1] *= 0.05  # a quarter that barely enhances (a necrotic core), below the median
    signal = np.stack([spgr_signal(np.full((4, 4, 4), 1000.0), np.full((4, 4, 4), 1.1), c, tr_ms=5.0, flip_deg=12.0,
                                   r1=4.5)
                       for c in conc])
    mean, std = 300.0, 50.0
    image = torch.as_tensor((signal - mean) / std, dtype=torch.float32)
    acquisition = acquisition_vector({"mean": mean, "std": std},
                                     {"field_strength": 1.5, "repetition_time": 5.0, "flip_angle": 12.0})
    curve = ceiling.enhancing_concentration_curve(image, torch.ones(4, 4, 4, dtype=torch.bool),
                                                  {"mean": mean, "std": std}, acquisition)
    assert curve == pytest.approx([0.0, 0.6, 0.5, 0.4], abs=1e-3)


def test_kinetic_start_fits_the_heads_features_on_the_finetuning_training_cases(phantoms, cache_dir, mtl_weights,
                                                                                 tmp_path):
    from mtl_breast.data.datamodule import FinetuneDataModule
    from mtl_breast.predictor import InferenceSettings, load_joint_model, read_weights_config

    run = tmp_path / "run"
    (run / "weights").mkdir(parents=True)
    (run / "cache").mkdir()
    (run / "data").symlink_to(phantoms)
    (run / "weights" / "mtl").symlink_to(mtl_weights)
    (run / "cache" / "data").symlink_to(cache_dir)
    out = load_bench_script("kinetic_start").main([str(run), "--against", str(run)])
    (row,) = out["results"]
    head = load_joint_model(mtl_weights, "cpu")[0].pcr_head
    assert list(row["coefficients"]) == list(head.feature_names)
    settings = InferenceSettings.from_config(read_weights_config(mtl_weights))
    dm = FinetuneDataModule(str(phantoms), cache_dir=str(cache_dir), preprocess=settings.preprocess)
    dm.setup("fit")
    known = [pid for pid in dm.train_ids if dm.cache.read(pid)["info"].get("pcr") is not None]
    assert row["training_cases"] == len(known) < out["scored_on"]  # training cases only, scored on all labelled
    assert 0.0 <= row["auc_on_other_cases"] <= 1.0


def test_ceiling_scores_held_out_folds_under_a_mask_one_voxel_off():
    import torch

    ceiling = load_bench_script("kinetics_ceiling")
    mask = torch.zeros(7, 7, 7, dtype=torch.bool)
    mask[2:5, 2:5, 2:5] = True
    assert int(ceiling.shifted_mask(mask, 1).sum()) == 5**3 and int(ceiling.shifted_mask(mask, -1).sum()) == 1
    # The regression is fitted on the expert-mask rows; only the scored fold reads the shifted ones.
    rng = np.random.default_rng(0)
    y = (rng.random(120) < 0.5).astype(float)
    signal = y + rng.normal(scale=0.7, size=120)
    rows = [{"x": v, "dilated": {"x": v}, "eroded": {"x": -v}} for v in signal]
    same = ceiling.cross_validated_auc(rows, y, ("x",), 2)
    assert ceiling.cross_validated_auc(rows, y, ("x",), 2, scored_as="dilated") == same
    assert np.mean(same) > 0.7 and np.mean(ceiling.cross_validated_auc(rows, y, ("x",), 2, scored_as="eroded")) < 0.3


def test_case_features_read_a_probability_as_its_mask():
    """The predicted-mask baselines read the tumour the pCR head reads: the probability thresholded at 0.5, so a
    low-probability tail around the tumour does not inflate log_volume (which every feature set shares)."""
    image = torch.randn(3, 24, 24, 24, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(24, 24, 24)
    mask[8:14, 8:14, 8:14] = 1
    image[1:, mask.bool()] += torch.tensor([2.0, 1.5])[:, None]
    prob = torch.where(mask.bool(), 0.9, 0.2)  # background at 0.2: a soft sum of ~970 voxels in the window
    acquisition = acquisition_vector({"mean": 0.0, "std": 1.0}, {"field_strength": 1.5})
    times = torch.tensor([0.0, 90.0, 180.0])
    soft = case_features(image + 1.0, prob, times, (16, 16, 16), acquisition)
    hard = case_features(image + 1.0, mask, times, (16, 16, 16), acquisition)
    assert soft == hard
    assert soft["log_volume"] == pytest.approx(math.log1p(216) - 6.0)


def test_label_curve_gains_over_size_grow_with_the_labelled_cases():
    """Cases whose pCR depends on size and on one kinetic feature: with more labelled cases the kinetic regressions'
    lead over size grows, the whole pool is one draw, and a count above the pool is an error."""
    curve = load_bench_script("label_curve").curve
    rng = np.random.default_rng(0)
    names = sorted({f for features in FEATURE_SETS.values() for f in features})

    def cases(n: int) -> tuple[list[dict], np.ndarray]:
        x = rng.standard_normal((n, len(names)))
        signal = x[:, names.index("log_volume")] + x[:, names.index("conc_log_slope")]
        y = (rng.random(n) < 1.0 / (1.0 + np.exp(-2.0 * signal))).astype(float)
        return [dict(zip(names, row, strict=True)) for row in x], y

    train, held = cases(300), cases(400)
    table = curve(train, {"held": held}, [12, 300], draws=20, seed=0)
    small, full = table[12]["concentration"]["held"], table[300]["concentration"]["held"]
    assert table[12]["draws"] == 20 and table[300]["draws"] == 1
    assert full["minus_size"] > 0.08 and full["minus_size"] > small["minus_size"] + 0.03
    assert small["minus_size_low"] <= small["minus_size"] <= small["minus_size_high"]
    assert table[300]["size"]["held"]["minus_size"] == 0.0
    with pytest.raises(SystemExit, match="more than the 300 pooled training cases"):
        curve(train, {"held": held}, [301], draws=2, seed=0)


