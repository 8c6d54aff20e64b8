"""Preprocessing, its inverse geometry, the batch driver and the case cache, on tiny NIfTI volumes."""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

import mtl_breast.files as files_module
from mtl_breast.data.build import preprocess_dataset
from mtl_breast.data.cache import CacheError, CaseCache, read_cached_crop, read_header
from mtl_breast.data.case import Case, CaseError
from mtl_breast.data.preprocess import PreprocessConfig, original_image_reference, preprocess_case, to_original_space
from mtl_breast.data.volumes import read_volume

SHAPE = (16, 18, 20)  # SimpleITK array order (z, y, x)


def write_nifti(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                direction=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin])
    if direction is not None:
        image.SetDirection([float(d) for d in np.ravel(direction)])
    sitk.WriteImage(image, str(path))
    return path


def ellipsoid(shape=SHAPE, center=(6, 10, 12), radii=(4, 5, 5.5)) -> np.ndarray:
    """Off-centre on every axis, so a wrong flip moves the centroid by 3 voxels or more."""
    grid = np.indices(shape)
    dist = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii, strict=True))
    return (dist <= 1).astype(np.uint8)


def phantom(shape=SHAPE, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    body = 100 + 20 * ellipsoid(shape) + rng.normal(0, 1, shape)
    body[:, :, :3] = 0  # air
    return body.astype(np.float32)


def make_case(folder: Path, pid="P1", phases=3, mask=True, geometry=None, box=None, scale=(1.0, 1.6, 1.3)) -> Case:
    """A case whose phase k is `scale[k]` x the same phantom (geometry: spacing/origin/direction kwargs)."""
    geometry = geometry or {}
    base = phantom()
    paths = [write_nifti(folder / pid / f"{pid.lower()}_{k:04d}.nii.gz", base * scale[k], **geometry)
             for k in range(phases)]
    mask_path = write_nifti(folder / "masks" / f"{pid}.nii.gz", ellipsoid(), **geometry) if mask else None
    return Case(patient_id=pid, image_paths=paths, mask_path=mask_path, pcr=1.0, breast_box=box,
                acquisition_times=[0.0, 90.0, 180.0][:phases], meta={"dataset": "T", "age": 50.0})


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


FLIP_PERMUTE = [[0, 0, -1], [1, 0, 0], [0, -1, 0]]  # columns: image axis directions in LPS


@pytest.mark.parametrize("geometry, box", [
    ({"spacing": (0.8, 1.3, 2.2)}, None),
    ({"spacing": (0.8, 1.3, 2.2), "direction": np.diag([-1, 1, -1])}, (2, 14, 3, 16, 4, 19)),
    ({"spacing": (1.2, 0.9, 1.6), "origin": (10, -5, 3), "direction": FLIP_PERMUTE}, (3, 13, 2, 17, 4, 18)),
])
def test_geometry_round_trip(tmp_path, geometry, box):
    case = make_case(tmp_path, geometry=geometry, box=box)
    out = preprocess_case(case, PreprocessConfig(margin_mm=2.0))
    geo = out.info["geometry"]
    assert np.allclose(np.reshape(geo["output"]["direction"], (3, 3)), np.diag([-1, -1, 1]))  # RAS in LPS terms
    assert np.allclose(geo["output"]["spacing"], 1.0)
    assert out.image.shape[1:] == out.label.shape == tuple(reversed(geo["output"]["size"]))
    original = ellipsoid().astype(bool)
    back = to_original_space(out.label.astype(bool), geo, "nearest")
    assert back.shape == SHAPE and back.dtype == bool
    assert dice(back, original) > 0.9
    centroid = lambda m: np.argwhere(m).mean(0)  # noqa: E731
    assert np.abs(centroid(back) - centroid(original)).max() < 1.0
    reference = original_image_reference(geo)
    assert reference.GetSize() == SHAPE[::-1]
    assert np.allclose(reference.GetDirection(), np.ravel(geometry.get("direction", np.eye(3))))
    if box is not None:  # the crop (box + 2 mm) is smaller than the image; 1 mm voxels fill its physical volume
        assert np.prod(geo["crop_size"]) < 0.9 * np.prod(SHAPE)
        crop_mm3 = np.prod(np.array(geo["crop_size"]) * np.array(geometry["spacing"]))
        assert np.prod(out.image.shape[1:]) == pytest.approx(crop_mm3, rel=0.2)


def test_crop_is_the_breast_box_in_array_indices(tmp_path):
    box = (2, 12, 3, 15, 5, 17)  # x = array axis 0
    case = make_case(tmp_path, box=box, geometry={"spacing": (1.0, 1.0, 2.0)})
    config = PreprocessConfig(orientation="LPS", spacing=(1.0, 1.0, 2.0), margin_mm=2.0)  # identity: no resampling
    out = preprocess_case(case, config)
    norm = out.info["normalization"]
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(case.image_paths[1])))
    # margin: 2 mm = 1 voxel on axis 0 (2 mm slices), 2 voxels on the 1 mm axes; clipped to the image
    expected = reference[1:13, 1:17, 3:19]
    assert out.image.shape[1:] == expected.shape
    np.testing.assert_allclose(out.image[1] * norm["std"] + norm["mean"], expected, rtol=1e-5, atol=1e-3)
    assert out.info["geometry"]["crop_index"] == [3, 1, 1] and out.info["geometry"]["crop_size"] == [16, 16, 12]


