"""DICOM studies to case folders the folder reader takes (`mtl-breast convert`), and DICOM roots read directly.

`convert_dicom(dicom_root, out)` writes, per study with a dynamic (`dynamic.read_dicom_root`):

```
<out>/<case>/<case>_0000.nii.gz, <case>_0001.nii.gz, ...   phases in time order (float32, geometry of the headers)
<out>/<case>/manifest.json      {"phases": [...], "times": [...] or absent, "pcr": 0/1 when a clinical table
                                 gives it (`--clinical`), "meta": {field_strength, repetition_time,
                                 echo_time, flip_angle, manufacturer, model, acquisition_times, study_uid,
                                 series_uids, dicom_patient_id, ...}, "dicom": {"study_uid", "ignored", "source"}}
<out>/conversion.json           converted, unchanged, skipped (with reasons) and ignored series per study
```
A case is written into a hidden folder and renamed into place when complete, so an interrupted conversion never
leaves a case folder with part of its phases; a case whose source files (names, sizes, times) are unchanged since
the last conversion is kept as it is.

`folder.read_dicom_cases(root)` is what `read_dataset` does with a DICOM root: it converts into a staging folder
(`$MTL_BREAST_DICOM_CACHE`, default `~/.cache/mtl_breast/dicom/<root name>-<hash of its path>`) and reads that, so
`preprocess`, `predict`, `extract` and pretraining take a DICOM folder as they take NIfTI.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from mtl_breast.data.case import CaseError
from mtl_breast.data.clinical import pcr_for, read_clinical
from mtl_breast.data.dynamic import DicomStudy, read_dicom_root
from mtl_breast.files import atomic_path, write_text

MANIFEST = "manifest.json"
REPORT = "conversion.json"


def _signature(study: DicomStudy, pcr: float) -> str:
    digest = hashlib.sha256(f"pcr={pcr}\n".encode())
    for volume in study.phases:
        for path in volume.files:
            stat = path.stat()
            digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _unchanged(folder: Path, signature: str) -> bool:
    try:
        return json.loads((folder / MANIFEST).read_text())["dicom"]["source"] == signature
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _write_case(study: DicomStudy, out: Path, signature: str, pcr: float) -> Path:
    """Write one study's case folder in a hidden folder, then rename it into place."""
    target = out / study.case_id
    work = out / f".{study.case_id}.{os.getpid()}.partial"
    shutil.rmtree(work, ignore_errors=True)
    try:
        names = []
        for k in range(len(study.phases)):
            image = study.read_phase(k)
            names.append(f"{study.case_id.lower()}_{k:04d}.nii.gz")
            with atomic_path(work / names[-1]) as tmp:
                sitk.WriteImage(image, str(tmp), True)
        manifest: dict[str, Any] = {"phases": names, "meta": study.meta,
                                    "dicom": {"study_uid": study.study_uid, "ignored": study.ignored,
                                              "source": signature}}
        if study.times is not None:
            manifest["times"] = study.times
        if not math.isnan(pcr):
            manifest["pcr"] = pcr
        write_text(work / MANIFEST, json.dumps(manifest, indent=2))
        old = out / f".{study.case_id}.{os.getpid()}.old"
        if target.exists():
            os.replace(target, old)
        os.replace(work, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return target


def convert_dicom(dicom_root: Path | str, out: Path | str, dataset: str | None = None,
                  clinical: Path | str | None = None, id_column: str | None = None,
                  pcr_column: str | None = None) -> dict[str, Any]:
    """Convert every study of `dicom_root` into a case folder under `out` (module docstring).

    `clinical` is a collection's clinical table whose pCR goes into each matching case's manifest
    (`clinical.read_clinical`, `clinical.pcr_for`; `id_column` and `pcr_column` name its columns).

    Returns:
        {"converted": [case ids written now], "unchanged": [case ids kept], "skipped": [{"patient_id", "reason"}],
        "ignored": {case id: [{"series", "reason"}]}, "report_path": str}.
    """
    dicom_root, out = Path(dicom_root), Path(out)
    if not dicom_root.is_dir():
        raise FileNotFoundError(f"DICOM folder {dicom_root} does not exist or is not a folder")
    skipped: list[dict[str, str]] = []
    studies = read_dicom_root(dicom_root, skipped=skipped, dataset=dataset)
    if not studies and not skipped:
        raise FileNotFoundError(f"no DICOM files found under {dicom_root}")
    out.mkdir(parents=True, exist_ok=True)
    converted, unchanged = [], []
    table = read_clinical(clinical, id_column, pcr_column) if clinical is not None else {}
    for study in studies:
        pcr = pcr_for(study.patient_id, table) if table else math.nan
        signature = _signature(study, pcr)
        if _unchanged(out / study.case_id, signature):
            unchanged.append(study.case_id)
            continue
        try:
            _write_case(study, out, signature, pcr)
            converted.append(study.case_id)
        except CaseError as err:
            skipped.append({"patient_id": study.case_id, "reason": str(err)})
    report = {"dicom": str(dicom_root), "out": str(out), "converted": converted, "unchanged": unchanged,
              "clinical": None if clinical is None else {"table": str(clinical), "with_pcr": sum(
                  not math.isnan(pcr_for(s.patient_id, table)) for s in studies)},
              "skipped": skipped, "ignored": {s.case_id: s.ignored for s in studies if s.ignored}}
    path = write_text(out / REPORT, json.dumps(report, indent=2))
    return {**report, "report_path": str(path)}


def staging_dir(root: Path | str) -> Path:
    """Where `folder.read_dicom_cases` converts a DICOM root: `$MTL_BREAST_DICOM_CACHE/<name>-<hash>`, or under
    ~/.cache/mtl_breast/dicom."""
    root = Path(root).resolve()
    base = Path(os.environ.get("MTL_BREAST_DICOM_CACHE") or Path.home() / ".cache" / "mtl_breast" / "dicom")
    return base / f"{root.name}-{hashlib.sha256(str(root).encode()).hexdigest()[:10]}"
