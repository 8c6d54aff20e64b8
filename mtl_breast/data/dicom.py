"""Reader for folders of DICOM studies: per study, the dynamic (DCE) series as phases in time order, on one grid each.

A DICOM root holds files in any nesting (`.dcm`, no suffix, TCIA's `<patient>/<study>/<series>/1-01.dcm`, ...); files
are told apart by their headers (pydicom), never by their names or folders. Per study (StudyInstanceUID):

1. every MR series is split into volumes: a series whose slice positions repeat holds several temporal positions,
   separated by the first of TemporalPositionIdentifier, TriggerTime, AcquisitionTime, ContentTime that gives
   equal groups with distinct positions; a series whose positions are all distinct is one volume;
2. the dynamic is the multi-volume series with the most volumes, or else the largest group of single-volume series
   that share one geometry (one series per phase), ordered by acquisition time (then SeriesNumber);
3. every other series is listed as ignored with its reason (derived images such as subtractions, localisers,
   enhanced multi-frame files, another geometry than the dynamic's, ...).

Geometry comes from the headers: ImageOrientationPatient gives the row and column directions, slices are sorted
along their normal (row x column, so the grid is right-handed), the slice spacing is measured between
ImagePositionPatient values and the origin is the first slice's position; voxels are decoded by SimpleITK
(rescale slope/intercept applied). Phase times are seconds after the first phase (TriggerTime of a multi-volume
series, otherwise AcquisitionTime, ContentTime or SeriesTime). Acquisition values (field strength, TR, TE, flip
angle, manufacturer, model) go into the case metadata.

A broken series of the dynamic (missing slices, mixed orientation or matrix, repeated positions no tag separates,
unequal temporal positions) and a study without a dynamic raise `DicomError` (a `CaseError`) in one line naming the
study, the series and a file.
"""

from __future__ import annotations

import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtl_breast.data.case import CaseError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")
# Header fields read from every file (pixel data are left on disk until a volume is built).
_TAGS = ["PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SeriesDescription", "SeriesNumber", "Modality",
         "ImageType", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns",
         "NumberOfFrames", "TemporalPositionIdentifier", "TriggerTime", "AcquisitionTime", "ContentTime",
         "SeriesTime", "StudyDate", "InstanceNumber", "MagneticFieldStrength", "RepetitionTime", "EchoTime",
         "FlipAngle", "Manufacturer", "ManufacturerModelName", "SOPClassUID"]
_DCE_WORDS = re.compile(r"dyn|dce|vibrant|thrive|twist|pre|post|ph(ase)?\s*\d|pass|contrast|gad", re.IGNORECASE)


class DicomError(CaseError):
    """A study whose dynamic series cannot be read; the message names the study, the series and a file."""


@dataclass
class Slice:
    """The header values of one DICOM file that the reader uses."""

    path: Path
    ds: Any  # pydicom Dataset without pixel data

    def get(self, name: str, default: Any = None) -> Any:
        value = getattr(self.ds, name, None)
        return default if value is None or value == "" else value

    def floats(self, name: str) -> tuple[float, ...] | None:
        value = self.get(name)
        try:
            return tuple(float(v) for v in value) if value is not None else None
        except (TypeError, ValueError):
            return None


@dataclass
class Volume:
    """One 3-D volume of a series: its files sorted along the slice normal, its geometry and time (s, absolute)."""

    files: list[Path]
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    time: float | None
    series_uid: str


# ---------------------------------------------------------------------------------------------- scanning
def _is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _walk(root: Path) -> Iterator[Path]:
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(folder) / name


def is_dicom_root(root: Path | str, probe: int = 200) -> bool:
    """True when the first DICOM-or-image file found under `root` (at most `probe` files looked at) is DICOM."""
    root = Path(root)
    if not root.is_dir():
        return False
    for k, path in enumerate(_walk(root)):
        if k >= probe:
            return False
        if path.name.lower().endswith(IMAGE_SUFFIXES):
            return False
        if _is_dicom_file(path):
            return True
    return False


