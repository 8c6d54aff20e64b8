"""The scored report: report.md with its headline numbers, and non-empty PNG plots written atomically."""

import numpy as np
import pandas as pd
import pytest

from mtl_breast.figures import BarPanel, bar_panels_figure, make_overlay
from mtl_breast.metrics.classification import reliability_curve
from mtl_breast.metrics.mamamia import score_classification, score_segmentation
from mtl_breast.metrics.subgroups import subgroup_table
from mtl_breast.run.evaluate import json_safe
from mtl_breast.run.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def scores():
    ids = [f"P{i}" for i in range(8)]
    groups = subgroup_table([{"patient_id": pid, "age": 35 + 6 * i, "menopause": ["pre", "post"][i % 2],
                              "density": "abcd"[i % 4] if i < 6 else None} for i, pid in enumerate(ids)])
    per_case = pd.DataFrame({"dsc": np.linspace(0.1, 0.9, 8), "norm_hd": [1.0] + [0.05] * 7,
                             "hd95": [np.inf] + [7.5] * 7}, index=ids)
    y_true = pd.Series([1, 0, 1, 0, np.nan, 1, 0, 1], index=ids)
    y_pred = pd.Series([1, 0, 0, 1, 0, 1, 0, 1], index=ids)
    score = pd.Series(np.linspace(0.05, 0.95, 8), index=ids)
    return {"segmentation": score_segmentation(per_case, groups),
            "classification": score_classification(y_true, y_pred, score, groups),
            "notes": ["segmentation: no predicted mask for P9; scored as an empty prediction"]}


def test_make_overlay_cuts_central_tumour_slice():
    expert = np.zeros((10, 8, 8), bool)
    expert[3:8, 2:5, 2:5] = True  # tumour on slices 3..7: the central one is 5
    pred = np.roll(expert, 1, axis=2)
    image = np.arange(10)[:, None, None] * np.ones((10, 8, 8))
    overlay = make_overlay("P1", expert, pred, image, title="best")
    assert overlay.image[0, 0] == 5 and overlay.expert.sum() == 9 and overlay.pred.shape == (8, 8)
    with pytest.raises(ValueError, match="P1"):
        make_overlay("P1", expert, pred[:, :, :7])


