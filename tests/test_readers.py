"""Dataset readers: the MAMA-MIA layout (names in any case, variable phases, spreadsheet/JSON quirks) and folders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from mtl_breast.data.case import CaseError
from mtl_breast.data.folder import read_dataset, read_folder
from mtl_breast.data.mamamia import is_mamamia_root, read_mamamia, read_splits


def write_nifti(path: Path, shape: tuple[int, int, int] = (4, 5, 6), value: float = 1.0) -> Path:
    """A tiny NIfTI volume (the readers only resolve names; the voxels only need to exist)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.full(shape, value, dtype=np.float32)
    array[0, 0, 0] = 0.0
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


def box_json(**extra) -> dict:
    return {"patient_id": "x", "primary_lesion": {"breast_coordinates": {
        "x_min": 0, "x_max": 4, "y_min": 1, "y_max": 5, "z_min": 2, "z_max": 6}, **extra.pop("lesion", {})}, **extra}


def make_root(root: Path, patients: list[dict], table: str | None = "xlsx", rows: list[dict] | None = None) -> Path:
    """Write a MAMA-MIA layout. Each patient: folder, files (file-name prefix), phases, mask, json."""
    for p in patients:
        folder = root / "images" / p["folder"]
        for k in p.get("phases", range(3)):
            write_nifti(folder / f"{p['files']}_{k:04d}.nii.gz")
        if p.get("mask"):
            write_nifti(root / "segmentations" / "expert" / f"{p['mask']}.nii.gz")
        if p.get("json") is not None:
            path = root / "patient_info_files" / f"{p['files']}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(p["json"]))
    if rows is not None:
        frame = pd.DataFrame(rows)
        if table == "xlsx":
            frame.to_excel(root / "clinical_and_imaging_info.xlsx", sheet_name="dataset_info", index=False)
        elif table == "csv":
            frame.to_csv(root / "clinical_and_imaging_info.csv", index=False)
    return root


def test_names_resolve_case_insensitively(tmp_path):
    root = make_root(tmp_path, [
        {"folder": "DUKE_001", "files": "duke_001", "mask": "duke_001", "json": box_json()},
        {"folder": "ispy1_002", "files": "ISPY1_002", "mask": "ISPY1_002", "json": box_json()},
    ], rows=[{"patient_id": "DUKE_001", "dataset": "DUKE", "pcr": 1}, {"patient_id": "ISPY1_002", "pcr": 0}])
    assert is_mamamia_root(root)
    cases = {c.patient_id: c for c in read_mamamia(root)}
    assert sorted(cases) == ["DUKE_001", "ISPY1_002"]  # spelled as in the spreadsheet
    duke, ispy = cases["DUKE_001"], cases["ISPY1_002"]
    assert [p.name for p in duke.image_paths] == [f"duke_001_000{k}.nii.gz" for k in range(3)]
    assert [p.name for p in ispy.image_paths] == [f"ISPY1_002_000{k}.nii.gz" for k in range(3)]
    assert duke.mask_path.name == "duke_001.nii.gz" and ispy.mask_path.name == "ISPY1_002.nii.gz"
    assert duke.info_path.name == "duke_001.json" and ispy.info_path.name == "ISPY1_002.json"
    assert duke.breast_box == (0, 4, 1, 5, 2, 6)
    assert (duke.pcr, ispy.pcr) == (1.0, 0.0)
    assert duke.meta["dataset"] == "DUKE" and ispy.meta["dataset"] == "ISPY1"  # falls back to the id prefix


def test_variable_phases_and_acquisition_times(tmp_path):
    root = make_root(tmp_path, [
        {"folder": "A_1", "files": "a_1", "phases": range(3)},
        {"folder": "A_2", "files": "a_2", "phases": range(6)},
        {"folder": "A_3", "files": "a_3", "phases": range(4)},
    ], rows=[{"patient_id": "A_1", "acquisition_times": "[0, 584, 714]"},
             {"patient_id": "A_2", "acquisition_times": "[0, 90, 180, 270, 360, 450]"},
             {"patient_id": "A_3", "acquisition_times": "[0, 90]"}])
    with pytest.warns(UserWarning, match="A_3: 2 acquisition times for 4 phases"):
        cases = {c.patient_id: c for c in read_mamamia(root)}
    assert [cases[p].num_phases for p in ("A_1", "A_2", "A_3")] == [3, 6, 4]
    assert cases["A_1"].acquisition_times == [0.0, 584.0, 714.0]
    assert cases["A_2"].acquisition_times[-1] == 450.0
    assert cases["A_3"].acquisition_times is None  # inconsistent: ignored, not fatal