def scan_headers(root: Path | str) -> tuple[dict[str, list[Slice]], list[dict[str, str]]]:
    """Headers of every DICOM file under `root`, grouped by study; and the files that could not be parsed."""
    # imported here: pydicom takes 0.4 s to import, and every dataset read imports this module (data.folder)
    import pydicom
    from pydicom.errors import InvalidDicomError

    studies: dict[str, list[Slice]] = defaultdict(list)
    unreadable = []
    for path in _walk(Path(root)):
        if not _is_dicom_file(path):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_TAGS)
        except (InvalidDicomError, OSError, ValueError, EOFError) as err:
            unreadable.append({"file": str(path), "reason": f"cannot parse DICOM header ({err})"})
            continue
        item = Slice(path, ds)
        if item.get("SOPClassUID") == "1.2.840.10008.1.3.10":  # DICOMDIR, a media directory
            continue
        studies[str(item.get("StudyInstanceUID", f"no-study-uid:{item.get('PatientID', path.parent)}"))].append(item)
    return dict(studies), unreadable


# ---------------------------------------------------------------------------------------------- one series
def dicom_seconds(value: Any) -> float | None:
    """A DICOM TM value ("HHMMSS.FFFFFF", also "HH:MM:SS") as seconds after midnight; None when absent or bad."""
    if value is None:
        return None
    text = str(value).strip().replace(":", "")
    try:
        hours, minutes = int(text[0:2]), int(text[2:4] or 0)
        seconds = float(text[4:] or 0)
    except ValueError:
        return None
    return hours * 3600.0 + minutes * 60.0 + seconds


def _series_name(series: list[Slice]) -> str:
    first = series[0]
    desc = first.get("SeriesDescription", "")
    number = first.get("SeriesNumber")
    label = f"series {number}" if number is not None else "series"
    return f"{label} '{desc}' ({first.get('SeriesInstanceUID', '?')})" if desc else \
        f"{label} ({first.get('SeriesInstanceUID', '?')})"


class _SeriesProblem(Exception):
    """Why a series cannot give volumes (a reason and a file)."""

    def __init__(self, reason: str, path: Path):
        super().__init__(reason)
        self.reason, self.path = reason, path


def _temporal_groups(series: list[Slice]) -> tuple[list[list[Slice]], str | None]:
    """The volumes of a series: one when every slice position is distinct, else split by a temporal tag."""
    positions = Counter(s.floats("ImagePositionPatient") for s in series)
    if max(positions.values()) == 1:
        return [series], None
    repeats = max(positions.values())
    for tag in ("TemporalPositionIdentifier", "TriggerTime", "AcquisitionTime", "ContentTime"):
        values = [s.get(tag) for s in series]
        if any(v is None for v in values):
            continue
        try:
            keys = [dicom_seconds(v) if tag in ("AcquisitionTime", "ContentTime") else float(v) for v in values]
        except (TypeError, ValueError):
            continue
        if any(k is None for k in keys):
            continue
        groups: dict[float, list[Slice]] = defaultdict(list)
        for key, item in zip(keys, series, strict=True):
            groups[key].append(item)
        if len(groups) < 2:
            continue
        ordered = [groups[k] for k in sorted(groups)]
        if any(len({s.floats("ImagePositionPatient") for s in g}) != len(g) for g in ordered):
            continue  # this tag does not separate the volumes (e.g. per-slice acquisition times)
        counts = [len(g) for g in ordered]
        if len(set(counts)) > 1:
            short = min(range(len(counts)), key=counts.__getitem__)
            raise _SeriesProblem(f"incomplete: temporal positions hold {sorted(set(counts))} slices (position "
                                 f"{short + 1} of {len(counts)} by {tag} has {counts[short]}, the others "
                                 f"{max(counts)})", ordered[short][0].path)
        return ordered, tag
    raise _SeriesProblem(f"slice positions repeat ({len(series)} files at {len(positions)} positions, up to {repeats} "
                         "at one) but no TemporalPositionIdentifier, TriggerTime, AcquisitionTime or ContentTime "
                         "separates them", series[0].path)


