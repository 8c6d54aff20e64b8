"""Baselines (logistic regression on kinetic features), bootstrap intervals and the evidence suite's pieces."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_bench_script

from mtl_breast.baselines import FEATURE_SETS, LogisticBaseline, case_features
from mtl_breast.data.dataset import acquisition_vector
from mtl_breast.metrics.classification import auc_with_interval, paired_auc_difference, roc_auc
from mtl_breast.metrics.intervals import bootstrap_interval
from mtl_breast.models.heads import PCRHead
from mtl_breast.models.kinetics import (
    CONCENTRATION_FEATURES,
    INNER_RIM_FEATURES,
    KINETIC_FEATURES,
    RIM_FEATURES,
    tumour_concentration,
    tumour_kinetics,
    tumour_rim_concentration,
)

ROOT = Path(__file__).resolve().parents[1]


def _science():
    return load_bench_script("science")


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
        PCRHead(embed_dim=8, kinetic=True).init_kinetic([0.0] * 6, [1.0] * 6, [0.0] * 6, 0.0)
    with pytest.raises(ValueError, match="no kinetic pathway"):
        PCRHead(embed_dim=8).init_kinetic([0.0] * 6, [1.0] * 6, [0.0] * 6, 0.0)


def test_science_inputs_remove_or_reverse_the_kinetics():
    science = _science()
    image = torch.arange(4.0)[:, None, None, None].expand(4, 2, 2, 2)
    assert science.flatten_washout(image)[:, 0, 0, 0].tolist() == [0.0, 1.0, 1.0, 1.0]
    assert science.reverse_post_contrast(image)[:, 0, 0, 0].tolist() == [0.0, 3.0, 2.0, 1.0]


def test_science_summary_and_report(tmp_path):
    science = _science()
    rng = np.random.default_rng(0)
    y = (rng.random(60) < 0.4).astype(float)
    names = ["joint model, as acquired", "joint model, washout removed (post-contrast flattened)",
             "joint model, post-contrast phases reversed", "size baseline, expert mask",
             "size baseline, predicted mask", "kinetic baseline, expert mask", "kinetic baseline, predicted mask",
             "generating model (ceiling)"]

    def run(noise: float) -> dict:
        scores = {n: (y + rng.normal(scale=noise if "as acquired" in n else 1.0, size=60)).tolist() for n in names}
        return {"y": y.tolist(), "scores": scores, "thresholds": dict.fromkeys(names, 0.5),
                "dice": rng.uniform(0.8, 0.9, 60).tolist()}

    summary = science.summarise([run(0.3), run(0.3)])
    table = summary["table"]
    assert summary["seeds"] == 2 and summary["cases"] == 60
    assert table["joint model, as acquired"]["auc"] > table["size baseline, expert mask"]["auc"]
    low, high = table["joint model, as acquired"]["auc_ci"]
    assert low <= table["joint model, as acquired"]["auc"] <= high
    diff = summary["differences"]["model - model with washout removed"]
    assert diff["auc_difference"] > 0 and diff["ci"][0] > 0
    # Each training seed's own difference, whose mean is the pooled one (every seed scores the same cases).
    assert len(diff["per_seed"]) == 2 and np.mean(diff["per_seed"]) == pytest.approx(diff["auc_difference"])
    assert "model - rim baseline (expert mask)" not in summary["differences"]  # these scores have no rim baseline
    result = tmp_path / "heldout.json"
    result.write_text(json.dumps({"experiment": "heldout", "command": "x", "seconds": 1.0, "device": "cpu",
                                  "held_out_cases": 60, **summary}))
    science.main(["report", str(result), "--out", str(tmp_path / "tables.md")])
    text = (tmp_path / "tables.md").read_text()
    assert "| joint model, as acquired |" in text and "model - model with washout removed" in text
    per_seed = ", ".join(f"{v:+.3f}" for v in diff["per_seed"])
    assert f"{science._ci(diff['ci'])} | {per_seed} |" in text

    # The ablations score the reference without reversed phases: its held-out table skips that pair only.
    reference = run(0.3)
    del reference["scores"]["joint model, post-contrast phases reversed"]
    partial = science.summarise([reference])
    assert "model - model with phases reversed" not in partial["differences"]
    assert "model - model with washout removed" in partial["differences"]
    ablations = tmp_path / "ablations.json"
    ablations.write_text(json.dumps({
        "experiment": "ablations", "command": "x", "seconds": 1.0, "device": "cpu", "held_out_cases": 60,
        "heldout_seed": 7, "results": [{"run": "seed0", "variant": "joint model (reference)", "auc": 0.8,
                                        "auc_washout_removed": 0.7, "dice": 0.85,
                                        "raw": {"ids": [str(i) for i in range(60)], **reference}}]}))
    science.main(["report", str(ablations), "--out", str(tmp_path / "ablations.md")])
    text = (tmp_path / "ablations.md").read_text()
    assert "The reference joint models next to the baselines" in text
    assert "| size baseline, expert mask |" in text and "phases reversed" not in text


def test_own_heldout_pools_runs_that_share_no_case(tmp_path):
    """Each run is scored on its own cases: the pooled difference is the mean of the runs' own paired differences,
    its interval resamples each run's cases separately, and the report shows both."""
    science = _science()
    rng = np.random.default_rng(1)
    names = sorted({name for _, a, b in science.OWN_PAIRS for name in (a, b)})  # sorted: draws in a fixed order

    def run(n: int, model_noise: float) -> dict:
        y = (rng.random(n) < 0.4).astype(float)
        scores = {name: (y + rng.normal(scale=model_noise if "as acquired" in name else 1.5, size=n)).tolist()
                  for name in names}
        return {"run": f"runs/seed{n}", "ids": [str(i) for i in range(n)], "y": y.tolist(), "scores": scores,
                "thresholds": dict.fromkeys(names, 0.5), "dice": rng.uniform(0.8, 0.9, n).tolist()}

    scored = [run(50, 0.4), run(80, 3.0)]  # a good model on one set, a poor one on the other
    pooled = science.pooled_differences(scored, samples=200)
    size = pooled["model - size baseline (expert mask)"]
    by_hand = [roc_auc(np.array(r["y"]), r["scores"]["joint model, as acquired"])
               - roc_auc(np.array(r["y"]), r["scores"]["size baseline, expert mask"]) for r in scored]
    assert size["per_run"] == pytest.approx(by_hand)
    assert size["auc_difference"] == pytest.approx(np.mean(by_hand))
    assert by_hand[0] > 0.1 and by_hand[1] < by_hand[0]
    low, high = size["ci"]
    assert low < size["auc_difference"] < high and high - low < 0.5
    one_class = {**scored[0], "y": [1.0] * 50}
    with pytest.raises(SystemExit, match="one pCR class"):
        science.pooled_differences([one_class, scored[1]], samples=10)
    result = tmp_path / "own.json"
    result.write_text(json.dumps({"experiment": "own-heldout", "command": "x", "seconds": 1.0, "device": "cpu",
                                  "runs": [r["run"] for r in scored],
                                  "per_run": [{"run": r["run"], **science.summarise([r])} for r in scored],
                                  "pooled": pooled}))
    science.main(["report", str(result), "--out", str(tmp_path / "own.md")])
    text = (tmp_path / "own.md").read_text()
    assert "| seed50 | 50 (" in text and "| seed80 | 80 (" in text
    assert f"| model - size baseline (expert mask) | {size['auc_difference']:+.4f} |" in text
    # Runs scored before the rim baseline existed lack its scores: that pair is left out, not an error.
    rim = "model - rim baseline (expert mask)"
    older = [{**r, "scores": {k: v for k, v in r["scores"].items() if not k.startswith("rim")}} for r in scored]
    assert rim not in science.pooled_differences(older, samples=10)
    # A file whose pooled table predates a pair its per-case scores hold: the report computes the pair from them.
    data = json.loads(result.read_text())
    data["pooled"] = {k: v for k, v in pooled.items() if k != rim}
    result.write_text(json.dumps({**data, "raw": scored}))
    science.main(["report", str(result), "--out", str(tmp_path / "own.md")])
    text = (tmp_path / "own.md").read_text()
    assert f"| {rim} | {pooled[rim]['auc_difference']:+.4f} |" in text
    assert "| concentration | rim | inner rim | Dice |" in text