def test_missing_phase_names_case_and_file(tmp_path):
    root = make_root(tmp_path, [{"folder": "B_1", "files": "b_1", "phases": [0, 1, 3]},
                                {"folder": "B_2", "files": "b_2"}], table=None)
    with pytest.raises(CaseError, match=r"case B_1 .*b_1_0002\.nii\.gz.*missing phase 2"):
        read_mamamia(root, require_images=True)
    skipped = []
    cases = read_mamamia(root, skipped=skipped)
    assert [c.patient_id for c in cases] == ["B_2"]
    assert skipped[0]["patient_id"] == "B_1" and "b_1_0002" in skipped[0]["reason"]


def test_json_with_missing_keys_names_case_and_file(tmp_path):
    broken = {"primary_lesion": {"breast_coordinates": {"x_min": 0, "x_max": 4, "y_min": 1}}}
    root = make_root(tmp_path, [{"folder": "C_1", "files": "c_1", "json": broken}], table=None)
    with pytest.raises(CaseError, match=r"case C_1 .*c_1\.json.*lacks y_max, z_min, z_max"):
        read_mamamia(root)
    (root / "patient_info_files" / "c_1.json").write_text(json.dumps({"imaging_data": {}}))
    with pytest.raises(CaseError, match=r"c_1\.json.*primary_lesion\.breast_coordinates"):
        read_mamamia(root)
    # Test-time JSONs carry the box and no clinical section: that is fine.
    (root / "patient_info_files" / "c_1.json").write_text(json.dumps(box_json()))
    (case,) = read_mamamia(root)
    assert case.breast_box == (0, 4, 1, 5, 2, 6) and math.isnan(case.pcr) and case.meta["age"] is None


def test_pcr_nan_when_missing_and_json_fallback(tmp_path):
    root = make_root(tmp_path, [
        {"folder": "D_1", "files": "d_1"},
        {"folder": "D_2", "files": "d_2", "json": box_json(lesion={"pcr": 1})},
        {"folder": "D_3", "files": "d_3", "json": box_json(lesion={"pcr": 1})},
    ], rows=[{"patient_id": "D_1", "pcr": None}, {"patient_id": "D_2", "pcr": None}, {"patient_id": "D_3", "pcr": 0}])
    cases = {c.patient_id: c for c in read_mamamia(root)}
    assert math.isnan(cases["D_1"].pcr) and not cases["D_1"].has_pcr
    assert cases["D_2"].pcr == 1.0  # spreadsheet empty -> JSON
    assert cases["D_3"].pcr == 0.0  # spreadsheet wins


@pytest.mark.parametrize("column", ["menopause", "menopausal_status"])
@pytest.mark.parametrize("table", ["xlsx", "csv"])
def test_clinical_columns_and_csv(tmp_path, column, table):
    root = make_root(tmp_path, [{"folder": "E_1", "files": "e_1"}, {"folder": "E_2", "files": "e_2"}], table=table,
                     rows=[{"patient_id": "E_1", "dataset": "NACT", "age": 41, column: "premenopausal", "pcr": 1,
                            "tumor_subtype": "luminal_a", "field_strength": 1.5, "manufacturer": "SIEMENS"},
                           {"patient_id": "E_2", "dataset": "NACT", "age": None, column: None, "pcr": 0}])
    cases = {c.patient_id: c for c in read_mamamia(root)}
    meta = cases["E_1"].meta
    assert meta["menopause"] == "premenopausal" and meta["age"] == 41.0 and meta["field_strength"] == 1.5
    assert meta["density"] is None  # no density column at all
    assert meta["manufacturer"] == "SIEMENS" and meta["tumor_subtype"] == "luminal_a"
    assert cases["E_2"].meta["menopause"] is None and cases["E_2"].meta["age"] is None
    json.dumps(meta)  # meta must stay JSON-serialisable (it goes into the cache metadata)


def test_spreadsheet_and_json_clinical_values(tmp_path):
    doc = box_json(clinical_data={"age": 55, "menopausal_status": "post", "breast_density": "C"},
                   imaging_data={"dataset": "ISPY2", "site": "S7", "scanner_manufacturer": "GE", "bilateral": True})
    root = make_root(tmp_path, [{"folder": "F_1", "files": "f_1", "json": doc}],
                     rows=[{"patient_id": "F_1", "age": 60, "breast_density": "b"}])
    (case,) = read_mamamia(root)
    assert case.meta["age"] == 60.0  # spreadsheet wins
    assert case.meta["density"] == "b" and case.meta["menopause"] == "post"
    assert (case.meta["dataset"], case.meta["site"], case.meta["manufacturer"], case.meta["bilateral"]) == \
        ("ISPY2", "S7", "GE", True)


