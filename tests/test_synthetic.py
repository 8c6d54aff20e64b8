"""Synthetic MAMA-MIA datasets: layout, metadata, geometry, physics and determinism."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from scipy import ndimage

from mtl_breast.phantoms.collection import SITES, generate_dataset
from mtl_breast.phantoms.physics import (
    PhantomSpec,
    _resample,
    _target_grid,
    parker_aif,
    spgr_signal,
    tofts_concentration,
)
from mtl_breast.phantoms.population import pcr_population_stats

NUM_CASES, SIZE = 6, 24


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth") / "data"
    return root, generate_dataset(root, num_cases=NUM_CASES, seed=7, size=SIZE)


def _cases(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "images").iterdir())


def _read(path: Path) -> tuple[np.ndarray, sitk.Image]:
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image


def _phases(root: Path, pid: str) -> list[Path]:
    return sorted((root / "images" / pid).glob(f"{pid.lower()}_*.nii.gz"))


def test_layout_and_summary(dataset):
    root, summary = dataset
    pids = _cases(root)
    assert len(pids) == NUM_CASES and all(p == p.upper() for p in pids)
    assert {p.split("_")[0] for p in pids} <= set(SITES)
    for pid in pids:
        low = pid.lower()
        phases = _phases(root, pid)
        assert [p.name for p in phases] == [f"{low}_{t:04d}.nii.gz" for t in range(len(phases))]
        assert 3 <= len(phases) <= 6
        assert (root / "segmentations" / "expert" / f"{low}.nii.gz").is_file()
        assert (root / "patient_info_files" / f"{low}.json").is_file()
    assert not list(root.rglob(".*tmp*")), "temporary files left behind"
    assert summary["num_cases"] == NUM_CASES and sum(summary["sites"].values()) == NUM_CASES
    assert sum(summary["phases"].values()) == NUM_CASES
    assert summary["splits"]["train"] + summary["splits"]["test"] == NUM_CASES
    assert 0.5 < summary["bayes_balanced_accuracy"] <= 1.0
    json.dumps(summary)  # the CLI prints it


def test_patient_json_and_spreadsheet(dataset):
    root, _ = dataset
    table = pd.read_excel(root / "clinical_and_imaging_info.xlsx", sheet_name="dataset_info")
    for column in ("patient_id", "dataset", "pcr", "age", "menopause", "tumor_subtype", "num_phases",
                   "acquisition_times", "field_strength", "manufacturer", "pixel_spacing", "slice_thickness",
                   "breast_density", "bilateral"):
        assert column in table.columns, column
    assert sorted(table["patient_id"]) == _cases(root)
    missing = {"pcr": 0, "density": 0}
    for row in table.itertuples():
        info = json.loads((root / "patient_info_files" / f"{row.patient_id.lower()}.json").read_text())
        lesion, imaging, clinical = info["primary_lesion"], info["imaging_data"], info["clinical_data"]
        assert set(lesion["breast_coordinates"]) == {"x_min", "x_max", "y_min", "y_max", "z_min", "z_max"}
        for key in ("bilateral", "dataset", "site", "scanner_manufacturer", "echo_time"):
            assert key in imaging, key
        assert "flip_angle" not in imaging and "phantom" not in info  # withheld, as real records withhold it
        assert math.isnan(row.field_strength) == ("field_strength" not in imaging)
        assert "age" in clinical and "menopausal_status" in clinical
        times = ast.literal_eval(row.acquisition_times)
        assert times[0] == 0 and times == sorted(times) and len(times) == row.num_phases
        assert len(_phases(root, row.patient_id)) == row.num_phases
        # pCR and density: missing in the sheet (NaN) exactly when missing in the JSON (absent or null)
        assert math.isnan(row.pcr) == (lesion.get("pcr") is None)
        if lesion.get("pcr") is not None:
            assert lesion["pcr"] == row.pcr
        missing["pcr"] += math.isnan(row.pcr)
        missing["density"] += clinical.get("breast_density") is None
        assert clinical.get("menopausal_status") in (None, "pre", "peri", "post")
        assert clinical.get("breast_density") in (None, "a", "b", "c", "d")
    assert missing["pcr"] >= 1 and missing["density"] >= 1


def test_split_file(dataset):
    root, summary = dataset
    splits = pd.read_csv(root / "train_test_splits.csv")
    assert list(splits.columns) == ["train_split", "test_split"]
    train, test = splits["train_split"].dropna().tolist(), splits["test_split"].dropna().tolist()
    assert sorted(train + test) == _cases(root) and not set(train) & set(test)
    assert len(test) == summary["splits"]["test"] >= 1


def test_geometry_mask_and_box(dataset):
    root, _ = dataset
    directions, shifted = set(), 0
    for pid in _cases(root):
        phases = [_read(p) for p in _phases(root, pid)]
        mask, mask_image = _read(root / "segmentations" / "expert" / f"{pid.lower()}.nii.gz")
        assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
        # the mask is drawn on the first post-contrast grid; every phase has that array shape
        ref = phases[1][1]
        assert mask_image.GetSize() == ref.GetSize() and mask_image.GetSpacing() == ref.GetSpacing()
        assert np.allclose(mask_image.GetOrigin(), ref.GetOrigin())
        assert np.allclose(mask_image.GetDirection(), ref.GetDirection())
        assert all(a.shape == mask.shape for a, _ in phases)
        shifted += not np.allclose(phases[0][1].GetOrigin(), ref.GetOrigin())
        directions.add(tuple(np.round(ref.GetDirection(), 3)))
        info = json.loads((root / "patient_info_files" / f"{pid.lower()}.json").read_text())
        assert math.isclose(ref.GetSpacing()[0], info["imaging_data"]["pixel_spacing"][0], rel_tol=1e-5)
        assert math.isclose(ref.GetSpacing()[2], info["imaging_data"]["slice_thickness"], rel_tol=1e-5)
        # breast box: x indexes array axis 0 (slices); maxima exclusive; it holds the whole tumour
        b = info["primary_lesion"]["breast_coordinates"]
        assert 0 <= b["x_min"] < b["x_max"] <= mask.shape[0] and 0 <= b["y_min"] < b["y_max"] <= mask.shape[1]
        assert 0 <= b["z_min"] < b["z_max"] <= mask.shape[2]
        inside = mask[b["x_min"]:b["x_max"], b["y_min"]:b["y_max"], b["z_min"]:b["z_max"]].sum()
        assert inside == mask.sum() > 0
    assert len(directions) >= 2, "all sites share one orientation; reorientation is not exercised"
    assert shifted >= 1, "no case has its pre-contrast phase on a different grid; resampling is not exercised"


def test_tumour_enhancement(dataset):
    root, _ = dataset
    for pid in _cases(root):
        phases = [_read(p)[0].astype(np.float64) for p in _phases(root, pid)]
        mask = _read(root / "segmentations" / "expert" / f"{pid.lower()}.nii.gz")[0].astype(bool)
        enhancement = phases[1] - phases[0]
        assert enhancement[mask].mean() > 3 * enhancement[~mask].mean(), pid
        tumour = [p[mask].mean() for p in phases]
        assert tumour[1] > 1.5 * tumour[0] and min(tumour[1:]) > 1.2 * tumour[0], (pid, tumour)


def _all_arrays(root: Path) -> list[np.ndarray]:
    out = []
    for pid in _cases(root):
        out += [_read(p)[0] for p in _phases(root, pid)]
        out.append(_read(root / "segmentations" / "expert" / f"{pid.lower()}.nii.gz")[0])
    return out


def test_deterministic(tmp_path):
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        generate_dataset(tmp_path / name, num_cases=3, seed=seed, size=16)
    a, b, c = (_all_arrays(tmp_path / name) for name in "abc")
    assert len(a) == len(b) and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    for pid in _cases(tmp_path / "a"):
        infos = [json.loads((tmp_path / r / "patient_info_files" / f"{pid.lower()}.json").read_text()) for r in "ab"]
        assert infos[0] == infos[1]
    assert len(a) != len(c) or any(x.shape != y.shape or not np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_rerun_removes_stale_cases(tmp_path):
    generate_dataset(tmp_path, num_cases=5, seed=1, size=16)
    generate_dataset(tmp_path, num_cases=2, seed=1, size=16)
    table = pd.read_excel(tmp_path / "clinical_and_imaging_info.xlsx", sheet_name="dataset_info")
    assert sorted(table["patient_id"]) == _cases(tmp_path)
    assert len(list((tmp_path / "patient_info_files").glob("*.json"))) == 2
    for pid in _cases(tmp_path):
        info = json.loads((tmp_path / "patient_info_files" / f"{pid.lower()}.json").read_text())
        assert len(_phases(tmp_path, pid)) == info["imaging_data"]["num_phases"]


def test_difficulty_shift_lowers_bayes_accuracy_of_dense_breasts():
    easy = pcr_population_stats(0.0, num_samples=20_000)
    hard = pcr_population_stats(1.0, num_samples=20_000)
    assert 0.75 < easy["bayes_balanced_accuracy"] < 0.9
    assert hard["bayes_balanced_accuracy"] < easy["bayes_balanced_accuracy"] - 0.02
    gap = {k: easy["bayes_balanced_accuracy_by_density"][k] - hard["bayes_balanced_accuracy_by_density"][k]
           for k in "abcd"}
    assert min(gap["c"], gap["d"]) > max(abs(gap["a"]), abs(gap["b"])) + 0.02


def test_kinetics_physics():
    t = np.linspace(0, 6, 601)
    cp = parker_aif(t)
    assert cp[0] == 0 and 0.1 < t[np.argmax(cp)] < 0.25 and 8 < cp.max() < 12  # first-pass peak ~10 s, ~10 mM
    ktrans, ve, vp = np.array([0.0, 0.2, 1.0]), np.array([0.3, 0.3, 0.3]), np.array([0.05, 0.0, 0.0])
    conc = tofts_concentration(ktrans, ve, vp, [0.0, 60.0, 120.0, 600.0], arrival_s=20.0)
    assert np.all(conc[0] == 0)
    assert np.allclose(conc[1:, 0], 0.05 * parker_aif((np.array([60.0, 120.0, 600.0]) - 20) / 60), rtol=1e-5)
    assert conc[1, 2] > conc[1, 1] > 0  # faster uptake with higher Ktrans
    assert conc[3, 2] < conc[2, 2]  # washout once kep is high
    signal = spgr_signal(1.0, 1.2, np.array([0.0, 0.1, 0.5, 2.0]), tr_ms=5.0, flip_deg=12.0, r1=4.5)
    assert np.all(np.diff(signal) > 0)


@pytest.mark.parametrize("site", list(SITES))
def test_fast_resampling_matches_the_written_geometry(site):
    """Voxel (k, j, i) of a stored phase shows the phantom at origin + direction @ (spacing * (i, j, k))."""
    rng = np.random.default_rng(0)
    h, shape = 0.8, ((40 if SITES[site].bilateral else 20), 20, 20)
    spec = PhantomSpec(site=SITES[site], pixel_spacing=h, slice_thickness=1.9, times_s=[0.0], fgt_fraction=0.3,
                       bpe_ktrans=0.01, fp=1.0, ps=0.5, ve=0.3, vp=0.05, radius_mm=3.0)
    volume, centre = rng.random(shape).astype(np.float32), rng.uniform(-50, 50, 3)
    direction, spacing, size, origin = _target_grid(spec, shape, centre)
    for half in (False, True):
        k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in size[::-1]), indexing="ij")
        offset = np.stack([(i + 0.5 * half) * spacing[0], j * spacing[1], k * spacing[2]])
        points = np.einsum("rc,ckji->rkji", direction, offset) + origin[:, None, None, None]
        coords = (points - centre[:, None, None, None]) / h + (np.array(shape)[:, None, None, None] - 1) / 2
        expected = ndimage.map_coordinates(volume, coords, order=1, mode="nearest", prefilter=False)
        np.testing.assert_allclose(_resample(volume, direction, int(size[2]), spacing[2] / h, half), expected,
                                   atol=1e-5)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        generate_dataset(tmp_path, num_cases=0)
    with pytest.raises(ValueError):
        generate_dataset(tmp_path, num_cases=2, test_fraction=1.0)
    with pytest.raises(ValueError):
        generate_dataset(tmp_path, num_cases=2, difficulty_shift=-0.5)