def test_science_report_joins_variant_files_with_paired_intervals(tmp_path):
    science = _science()
    rng = np.random.default_rng(1)
    y = (rng.random(80) < 0.4).astype(float)
    ids = [f"case{i}" for i in range(80)]

    def row(variant: str, noise: float, dice: float, **extra) -> dict:
        scores = (y + rng.normal(scale=noise, size=80)).tolist()
        return {"run": "runs/x/seed0", "variant": variant, "auc": roc_auc(y, scores), "dice": dice,
                "auc_washout_removed": float("nan"), **extra,
                "raw": {"ids": ids, "y": y.tolist(), "scores": {"joint model, as acquired": scores},
                        "thresholds": {"joint model, as acquired": 0.5}, "dice": rng.normal(dice, 0.01, 80).tolist()}}

    files = []
    # The reference sits in one file, the variant in another (run at different times): one table, paired.
    for name, rows in (("a", [row("joint model (reference)", 0.3, 0.94)]), ("b", [row("pCR loss only", 2.0, 0.5)])):
        files.append(tmp_path / f"ablations_{name}.json")
        files[-1].write_text(json.dumps({"experiment": "ablations", "held_out_cases": 90, "seconds": 1.0,
                                         "device": "cpu", "results": rows,
                                         "command": "bench/science.py ablations --heldout-seed 20000"}))
    science.main(["report", *map(str, files), "--out", str(tmp_path / "tables.md")])
    lines = (tmp_path / "tables.md").read_text().splitlines()
    assert sum(line.startswith("### ablations") for line in lines) == 1
    assert any("(seed 20000)" in line for line in lines)
    variant = next(line for line in lines if line.startswith("| seed0 | pCR loss only |"))
    cells = [c.strip() for c in variant.split("|")]
    auc_diff, dice_diff = float(cells[6].split()[0]), float(cells[7].split()[0])
    assert auc_diff < -0.1 and -0.5 < dice_diff < -0.4  # a much worse variant, paired against the reference
    low, high = (float(v) for v in cells[6].split("[")[1].rstrip("]").split(","))
    assert low <= auc_diff <= high < 0
    # Scored on other cases than the reference: refused, not silently paired.
    other = json.loads(files[1].read_text())
    other["results"][0]["raw"]["ids"] = ids[::-1]
    files[1].write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="different held-out cases"):
        science.main(["report", *map(str, files), "--out", str(tmp_path / "tables.md")])


