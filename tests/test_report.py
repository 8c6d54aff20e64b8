"""The scored report: report.md with its headline numbers, and non-empty PNG plots written atomically."""

import numpy as np
import pandas as pd
import pytest

from mtl_breast.metrics.classification import reliability_curve
from mtl_breast.metrics.mamamia import json_safe, score_classification, score_segmentation
from mtl_breast.metrics.subgroups import subgroup_table
from mtl_breast.report import make_overlay, write_report

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