def test_one_mean_std_shared_by_all_phases(tmp_path):
    case = make_case(tmp_path, scale=(1.0, 1.6, 1.3))
    out = preprocess_case(case, PreprocessConfig(orientation="LPS", crop_to_breast=False))
    means = out.image.reshape(3, -1).mean(1)
    assert abs(out.image.mean()) < 1e-4 and abs(out.image.std() - 1) < 1e-3  # jointly, not per phase
    norm = out.info["normalization"]
    raw = means * norm["std"] + norm["mean"]
    np.testing.assert_allclose(raw[1:] / raw[0], [1.6, 1.3], rtol=1e-4)  # relative enhancement survives
    np.testing.assert_allclose(out.phase_time, [0, 90, 180])
    assert out.info["pcr"] == 1.0 and out.info["num_phases"] == 3 and json.dumps(out.info)


def test_shifted_and_coarser_phases_are_resampled_onto_phase_1(tmp_path):
    z, y, x = np.indices(SHAPE).astype(np.float32)
    ramp = lambda zz, yy, xx: 50 + 2 * xx + 3 * yy + 4 * zz  # noqa: E731 -- linear: exact under linear interpolation
    phase1 = write_nifti(tmp_path / "p_0001.nii.gz", ramp(z, y, x))
    # Phase 0 covers the same anatomy on a grid shifted by (2, 1, 3) voxels: voxel i holds ramp(i + shift).
    phase0 = write_nifti(tmp_path / "p_0000.nii.gz", 2 * ramp(z + 3, y + 1, x + 2), origin=(2, 1, 3))
    # Phase 2 on a half-resolution grid (2 mm voxels) whose outer edges match phase 1's.
    zc, yc, xc = (np.indices((8, 9, 10)) * 2 + 0.5).astype(np.float32)
    phase2 = write_nifti(tmp_path / "p_0002.nii.gz", 3 * ramp(zc, yc, xc), spacing=(2, 2, 2), origin=(0.5, 0.5, 0.5))
    case = Case(patient_id="S1", image_paths=[phase0, phase1, phase2])
    out = preprocess_case(case, PreprocessConfig(orientation="LPS", crop_to_breast=False))
    norm = out.info["normalization"]
    raw = out.image * norm["std"] + norm["mean"]
    assert raw.shape == (3, *SHAPE) and np.isnan(out.phase_time).all() and out.label is None
    inner = (slice(3, SHAPE[0] - 1), slice(1, SHAPE[1] - 1), slice(2, SHAPE[2] - 1))  # inside every phase
    np.testing.assert_allclose(raw[0][inner], 2 * raw[1][inner], rtol=1e-4)
    np.testing.assert_allclose(raw[2][inner], 3 * raw[1][inner], rtol=1e-4)
    assert raw[0][0, 0, 0] == pytest.approx(0.0, abs=1e-3)  # outside phase 0's field of view


