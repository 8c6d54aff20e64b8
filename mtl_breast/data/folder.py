"""Reader for unlabeled DCE-MRI folders (pretraining data), and `read_dataset`, which picks the reader.

Layout: each root holds one sub-folder per case; the sub-folder holds that case's phase files
(`*.nii`, `*.nii.gz`, `*.mha`, `*.nrrd`). Phase order is either

- the file names in natural order (`t2` before `t10`; numbers compare as numbers), or
- a `manifest.json` in the case folder, which wins when present:
  `{"phases": ["pre.nii.gz", "post1.nii.gz", ...], "times": [0, 90, ...]}`; `phases` lists file
  names relative to the case folder, pre-contrast first; `times` (seconds after the pre-contrast
  acquisition, one per phase, strictly increasing) is optional, and so is `meta`, a mapping of case
  metadata (field_strength, repetition_time, flip_angle, manufacturer, dataset, ... as `mtl-breast convert`
  writes them from DICOM headers) that fills `Case.meta`, and `pcr` (0 or 1).

Sub-folders without image files are ignored. Several roots combine; when two roots hold the same case
name the ids of the colliding cases become `<root name>_<case name>`. A root in the MAMA-MIA layout is
read with `read_mamamia`, and a folder of DICOM studies through `convert.read_dicom_cases` (converted once into a
staging folder), so any root a user has can be passed here.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from mtl_breast.acquisition import check_given
from mtl_breast.data.breastdcedl import is_breastdcedl_root, read_breastdcedl
from mtl_breast.data.case import Case, CaseError, check_times
from mtl_breast.data.convert import convert_dicom, staging_dir
from mtl_breast.data.dicom import is_dicom_root
from mtl_breast.data.mamamia import META_KEYS, is_mamamia_root, read_mamamia

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")
MANIFEST = "manifest.json"


def _is_image(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and not name.startswith(".") and name.endswith(IMAGE_SUFFIXES)


def _natural_key(name: str) -> list[int | str]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name.lower())]


def _read_manifest(path: Path, patient_id: str) -> tuple[list[Path], list[float] | None, dict]:
    try:
        doc = json.loads(path.read_text())
        names = doc["phases"]
        times = doc.get("times")
        meta = doc.get("meta") or {}
        pcr = doc.get("pcr")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise TypeError("'phases' must be a non-empty list of file names")
        if not isinstance(meta, dict):
            raise TypeError("'meta' must be a mapping")
        if pcr is not None and (isinstance(pcr, bool) or pcr not in (0, 1)):
            raise ValueError(f"'pcr' must be 0 or 1, got {pcr!r}")
        meta = {**meta, "pcr": pcr} if pcr is not None else meta
        if times is not None:
            times = [float(t) for t in times]
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise CaseError(patient_id, path, f"bad manifest ({type(err).__name__}: {err})") from err
    if times is not None and len(times) != len(names):
        raise CaseError(patient_id, path, f"{len(times)} times for {len(names)} phases")
    if times is not None:
        times = check_times(times, patient_id, path)
    paths = [path.parent / name for name in names]
    for phase in paths:
        if not phase.is_file():
            raise CaseError(patient_id, phase, f"phase file listed in {MANIFEST} does not exist")
    return paths, times, meta


def _read_case_folder(folder: Path, dataset: str) -> Case | None:
    """One case from its folder; None when the folder holds no images (not a case)."""
    patient_id = folder.name
    manifest = folder / MANIFEST
    given: dict = {}
    if manifest.is_file():
        paths, times, given = _read_manifest(manifest, patient_id)
    else:
        paths = sorted((p for p in folder.iterdir() if _is_image(p)), key=lambda p: _natural_key(p.name))
        times = None
        if not paths:
            return None
    meta = dict.fromkeys(META_KEYS)
    meta.update(dataset=dataset, site=dataset)
    for key in ("field_strength", "repetition_time", "flip_angle"):
        if key in given:
            try:
                given[key] = check_given(key, given[key])
            except ValueError as err:
                raise CaseError(patient_id, manifest, str(err)) from err
    pcr = given.pop("pcr", None)
    meta.update(given)
    return Case(patient_id=patient_id, image_paths=paths, pcr=math.nan if pcr is None else float(pcr),
                acquisition_times=times, meta=meta)


def _read_root(root: Path, skipped: list[dict[str, str]] | None) -> list[Case]:
    if is_mamamia_root(root):
        return read_mamamia(root, require_images=True, skipped=skipped)
    if is_breastdcedl_root(root):
        return read_breastdcedl(root, skipped=skipped)

    if is_dicom_root(root):
        return read_dicom_cases(root, skipped=skipped)
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist or is not a folder")
    cases = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            case = _read_case_folder(folder, dataset=root.name)
        except CaseError as err:
            if skipped is None:
                raise
            skipped.append({"patient_id": folder.name, "reason": str(err)})
            continue
        if case is not None:
            cases.append(case)
    return cases


def read_dicom_cases(root: Path | str, skipped: list[dict[str, str]] | None = None) -> list[Case]:
    """The cases of a DICOM root (one per study), converted into `convert.staging_dir(root)` and read from there.

    Studies without a usable dynamic are appended to `skipped` (else the first one's `CaseError` propagates, its
    message as listed: it names the case, study, series and file).
    """
    root = Path(root)
    report = convert_dicom(root, staging_dir(root), dataset=root.name)
    if report["skipped"] and skipped is None:
        item = report["skipped"][0]
        err = CaseError(item["patient_id"], None, "")
        err.args = (item["reason"],)
        raise err
    if skipped is not None:
        skipped += report["skipped"]
    wanted = set(report["converted"]) | set(report["unchanged"])
    return [c for c in read_folder(staging_dir(root), skipped=skipped) if c.patient_id in wanted]


def read_folder(roots: Path | str | Sequence[Path | str], *,
                skipped: list[dict[str, str]] | None = None) -> list[Case]:
    """Read every case under one or several roots (folders of case folders, or MAMA-MIA roots).

    Args:
        roots: a root or a sequence of roots.
        skipped: when given, cases with bad input are appended here as {"patient_id", "reason"} and
            reading goes on; otherwise their `CaseError` propagates.

    Returns:
        Cases in root order, then sorted by case name; ids that occur in more than one root
        (case-insensitively) are prefixed with their root's name.
    """
    roots = [Path(roots)] if isinstance(roots, str | Path) else [Path(r) for r in roots]
    per_root = [(root, _read_root(root, skipped)) for root in roots]
    counts = Counter(case.patient_id.lower() for _, cases in per_root for case in cases)
    names = [root.name for root in roots]
    out = []
    for index, (root, cases) in enumerate(per_root):
        # Ids are unique within a root, so its name disambiguates; roots sharing a name also get their index.
        prefix = root.name if names.count(root.name) == 1 else f"{root.name}{index}"
        for case in cases:
            if counts[case.patient_id.lower()] > 1:
                case.patient_id = f"{prefix}_{case.patient_id}"
            out.append(case)
    return out


def read_dataset(root_or_roots: Path | str | Sequence[Path | str], *,
                 skipped: list[dict[str, str]] | None = None) -> list[Case]:
    """Read a dataset whatever its layout: MAMA-MIA roots through `read_mamamia`, others as case folders.

    Args:
        root_or_roots: one root or several (their cases are concatenated).
        skipped: see `read_folder`.
    """
    if isinstance(root_or_roots, str | Path) and is_mamamia_root(root_or_roots):
        return read_mamamia(root_or_roots, require_images=True, skipped=skipped)
    return read_folder(root_or_roots, skipped=skipped)