def test_write_report(tmp_path, scores):
    rng = np.random.default_rng(0)
    expert = np.zeros((6, 32, 32), bool)
    expert[2:5, 10:18, 12:20] = True
    overlays = [make_overlay("P7", expert, np.roll(expert, 2, axis=1), rng.normal(size=expert.shape), title="best"),
                make_overlay("P0", expert, np.zeros_like(expert), None, title="worst")]
    reliability = reliability_curve([1, 0, 1, 0, 1, 1, 0, 1], np.linspace(0.05, 0.95, 8))
    path = write_report(json_safe(scores), tmp_path / "out", overlays=overlays, reliability=reliability)

    assert path == tmp_path / "out" / "report.md"
    text = path.read_text()
    seg, cls = scores["segmentation"], scores["classification"]
    for value in (seg["dsc"], seg["ranking"], cls["balanced_accuracy"], cls["ranking"]):
        assert f"{value:.3f}" in text  # the headline numbers are in the table
    assert "no predicted mask for P9" in text
    pngs = ["seg_subgroups.png", "seg_per_case.png", "overlays.png", "pcr_subgroups.png", "reliability.png"]
    for name in pngs:
        data = (tmp_path / "out" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, name
        assert f"]({name})" in text  # linked from the report
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(pngs + ["report.md"])  # no temp files


def test_write_report_classification_only(tmp_path, scores):
    path = write_report({"classification": json_safe(scores["classification"])}, tmp_path)
    text = path.read_text()
    assert "Not scored (no predicted masks)" in text
    assert (tmp_path / "pcr_subgroups.png").stat().st_size > 0
    assert not (tmp_path / "seg_subgroups.png").exists() and not (tmp_path / "reliability.png").exists()


@pytest.fixture
def scores_with_intervals():
    """24 cases: age 0-40 holds 12 (6 with pCR), 40-50 holds 3 and 50-60 holds 9, so two age groups are too small."""
    ids = [f"P{i}" for i in range(24)]
    groups = subgroup_table([{"patient_id": pid, "age": 35 if i < 12 else 45 if i < 15 else 55,
                              "menopause": ["pre", "post"][i % 2], "density": None} for i, pid in enumerate(ids)])
    per_case = pd.DataFrame({"dsc": np.linspace(0.1, 0.9, 24), "norm_hd": np.linspace(0.5, 0.0, 24),
                             "hd95": np.linspace(75.0, 0.0, 24)}, index=ids)
    y_true = pd.Series([float(i % 4 < 2) for i in range(24)], index=ids)
    y_pred = pd.Series([float(i % 3 == 0) for i in range(24)], index=ids)
    score = pd.Series(np.linspace(0.05, 0.95, 24), index=ids)
    return json_safe({"segmentation": score_segmentation(per_case, groups, intervals=True),
                      "classification": score_classification(y_true, y_pred, score, groups, intervals=True)})


def _with_ci(entry, key):
    low, high = entry[f"{key}_ci"]
    return f"{entry[key]:.3f} [{low:.3f}, {high:.3f}]"


def test_report_shows_counts_and_intervals(tmp_path, scores_with_intervals):
    text = write_report(scores_with_intervals, tmp_path).read_text()
    seg, cls = scores_with_intervals["segmentation"], scores_with_intervals["classification"]
    for part, key in ((seg, "dsc"), (seg, "norm_hd"), (cls, "balanced_accuracy"), (cls, "auc")):
        assert _with_ci(part, key) in text, key  # headline numbers with their bootstrap intervals
    young, old = seg["by_variable"]["age"]["0-40"], seg["by_variable"]["age"]["40-50"]
    assert not young["too_small"] and old["too_small"]
    assert f"| Age | 0-40 | 12 | {_with_ci(young, 'dsc')} | {_with_ci(young, 'norm_hd')} |  |" in text
    assert f"| Age | 40-50 | 3 | {_with_ci(old, 'dsc')} | {_with_ci(old, 'norm_hd')} | † too few cases |" in text
    pre = cls["by_variable"]["menopausal_status"]["pre"]
    assert (pre["n"], pre["n_pos"], pre["n_neg"]) == (12, 6, 6)
    assert f"| Menopausal status | pre | 12 | 6 / 6 | {_with_ci(pre, 'tpr')} | {_with_ci(pre, 'fpr')} |" in text
    assert "† Too few cases to judge (fewer than 10 cases" in text  # the note that explains the mark
    for name in ("seg_subgroups.png", "pcr_subgroups.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG_MAGIC)


def test_report_of_scores_without_intervals(tmp_path, scores):
    text = write_report(json_safe(scores), tmp_path).read_text()  # scores made without intervals: drawn as before
    assert "too few cases" not in text.lower() and "| Age | 0-40 | n/a |" in text


def test_subgroup_bars_show_counts_intervals_and_small_groups():
    groups = {"40-50": {"n": 3, "too_small": True}, "0-40": {"n": 12}}
    panel = BarPanel(groups, ["0-40", "40-50"], {"DSC": [0.6, 0.8]}, "t", errors={"DSC": [(0.5, 0.7), (0.3, 0.95)]})
    (ax,) = bar_panels_figure([[panel]], "title", "note", 3.0).axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0-40\n(n=12)", "40-50\n(n=3)"]
    big, small = ax.patches
    assert big.get_hatch() is None and small.get_hatch() == "///"  # the small group is hatched
    (segments,) = [c.get_segments() for c in ax.collections]  # one error bar per group, from low to high
    assert [tuple(s[:, 1]) for s in segments] == [pytest.approx((0.5, 0.7)), pytest.approx((0.3, 0.95))]
    assert ax.get_ylim()[1] > 0.95  # room for the whole interval


def test_report_lists_missing_predictions_first(tmp_path, scores):
    missing = {**json_safe(scores), "missing_predictions": ["P2", "P5"], "scored_cases": {"source": "test", "n": 8}}
    missing["segmentation"] = {**missing["segmentation"], "missing_predictions": ["P2", "P5"]}
    missing["classification"] = {**missing["classification"], "missing_predictions": ["P5"]}
    text = write_report(missing, tmp_path / "m").read_text()
    section = text[text.index("## Missing predictions"):text.index("## Segmentation")]  # before the scores
    assert "**2 of 8 scored case(s) have no prediction**" in section and "DSC 0" in section
    assert "- Segmentation (2): P2, P5" in section and "- pCR (1): P5" in section
    assert "Missing predictions" not in write_report(json_safe(scores), tmp_path / "ok").read_text()