def test_science_report_averages_label_efficiency_over_runs(tmp_path):
    """Three runs (seeds) of MAE vs scratch on the same held-out cases: one mean-over-runs row per variant whose
    AUC is the mean of the runs' AUCs and whose paired difference is the mean of the runs' differences."""
    science = _science()
    rng = np.random.default_rng(2)
    y = (rng.random(90) < 0.4).astype(float)
    ids = [f"case{i}" for i in range(90)]

    def row(run: str, init: str, noise: float, dice: float) -> dict:
        scores = (y + rng.normal(scale=noise, size=90)).tolist()
        return {"run": run, "variant": f"16 labelled, {init}", "labelled": 16, "init": init,
                "auc": roc_auc(y, scores), "dice": dice, "auc_washout_removed": float("nan"),
                "raw": {"ids": ids, "y": y.tolist(), "scores": {"joint model, as acquired": scores},
                        "dice": np.full(90, dice).tolist()}}

    runs = [f"runs/x/seed{k}" for k in range(3)]
    rows = [row(run, init, noise, dice) for run in runs
            for init, noise, dice in (("MAE", 0.4, 0.92), ("scratch", 1.0, 0.90))]
    path = tmp_path / "label_efficiency.json"
    path.write_text(json.dumps({"experiment": "label-efficiency", "held_out_cases": 90, "heldout_seed": 20000,
                                "seconds": 1.0, "device": "cpu", "command": "x", "results": rows}))
    science.main(["report", str(path), "--out", str(tmp_path / "tables.md")])
    lines = (tmp_path / "tables.md").read_text().splitlines()
    mae = next(line for line in lines if line.startswith("| 16 labelled, MAE | 3 |"))
    cells = [c.strip() for c in mae.split("|")][1:-1]
    aucs = [r["auc"] for r in rows if r["init"] == "MAE"]
    diffs = [a - r["auc"] for a, r in zip(aucs, (r for r in rows if r["init"] == "scratch"), strict=True)]
    assert float(cells[2].split()[0]) == pytest.approx(np.mean(aucs), abs=5e-4)
    assert cells[3] == ", ".join(f"{a:.3f}" for a in aucs)
    assert float(cells[4].split()[0]) == pytest.approx(0.92, abs=5e-4)
    assert float(cells[5].split()[0]) == pytest.approx(np.mean(diffs), abs=5e-4) and np.mean(diffs) > 0.1
    low, high = (float(v) for v in cells[5].split("[")[1].rstrip("]").split(","))
    assert 0 < low <= np.mean(diffs) <= high
    assert float(cells[7].split()[0]) == pytest.approx(0.02, abs=5e-4)
    scratch = next(line for line in lines if line.startswith("| 16 labelled, scratch | 3 |"))
    assert scratch.rstrip().endswith("|  |  |  |")  # scratch is the comparison: no difference to itself


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