def test_tolerates_extra_files_and_unmatched_rows(tmp_path):
    root = make_root(tmp_path, [{"folder": "G_1", "files": "g_1"}, {"folder": "G_2", "files": "g_2"}],
                     rows=[{"patient_id": "G_1", "pcr": 1}, {"patient_id": "G_9", "pcr": 0}])
    (root / "images" / "G_1" / "notes.txt").write_text("x")
    (root / "images" / "G_1" / "g_1_0000_brain_mask.nii.gz").write_text("x")
    (root / "images" / ".DS_Store").write_text("x")
    (root / "README.md").write_text("x")
    (root / "segmentations" / "automatic").mkdir(parents=True)
    (root / "images" / "__MACOSX").mkdir()
    cases = {c.patient_id: c for c in read_mamamia(root)}
    assert sorted(cases) == ["G_1", "G_2"]  # G_9 has no images; G_2 has no row
    assert cases["G_1"].num_phases == 3 and math.isnan(cases["G_2"].pcr)
    labels_only = {c.patient_id: c for c in read_mamamia(root, require_images=False)}
    assert labels_only["G_9"].image_paths == [] and labels_only["G_9"].pcr == 0.0


def test_images_only_copy_is_recognised(tmp_path):
    root = make_root(tmp_path / "copy", [{"folder": "NEW_001", "files": "new_001", "phases": range(4)}], table=None)
    assert is_mamamia_root(root) and not is_mamamia_root(root / "images")
    (case,) = read_dataset(root)
    assert case.patient_id == "NEW_001" and case.num_phases == 4 and case.mask_path is None and case.breast_box is None


def test_splits(tmp_path):
    pd.DataFrame({"train_split": ["DUKE_001", "DUKE_002", "NACT_01"], "test_split": ["ISPY1_1", None, None]}).to_csv(
        tmp_path / "train_test_splits.csv", index=False)
    assert read_splits(tmp_path) == {"train": ["DUKE_001", "DUKE_002", "NACT_01"], "test": ["ISPY1_1"]}


def test_folder_reader_orders_phases_and_reads_manifest(tmp_path):
    root = tmp_path / "unlabeled"
    for name in ("t10.nii.gz", "t2.nii.gz", "t1.mha"):
        write_nifti(root / "case_a" / name)
    (root / "case_a" / "readme.txt").write_text("not an image")
    for name in ("post.nrrd", "pre.nii"):
        write_nifti(root / "case_b" / name)
    (root / "case_b" / "manifest.json").write_text(json.dumps({"phases": ["pre.nii", "post.nrrd"], "times": [0, 95]}))
    (root / "empty_folder").mkdir()
    cases = {c.patient_id: c for c in read_folder(root)}
    assert sorted(cases) == ["case_a", "case_b"]
    assert [p.name for p in cases["case_a"].image_paths] == ["t1.mha", "t2.nii.gz", "t10.nii.gz"]
    assert cases["case_a"].acquisition_times is None and math.isnan(cases["case_a"].pcr)
    assert [p.name for p in cases["case_b"].image_paths] == ["pre.nii", "post.nrrd"]
    assert cases["case_b"].acquisition_times == [0.0, 95.0] and cases["case_b"].meta["dataset"] == "unlabeled"


def test_folder_manifest_naming_missing_file(tmp_path):
    write_nifti(tmp_path / "root" / "case_c" / "pre.nii.gz")
    (tmp_path / "root" / "case_c" / "manifest.json").write_text(json.dumps({"phases": ["pre.nii.gz", "gone.nii.gz"]}))
    with pytest.raises(CaseError, match=r"case case_c .*gone\.nii\.gz"):
        read_folder(tmp_path / "root")
    skipped = []
    assert read_folder(tmp_path / "root", skipped=skipped) == [] and skipped[0]["patient_id"] == "case_c"