def _bad(tmp_path: Path, kind: str) -> tuple[Case, str]:
    """A case with one defect and the file its error must name."""
    case = make_case(tmp_path, pid=kind)
    target = case.image_paths[2]
    if kind == "garbage":
        target.write_bytes(b"this is not a nifti file")
    elif kind == "truncated":
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])
    elif kind == "missing":
        target.unlink()
    elif kind == "disjoint":
        write_nifti(target, phantom(), origin=(500, 0, 0))
    elif kind == "flat":
        write_nifti(target, phantom()[0])
    elif kind in ("nan", "inf"):
        array = phantom()
        array[3, 4, 5] = np.nan if kind == "nan" else np.inf
        write_nifti(target, array)
    elif kind == "empty":
        write_nifti(target, np.full(SHAPE, 7.0, np.float32))
    elif kind == "mask_shape":
        target = write_nifti(case.mask_path, ellipsoid((16, 18, 19)))
    elif kind == "mask_geometry":
        target = write_nifti(case.mask_path, ellipsoid(), spacing=(2, 1, 1))
    elif kind == "mask_labels":
        labels = ellipsoid()
        labels[SHAPE[0] // 2:] *= 2  # {0, 1, 2}: a multi-label mask
        target = write_nifti(case.mask_path, labels)
    elif kind == "series":  # 4-D: two volumes in one file
        nib.save(nib.Nifti1Image(np.stack([phantom().T] * 2, -1), np.eye(4)), target)
    elif kind == "slice":
        write_nifti(target, phantom()[5:6])
    elif kind == "slab":
        # A thin slab along the diagonal: its bounding box holds the reference, its voxels cover a fifth of it.
        c = np.sqrt(0.5)
        write_nifti(target, phantom((16, 3, 60)), direction=[[c, -c, 0], [c, c, 0], [0, 0, 1]])
    elif kind in ("spacing_zero", "spacing_negative", "spacing_nan"):
        set_pixdim(target, 1, {"spacing_zero": 0.0, "spacing_negative": -2.0, "spacing_nan": float("nan")}[kind])
    elif kind == "ref_spacing_zero":
        target = set_pixdim(case.image_paths[1], 3, 0.0)
    return case, target.name


def set_pixdim(path: Path, axis: int, value: float) -> Path:
    """Write `value` into pixdim[axis] of a .nii.gz header as stored, bypassing the writers' own repairs."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    struct.pack_into("<f", raw, 76 + 4 * axis, value)  # NIfTI-1: pixdim is float32[8] at byte 76
    path.write_bytes(gzip.compress(bytes(raw)))
    return path


BAD = {"garbage": "cannot read image", "truncated": "cannot read image", "missing": "cannot read image",
       "disjoint": "covers 0% of the reference", "flat": "expected a 3-D image", "nan": "1 NaN/Inf voxels",
       "inf": "1 NaN/Inf voxels", "empty": "image is empty", "mask_shape": "mask size",
       "mask_geometry": "mask geometry",
       "mask_labels": "mask labels must be 0 (background) and 1 (tumour), found {0, 1, 2}",
       "series": "expected a 3-D image, got a 4-D one of shape (20, 18, 16, 2)",
       "slice": "expected a 3-D image, got a single slice", "slab": "of the reference phase's field of view",
       "spacing_zero": "voxel spacing (0, 1, 1) in the header (pixdim) must be positive and finite",
       "spacing_negative": "voxel spacing (-2, 1, 1) in the header",
       "spacing_nan": "voxel spacing (nan, 1, 1) in the header",
       "ref_spacing_zero": "voxel spacing (1, 1, 0) in the header"}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_input_names_case_and_file(tmp_path, kind):
    case, name = _bad(tmp_path, kind)
    with pytest.raises(CaseError) as info:
        preprocess_case(case, PreprocessConfig())
    message = str(info.value)
    assert message.startswith(f"case {kind} (") and name in message and BAD[kind] in message


def test_nifti_reading_matches_simpleitk(tmp_path):
    # nibabel-written, scaled int16, oblique affine: voxels and geometry must equal SimpleITK's own reading.
    rotation = np.array([[0.96, -0.28, 0.0], [0.28, 0.96, 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-0.8, 1.1, 2.0])
    affine[:3, 3] = [5, -7, 9]
    data = np.random.default_rng(0).integers(-300, 300, (9, 8, 7)).astype(np.int16)
    image = nib.Nifti1Image(data, affine)
    image.header.set_slope_inter(0.5, 3.0)
    nib.save(image, tmp_path / "scaled.nii.gz")
    ours, theirs = read_volume(tmp_path / "scaled.nii.gz", "N1"), sitk.ReadImage(str(tmp_path / "scaled.nii.gz"))
    np.testing.assert_allclose(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(theirs))
    for get in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        np.testing.assert_allclose(getattr(ours, get)(), getattr(theirs, get)(), atol=1e-6)


def test_mask_with_header_float_noise_is_accepted(tmp_path):
    case = make_case(tmp_path, geometry={"spacing": (0.7, 0.7, 1.5), "origin": (1.0, 2.0, 3.0)})
    write_nifti(case.mask_path, ellipsoid(), spacing=(0.7000001, 0.7, 1.5), origin=(1.0002, 2.0, 2.9999))
    assert preprocess_case(case, PreprocessConfig()).label.sum() > 0


def test_box_outside_the_image_names_the_json(tmp_path):
    case = make_case(tmp_path, box=(40, 50, 0, 5, 0, 5))
    case.info_path = tmp_path / "p1.json"
    with pytest.raises(CaseError, match=r"p1\.json.*outside the image"):
        preprocess_case(case, PreprocessConfig(margin_mm=0.0))


def test_to_original_space_channels_and_bad_shape(tmp_path):
    out = preprocess_case(make_case(tmp_path, geometry={"spacing": (0.8, 1.3, 2.2)}), PreprocessConfig())
    probs = np.stack([1.0 - out.label, out.label]).astype(np.float32)
    back = to_original_space(probs, out.info["geometry"], "linear")
    assert back.shape == (2, *SHAPE) and back.dtype == np.float32
    assert dice(back[1] > 0.5, ellipsoid().astype(bool)) > 0.9
    with pytest.raises(ValueError, match="cache grid shape"):
        to_original_space(probs[:, :-1], out.info["geometry"])


def test_config_key_is_stable_and_validated():
    assert PreprocessConfig().key() == PreprocessConfig(spacing=[1, 1, 1], orientation="ras").key()
    assert PreprocessConfig().key() != PreprocessConfig(margin_mm=5).key()
    assert PreprocessConfig().key() != PreprocessConfig(clip_percentiles=(0.5, 99.5)).key()
    with pytest.raises(ValueError, match="orientation"):
        PreprocessConfig(orientation="RRS")
    with pytest.raises(ValueError, match="clip_percentiles"):
        PreprocessConfig(clip_percentiles=(99, 1))


def test_clip_percentiles(tmp_path):
    out = preprocess_case(make_case(tmp_path), PreprocessConfig(clip_percentiles=(1, 99)))
    low, high = out.info["normalization"]["clip"]
    norm = out.info["normalization"]
    raw = out.image * norm["std"] + norm["mean"]
    assert raw.min() >= low - 1e-3 and raw.max() <= high + 1e-3


def make_dataset(root: Path) -> Path:
    """Three MAMA-MIA cases (one with a NaN phase) plus one with a missing phase file."""
    for pid in ("OK_1", "OK_2", "NAN_3", "GAP_4"):
        case = make_case(root / "images", pid=pid, mask=False)
        write_nifti(root / "segmentations" / "expert" / f"{pid.lower()}.nii.gz", ellipsoid())
        box = {"x_min": 1, "x_max": 15, "y_min": 2, "y_max": 16, "z_min": 2, "z_max": 18}
        info = root / "patient_info_files" / f"{pid.lower()}.json"
        info.parent.mkdir(parents=True, exist_ok=True)
        info.write_text(json.dumps({"primary_lesion": {"breast_coordinates": box, "pcr": 1}}))
        if pid == "NAN_3":
            array = phantom()
            array[0, 0, 0] = np.nan
            write_nifti(case.image_paths[0], array)
        if pid == "GAP_4":
            case.image_paths[1].unlink()
    return root


def test_preprocess_dataset_skips_reports_and_hits_cache(tmp_path):
    data, cache = make_dataset(tmp_path / "data"), tmp_path / "cache"
    config = PreprocessConfig(margin_mm=2.0)
    first = preprocess_dataset(data, cache, config, progress=False)
    assert first["done"] == ["OK_1", "OK_2"] and first["cached"] == []
    reasons = {s["patient_id"]: s["reason"] for s in first["skipped"]}
    assert "nan_3_0000.nii.gz" in reasons["NAN_3"] and "NaN/Inf" in reasons["NAN_3"]
    assert "gap_4_0001.nii.gz" in reasons["GAP_4"] and "missing phase 1" in reasons["GAP_4"]
    report = json.loads(Path(first["report_path"]).read_text())
    assert Path(first["report_path"]).parent == cache / config.key()
    assert report["done"] == first["done"] and report["skipped"] == first["skipped"]

    store = CaseCache(cache, config)
    assert store.patient_ids() == ["OK_1", "OK_2"]
    assert json.loads((store.dir / "config.json").read_text())["margin_mm"] == 2.0
    item = store.read("OK_1")
    assert item["image"].dtype == torch.float32 and item["image"].shape[0] == 3 and item["label"].dtype == torch.uint8
    assert item["info"]["pcr"] == 1.0 and item["info"]["geometry"]["crop_size"]
    assert store.read_info("OK_2")["patient_id"] == "OK_2"

    second = preprocess_dataset(data, cache, config, progress=False)
    assert second["done"] == [] and sorted(second["cached"]) == ["OK_1", "OK_2"] and len(second["skipped"]) == 2

    # A truncated file is not a hit: it is rejected with its name, and the next run rebuilds it.
    path = store.path("OK_2")
    path.write_bytes(path.read_bytes()[:-100])
    assert not store.has("OK_2")
    with pytest.raises(CacheError, match=r"OK_2\.safetensors.*truncated"):
        store.read("OK_2")
    third = preprocess_dataset(data, cache, config, progress=False)
    assert third["done"] == ["OK_2"] and third["cached"] == ["OK_1"]


def test_cache_write_is_atomic(tmp_path, monkeypatch):
    out = preprocess_case(make_case(tmp_path / "data"), PreprocessConfig())
    store = CaseCache(tmp_path / "cache", PreprocessConfig())
    store.write(out)
    listing = ["P1.safetensors", "config.json"]
    assert sorted(p.name for p in store.dir.iterdir()) == listing
    gone = subprocess.Popen(["true"])
    gone.wait()  # a process id that no longer runs
    dead = gone.pid
    leftover = store.dir / f".P1.safetensors.{files_module._HOST}-{dead}-0a1b2c3d.tmp.safetensors"
    leftover.write_bytes(b"left by a killed run")  # ignored, then cleaned up
    assert store.patient_ids() == ["P1"]
    store.write(out)
    assert sorted(p.name for p in store.dir.iterdir()) == listing

    def interrupted(fd):  # the data are written; interrupted before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(files_module.os, "fsync", interrupted)
    out.info["patient_id"] = "P2"
    with pytest.raises(KeyboardInterrupt):
        store.write(out)
    assert sorted(p.name for p in store.dir.iterdir()) == listing
    assert not store.has("P2") and store.patient_ids() == ["P1"]


def test_cache_stores_float16_within_its_rounding_and_float32_exactly(tmp_path):
    out = preprocess_case(make_case(tmp_path / "data"), PreprocessConfig())
    half, full = PreprocessConfig(), PreprocessConfig(cache_dtype="float32")
    assert half.cache_dtype == "float16" and half.key() != full.key()  # never mixed in one cache folder
    for config, dtype in ((half, "F16"), (full, "F32")):
        store = CaseCache(tmp_path / "cache", config)
        store.write(out)
        assert read_header(store.path("P1"))["image"]["dtype"] == dtype
        image = store.read("P1")["image"]
        crop = read_cached_crop(store.path("P1"), (0, 0, 0), out.image.shape[1:])["image"]
        assert image.dtype == crop.dtype == torch.float32 and torch.equal(image, crop)
        error = np.abs(image.numpy() - out.image)
        if dtype == "F32":
            assert error.max() == 0
        else:  # round to nearest, 10 stored mantissa bits: at most half a unit in the last place
            assert 0 < error.max() and np.all(error <= np.abs(out.image) * 2.0**-11 + 2.0**-25)
    size32, size16 = (CaseCache(tmp_path / "cache", c).path("P1").stat().st_size for c in (full, half))
    assert size16 < 0.55 * size32
    loud = preprocess_case(make_case(tmp_path / "data2"), PreprocessConfig())
    loud.image[0, 0, 0, 0] = 70000.0  # beyond float16: refused, never stored as inf
    with pytest.raises(ValueError, match=r"case P1: .*70000.*float32"):
        CaseCache(tmp_path / "cache", half).write(loud)
    with pytest.raises(ValueError, match="cache_dtype"):
        PreprocessConfig(cache_dtype="int8")


def test_cache_is_rebuilt_when_the_sources_change(tmp_path):
    data, cache = make_dataset(tmp_path / "data"), tmp_path / "cache"
    config = PreprocessConfig(margin_mm=2.0)
    assert preprocess_dataset(data, cache, config, progress=False)["done"] == ["OK_1", "OK_2"]
    store = CaseCache(cache, config)
    before = store.read("OK_1")["image"]
    # Same folder, same ids, same file names: a regenerated phase and a relabelled case.
    write_nifti(data / "images" / "OK_1" / "ok_1_0000.nii.gz", phantom() * 2.5)
    info = data / "patient_info_files" / "ok_2.json"
    doc = json.loads(info.read_text())
    doc["primary_lesion"]["pcr"] = 0
    info.write_text(json.dumps(doc))
    os.utime(data / "images" / "OK_1" / "ok_1_0001.nii.gz")  # a new time alone (a copy) is not a change
    again = preprocess_dataset(data, cache, config, progress=False)
    assert again["done"] == again["stale"] == ["OK_1", "OK_2"] and again["cached"] == []
    assert not torch.equal(store.read("OK_1")["image"], before)
    assert store.read_info("OK_2")["pcr"] == 0.0
    for path in (data / "images" / "OK_1" / "ok_1_0002.nii.gz", data / "segmentations" / "expert" / "ok_1.nii.gz"):
        os.utime(path, (1, 1))
    third = preprocess_dataset(data, cache, config, progress=False)
    assert third["done"] == [] and third["cached"] == ["OK_1", "OK_2"]


def test_same_sources_give_byte_identical_cache_files(tmp_path):
    data = make_dataset(tmp_path / "data")
    for name in ("a", "b"):
        preprocess_dataset(data, tmp_path / name, PreprocessConfig(), progress=False)
    a, b = CaseCache(tmp_path / "a", PreprocessConfig()), CaseCache(tmp_path / "b", PreprocessConfig())
    for pid in ("OK_1", "OK_2"):
        assert a.path(pid).read_bytes() == b.path(pid).read_bytes()
    assert (a.dir / "config.json").read_bytes() == (b.dir / "config.json").read_bytes()


def test_crop_read_matches_full_read(tmp_path):
    out = preprocess_case(make_case(tmp_path / "data"), PreprocessConfig(crop_to_breast=False))
    store = CaseCache(tmp_path / "cache", PreprocessConfig(crop_to_breast=False))
    store.write(out)
    full = store.read("P1")
    start, size = (2, 3, 4), (8, 9, 10)
    crop = read_cached_crop(store.path("P1"), start, size)
    window = tuple(slice(s, s + n) for s, n in zip(start, size, strict=True))
    assert torch.equal(crop["image"], full["image"][(slice(None), *window)])
    assert torch.equal(crop["label"], full["label"][window])
    assert torch.equal(crop["phase_time"], full["phase_time"]) and crop["info"] == full["info"]
    # Past the edge: the inside part matches, the rest is background / label 0.
    shape = full["image"].shape[1:]
    edge = read_cached_crop(store.path("P1"), (-2, shape[1] - 4, 0), (6, 8, shape[2]))
    assert edge["image"].shape == (3, 6, 8, shape[2])
    assert torch.equal(edge["image"][:, 2:, :4], full["image"][:, :4, -4:])
    background = out.info["normalization"]["background"]
    assert torch.all(edge["image"][:, :2] == background) and torch.all(edge["label"][:, 4:] == 0)


@pytest.mark.slow
def test_preprocess_dataset_in_worker_processes(tmp_path):
    data, cache = make_dataset(tmp_path / "data"), tmp_path / "cache"
    serial = preprocess_dataset(data, tmp_path / "serial", PreprocessConfig(), progress=False)
    parallel = preprocess_dataset(data, cache, PreprocessConfig(), workers=2, progress=False)
    assert parallel["done"] == serial["done"] == ["OK_1", "OK_2"]
    assert sorted(s["patient_id"] for s in parallel["skipped"]) == ["GAP_4", "NAN_3"]
    a, b = CaseCache(tmp_path / "serial", PreprocessConfig()), CaseCache(cache, PreprocessConfig())
    assert a.path("OK_1").read_bytes() == b.path("OK_1").read_bytes()


def test_phantom_dataset_through_the_cli(tmp_path, capsys):
    synthetic = pytest.importorskip("mtl_breast.phantoms.collection")
    from mtl_breast.cli import main
    from mtl_breast.data.folder import read_dataset

    data, cache = tmp_path / "phantoms", tmp_path / "cache"
    synthetic.generate_dataset(data, num_cases=4, seed=0, size=24)
    assert main(["preprocess", "--data", str(data), "--cache", str(cache), "--margin", "5"]) == 0
    assert "done 4, skipped 0" in capsys.readouterr().out
    store = CaseCache(cache, PreprocessConfig(margin_mm=5.0))
    for case in read_dataset(data):
        item = store.read(case.patient_id)
        assert item["image"].shape[0] == case.num_phases
        np.testing.assert_allclose(item["phase_time"].numpy(), case.acquisition_times)
        assert item["info"]["pcr"] == (None if np.isnan(case.pcr) else case.pcr)
        back = to_original_space(item["label"].numpy().astype(bool), item["info"]["geometry"], "nearest")
        original = sitk.GetArrayFromImage(sitk.ReadImage(str(case.mask_path))) > 0
        assert dice(back, original) > 0.8, case.patient_id


def test_slab_is_refused_on_what_it_covers(tmp_path):
    case, _ = _bad(tmp_path, "slab")
    with pytest.raises(CaseError, match=r"covers (1\d|2\d)% of the reference phase's field of view"):
        preprocess_case(case, PreprocessConfig())


def test_mask_of_zeros_and_near_integer_labels_are_accepted(tmp_path):
    case = make_case(tmp_path)
    write_nifti(case.mask_path, np.zeros(SHAPE, np.uint8))
    assert preprocess_case(case, PreprocessConfig()).label.sum() == 0
    write_nifti(case.mask_path, ellipsoid().astype(np.float32) * np.float32(0.99999))
    assert preprocess_case(case, PreprocessConfig()).label.max() == 1


@pytest.mark.parametrize("times", [[0.0, 90.0, 90.0], [0.0, 180.0, 90.0], [0.0, float("nan"), 90.0], [0.0, 90.0]])
def test_acquisition_times_must_be_one_per_phase_and_increasing(tmp_path, times):
    case = make_case(tmp_path)
    case.acquisition_times, case.info_path = times, tmp_path / "p1.json"
    with pytest.raises(CaseError, match=r"case P1 \(.*p1\.json\): .*(strictly increasing|finite|2 acquisition times)"):
        preprocess_case(case, PreprocessConfig())


def test_preprocess_dataset_lists_empty_case_folders_and_refuses_an_empty_dataset(tmp_path):
    data = make_dataset(tmp_path / "data")
    (data / "images" / "EMPTY_5").mkdir()
    report = preprocess_dataset(data, tmp_path / "cache", PreprocessConfig(), progress=False)
    reasons = {s["patient_id"]: s["reason"] for s in report["skipped"]}
    assert report["done"] == ["OK_1", "OK_2"] and sorted(reasons) == ["EMPTY_5", "GAP_4", "NAN_3"]
    assert reasons["EMPTY_5"] == f"case EMPTY_5 ({data / 'images' / 'EMPTY_5'}): case folder is empty " \
                                 "(expected phase files empty_5_0000.nii.gz, empty_5_0001.nii.gz, ...)"
    (tmp_path / "nothing").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no cases found in .*nothing"):
        preprocess_dataset(tmp_path / "nothing", tmp_path / "cache", PreprocessConfig(), progress=False)
