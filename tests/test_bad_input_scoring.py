"""Scoring with failed cases and bad prediction files: missing predictions count as failures, bad input is named."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from conftest import run_cli

from mtl_breast.run.evaluate import PredictionsError, evaluate, read_case_list

IDS = ["DUKE_001", "DUKE_002", "ISPY1_003", "NACT_004"]


def _write_mask(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(array.astype(np.uint8)), str(path))


@pytest.fixture
def dataset(tmp_path):
    """Four cases with the same expert cube; DUKE_001..ISPY1_003 predicted perfectly (pCR 1, score 0.8)."""
    root, pred = tmp_path / "data", tmp_path / "pred"
    cube = np.zeros((8, 12, 12))
    cube[2:5, 4:8, 4:8] = 1
    root.mkdir()
    pd.DataFrame({"patient_id": IDS, "pcr": [1, 0, 1, 0], "age": [35, 45, 55, 65],
                  "menopause": ["pre", "post", "post", "post"], "breast_density": ["a", "b", "c", "d"]}
                 ).to_csv(root / "clinical_and_imaging_info.csv", index=False)
    for pid in IDS:
        _write_mask(root / "segmentations" / "expert" / f"{pid.lower()}.nii.gz", cube)
    for pid in IDS[:3]:
        _write_mask(pred / "pred_segmentations" / f"{pid}.nii.gz", cube)
    _csv(pred, IDS[:3], pcr=["1", "0", "1"], score=["0.8", "0.2", "0.9"])
    return root, pred, tmp_path / "out"


def _csv(pred, ids, **columns):
    pd.DataFrame({"patient_id": ids, **columns}).to_csv(pred / "predictions.csv", index=False)


def test_test_split_sets_the_cases_and_a_missing_case_scores_as_a_failure(dataset):
    root, pred, out = dataset
    pd.DataFrame({"train_split": ["ISPY1_003", None], "test_split": ["duke_001", "NACT_004"]}).to_csv(
        root / "train_test_splits.csv", index=False)
    scores = evaluate(pred, root, out)
    assert scores["scored_cases"] == {"source": "test split of train_test_splits.csv", "n": 2}
    seg, cls = scores["segmentation"], scores["classification"]
    assert set(seg["per_case"]) == {"DUKE_001", "NACT_004"}  # ISPY1_003 was predicted but is not a test case
    assert seg["per_case"]["NACT_004"] == {"dsc": 0.0, "hd95": None, "norm_hd": 1.0}
    assert seg["dsc"] == pytest.approx(0.5) and seg["norm_hd"] == pytest.approx(0.5)
    assert scores["missing_predictions"] == seg["missing_predictions"] == cls["missing_predictions"] == ["NACT_004"]
    # truth [1, 0], prediction [1, missing -> 0]: both right; the failure's score 0 ranks below DUKE_001's 0.8
    assert cls["balanced_accuracy"] == 1.0 and cls["auc"] == 1.0
    assert any("ISPY1_003" in n and "not among the scored cases" in n for n in scores["notes"])
    assert json.loads((out / "scores.json").read_text())["missing_predictions"] == ["NACT_004"]
    assert "## Missing predictions" in (out / "report.md").read_text()


def test_missing_score_counts_as_zero_in_the_auc(dataset):
    root, pred, out = dataset
    _csv(pred, IDS[1:], pcr=["0", "1", "0"], score=["0.3", "0.9", "0.4"])  # DUKE_001 (pCR) failed
    cls = evaluate(pred, root, out)["classification"]
    # DUKE_001 scored 0: below both negatives; ISPY1_003 (0.9) above both -> 2 of 4 pairs ordered
    assert cls["auc"] == pytest.approx(0.5) and cls["missing_predictions"] == ["DUKE_001"]
    assert cls["balanced_accuracy"] == pytest.approx(0.75)  # recall 1/2, specificity 1


def test_every_case_failed(dataset):
    root, pred, out = dataset
    for path in (pred / "pred_segmentations").iterdir():
        path.unlink()
    (pred / "predictions.csv").write_text("patient_id,pcr,score\n")  # what predict writes when all cases fail
    scores = evaluate(pred, root, out)
    assert scores["missing_predictions"] == IDS
    assert scores["segmentation"]["dsc"] == 0.0 and scores["segmentation"]["norm_hd"] == 1.0
    assert scores["classification"]["balanced_accuracy"] == 0.5


def test_case_list_file(dataset, tmp_path):
    root, pred, out = dataset
    listing = tmp_path / "cases.txt"
    listing.write_text("# held-out cases\nduke_002\n\nNACT_004\n")
    assert read_case_list(listing) == ["duke_002", "NACT_004"]
    scores = evaluate(pred, root, out, cases=listing)
    assert scores["scored_cases"] == {"source": f"case list {listing}", "n": 2}
    assert scores["missing_predictions"] == ["NACT_004"]
    listing.write_text("DUKE_002\nduke_002\n")
    with pytest.raises(PredictionsError, match="listed more than once: DUKE_002, duke_002"):
        evaluate(pred, root, out, cases=listing)
    listing.write_text("\n# nothing\n")
    with pytest.raises(PredictionsError, match="no patient ids"):
        evaluate(pred, root, out, cases=listing)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        evaluate(pred, root, out, cases=tmp_path / "nope.txt")
    with pytest.raises(PredictionsError, match=r"2 case\(s\) not in the dataset .*: NOPE_1, NOPE_2"):
        evaluate(pred, root, out, cases=["DUKE_001", "NOPE_1", "NOPE_2"])


@pytest.mark.parametrize(("pcr", "score", "match"), [
    (["1", "yes", "0"], ["0.8", "0.2", "0.9"], r"line 3 \(DUKE_002\): pcr 'yes'"),
    (["1", "", "0"], ["0.8", "0.2", "0.9"], r"line 3 \(DUKE_002\): pcr ''"),
    (["1", "0", "2"], ["0.8", "0.2", "0.9"], r"line 4 \(ISPY1_003\): pcr '2'"),
    (["1", "0", "1"], ["0.8", "nan", "0.9"], r"line 3 \(DUKE_002\): score 'nan'"),
    (["1", "0", "1"], ["abc", "0.2", "0.9"], r"line 2 \(DUKE_001\): score 'abc'"),
    (["1", "0", "1"], ["0.8", "1.5", "inf"], r"line 3 \(DUKE_002\): score '1.5', line 4 \(ISPY1_003\): score 'inf'"),
    (["1", "0", "1"], ["0.8", "", "0.9"], r"line 3 \(DUKE_002\): score ''"),
])
def test_bad_values_are_named(dataset, pcr, score, match):
    root, pred, out = dataset
    _csv(pred, IDS[:3], pcr=pcr, score=score)
    with pytest.raises(PredictionsError, match=r"predictions.csv: pcr must be 0 or 1 and score a number in \[0, 1\]; "
                                               r"bad values on .*" + match):
        evaluate(pred, root, out)
    assert not (out / "scores.json").exists()  # nothing is scored from a bad file


@pytest.mark.parametrize(("ids", "columns", "match"), [
    (IDS[:2], {"score": ["0.1", "0.2"]}, r"missing column\(s\) \['pcr'\]; needs patient_id, pcr\[, score\]"),
    (None, {"pcr": ["1", "0"]}, r"missing column\(s\) \['patient_id'\]"),
    (["DUKE_001", "GHOST_1", "GHOST_2"], {"pcr": ["1", "0", "1"]},
     r"2 patient id\(s\) not in the dataset: GHOST_1, GHOST_2"),
    ([f"X{i}" for i in range(12)], {"pcr": ["1"] * 12}, r"12 patient id\(s\) not in the dataset: X0, .*X9 and 2 more"),
    (["DUKE_001", "duke_001"], {"pcr": ["1", "1"]}, r"patient\(s\) listed more than once: DUKE_001, duke_001"),
    (["DUKE_001", ""], {"pcr": ["1", "1"]}, r"empty patient_id on line 3"),
])
def test_bad_tables_are_named(dataset, ids, columns, match):
    root, pred, out = dataset
    pd.DataFrame({**({"patient_id": ids} if ids else {}), **columns}).to_csv(pred / "predictions.csv", index=False)
    with pytest.raises(PredictionsError, match=r"predictions.csv: " + match):
        evaluate(pred, root, out)


def test_empty_file_and_empty_score_column(dataset):
    root, pred, out = dataset
    (pred / "predictions.csv").write_text("")
    with pytest.raises(PredictionsError, match="predictions.csv: not a CSV table"):
        evaluate(pred, root, out)
    _csv(pred, IDS, pcr=["1", "0", "1", "0"], score=["", "", "", ""])  # no scores at all: no AUC, not an error
    cls = evaluate(pred, root, out)["classification"]
    assert cls["auc"] is None and cls["balanced_accuracy"] == 1.0 and cls["missing_predictions"] == []


def test_cli_bad_predictions_exit_2_with_one_line(dataset, capsys):
    root, pred, out = dataset
    _csv(pred, IDS[:3], pcr=["1", "yes", "0"], score=["0.8", "0.2", "0.9"])
    assert run_cli(["evaluate", "--pred", pred, "--data", root, "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtl-breast evaluate: error: ") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert str(pred / "predictions.csv") in err and "DUKE_002" in err and "'yes'" in err
    assert run_cli(["evaluate", "--pred", pred, "--data", root, "--out", out, "--cases", out / "none.txt"]) == 2
    assert "none.txt" in capsys.readouterr().err


def test_cli_missing_predictions_warn_and_exit_0(dataset, tmp_path, capsys):
    root, pred, out = dataset
    listing = tmp_path / "cases.txt"
    listing.write_text("DUKE_001\nNACT_004\nISPY1_003\n")
    assert run_cli(["evaluate", "--pred", pred, "--data", root, "--out", out, "--cases", listing]) == 0
    captured = capsys.readouterr()
    warning = [line for line in captured.err.splitlines() if "warning" in line]
    assert warning == [f"mtl-breast evaluate: warning: 1 of 3 case(s) have no prediction and were scored as failures "
                       f"(missing_predictions in {out / 'scores.json'})"]
    printed = json.loads(captured.out[captured.out.index("{"):captured.out.index("\nscores:")])
    assert printed["segmentation"]["missing_predictions"] == 1  # a count on stdout, the ids in scores.json
    assert json.loads((out / "scores.json").read_text())["segmentation"]["missing_predictions"] == ["NACT_004"]
    listing.write_text("DUKE_001\n")
    assert run_cli(["evaluate", "--pred", pred, "--data", root, "--out", out, "--cases", listing]) == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("which", ["predicted", "expert"])
def test_a_truncated_mask_is_refused_not_scored(dataset, capsys, which):
    root, pred, out = dataset
    path = (pred / "pred_segmentations" / "DUKE_001.nii.gz" if which == "predicted"
            else root / "segmentations" / "expert" / "duke_001.nii.gz")
    sitk.WriteImage(sitk.ReadImage(str(path)), str(path), True)  # compressed, so the cut lands in the voxels
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 4])
    assert run_cli(["evaluate", "--pred", pred, "--data", root, "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mtl-breast evaluate: error: case DUKE_001 ({path}): cannot read mask"), err
    assert len(err.strip().splitlines()) == 1 and not (out / "scores.json").exists()


def test_no_pcr_truth_at_all_is_not_scored_as_all_zero(dataset):
    root, pred, out = dataset
    table = pd.read_csv(root / "clinical_and_imaging_info.csv")
    table["pcr"] = None
    table.to_csv(root / "clinical_and_imaging_info.csv", index=False)
    scores = evaluate(pred, root, out)
    assert "classification" not in scores and "segmentation" in scores
    assert any("none of the 4 scored case(s) has a pCR truth; not scored" in n for n in scores["notes"])
