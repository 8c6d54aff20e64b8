"""DICOM input: phantoms written as DICOM studies (tests/dicomwriter.py) in both layouts, with shuffled files, an
oblique grid, rescaled pixels and extra series, read back equal to their NIfTI twins; `convert`; direct DICOM input
to preprocess and predict; one-line errors for broken studies."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import run_cli
from dicomwriter import ACQUISITION, dicom_twin

from mtl_breast.data.dynamic import read_dicom_root
from mtl_breast.data.folder import read_dataset, read_folder
from mtl_breast.data.mamamia import read_mamamia
from mtl_breast.data.preprocess import PreprocessConfig, preprocess_case

LAYOUTS = ("per_phase", "multi")


@pytest.fixture(scope="module")
def twins(tmp_path_factory) -> dict:
    """Per layout: a DICOM root and its NIfTI twin root (two phantom cases, 5 and 4 phases, 24 voxels a side)."""
    from mtl_breast.phantoms.collection import generate_dataset

    base = tmp_path_factory.mktemp("dicom")
    generate_dataset(base / "phantoms", num_cases=2, seed=0, size=24)
    out = {}
    for layout in LAYOUTS:
        written = {}
        for n, case in enumerate(read_mamamia(base / "phantoms")):
            written[case.patient_id] = dicom_twin(case.image_paths, case.acquisition_times, base / f"dcm_{layout}",
                                                  base / f"nii_{layout}", case.patient_id, layout=layout, seed=n)
        out[layout] = {"dicom": base / f"dcm_{layout}", "nifti": base / f"nii_{layout}", "written": written}
    return out


@pytest.fixture(autouse=True)
def _staging(tmp_path, monkeypatch):
    monkeypatch.setenv("MTL_BREAST_DICOM_CACHE", str(tmp_path / "staging"))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dicom_study_equals_its_nifti_twin(twins, layout):
    studies = read_dicom_root(twins[layout]["dicom"])
    assert sorted(s.case_id for s in studies) == sorted(twins[layout]["written"])
    twin_cases = {c.patient_id: c for c in read_folder(twins[layout]["nifti"])}
    for study in studies:
        written, twin = twins[layout]["written"][study.case_id], twin_cases[study.case_id]
        assert study.times == pytest.approx(twin.acquisition_times, abs=1e-6)
        assert study.series_uids == written["series_uids"]
        assert [i["series"].split(" ")[1] for i in study.ignored] == ["99", "1"]  # subtraction, T2 on another grid
        for k, path in enumerate(twin.image_paths):
            image, reference = study.read_phase(k), sitk.ReadImage(str(path), sitk.sitkFloat32)
            np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(reference))
            np.testing.assert_allclose(image.GetOrigin(), written["origin"], atol=1e-6)
            np.testing.assert_allclose(image.GetDirection(), written["direction"], atol=1e-6)
            np.testing.assert_allclose(image.GetSpacing(), written["spacing"], atol=1e-6)
        for key in ("field_strength", "repetition_time", "echo_time", "flip_angle", "manufacturer", "model"):
            assert study.meta[key] == ACQUISITION[key]
        assert study.meta["acquisition_times"] == study.times


def test_convert_writes_case_folders_the_folder_reader_takes(twins, tmp_path, capsys):
    out = tmp_path / "converted"
    assert run_cli(["convert", "--dicom", twins["multi"]["dicom"], "--out", out]) == 0
    assert "converted 2" in capsys.readouterr().out
    cases = {c.patient_id: c for c in read_folder(out)}
    twin = {c.patient_id: c for c in read_folder(twins["multi"]["nifti"])}
    assert sorted(cases) == sorted(twin)
    for pid, case in cases.items():
        assert case.acquisition_times == pytest.approx(twin[pid].acquisition_times)
        assert case.meta["flip_angle"] == 12.0 and case.meta["model"] == "Skyra"
        a = preprocess_case(case, PreprocessConfig(spacing=(2.0, 2.0, 2.0)))
        b = preprocess_case(twin[pid], PreprocessConfig(spacing=(2.0, 2.0, 2.0)))
        np.testing.assert_allclose(a.image, b.image, atol=1e-4)
    report = json.loads((out / "conversion.json").read_text())
    assert sorted(report["converted"]) == sorted(cases)
    assert run_cli(["convert", "--dicom", twins["multi"]["dicom"], "--out", out]) == 0  # a second run keeps them
    assert "converted 0, unchanged 2" in capsys.readouterr().out


def test_read_dataset_takes_a_dicom_root(twins):
    cases = read_dataset(twins["per_phase"]["dicom"])
    assert sorted(c.patient_id for c in cases) == sorted(twins["per_phase"]["written"])
    assert all(c.meta["study_uid"] and len(c.meta["series_uids"]) == c.num_phases for c in cases)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_predict_on_dicom_equals_predict_on_the_nifti_twin(twins, layout, tmp_path):
    from mtl_breast.hub import save_pretrained
    from mtl_breast.models.registry import create_model

    weights = tmp_path / "w"
    save_pretrained(create_model("mtl_vit_test"), weights,
                    extra_config={"inference": {"roi_size": [32] * 3}, "preprocess": {"spacing": [2.0, 2.0, 2.0]}})
    outs = {}
    for kind in ("dicom", "nifti"):
        outs[kind] = tmp_path / kind
        assert run_cli(["predict", "--weights", weights, "--data", twins[layout][kind], "--out", outs[kind],
                        "--device", "cpu"]) == 0
    rows = {kind: list(csv.DictReader(open(out / "predictions.csv"))) for kind, out in outs.items()}
    assert len(rows["dicom"]) == 2
    for a, b in zip(rows["dicom"], rows["nifti"], strict=True):
        assert a["patient_id"] == b["patient_id"] and a["pcr"] == b["pcr"]
        assert float(a["score"]) == pytest.approx(float(b["score"]), abs=1e-5)
        ma = sitk.ReadImage(str(outs["dicom"] / "pred_segmentations" / f"{a['patient_id']}.nii.gz"))
        mb = sitk.ReadImage(str(outs["nifti"] / "pred_segmentations" / f"{a['patient_id']}.nii.gz"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(ma), sitk.GetArrayFromImage(mb))
        np.testing.assert_allclose(ma.GetOrigin(), mb.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(ma.GetDirection(), mb.GetDirection(), atol=1e-5)


# ---------------------------------------------------------------------------------------------- bad DICOM
def _phantom_phases(tmp_path: Path) -> tuple[list[Path], list[float]]:
    from mtl_breast.phantoms.collection import generate_dataset

    generate_dataset(tmp_path / "ph", num_cases=1, seed=3, size=16)
    case = read_mamamia(tmp_path / "ph")[0]
    return case.image_paths[:3], (case.acquisition_times or [0.0, 60.0, 120.0, 180.0, 240.0])[:3]


def _series_files(root: Path, study: dict, k: int) -> list[Path]:
    import pydicom

    uid = study["series_uids"][min(k, len(study["series_uids"]) - 1)]
    return sorted(p for p in study["files"] if pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID == uid)


def _convert_fails(tmp_path: Path, dicom: Path, capsys) -> str:
    rc = run_cli(["convert", "--dicom", dicom, "--out", tmp_path / "out"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 1 and len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_missing_slices_name_the_study_and_series(tmp_path, layout, capsys):
    import pydicom

    phases, times = _phantom_phases(tmp_path)
    study = dicom_twin(phases, times, tmp_path / "dcm", tmp_path / "nii", "P1", layout=layout)
    files = _series_files(tmp_path / "dcm", study, 1)
    by_z = sorted(files, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber))
    by_z[len(by_z) // 2 + 1].unlink()  # a middle slice (of phase 1 in the per-phase layout)
    line = _convert_fails(tmp_path, tmp_path / "dcm", capsys)
    assert study["study_uid"] in line and study["series_uids"][min(1, len(study["series_uids"]) - 1)] in line
    assert ("missing slices" if layout == "per_phase" else "incomplete") in line


def test_mixed_geometry_names_the_series(tmp_path, capsys):
    import pydicom

    phases, times = _phantom_phases(tmp_path)
    study = dicom_twin(phases, times, tmp_path / "dcm", tmp_path / "nii", "P2", layout="per_phase")
    victim = _series_files(tmp_path / "dcm", study, 2)[0]
    ds = pydicom.dcmread(victim)
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.save_as(victim)
    line = _convert_fails(tmp_path, tmp_path / "dcm", capsys)
    assert "mixed geometry" in line and study["series_uids"][2] in line and victim.name in line


def test_a_study_without_a_dynamic_series_is_named(tmp_path, capsys):
    phases, times = _phantom_phases(tmp_path)
    study = dicom_twin(phases[:1], times[:1], tmp_path / "dcm", tmp_path / "nii", "P3", layout="per_phase")
    line = _convert_fails(tmp_path, tmp_path / "dcm", capsys)
    assert "no dynamic series" in line and study["study_uid"] in line and "P3" in line


def test_a_broken_study_leaves_the_others_and_earlier_output_alone(tmp_path, capsys):
    phases, times = _phantom_phases(tmp_path)
    dicom_twin(phases, times, tmp_path / "dcm", tmp_path / "nii", "GOOD", layout="multi")
    out = tmp_path / "out"
    assert run_cli(["convert", "--dicom", tmp_path / "dcm", "--out", out]) == 0
    before = {p.name: p.read_bytes() for p in (out / "GOOD").iterdir()}
    dicom_twin(phases[:1], times[:1], tmp_path / "dcm", tmp_path / "nii", "BAD", layout="per_phase")
    capsys.readouterr()
    assert run_cli(["convert", "--dicom", tmp_path / "dcm", "--out", out]) == 1
    assert "BAD" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (out / "GOOD").iterdir()} == before
    assert not (out / "BAD").exists() and not [p for p in out.iterdir() if p.name.startswith(".")]


def test_convert_joins_pcr_from_a_clinical_table(twins, tmp_path):
    table = tmp_path / "clinical.csv"
    table.write_text("group,,\nSUBJECTID,PCR,age\nBreast_MRI_001,1,50\n1001,0,40\n")  # a title row above the header
    out = tmp_path / "converted"
    assert run_cli(["convert", "--dicom", twins["per_phase"]["dicom"], "--out", out, "--clinical", table]) == 0
    cases = {c.patient_id: c for c in read_folder(out)}
    assert cases["DUKE_001"].pcr == 1.0 and cases["ISPY1_1001"].pcr == 0.0
    assert json.loads((out / "conversion.json").read_text())["clinical"]["with_pcr"] == 2


def test_extract_on_dicom_equals_extract_on_the_nifti_twin(twins, tmp_path):
    from safetensors.numpy import load_file

    from mtl_breast.hub import save_pretrained
    from mtl_breast.models.registry import create_model

    weights = tmp_path / "mae"
    save_pretrained(create_model("mae_vit_test"), weights, extra_config={"preprocess": {"spacing": [2.0, 2.0, 2.0]}})
    for kind in ("dicom", "nifti"):
        assert run_cli(["extract", "--weights", weights, "--data", twins["multi"][kind], "--out", tmp_path / kind,
                        "--device", "cpu"]) == 0
    for pid in twins["multi"]["written"]:
        a = load_file(tmp_path / "dicom" / "features" / f"{pid}.safetensors")
        b = load_file(tmp_path / "nifti" / "features" / f"{pid}.safetensors")
        np.testing.assert_allclose(a["pooled"], b["pooled"], atol=1e-5)


def test_a_non_dynamic_series_on_the_dynamics_grid_is_ignored_with_its_reason(tmp_path):
    phases, times = _phantom_phases(tmp_path)
    written = dicom_twin(phases, times, tmp_path / "dcm", tmp_path / "nii", "P4", layout="per_phase",
                         same_grid_t1=True)
    study = read_dicom_root(tmp_path / "dcm")[0]
    assert study.series_uids == written["series_uids"] and study.times == pytest.approx(times)
    reasons = {i["series"].split(" ")[1]: i["reason"] for i in study.ignored}
    assert "names no dynamic phase" in reasons["2"] and "derived" in reasons["99"]
