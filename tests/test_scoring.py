"""MAMA-MIA challenge scoring: per-case metrics, subgroups, challenge scores and `evaluate`, checked by hand."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from mtl_breast.data.case import CaseError
from mtl_breast.metrics.classification import (
    balanced_accuracy,
    choose_threshold,
    equalized_odds,
    reliability_curve,
    roc_auc,
    temperature_scale,
    tpr_fpr,
)
from mtl_breast.metrics.intervals import mean_interval, wilson_interval
from mtl_breast.metrics.mamamia import score_classification, score_segmentation
from mtl_breast.metrics.segmentation import dice, hd95, label_contour, norm_hd
from mtl_breast.metrics.subgroups import age_group, density_group, menopause_group, subgroup_table

# ---------------------------------------------------------------- per-case segmentation metrics


def test_dice_counts():
    pred = np.array([[1, 1, 0, 0], [1, 0, 0, 0]])
    gt = np.array([[0, 1, 1, 0], [1, 0, 0, 1]])
    # TP = 2 ((0,1), (1,0)), FP = 1 ((0,0)), FN = 2 ((0,2), (1,3)) -> 2*2 / (4 + 1 + 2) = 4/7
    assert dice(pred, gt) == pytest.approx(4 / 7)
    assert dice(gt, gt) == 1.0
    # labels other than 1 count as tumour too
    assert dice(pred * 2, gt) == pytest.approx(4 / 7)


def test_empty_masks():
    empty, one = np.zeros((5, 5, 5)), np.zeros((5, 5, 5))
    one[2, 2, 2] = 1
    assert dice(empty, empty) == 0.0  # the challenge's convention, not 1
    assert hd95(empty, empty) == 0.0
    assert norm_hd(hd95(empty, empty)) == 0.0
    assert hd95(empty, one) == math.inf and hd95(one, empty) == math.inf
    assert norm_hd(hd95(one, empty)) == 1.0
    assert dice(one, empty) == 0.0


def test_hd95_single_voxels():
    a, b = np.zeros((10, 10, 10)), np.zeros((10, 10, 10))
    a[2, 3, 4] = 1
    b[2, 3, 9] = 1  # 5 voxels apart along the last axis
    assert hd95(a, b) == pytest.approx(5.0)
    assert hd95(a, b, spacing=(2.0, 1.0, 0.5)) == pytest.approx(2.5)  # 5 voxels x 0.5 mm
    c = np.zeros((10, 10, 10))
    c[5, 7, 4] = 1  # offset (3, 4, 0) from a: a 3-4-5 triangle
    assert hd95(a, c) == pytest.approx(5.0)
    assert hd95(a, c, spacing=(2.0, 1.0, 1.0)) == pytest.approx(math.hypot(6, 4))


def test_hd95_shifted_cube():
    a, b = np.zeros((12, 12, 12)), np.zeros((12, 12, 12))
    a[3:7, 3:7, 3:7] = 1
    b[5:9, 3:7, 3:7] = 1  # the same 4-cube shifted by 2 along axis 0
    # Contour of a: 64 - 8 interior = 56 voxels. Its z=3 face (16 voxels) is 2 from b's z=5 face, the rest is
    # 0 or 1 from b's contour; 16/56 > 5 % of the distances are 2, so the 95th percentile is 2 (both ways).
    assert hd95(a, b) == pytest.approx(2.0)
    assert hd95(a, b, spacing=(3.0, 1.0, 1.0)) == pytest.approx(6.0)
    assert norm_hd(hd95(a, b)) == pytest.approx(2 / 150)


def test_hd95_sparse_points_use_linear_percentile():
    # Few contour points in a big box take the k-d tree path; numpy's linear percentile is the official one.
    pred, gt = np.zeros((60, 60, 60)), np.zeros((60, 60, 60))
    pred[0, 0, 0] = pred[59, 59, 59] = 1
    gt[0, 0, 3] = 1
    far = math.sqrt(59**2 + 59**2 + 56**2)
    # pred -> gt distances [3, far]: 95th percentile = 3 + 0.95 * (far - 3); gt -> pred: [3]
    assert hd95(pred, gt) == pytest.approx(3 + 0.95 * (far - 3))


def test_contour_matches_simpleitk_label_contour():
    rng = np.random.default_rng(0)
    mask = rng.random((6, 7, 8)) < 0.6  # touches every image face
    official = sitk.GetArrayFromImage(sitk.LabelContour(sitk.GetImageFromArray(mask.astype(np.uint8)))) > 0
    np.testing.assert_array_equal(label_contour(mask), official)


def test_norm_hd_not_clipped():
    assert norm_hd(75.0) == 0.5
    assert norm_hd(300.0) == 2.0
    assert norm_hd(math.inf) == 1.0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros((3, 3)), np.zeros((3, 4)))


# ---------------------------------------------------------------- subgroups


def test_age_bins_at_edges():
    assert age_group(40) == "0-40"
    assert age_group(40.5) == "40-50"
    assert age_group(50) == "40-50"
    assert age_group(70) == "60-70"
    assert age_group(70.1) == "70-100"
    assert age_group(100) == "70-100"
    assert age_group(0) is None and age_group(101) is None  # outside pd.cut's bins
    assert age_group(None) is None and age_group(float("nan")) is None


def test_menopause_mapping():
    assert menopause_group("premenopausal") == "pre"
    assert menopause_group("perimenopausal") == "pre"
    assert menopause_group("postmenopausal") == "post"  # holds neither "pre" nor "peri"
    assert menopause_group(None) == "unknown" and menopause_group(float("nan")) == "unknown"
    assert menopause_group("unknown") == "unknown"
    assert menopause_group("peri (6-12 months since LMP AND no prior bilateral ovariectomy)") == "pre"
    assert menopause_group("Post (prior bilateral ovariectomy OR >12 mo since LMP)") == "post"
    assert menopause_group("Indeterminate (neither Pre or Postmenopausal)") == "pre"  # pre tested before post
    assert menopause_group("other") == "other"  # unrecognised text stays its own group, as officially


def test_density_and_table():
    assert density_group("A") == "a" and density_group(" d ") == "d"
    assert density_group("e") is None and density_group(None) is None
    table = subgroup_table([{"patient_id": "P1", "age": 39, "menopause": "post", "density": None},
                            {"patient_id": "P2", "age": None, "menopausal_status": None, "breast_density": "C"}])
    assert table.loc["P1"].tolist() == ["0-40", "post", None]
    assert table.loc["P2"].tolist() == [None, "unknown", "c"]
    with pytest.raises(ValueError, match="more than once"):
        subgroup_table([{"patient_id": "P1"}, {"patient_id": "P1"}])


# ---------------------------------------------------------------- segmentation challenge score


def test_score_segmentation_by_hand():
    per_case = pd.DataFrame({"dsc": [0.8, 0.6, 0.4, 1.0], "norm_hd": [0.1, 0.3, 0.2, 0.0],
                             "hd95": [15.0, 45.0, 30.0, 0.0]}, index=["P1", "P2", "P3", "P4"])
    groups = subgroup_table([
        {"patient_id": "P1", "age": 35, "menopause": "premenopausal", "density": "A"},
        {"patient_id": "P2", "age": 40, "menopause": "post", "density": "b"},
        {"patient_id": "P3", "age": 45.5, "menopause": "postmenopausal", "density": None},
        {"patient_id": "P4", "age": None, "menopause": None, "density": "b"},
        {"patient_id": "P9", "age": 80, "menopause": "pre", "density": "d"},  # not scored: must not count
    ])
    s = score_segmentation(per_case, groups)
    # mean DSC 2.8/4 = 0.7, mean NormHD 0.6/4 = 0.15 -> performance 0.5 * (0.7 + 0.85) = 0.775
    assert s["dsc"] == pytest.approx(0.7) and s["norm_hd"] == pytest.approx(0.15)
    assert s["performance"] == pytest.approx(0.775)
    # age (P4 drops out): 0-40 {P1,P2} = (0.7, 0.2), 40-50 {P3} = (0.4, 0.2) -> 1 - 0.5 * (0.3 + 0) = 0.85
    # menopause: pre {P1} = (0.8, 0.1), post {P2,P3} = (0.5, 0.25), unknown {P4} = (1.0, 0.0)
    #            -> 1 - 0.5 * (0.5 + 0.25) = 0.625
    # density (P3 drops out): a {P1} = (0.8, 0.1), b {P2,P4} = (0.8, 0.15) -> 1 - 0.5 * (0 + 0.05) = 0.975
    assert s["fairness"] == pytest.approx((0.85 + 0.625 + 0.975) / 3)
    assert s["ranking"] == pytest.approx(0.5 * 0.775 + 0.5 * (0.85 + 0.625 + 0.975) / 3)
    assert s["by_variable"]["age"] == {"0-40": pytest.approx({"dsc": 0.7, "norm_hd": 0.2}),
                                       "40-50": pytest.approx({"dsc": 0.4, "norm_hd": 0.2})}
    assert set(s["by_variable"]["menopausal_status"]) == {"pre", "post", "unknown"}
    assert s["per_case"]["P2"] == {"dsc": 0.6, "hd95": 45.0, "norm_hd": 0.3}


def test_score_segmentation_intervals():
    # 14 cases: 12 aged 35 (a group big enough to judge) and 2 aged 45; menopause and density unknown
    ids = [f"P{i}" for i in range(14)]
    per_case = pd.DataFrame({"dsc": np.linspace(0.2, 0.9, 14), "norm_hd": np.linspace(0.3, 0.0, 14),
                             "hd95": np.linspace(45.0, 0.0, 14)}, index=ids)
    groups = subgroup_table([{"patient_id": pid, "age": 35 if i < 12 else 45} for i, pid in enumerate(ids)])
    plain = score_segmentation(per_case, groups)
    s = score_segmentation(per_case, groups, intervals=True)
    for key in ("dsc", "norm_hd", "performance", "fairness", "ranking", "per_case"):
        assert s[key] == plain[key]  # the scores do not move
    old, young = s["by_variable"]["age"]["40-50"], s["by_variable"]["age"]["0-40"]
    assert (young["n"], young["too_small"], old["n"], old["too_small"]) == (12, False, 2, True)
    assert young["dsc_ci"] == mean_interval(per_case["dsc"].iloc[:12])
    assert young["dsc_ci"][0] < young["dsc"] < young["dsc_ci"][1]
    assert s["by_variable"]["menopausal_status"]["unknown"]["n"] == 14
    assert set(s["by_variable"]["breast_density"]) == set()
    assert s["n"] == 14 and s["intervals"]["level"] == 0.95
    for key in ("dsc", "norm_hd", "performance"):
        assert s[f"{key}_ci"][0] < s[key] < s[f"{key}_ci"][1]
    assert score_segmentation(per_case, groups, intervals=True) == s  # seeded
    assert score_segmentation(per_case, groups, intervals=True, seed=1)["dsc_ci"] != s["dsc_ci"]


# ---------------------------------------------------------------- classification


def test_tpr_fpr_rules():
    assert tpr_fpr([1, 0], [1, 0]) == (1.0, 0.0)
    assert tpr_fpr([1, 1, 0, 0], [1, 0, 1, 1]) == (0.5, 1.0)
    assert tpr_fpr([0, 0], [0, 1]) == (0.0, 0.5)  # no positive: TPR denominator 0 -> 0
    assert tpr_fpr([1, 1], [1, 1]) == (0.0, 0.0)  # one label in truth and prediction: both 0 (official)
    assert tpr_fpr([0, 0], [0, 0]) == (0.0, 0.0)


def test_balanced_accuracy_and_auc():
    assert balanced_accuracy([1, 1, 0, 0, 0], [1, 0, 0, 0, 1]) == pytest.approx(0.5 * (1 / 2 + 2 / 3))
    assert balanced_accuracy([1, 1], [1, 0]) == 0.5  # recall over the classes present in the truth only
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: 3 of 4 pairs ordered -> 0.75
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert roc_auc([0, 1], [0.5, 0.5]) == 0.5
    assert math.isnan(roc_auc([1, 1, 1], [0.2, 0.5, 0.9]))
    with pytest.raises(ValueError, match="0/1"):
        balanced_accuracy([1, 0], [0.7, 0.2])


def _six_cases():
    # C1-C3 age 0-40 and premenopausal; C4 40-50 premenopausal; C5-C6 40-50 postmenopausal; only C1, C2 have density
    groups = subgroup_table([
        {"patient_id": "C1", "age": 30, "menopause": "premenopausal", "density": "a"},
        {"patient_id": "C2", "age": 35, "menopause": "premenopausal", "density": "a"},
        {"patient_id": "C3", "age": 38, "menopause": "premenopausal", "density": None},
        {"patient_id": "C4", "age": 45, "menopause": "pre", "density": None},
        {"patient_id": "C5", "age": 46, "menopause": "postmenopausal", "density": None},
        {"patient_id": "C6", "age": 48, "menopause": "post", "density": None},
    ])
    y_true = pd.Series([1, 1, 0, 1, 0, np.nan], index=[f"C{i}" for i in range(1, 7)])
    return y_true, groups


def test_score_classification_missing_prediction_counts_as_zero():
    y_true, groups = _six_cases()
    y_pred = pd.Series([1, 0, 0, 1, 0], index=["C1", "C2", "C3", "C4", "C5"])  # C6 has none -> 0
    s = score_classification(y_true, y_pred, None, groups)
    # truth [1,1,0,1,0,0] pred [1,0,0,1,0,0]: recall 2/3, specificity 3/3 -> BA 5/6
    assert s["balanced_accuracy"] == pytest.approx(5 / 6)
    # age: 0-40 {C1,C2,C3} TPR 1/2 FPR 0; 40-50 {C4,C5,C6} TPR 1 FPR 0 -> disparity 0.5
    # menopause: pre {C1..C4} TPR 2/3 FPR 0; post {C5,C6} all-0 truth and prediction -> (0, 0) -> 2/3
    # density: a {C1,C2} only group -> 0.   EO = (0.5 + 2/3 + 0) / 3 = 7/18
    assert s["fairness"] == pytest.approx(11 / 18)
    assert s["ranking"] == pytest.approx(0.5 * (5 / 6 + 11 / 18))
    assert s["by_variable"]["menopausal_status"]["post"] == {"tpr": 0.0, "fpr": 0.0}
    assert s["by_variable"]["age"]["0-40"] == {"tpr": 0.5, "fpr": 0.0}
    assert math.isnan(s["auc"])


def test_score_classification_intervals():
    y_true, groups = _six_cases()
    y_pred = pd.Series([1, 0, 0, 1, 0, 0], index=y_true.index)
    plain = score_classification(y_true, y_pred, None, groups)
    s = score_classification(y_true, y_pred, None, groups, intervals=True)
    for key in ("balanced_accuracy", "fairness", "ranking"):
        assert s[key] == plain[key]
    # truth [1,1,0,1,0,0] (C6 unknown -> 0): 3 positives, 3 negatives
    assert (s["n"], s["n_pos"], s["n_neg"]) == (6, 3, 3)
    assert s["balanced_accuracy_ci"][0] <= s["balanced_accuracy"] <= s["balanced_accuracy_ci"][1]
    assert all(math.isnan(v) for v in s["auc_ci"])  # no scores, no AUC
    # age 0-40 {C1, C2, C3}: positives C1, C2 (TP 1), negative C3 (FP 0); the official rates stay as they were
    young = s["by_variable"]["age"]["0-40"]
    assert (young["tpr"], young["fpr"]) == (0.5, 0.0)
    assert (young["n"], young["n_pos"], young["n_neg"], young["too_small"]) == (3, 2, 1, True)
    assert young["tpr_ci"] == wilson_interval(1, 2) and young["fpr_ci"] == wilson_interval(0, 1)
    # menopause post {C5, C6}: no positive, so no TPR interval (the challenge's TPR is 0 by its rule)
    post = s["by_variable"]["menopausal_status"]["post"]
    assert post["n"] == 2 and post["n_pos"] == 0 and math.isnan(post["tpr_ci"][0])
    assert s["by_variable"]["breast_density"]["a"]["n"] == 2  # C3..C6 have no density and drop out
    scored = score_classification(y_true, y_pred, pd.Series(np.linspace(0, 1, 6), index=y_true.index), groups,
                                  intervals=True)
    assert scored["auc_ci"][0] <= scored["auc"] <= scored["auc_ci"][1]


def test_score_classification_missing_truth_counts_as_zero():
    y_true, groups = _six_cases()
    y_pred = pd.Series([1, 0, 0, 1, 0, 1], index=y_true.index)  # C6 (unknown truth) predicted 1: a false positive
    score = pd.Series([0.9, 0.3, 0.2, 0.8, 0.1, 0.7], index=y_true.index)
    s = score_classification(y_true, y_pred, score, groups)
    # negatives C3, C5, C6: specificity 2/3 (5/6 if C6 were left out); recall 2/3 -> BA 2/3
    assert s["balanced_accuracy"] == pytest.approx(2 / 3)
    # age: 0-40 (1/2, 0), 40-50 (1, 1/2) -> 1; menopause: pre (2/3, 0), post (0, 1/2) -> 7/6; density 0
    assert s["fairness"] == pytest.approx(1 - 13 / 18)
    # AUC with C6 as a negative: positives 0.9, 0.3, 0.8 vs negatives 0.2, 0.1, 0.7 -> 8 of 9 pairs ordered
    # (0.3 < 0.7 is the one miss; without C6 it would be 1)
    assert s["auc"] == pytest.approx(8 / 9)


def test_equalized_odds_is_clipped():
    # group x: (1,1), (0,1) -> TPR 1 FPR 1; group y: (1,0), (0,0) -> TPR 0 FPR 0: disparity 2 on two variables
    split = ["x", "x", "y", "y"]
    eo = equalized_odds([1, 0, 1, 0], [1, 1, 0, 0], {"age": split, "breast_density": split,
                                                     "menopausal_status": ["u"] * 4})
    assert eo["disparity"] == {"age": 2.0, "breast_density": 2.0, "menopausal_status": 0.0}
    assert eo["fairness"] == 0.0  # 1 - clip(4/3, 0, 1), not -1/3


def test_choose_threshold():
    assert choose_threshold([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9]) == pytest.approx(0.45)
    with pytest.raises(ValueError, match="groups"):
        choose_threshold([0, 1], [0.1, 0.9], objective="ranking")
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 40).astype(float)
    s = np.clip(0.3 * y + rng.normal(0.35, 0.2, 40), 0, 1)
    groups = {"age": rng.choice(["0-40", "40-50"], 40).tolist(), "menopausal_status": ["pre"] * 20 + ["post"] * 20,
              "breast_density": [None] * 40}
    t = choose_threshold(y, s, objective="ranking", groups=groups)

    def ranking(threshold):
        pred = (s >= threshold).astype(float)
        return 0.5 * balanced_accuracy(y, pred) + 0.5 * equalized_odds(y, pred, groups)["fairness"]

    u = np.unique(s)
    assert ranking(t) == pytest.approx(max(ranking(m) for m in (u[:-1] + u[1:]) / 2))


def test_reliability_curve():
    mean_prob, frac_pos, counts = reliability_curve([0, 1, 0, 1, 1, np.nan], [0.05, 0.15, 0.12, 0.95, 1.0, 0.5])
    assert counts.tolist() == [1, 2, 0, 0, 0, 0, 0, 0, 0, 2]  # the unknown outcome is left out; 1.0 -> last bin
    assert mean_prob[1] == pytest.approx(0.135) and frac_pos[1] == pytest.approx(0.5)
    assert mean_prob[9] == pytest.approx(0.975) and frac_pos[9] == 1.0
    assert np.isnan(frac_pos[4])


def test_temperature_scale_recovers_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, 20000)
    y = (rng.random(20000) < 1 / (1 + np.exp(-logits / 2.0))).astype(float)  # labels drawn at temperature 2
    assert temperature_scale(logits, y) == pytest.approx(2.0, rel=0.06)
    y_nan = np.concatenate([y, [np.nan] * 100])
    assert temperature_scale(np.concatenate([logits, np.full(100, 50.0)]), y_nan) == temperature_scale(logits, y)


# ---------------------------------------------------------------- evaluate() end to end


def _write_mask(path, array, spacing=(1.0, 1.0, 3.0)):
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing)  # SimpleITK (x, y, z): z = array axis 0
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


@pytest.fixture
def mamamia(tmp_path):
    """Four cases: perfect, shifted by 2 slices, missed (empty prediction), and one never predicted."""
    pytest.importorskip("mtl_breast.data.mamamia", reason="the MAMA-MIA reader (mtl_breast.data.mamamia) is missing")
    root, pred = tmp_path / "data", tmp_path / "pred"
    cube = np.zeros((12, 16, 16))
    cube[3:7, 5:9, 5:9] = 1
    shifted = np.roll(cube, 2, axis=0)
    root.mkdir()
    pd.DataFrame({"patient_id": ["DUKE_001", "DUKE_002", "ISPY1_003", "NACT_004"],
                  "dataset": ["DUKE", "DUKE", "ISPY1", "NACT"], "pcr": [1, 0, np.nan, 1], "age": [35, 45, 62, 71],
                  "menopause": ["pre", "post", None, "post"], "breast_density": ["a", "b", None, "c"]}
                 ).to_csv(root / "clinical_and_imaging_info.csv", index=False)
    for pid in ("duke_001", "duke_002", "ispy1_003", "nact_004"):
        _write_mask(root / "segmentations" / "expert" / f"{pid}.nii.gz", cube)
    for phase in range(2):
        _write_mask(root / "images" / "DUKE_001" / f"duke_001_{phase:04d}.nii.gz", cube * 100 + phase * 10)
    _write_mask(pred / "pred_segmentations" / "duke_001.nii.gz", cube)
    _write_mask(pred / "pred_segmentations" / "DUKE_002.nii.gz", shifted)  # names match case-insensitively
    _write_mask(pred / "pred_segmentations" / "ispy1_003.nii.gz", np.zeros_like(cube))
    pd.DataFrame({"patient_id": ["DUKE_001", "DUKE_002", "ISPY1_003"], "pcr": [1, 0, 1], "score": [0.9, 0.2, 0.6]}
                 ).to_csv(pred / "predictions.csv", index=False)
    return root, pred, tmp_path / "out"


def test_evaluate_end_to_end(mamamia):
    from mtl_breast.run.evaluate import evaluate

    root, pred, out = mamamia
    scores = evaluate(pred, root, out)
    seg, cls = scores["segmentation"], scores["classification"]
    # No split file: every dataset case is scored, and NACT_004 (never predicted) as a failure, not left out.
    assert scores["scored_cases"] == {"source": "every dataset case (no split file)", "n": 4}
    assert scores["missing_predictions"] == seg["missing_predictions"] == cls["missing_predictions"] == ["NACT_004"]
    assert set(seg["per_case"]) == {"DUKE_001", "DUKE_002", "ISPY1_003", "NACT_004"}
    assert seg["per_case"]["DUKE_001"] == {"dsc": 1.0, "hd95": 0.0, "norm_hd": 0.0}
    assert seg["per_case"]["DUKE_002"]["dsc"] == pytest.approx(0.5)  # 2 of 4 slices overlap
    assert seg["per_case"]["DUKE_002"]["hd95"] == pytest.approx(2.0)  # voxel units by default
    assert seg["per_case"]["ISPY1_003"] == {"dsc": 0.0, "hd95": None, "norm_hd": 1.0}  # inf written as null
    assert seg["per_case"]["NACT_004"] == {"dsc": 0.0, "hd95": None, "norm_hd": 1.0}  # missing = empty mask
    assert seg["dsc"] == pytest.approx((1.0 + 0.5 + 0.0 + 0.0) / 4)
    # truth [1, 0, unknown -> 0, 1], prediction [1, 0, 1, missing -> 0]: recall 1/2, specificity 1/2
    assert cls["balanced_accuracy"] == pytest.approx(0.5)
    # scores [0.9, 0.2, 0.6, missing -> 0]: positives 0.9, 0 vs negatives 0.2, 0.6 -> 2 of 4 pairs ordered
    assert cls["auc"] == pytest.approx(0.5)
    on_disk = json.loads((out / "scores.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert on_disk == scores
    report = (out / "report.md").read_text()
    assert "MAMA-MIA scores" in report and (out / "overlays.png").stat().st_size > 0
    assert "## Missing predictions" in report and "1 of 4 scored case(s) have no prediction" in report
    assert "- Segmentation (1): NACT_004" in report and "- pCR (1): NACT_004" in report
    assert (out / "reliability.png").is_file()

    # Every subgroup entry carries its case count, its interval and the small-group flag.
    assert {g: e["n"] for g, e in seg["by_variable"]["age"].items()} == {"0-40": 1, "40-50": 1, "60-70": 1,
                                                                          "70-100": 1}
    assert {g: e["n"] for g, e in seg["by_variable"]["breast_density"].items()} == {"a": 1, "b": 1, "c": 1}
    assert seg["by_variable"]["age"]["40-50"]["dsc_ci"] == [0.5, 0.5]  # one case: a point, and too small
    assert all(e["too_small"] for groups in seg["by_variable"].values() for e in groups.values())
    assert seg["n"] == 4 and seg["dsc_ci"][0] <= seg["dsc"] <= seg["dsc_ci"][1]
    assert {g: (e["n"], e["n_pos"]) for g, e in cls["by_variable"]["menopausal_status"].items()} == \
        {"pre": (1, 1), "post": (2, 1), "unknown": (1, 0)}
    assert cls["by_variable"]["menopausal_status"]["unknown"]["tpr_ci"] == [None, None]  # no positive: null in JSON
    assert len(cls["auc_ci"]) == 2 and cls["n"] == 4
    assert "too few cases" in report and "[" in report

    mm = evaluate(pred, root, tmp := out.parent / "mm", spacing_aware=True)
    assert mm["segmentation"]["per_case"]["DUKE_002"]["hd95"] == pytest.approx(6.0)  # 2 slices x 3 mm
    assert (tmp / "scores.json").is_file()


def test_evaluate_selected_cases_and_missing_parts(mamamia):
    from mtl_breast.run.evaluate import evaluate

    root, pred, out = mamamia
    (pred / "predictions.csv").unlink()
    scores = evaluate(pred, root, out, cases=["duke_001", "NACT_004"])
    assert "classification" not in scores
    assert scores["segmentation"]["per_case"]["NACT_004"] == {"dsc": 0.0, "hd95": None, "norm_hd": 1.0}
    assert scores["missing_predictions"] == ["NACT_004"] and scores["scored_cases"]["n"] == 2
    assert any("NACT_004" in note and "empty" in note for note in scores["notes"])
    with pytest.raises(ValueError, match="not in the dataset"):
        evaluate(pred, root, out, cases=["NOPE_999"])


def test_evaluate_shape_mismatch_names_both_files(mamamia):
    from mtl_breast.run.evaluate import evaluate

    root, pred, out = mamamia
    _write_mask(pred / "pred_segmentations" / "duke_001.nii.gz", np.zeros((12, 16, 15)))
    with pytest.raises(CaseError, match=r"DUKE_001.*duke_001\.nii\.gz.*expert.*duke_001\.nii\.gz"):
        evaluate(pred, root, out)
