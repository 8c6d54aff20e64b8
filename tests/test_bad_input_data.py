"""Bad input at the data entry points (`mtl-breast preprocess`, `mtl-breast predict`, the training data modules).

Every requested case is either written or listed with its reason, in one line naming the case and the file; the
other cases still run; any skipped case makes the exit code 1, and an input error of the whole job ends in one
line with exit code 2 (never a traceback). Each test damages a copy of the session phantoms.
"""

from __future__ import annotations

import gzip
import json
import logging
import shutil
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from conftest import run_cli


def _copy(phantoms: Path, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(phantoms, data)
    return data


def _splits(data: Path) -> dict[str, list[str]]:
    table = pd.read_csv(data / "train_test_splits.csv", dtype=str)
    return {name: sorted(table[f"{name}_split"].dropna()) for name in ("train", "test")}


def _folder(data: Path, pid: str) -> Path:
    (folder,) = [p for p in (data / "images").iterdir() if p.name.lower() == pid.lower()]
    return folder


def _phase(data: Path, pid: str, index: int) -> Path:
    return _folder(data, pid) / f"{pid.lower()}_{index:04d}.nii.gz"


def _preprocess(data: Path, cache: Path, capsys) -> tuple[int, str, str]:
    code = run_cli(["preprocess", "--data", data, "--cache", cache])
    out, err = capsys.readouterr()
    return code, out, err


def _empty_test_case_and_ghost_id(data: Path) -> tuple[str, Path]:
    """Empty the folder of the first test case and list an id without a folder in the test split."""
    splits = _splits(data)
    empty = splits["test"][0]
    for path in _folder(data, empty).iterdir():
        path.unlink()
    test = splits["test"] + ["GHOST_001"]
    pd.DataFrame({"train_split": splits["train"],
                  "test_split": test + [None] * (len(splits["train"]) - len(test))}).to_csv(
        data / "train_test_splits.csv", index=False)
    return empty, _folder(data, empty)


# ---------------------------------------------------------------------------------------------- missing cases
def test_preprocess_lists_an_empty_test_case_and_a_split_id_without_folder(phantoms, tmp_path, capsys):
    data = _copy(phantoms, tmp_path)
    empty, folder = _empty_test_case_and_ghost_id(data)
    code, out, err = _preprocess(data, tmp_path / "cache", capsys)
    assert code == 1
    assert "done 9, skipped 2" in out
    assert f"  skipped {empty} ({folder}): case folder is empty (expected phase files " in err
    assert f"  skipped GHOST_001 ({data / 'train_test_splits.csv'}): listed in the test split, but " \
           f"{data / 'images'} has no folder GHOST_001" in err
    assert "2 case(s) skipped" in err and "Traceback" not in err
    report = json.loads(next((tmp_path / "cache").glob("*/report.json")).read_text())
    assert sorted(s["patient_id"] for s in report["skipped"]) == sorted([empty, "GHOST_001"])


def test_predict_lists_an_empty_test_case_and_a_split_id_without_folder(mtl_weights, phantoms, tmp_path, capsys):
    data = _copy(phantoms, tmp_path)
    empty, folder = _empty_test_case_and_ghost_id(data)
    other = _splits(phantoms)["test"][1]
    out = tmp_path / "out"
    code = run_cli(["predict", "--weights", mtl_weights, "--data", data, "--out", out, "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count(f"skipped {empty} ({folder}): case folder is empty") == 1  # one message per case
    assert "skipped GHOST_001 (" in err and "listed in the test split" in err
    assert "2 case(s) skipped" in err
    rows = pd.read_csv(out / "predictions.csv", dtype={"patient_id": str})
    assert list(rows["patient_id"]) == [other]
    assert [p.name for p in (out / "pred_segmentations").iterdir()] == [f"{other}.nii.gz"]


def test_predict_removes_the_earlier_mask_of_a_case_that_now_fails(mtl_weights, phantoms, tmp_path, capsys):
    data, out = _copy(phantoms, tmp_path), tmp_path / "out"
    argv = ["predict", "--weights", mtl_weights, "--data", data, "--out", out, "--device", "cpu"]
    assert run_cli(argv) == 0
    broken, kept = _splits(phantoms)["test"]
    phase = _phase(data, broken, 0)
    phase.write_bytes(phase.read_bytes()[:200])  # truncated since the last run
    capsys.readouterr()
    assert run_cli(argv) == 1
    out_text = capsys.readouterr()
    assert (out_text.out + out_text.err).count(f"skipped {broken} (") == 1  # listed once, not logged again
    assert [p.name for p in (out / "pred_segmentations").iterdir()] == [f"{kept}.nii.gz"]  # no stale mask
    assert list(pd.read_csv(out / "predictions.csv", dtype={"patient_id": str})["patient_id"]) == [kept]


def test_a_folder_without_cases_is_an_input_error(mtl_weights, tmp_path, capsys):
    (tmp_path / "nothing").mkdir()
    assert _preprocess(tmp_path / "nothing", tmp_path / "cache", capsys)[0] == 2
    code = run_cli(["predict", "--weights", mtl_weights, "--data", tmp_path / "nothing", "--out", tmp_path / "out",
                    "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("mtl-breast predict: error: no cases to predict in ")
    assert len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------- bad files
def test_mask_with_three_labels_is_refused_at_preprocessing_and_training(phantoms, tmp_path, capsys, caplog):
    from mtl_breast.data.datamodule import FinetuneDataModule

    data = _copy(phantoms, tmp_path)
    pid = _splits(data)["train"][0]
    mask_path = data / "segmentations" / "expert" / f"{pid.lower()}.nii.gz"
    mask = sitk.ReadImage(str(mask_path))
    array = sitk.GetArrayFromImage(mask)
    tumour = np.flatnonzero(array)
    assert len(tumour) >= 2
    array.flat[tumour[len(tumour) // 2:]] = 2  # the far half of the tumour becomes label 2
    relabelled = sitk.GetImageFromArray(array)
    relabelled.CopyInformation(mask)
    sitk.WriteImage(relabelled, str(mask_path))

    code, out, err = _preprocess(data, tmp_path / "cache", capsys)
    assert code == 1 and "done 9, skipped 1" in out
    assert f"  skipped {pid} ({mask_path}): mask labels must be 0 (background) and 1 (tumour), found {{0, 1, 2}}" \
        in err

    # The data modules call the same preprocessing: the case is named in a warning and left out of training.
    dm = FinetuneDataModule(str(data), cache_dir=str(tmp_path / "dm_cache"), crop_size=32, batch_size=2)
    with caplog.at_level(logging.WARNING, logger="mtl_breast.data.datamodule"):
        dm.prepare_data()
    assert any(pid in r.getMessage() and mask_path.name in r.getMessage() and "found {0, 1, 2}" in r.getMessage()
               for r in caplog.records)
    dm.setup("fit")
    assert pid not in set(dm.train_ids) | set(dm.val_ids) and dm.train_ids


def test_cases_with_one_or_nine_phases_are_refused_at_preprocessing_and_training(phantoms, tmp_path, capsys,
                                                                                   caplog):
    from mtl_breast.data.datamodule import FinetuneDataModule

    data = _copy(phantoms, tmp_path)
    one, nine = _splits(data)["train"][:2]
    for path in sorted(_folder(data, one).glob("*.nii.gz"))[1:]:
        path.unlink()  # the pre-contrast phase alone
    phases = sorted(_folder(data, nine).glob("*.nii.gz"))
    for k in range(len(phases), 9):
        shutil.copy(phases[-1], _phase(data, nine, k))

    code, out, err = _preprocess(data, tmp_path / "cache", capsys)
    assert code == 1 and "done 8, skipped 2" in out
    assert (f"  skipped {one} ({_folder(data, one)}): 1 phase file(s) ({one.lower()}_0000.nii.gz); a DCE-MRI case "
            "needs a pre-contrast and at least one post-contrast phase, 2 to 8 phases") in err
    assert f"  skipped {nine} ({_folder(data, nine)}): 9 phase file(s) ({nine.lower()}_0000.nii.gz, " in err
    assert "Traceback" not in err

    dm = FinetuneDataModule(str(data), cache_dir=str(tmp_path / "dm_cache"), crop_size=32, batch_size=2)
    with caplog.at_level(logging.WARNING, logger="mtl_breast.data.datamodule"):
        dm.prepare_data()
    for pid, n in ((one, 1), (nine, 9)):
        assert any(pid in r.getMessage() and f"{n} phase file(s)" in r.getMessage() for r in caplog.records)
    dm.setup("fit")
    assert not {one, nine} & (set(dm.train_ids) | set(dm.val_ids)) and dm.train_ids


def _header_bomb(path: Path, side: int) -> None:
    """Make the header of `path` announce side^3 voxels; the file keeps its few kilobytes of data."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    struct.pack_into("<hhh", raw, 42, side, side, side)  # dim[1:4] of the NIfTI-1 header
    path.write_bytes(gzip.compress(bytes(raw)))


@pytest.mark.parametrize(("side", "expected"), [
    (4000, "the header announces 4000 x 4000 x 4000 = 64,000,000,000 voxels, more than the 268,435,456 accepted"),
    (600, "the header announces 600 x 600 x 600 voxels of "),
])
def test_a_header_bomb_is_refused_before_reading_and_costs_no_other_case(mtl_weights, phantoms, tmp_path, capsys,
                                                                         side, expected):
    data = _copy(phantoms, tmp_path)
    bomb, other = _splits(data)["test"]
    path = _phase(data, bomb, 2)
    _header_bomb(path, side)
    assert path.stat().st_size < 100_000
    code, out, err = _preprocess(data, tmp_path / "cache", capsys)
    assert code == 1 and "done 9, skipped 1" in out
    (line,) = [x for x in err.splitlines() if x.startswith("  skipped")]
    assert line.startswith(f"  skipped {bomb} ({path}): {expected}"), line

    out = tmp_path / "out"
    code = run_cli(["predict", "--weights", mtl_weights, "--data", data, "--out", out, "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and f"  skipped {bomb} ({path}): {expected}" in err and "Traceback" not in err
    assert list(pd.read_csv(out / "predictions.csv", dtype={"patient_id": str})["patient_id"]) == [other]
    assert [p.name for p in (out / "pred_segmentations").iterdir()] == [f"{other}.nii.gz"]


def _zero_spacing(path: Path) -> None:
    raw = bytearray(gzip.decompress(path.read_bytes()))
    struct.pack_into("<f", raw, 76 + 4 * 1, 0.0)  # pixdim[1] of the NIfTI-1 header, as stored
    path.write_bytes(gzip.compress(bytes(raw)))


def _four_d(path: Path) -> None:
    image = sitk.ReadImage(str(path))
    sitk.WriteImage(sitk.JoinSeries([image, image]), str(path))


def _two_d(path: Path) -> None:
    image = sitk.ReadImage(str(path))
    sitk.WriteImage(image[:, :, image.GetSize()[2] // 2], str(path))


def _disjoint(path: Path) -> None:
    image = sitk.ReadImage(str(path))
    image.SetOrigin([o + 1000.0 for o in image.GetOrigin()])  # same voxels, 1 m away from the reference phase
    sitk.WriteImage(image, str(path))


PHASE_DEFECTS = {
    "zero_spacing": (_zero_spacing, "voxel spacing (0, "),
    "four_d": (_four_d, "expected a 3-D image, got a 4-D one"),
    "two_d": (_two_d, "expected a 3-D image, got a 2-D one"),
    "disjoint": (_disjoint, "covers 0% of the reference phase's field of view"),
}


@pytest.mark.parametrize("defect", sorted(PHASE_DEFECTS))
def test_bad_non_reference_phase_names_case_and_file(phantoms, tmp_path, capsys, defect):
    data = _copy(phantoms, tmp_path)
    pid = _splits(data)["train"][1]
    damage, expected = PHASE_DEFECTS[defect]
    path = _phase(data, pid, 2)
    damage(path)
    code, out, err = _preprocess(data, tmp_path / "cache", capsys)
    assert code == 1 and "done 9, skipped 1" in out
    (line,) = [x for x in err.splitlines() if x.startswith("  skipped")]
    assert line.startswith(f"  skipped {pid} ({path}): {expected}")
    assert "Traceback" not in err


@pytest.mark.parametrize("change", ["duplicate", "reversed"])
def test_acquisition_times_out_of_order_name_the_spreadsheet(phantoms, tmp_path, capsys, change):
    data = _copy(phantoms, tmp_path)
    sheet = data / "clinical_and_imaging_info.xlsx"
    table = pd.read_excel(sheet, sheet_name="dataset_info")
    pid = _splits(data)["train"][2]
    row = table.index[table["patient_id"].str.lower() == pid.lower()][0]
    times = json.loads(table.loc[row, "acquisition_times"])
    times[2] = times[1] if change == "duplicate" else times[1] - 1  # e.g. [0, 90, 90] or [0, 90, 89]
    table.loc[row, "acquisition_times"] = json.dumps(times)
    table.to_excel(sheet, sheet_name="dataset_info", index=False)
    code, out, err = _preprocess(data, tmp_path / "cache", capsys)
    assert code == 1 and "done 9, skipped 1" in out
    shown = "[" + ", ".join(f"{float(t):g}" for t in times) + "]"
    assert f"  skipped {pid} ({sheet}): acquisition_times {shown} must be strictly increasing" in err


@pytest.mark.parametrize("damage", ["no split columns", "garbled spreadsheet"])
def test_unusable_split_file_or_spreadsheet_is_one_line_naming_it(mtl_weights, finetune_argv, phantoms, tmp_path,
                                                                   capsys, damage):
    data = _copy(phantoms, tmp_path)
    if damage == "no split columns":
        bad = data / "train_test_splits.csv"
        bad.write_text("patient,fold\nDUKE_001,1\n")
    else:
        bad = data / "clinical_and_imaging_info.xlsx"
        bad.write_bytes(b"PK\x03\x04 not really a workbook")
    for argv in (["predict", "--weights", mtl_weights, "--data", data, "--out", tmp_path / "pred", "--device", "cpu"],
                 finetune_argv(tmp_path / "run", "--data.root", data, "--data.cache_dir", tmp_path / "cache")):
        capsys.readouterr()
        assert run_cli(argv) == 2, argv[0]
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(bad) in err[0] and "error:" in err[0], err


def test_training_without_any_pcr_label_is_refused_in_one_line(phantoms, tmp_path, monkeypatch):
    from mtl_breast.data.case import DatasetError
    from mtl_breast.data.datamodule import FinetuneDataModule

    dm = FinetuneDataModule(str(phantoms), cache_dir=str(tmp_path / "cache"), crop_size=32, batch_size=2)
    dm.prepare_data()
    monkeypatch.setattr(FinetuneDataModule, "_pcr", lambda self, pid: float("nan"))  # no case has a pCR label
    with pytest.raises(DatasetError, match=r"none of the \d+ training case\(s\) has a pCR label \(0 or 1\)"):
        dm.setup("fit")