def _geometry(group: list[Slice]) -> tuple[list[Slice], tuple, tuple, tuple, tuple]:
    """(slices sorted along the normal, size, spacing, origin, direction) of one volume, or `_SeriesProblem`."""
    first = group[0]
    for s in group:
        for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"):
            if s.get(tag) is None:
                raise _SeriesProblem(f"no {tag} in the header", s.path)
    iop = np.asarray(first.floats("ImageOrientationPatient"), dtype=float)
    for s in group:
        if np.abs(np.asarray(s.floats("ImageOrientationPatient")) - iop).max() > 1e-4:
            raise _SeriesProblem(f"mixed geometry: ImageOrientationPatient {list(s.floats('ImageOrientationPatient'))} "
                                 f"differs from {iop.tolist()} of {first.path.name}", s.path)
        if (s.get("Rows"), s.get("Columns")) != (first.get("Rows"), first.get("Columns")):
            raise _SeriesProblem(f"mixed geometry: {s.get('Rows')}x{s.get('Columns')} pixels, "
                                 f"{first.get('Rows')}x{first.get('Columns')} in {first.path.name}", s.path)
        if np.abs(np.subtract(s.floats("PixelSpacing"), first.floats("PixelSpacing"))).max() > 1e-4:
            raise _SeriesProblem(f"mixed geometry: PixelSpacing {list(s.floats('PixelSpacing'))} differs from "
                                 f"{list(first.floats('PixelSpacing'))} of {first.path.name}", s.path)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    if not (abs(np.linalg.norm(row) - 1) < 1e-3 and abs(np.linalg.norm(col) - 1) < 1e-3 and abs(row @ col) < 1e-3):
        raise _SeriesProblem(f"ImageOrientationPatient {iop.tolist()} is not two orthogonal unit vectors", first.path)
    if len(group) < 3:
        raise _SeriesProblem(f"{len(group)} slice(s): not a volume (localiser?)", first.path)
    positions = np.asarray([s.floats("ImagePositionPatient") for s in group], dtype=float)
    order = np.argsort(positions @ normal, kind="stable")
    group, positions = [group[i] for i in order], positions[order]
    steps = np.diff(positions @ normal)
    spacing_z = float(np.median(steps))
    if spacing_z <= 1e-4:
        raise _SeriesProblem("two files at the same slice position", group[int(np.argmin(steps)) + 1].path)
    worst = int(np.argmax(np.abs(steps - spacing_z)))
    if abs(steps[worst] - spacing_z) > 0.02 * spacing_z + 1e-3:
        ratio = steps[worst] / spacing_z
        what = (f"missing slices: {round(ratio) - 1} slice(s) absent" if ratio > 1.5 and abs(ratio - round(ratio)) < 0.1
                else "uneven slice spacing")
        raise _SeriesProblem(f"{what} between positions {positions[worst] @ normal:.2f} and "
                             f"{positions[worst + 1] @ normal:.2f} mm along the normal (step {steps[worst]:.2f} mm, "
                             f"{spacing_z:.2f} mm elsewhere)", group[worst + 1].path)
    lateral = positions - positions[0] - np.outer((positions - positions[0]) @ normal, normal)
    if np.abs(lateral).max() > 0.01 * spacing_z + 1e-3:
        raise _SeriesProblem("mixed geometry: slices are not stacked along their normal (sheared or shifted)",
                             group[int(np.abs(lateral).max(1).argmax())].path)
    pixel = first.floats("PixelSpacing")  # (between rows, between columns)
    size = (int(first.get("Columns")), int(first.get("Rows")), len(group))
    spacing = (float(pixel[1]), float(pixel[0]), spacing_z)
    direction = tuple(np.stack([row, col, normal], axis=1).ravel().tolist())
    return group, size, spacing, tuple(positions[0].tolist()), direction


def _volume_time(group: list[Slice], tag: str | None) -> float | None:
    """Absolute time (s) of one volume: the earliest of its slices, by the separating tag when it is a time."""
    tags = ["TriggerTime"] if tag in ("TemporalPositionIdentifier", "TriggerTime") else []
    tags += ["AcquisitionTime", "ContentTime", "SeriesTime"]
    for name in tags:
        values = [s.get(name) for s in group]
        if any(v is None for v in values):
            continue
        seconds = [float(v) / 1000.0 if name == "TriggerTime" else dicom_seconds(v) for v in values]
        if all(v is not None for v in seconds):
            return min(seconds)
    return None


def series_volumes(series: list[Slice]) -> list[Volume]:
    """The volumes of one series in time order (raises `_SeriesProblem`)."""
    groups, tag = _temporal_groups(series)
    out = []
    for group in groups:
        sorted_group, size, spacing, origin, direction = _geometry(group)
        out.append(Volume([s.path for s in sorted_group], size, spacing, origin, direction, _volume_time(group, tag),
                          str(series[0].get("SeriesInstanceUID"))))
    return out
