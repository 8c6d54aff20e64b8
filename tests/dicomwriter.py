"""Test helper: phantom volumes written as DICOM studies (pydicom) and as their NIfTI twins.

`dicom_twin` takes a phantom case's phases, puts them on an oblique grid, quantises them to what a DICOM file can
hold (int16 with RescaleSlope 0.5 and RescaleIntercept -10), and writes both the DICOM study (one series per phase,
or one series with several temporal positions; file names shuffled) and a NIfTI case folder with the same arrays,
geometry, times and acquisition metadata.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
SLOPE, INTERCEPT = 0.5, -10.0
ACQUISITION = {"field_strength": 3.0, "repetition_time": 4.5, "echo_time": 1.8, "flip_angle": 12.0,
               "manufacturer": "SIEMENS", "model": "Skyra"}


def rotation(angles_deg: tuple[float, float, float] = (20.0, -15.0, 10.0)) -> np.ndarray:
    """A proper rotation (det +1) from angles about x, y, z: an oblique grid."""
    ax, ay, az = np.radians(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def quantise(array: np.ndarray) -> np.ndarray:
    """Values a DICOM file stores exactly: int16 counts times SLOPE plus INTERCEPT (float32)."""
    peak = float(np.abs(array).max()) or 1.0
    counts = np.clip(np.round(array / peak * 12000.0), -32000, 32000)
    return (counts * SLOPE + INTERCEPT).astype(np.float32)


def _ds(value: float) -> str:
    return f"{value:.10g}"


def _tm(seconds: float) -> str:
    h, rest = divmod(seconds, 3600.0)
    m, s = divmod(rest, 60.0)
    return f"{int(h):02d}{int(m):02d}{s:09.6f}"


def _slice(array2d: np.ndarray, *, patient_id: str, study_uid: str, series_uid: str, series_number: int,
           description: str, position: np.ndarray, direction: np.ndarray, spacing: tuple[float, float, float],
           instance: int, acquisition: dict, time_s: float, temporal: int | None, image_type: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MR_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MR_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.PatientName = patient_id, patient_id
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.StudyDate, ds.Modality = "20200101", "MR"
    ds.SeriesNumber, ds.SeriesDescription, ds.InstanceNumber = series_number, description, instance
    ds.ImageType = image_type.split("\\")
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.ImageOrientationPatient = [_ds(v) for v in (*direction[:, 0], *direction[:, 1])]
    ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]
    ds.SliceThickness = _ds(spacing[2])
    ds.Rows, ds.Columns = array2d.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = _ds(SLOPE), _ds(INTERCEPT)
    ds.MagneticFieldStrength = _ds(acquisition["field_strength"])
    ds.RepetitionTime, ds.EchoTime = _ds(acquisition["repetition_time"]), _ds(acquisition["echo_time"])
    ds.FlipAngle = _ds(acquisition["flip_angle"])
    ds.Manufacturer, ds.ManufacturerModelName = acquisition["manufacturer"], acquisition["model"]
    ds.AcquisitionTime = ds.ContentTime = _tm(36000.0 + time_s)
    if temporal is not None:
        ds.TemporalPositionIdentifier = temporal
        ds.TriggerTime = _ds(time_s * 1000.0)
    counts = np.round((array2d - INTERCEPT) / SLOPE).astype(np.int16)
    ds.PixelData = counts.tobytes()
    return ds


def write_dicom_study(out: Path, phases: list[np.ndarray], spacing, origin, direction, times, *, layout: str,
                      patient_id: str, seed: int = 0, acquisition: dict | None = None,
                      extra_series: bool = True, same_grid_t1: bool = False) -> dict:
    """Write phases ([D, H, W] SimpleITK array order, values from `quantise`) as one DICOM study under `out`.

    Args:
        layout: "per_phase" (one series per phase) or "multi" (one series, TemporalPositionIdentifier and
            TriggerTime per phase).
        extra_series: also write a T2-like single series on another grid and a derived subtraction series.
        same_grid_t1: also write a non-dynamic series ("ax t1 non fs") on the dynamic's grid.

    Returns:
        {"study_uid", "series_uids" (of the dynamic, in phase order), "files" (all written paths)}.
    """
    acquisition = acquisition or ACQUISITION
    direction = np.asarray(direction, dtype=float).reshape(3, 3)
    study_uid = generate_uid()
    rng = random.Random(seed)
    items: list[Dataset] = []
    uids = [generate_uid() for _ in phases] if layout == "per_phase" else [generate_uid()] * len(phases)
    for k, (volume, t) in enumerate(zip(phases, times, strict=True)):
        for z in range(volume.shape[0]):
            position = np.asarray(origin) + direction[:, 2] * spacing[2] * z
            items.append(_slice(volume[z], patient_id=patient_id, study_uid=study_uid, series_uid=uids[k],
                                series_number=(k + 3) if layout == "per_phase" else 3,
                                description=f"ax dyn ph{k}" if layout == "per_phase" else "ax dyn",
                                position=position, direction=direction, spacing=spacing,
                                instance=k * volume.shape[0] + z + 1, acquisition=acquisition, time_s=float(t),
                                temporal=(k + 1) if layout == "multi" else None, image_type="ORIGINAL\\PRIMARY"))
    if extra_series:
        t2 = phases[0][:, ::2, ::2]
        t2_uid, sub_uid = generate_uid(), generate_uid()
        for z in range(t2.shape[0]):
            items.append(_slice(t2[z], patient_id=patient_id, study_uid=study_uid, series_uid=t2_uid, series_number=1,
                                description="t2 ax", position=np.asarray(origin) + direction[:, 2] * spacing[2] * z,
                                direction=direction, spacing=(spacing[0] * 2, spacing[1] * 2, spacing[2]),
                                instance=z + 1, acquisition=acquisition, time_s=-300.0, temporal=None,
                                image_type="ORIGINAL\\PRIMARY"))
        for z in range(phases[0].shape[0]):
            items.append(_slice(phases[-1][z], patient_id=patient_id, study_uid=study_uid, series_uid=sub_uid,
                                series_number=99, description="sub", direction=direction, spacing=spacing,
                                position=np.asarray(origin) + direction[:, 2] * spacing[2] * z, instance=z + 1,
                                acquisition=acquisition, time_s=float(times[-1]) + 10, temporal=None,
                                image_type="DERIVED\\SECONDARY\\SUBTRACTION"))
    if same_grid_t1:
        t1_uid = generate_uid()
        for z in range(phases[0].shape[0]):
            items.append(_slice(phases[0][z], patient_id=patient_id, study_uid=study_uid, series_uid=t1_uid,
                                series_number=2, description="ax t1 non fs", direction=direction, spacing=spacing,
                                position=np.asarray(origin) + direction[:, 2] * spacing[2] * z, instance=z + 1,
                                acquisition=acquisition, time_s=-600.0, temporal=None, image_type="ORIGINAL\\PRIMARY"))
    rng.shuffle(items)
    files = []
    for n, ds in enumerate(items):
        folder = out / patient_id / study_uid[-8:] / f"{ds.SeriesNumber}-{ds.SeriesInstanceUID[-6:]}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{rng.getrandbits(32):08x}-{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return {"study_uid": study_uid, "series_uids": list(dict.fromkeys(uids)), "files": files}


def dicom_twin(phase_paths: list[Path], times: list[float], dicom_root: Path, nifti_root: Path, case_id: str, *,
               layout: str, seed: int = 0, extra_series: bool = True, same_grid_t1: bool = False) -> dict:
    """Write one phantom case as a DICOM study under `dicom_root` and as a NIfTI case folder
    `nifti_root/<case_id>/` (phases + manifest.json with the times and the DICOM headers' acquisition metadata),
    both on the same oblique grid with the same quantised voxels. Returns `write_dicom_study`'s dict plus
    "arrays", "spacing", "origin", "direction"."""
    images = [sitk.ReadImage(str(p), sitk.sitkFloat32) for p in phase_paths]
    spacing = images[0].GetSpacing()
    direction = rotation()
    origin = np.asarray(images[0].GetOrigin()) + np.array([3.25, -7.5, 11.0])
    arrays = [quantise(sitk.GetArrayFromImage(im)) for im in images]
    written = write_dicom_study(dicom_root, arrays, spacing, origin, direction, times, layout=layout,
                                patient_id=case_id, seed=seed, extra_series=extra_series, same_grid_t1=same_grid_t1)
    folder = nifti_root / case_id
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for k, array in enumerate(arrays):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(spacing)
        image.SetOrigin(origin.tolist())
        image.SetDirection(direction.ravel().tolist())
        names.append(f"{case_id.lower()}_{k:04d}.nii.gz")
        sitk.WriteImage(image, str(folder / names[-1]), True)
    meta = {key: ACQUISITION[key] for key in ("field_strength", "repetition_time", "flip_angle", "manufacturer")}
    (folder / "manifest.json").write_text(json.dumps({"phases": names, "times": list(times), "meta": meta}))
    return {**written, "arrays": arrays, "spacing": tuple(spacing), "origin": tuple(origin.tolist()),
            "direction": tuple(direction.ravel().tolist())}