def test_several_roots_and_mamamia_delegation(tmp_path):
    for site in ("site_a", "site_b"):
        write_nifti(tmp_path / site / "p001" / "p001_0.nii.gz")
        write_nifti(tmp_path / site / "p001" / "p001_1.nii.gz")
    write_nifti(tmp_path / "site_b" / "p002" / "p002_0.nii.gz")
    mamamia = make_root(tmp_path / "mamamia", [{"folder": "DUKE_001", "files": "duke_001", "json": box_json()}],
                        rows=[{"patient_id": "DUKE_001", "pcr": 1}])
    cases = read_folder([tmp_path / "site_a", str(tmp_path / "site_b"), mamamia])
    assert [c.patient_id for c in cases] == ["site_a_p001", "site_b_p001", "p002", "DUKE_001"]
    assert cases[-1].pcr == 1.0 and cases[-1].breast_box is not None
    assert [c.patient_id for c in read_dataset(mamamia)] == ["DUKE_001"]
    assert [c.patient_id for c in read_dataset(tmp_path / "site_b")] == ["p001", "p002"]


def test_empty_case_folder_and_split_id_without_folder_are_reported(tmp_path):
    root = make_root(tmp_path, [{"folder": "H_1", "files": "h_1"}, {"folder": "H_3", "files": "h_3"}], table=None)
    (root / "images" / "H_2").mkdir()  # a test case whose files never arrived
    write_nifti(root / "images" / "H_3" / "scan.nii.gz")
    for phase in (root / "images" / "H_3").glob("h_3_*.nii.gz"):  # files named otherwise are not phases
        phase.unlink()
    (root / "images" / "__MACOSX").mkdir()  # archive debris, not a case
    pd.DataFrame({"train_split": ["H_1", "H_3"], "test_split": ["H_2", "H_9"]}).to_csv(
        root / "train_test_splits.csv", index=False)
    skipped = []
    assert [c.patient_id for c in read_mamamia(root, skipped=skipped)] == ["H_1"]
    reasons = {s["patient_id"]: s["reason"] for s in skipped}
    assert sorted(reasons) == ["H_2", "H_3", "H_9"]
    assert reasons["H_2"].startswith(f"case H_2 ({root / 'images' / 'H_2'}): case folder is empty")
    assert "no phase files named h_3_0000.nii.gz" in reasons["H_3"] and "scan.nii.gz" in reasons["H_3"]
    assert reasons["H_9"].startswith(f"case H_9 ({root / 'train_test_splits.csv'}): listed in the test split")
    assert str(root / "images" / "H_9") in reasons["H_9"]
    with pytest.raises(CaseError, match=r"case H_2 .*case folder is empty"):
        read_mamamia(root)
    # Reading labels alone (evaluation) still lists every patient, with or without images.
    assert "H_2" in {c.patient_id for c in read_mamamia(root, require_images=False, skipped=[])}


@pytest.mark.parametrize("times", ["[0, 90, 90]", "[0, 180, 90]"])
def test_acquisition_times_out_of_order_name_the_spreadsheet_or_json(tmp_path, times):
    root = make_root(tmp_path, [{"folder": "T_1", "files": "t_1"}, {"folder": "T_2", "files": "t_2"}],
                     rows=[{"patient_id": "T_1", "acquisition_times": times},
                           {"patient_id": "T_2", "acquisition_times": "[0, 90, 180]"}])
    with pytest.raises(CaseError, match=r"case T_1 \(.*clinical_and_imaging_info\.xlsx\): acquisition_times "
                                        r".* must be strictly increasing"):
        read_mamamia(root)
    skipped = []
    assert [c.patient_id for c in read_mamamia(root, skipped=skipped)] == ["T_2"]
    assert skipped[0]["patient_id"] == "T_1" and times in skipped[0]["reason"]
    # From the JSON when the spreadsheet has no times.
    (root / "clinical_and_imaging_info.xlsx").unlink()
    write_json = root / "patient_info_files" / "t_1.json"
    write_json.parent.mkdir(parents=True, exist_ok=True)
    write_json.write_text(json.dumps(box_json(imaging_data={"acquisition_times": json.loads(times)})))
    with pytest.raises(CaseError, match=r"case T_1 \(.*t_1\.json\): acquisition_times"):
        read_mamamia(root)


def test_folder_manifest_times_out_of_order(tmp_path):
    for name in ("pre.nii.gz", "post.nii.gz", "late.nii.gz"):
        write_nifti(tmp_path / "root" / "case_t" / name)
    manifest = tmp_path / "root" / "case_t" / "manifest.json"
    manifest.write_text(json.dumps({"phases": ["pre.nii.gz", "post.nii.gz", "late.nii.gz"], "times": [0, 180, 90]}))
    with pytest.raises(CaseError, match=r"case case_t \(.*manifest\.json\): acquisition_times \[0, 180, 90\] must be "
                                        r"strictly increasing.*phase 2 at 90 s is not after phase 1 at 180 s"):
        read_folder(tmp_path / "root")