def test_heldout_scores_kept_per_run_are_reused_and_never_mixed_up(tmp_path, monkeypatch):
    """`science.py heldout --scores-dir` (and `own-heldout --scores-dir`): a run scored once is read back (runs
    scored by separate processes join one summary); a kept file of another run folder with the same name, or of
    another held-out set, is refused."""
    science = _science()
    calls = []

    def fake_score_run(run, weights, data, cache):
        calls.append(run)
        return {"ids": ["a", "b"], "y": [0.0, 1.0], "scores": {"joint model, as acquired": [0.2, 0.7]},
                "thresholds": {"joint model, as acquired": 0.5}, "dice": [0.9, 0.8]}

    monkeypatch.setattr(science, "score_run", fake_score_run)
    run, kept = tmp_path / "a" / "seed0", tmp_path / "scores"
    first = science._scored_run(run, tmp_path, None, 20_000, str(kept))
    assert science._scored_run(run, tmp_path, None, 20_000, str(kept)) == first and len(calls) == 1
    assert (kept / "seed0.json").exists()
    with pytest.raises(SystemExit, match="use another --scores-dir"):
        science._scored_run(tmp_path / "b" / "seed0", tmp_path, None, 20_000, str(kept))
    with pytest.raises(SystemExit, match="on held-out seed 20000"):
        science._scored_run(run, tmp_path, None, 30_000, str(kept))
    assert science._scored_run(run, tmp_path, None, 20_000, None) == first and len(calls) == 2
    # `own-heldout --scores-dir`: the run's own split is another held-out set, never confused with a seed's.
    with pytest.raises(SystemExit, match="on its own held-out split"):
        science._kept_scores(run, str(kept), science.OWN_SPLIT, lambda: first)
    own = tmp_path / "own"
    assert science._kept_scores(run, str(own), science.OWN_SPLIT, lambda: first) == first
    assert science._kept_scores(run, str(own), science.OWN_SPLIT, lambda: {}) == first  # read back, not rescored
    with pytest.raises(SystemExit, match="holds the scores of .* on its own held-out split"):
        science._scored_run(run, tmp_path, None, 20_000, str(own))


def test_ablation_variants_keep_the_demo_heads_kinetic_features(tmp_path, monkeypatch):
    """A variant that passes its own model_args (which replace the config's) still gets the demo config's pCR head
    settings, and a variant's own head setting wins."""
    science = _science()
    config = tmp_path / "demo.yaml"
    config.write_text("model:\n  model_args:\n    encoder: {phase_time_drop: 0.2}\n"
                      "    pcr_head: {kinetic_features: rim}\n")
    monkeypatch.setattr(science, "FINETUNE_CONFIG", config)
    flag, value = science._finetune_model_args({"encoder": {"attn_mode": "joint"}})
    assert flag == "--model.model_args"
    assert json.loads(value) == {"encoder": {"attn_mode": "joint"}, "pcr_head": {"kinetic_features": "rim"}}
    _, value = science._finetune_model_args({"pcr_head": {"kinetic_features": "concentration", "dropout": 0.5}})
    assert json.loads(value)["pcr_head"] == {"kinetic_features": "concentration", "dropout": 0.5}
    config.write_text("model:\n  arch: mtl_vit_test\n")
    assert json.loads(science._finetune_model_args({"encoder": {}})[1]) == {"encoder": {}}
