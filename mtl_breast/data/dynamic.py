"""The dynamic series of each DICOM study under a root (`dicom.py` reads headers and series): which series are the
phases, in which order and at which times, the case metadata from the headers, and the voxels of a phase.

`read_dicom_root` returns one `DicomStudy` per study with a usable dynamic; a study without one, or whose dynamic is
broken, is listed in `skipped` with a one-line reason naming the study, the series and a file.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from mtl_breast.acquisition import check_given
from mtl_breast.data.dicom import (
    _DCE_WORDS,
    DicomError,
    Slice,
    Volume,
    _series_name,
    _SeriesProblem,
    scan_headers,
    series_volumes,
)


@dataclass
class DicomStudy:
    """The dynamic of one study: phases in time order, their times (s after phase 0) and the case metadata."""

    case_id: str
    patient_id: str
    study_uid: str
    phases: list[Volume]
    times: list[float] | None
    meta: dict[str, Any]
    ignored: list[dict[str, str]] = field(default_factory=list)

    @property
    def series_uids(self) -> list[str]:
        return list(dict.fromkeys(v.series_uid for v in self.phases))

    def read_phase(self, k: int) -> sitk.Image:
        """Phase `k` as a float32 image with the geometry taken from its headers."""
        return read_volume_files(self.phases[k], self.case_id, self.study_uid)


def _ignore_reason(first: Slice) -> str | None:
    modality = first.get("Modality")
    if modality is not None and str(modality).upper() != "MR":
        return f"modality {modality}, not MR"
    image_type = [str(v).upper() for v in (first.get("ImageType") or [])]
    if "DERIVED" in image_type or "SECONDARY" in image_type:
        shown = "\\".join(image_type)
        return f"derived image (ImageType {shown}: a subtraction, MIP or map, not an acquisition)"
    if "LOCALIZER" in image_type:
        return "localiser"
    frames = first.get("NumberOfFrames")
    if frames is not None and int(frames) > 1:
        return "enhanced multi-frame DICOM (one file per series) is not read"
    return None


def _grid_key(v: Volume) -> tuple:
    """Matrix, slice count, spacing and orientation: the phases of a dynamic share them (their origins may differ
    a little between series; preprocessing resamples every phase onto phase 1's grid)."""
    return (v.size, tuple(round(s, 2) for s in v.spacing), tuple(round(d, 3) for d in v.direction))


def _plane_key(series: list[Slice]) -> tuple:
    first = series[0]
    iop = first.floats("ImageOrientationPatient") or ()
    return (first.get("Rows"), first.get("Columns"), tuple(round(v, 3) for v in iop))


def _order_key(v: Volume, series: list[Slice]) -> tuple:
    number = series[0].get("SeriesNumber")
    return (math.inf if v.time is None else v.time, math.inf if number is None else float(number))


def _study_error(case_id: str, study_uid: str, name: str, problem: _SeriesProblem) -> DicomError:
    return DicomError(case_id, problem.path, f"study {study_uid}, {name}: {problem.reason}")


def find_dynamic(slices: list[Slice], study_uid: str, case_id: str, dataset: str) -> DicomStudy:
    """The dynamic of one study (module `dicom` docstring, steps 1-3); raises `DicomError`."""
    by_series: dict[str, list[Slice]] = defaultdict(list)
    for s in slices:
        by_series[str(s.get("SeriesInstanceUID"))].append(s)
    patient_id = str(slices[0].get("PatientID", case_id))
    ignored, broken, multi, single = [], [], [], []
    for uid in sorted(by_series, key=lambda u: (float(by_series[u][0].get("SeriesNumber", 0) or 0), u)):
        series = by_series[uid]
        name = _series_name(series)
        reason = _ignore_reason(series[0])
        if reason:
            ignored.append({"series": name, "reason": reason})
            continue
        try:
            volumes = series_volumes(series)
        except _SeriesProblem as problem:
            broken.append((name, series, problem))
            continue
        (multi if len(volumes) > 1 else single).append((name, series, volumes))
    groups: dict[tuple, list] = defaultdict(list)
    for item in single:
        groups[_grid_key(item[2][0])].append(item)
    best_group = max(groups.values(), default=[],
                     key=lambda g: (len(g), sum(bool(_DCE_WORDS.search(i[1][0].get("SeriesDescription", "")))
                                                for i in g)))
    best_multi = max(multi, default=None, key=lambda item: len(item[2]))
    if best_multi is not None and len(best_multi[2]) >= len(best_group):
        chosen = [best_multi]
        phases = best_multi[2]
        series_of = [best_multi[1]] * len(phases)
    elif len(best_group) >= 2:
        named = [item for item in best_group if _DCE_WORDS.search(item[1][0].get("SeriesDescription", ""))]
        if len(named) >= 2:  # e.g. a non-fat-saturated T1 on the dynamic's grid is not a phase
            for name, _, _ in best_group:
                if all(name != n for n, _, _ in named):
                    ignored.append({"series": name, "reason": "on the dynamic's grid, but its description names "
                                                              "no dynamic phase"})
            best_group = named
        chosen = sorted(best_group, key=lambda item: _order_key(item[2][0], item[1]))
        phases = [item[2][0] for item in chosen]
        series_of = [item[1] for item in chosen]
    else:
        chosen, phases, series_of = [], [], []
    planes = {_plane_key(s) for s in series_of}
    for name, series, problem in broken:
        # A broken series that looks like part of the dynamic makes the dynamic incomplete: refuse the study.
        if _plane_key(series) in planes or _DCE_WORDS.search(series[0].get("SeriesDescription", "")) or not phases:
            if not phases and len(broken) > 1:
                continue
            raise _study_error(case_id, study_uid, name, problem)
        ignored.append({"series": name, "reason": problem.reason})
    if not phases:
        if broken:
            name, _, problem = max(broken, key=lambda b: len(b[1]))
            raise _study_error(case_id, study_uid, name, problem)
        listed = "; ".join(f"{i['series']}: {i['reason']}" for i in ignored) or "no MR series"
        singles = "; ".join(f"{name}: one volume, no other series shares its grid" for name, _, _ in single)
        raise DicomError(case_id, slices[0].path.parent,
                         f"study {study_uid}: no dynamic series ({'; '.join(p for p in (singles, listed) if p)})")
    chosen_names = {name for name, _, _ in chosen} | {i["series"] for i in ignored}
    for name, _, volumes in single + multi:
        if name not in chosen_names:
            ignored.append({"series": name, "reason": f"{len(volumes)} volume(s), not part of the dynamic "
                                                      "(another grid or fewer phases)"})
    times = None
    if all(v.time is not None for v in phases):
        relative = [v.time - phases[0].time for v in phases]
        if all(b > a for a, b in zip(relative, relative[1:], strict=False)):
            times = [round(t, 6) for t in relative]
    return DicomStudy(case_id, patient_id, study_uid, phases, times, _meta(series_of[0][0], dataset, phases, times,
                                                                          study_uid), ignored)


def _number(first: Slice, tag: str, key: str | None = None) -> float | None:
    value = first.get(tag)
    try:
        return check_given(key, float(value)) if key else (None if value is None else float(value))
    except (TypeError, ValueError):
        return None


def _meta(first: Slice, dataset: str, phases: list[Volume], times: list[float] | None, study_uid: str) -> dict:
    def text(tag: str) -> str | None:
        value = first.get(tag)
        return None if value is None else str(value).strip() or None

    return {"dataset": dataset, "site": dataset, "age": None, "menopause": None, "density": None,
            "tumor_subtype": None, "bilateral": None,
            "field_strength": _number(first, "MagneticFieldStrength", "field_strength"),
            "manufacturer": text("Manufacturer"), "model": text("ManufacturerModelName"),
            "repetition_time": _number(first, "RepetitionTime", "repetition_time"),
            "echo_time": _number(first, "EchoTime"),
            "flip_angle": _number(first, "FlipAngle", "flip_angle"),
            "acquisition_times": times, "dicom_patient_id": text("PatientID"), "study_uid": study_uid,
            "study_date": text("StudyDate"), "series_uids": list(dict.fromkeys(v.series_uid for v in phases))}


def read_volume_files(volume: Volume, case_id: str, study_uid: str) -> sitk.Image:
    """Decode one volume's files (SimpleITK/GDCM, rescale applied) and give it the geometry of its headers."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in volume.files])
    reader.SetGlobalWarningDisplay(False)
    try:
        image = sitk.Cast(reader.Execute(), sitk.sitkFloat32)
    except RuntimeError as err:
        raise DicomError(case_id, volume.files[0], f"study {study_uid}, series {volume.series_uid}: cannot decode "
                                                   f"the pixels ({str(err).strip().splitlines()[-1]})") from err
    if tuple(image.GetSize()) != tuple(volume.size):
        raise DicomError(case_id, volume.files[0], f"study {study_uid}, series {volume.series_uid}: decoded size "
                                                   f"{image.GetSize()} differs from the headers' {volume.size}")
    image.SetSpacing(volume.spacing)
    image.SetOrigin(volume.origin)
    image.SetDirection(volume.direction)
    if not np.isfinite(sitk.GetArrayViewFromImage(image)).all():
        raise DicomError(case_id, volume.files[0], f"study {study_uid}, series {volume.series_uid}: NaN/Inf voxels")
    return image


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "patient"


def read_dicom_root(root: Path | str, skipped: list[dict[str, str]] | None = None,
                    dataset: str | None = None) -> list[DicomStudy]:
    """The dynamic of every study under `root`, sorted by case id.

    Case ids are the PatientID (made file-name safe); a patient with several studies gets `<id>_<StudyDate>` (and
    a counter when dates repeat). Args: `skipped` collects {"patient_id", "reason"} of studies without a usable
    dynamic (else the first `DicomError` propagates); `dataset` names the collection in the metadata (default the
    root's folder name).
    """
    root = Path(root)
    studies, unreadable = scan_headers(root)
    errors: list[DicomError] = [DicomError(Path(u["file"]).parent.name, u["file"], u["reason"]) for u in unreadable]
    per_patient: dict[str, list[str]] = defaultdict(list)
    for uid, slices in studies.items():
        per_patient[_safe(str(slices[0].get("PatientID", uid)))].append(uid)
    out = []
    for patient, uids in sorted(per_patient.items()):
        uids = sorted(uids, key=lambda u: (str(studies[u][0].get("StudyDate", "")), u))
        names = [patient] if len(uids) == 1 else \
            [f"{patient}_{studies[u][0].get('StudyDate', '') or 'study'}" for u in uids]
        names = [n if names.count(n) == 1 else f"{n}_{k}" for k, n in enumerate(names)]
        for uid, case_id in zip(uids, names, strict=True):
            try:
                out.append(find_dynamic(studies[uid], uid, case_id, dataset or root.name))
            except DicomError as err:
                errors.append(err)
    if errors and skipped is None:
        raise errors[0]
    if skipped is not None:
        skipped += [{"patient_id": e.patient_id, "reason": str(e)} for e in errors]
    return out
