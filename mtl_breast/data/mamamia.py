"""Reader for the MAMA-MIA layout (DESIGN.md section 3).

```
<root>/images/<PID>/<pid>_0000.nii.gz            pre-contrast, then _0001 (first post-contrast), ...
<root>/segmentations/expert/<pid>.nii.gz         expert tumour mask (optional)
<root>/patient_info_files/<pid>.json             breast box, pCR, clinical and imaging data (optional)
<root>/clinical_and_imaging_info.xlsx            sheet `dataset_info`; a .csv with the same columns works too
<root>/train_test_splits.csv                     columns train_split, test_split
```
Copies of the dataset spell the same patient in different cases (folder `DUKE_001`, files
`duke_001_0000.nii.gz`), so every name is resolved case-insensitively. Extra files and folders are
ignored, spreadsheet rows without images are skipped (`require_images`), and images without a
spreadsheet row are read with whatever their JSON provides. A case the layout promises but that cannot be
read -- an `images/<PID>` folder without phase files, an id of the split file without a folder -- is bad
input of that case, reported like any other (see `read_mamamia`'s `skipped`).
"""

from __future__ import annotations

import ast
import json
import math
import re
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from mtl_breast.acquisition import check_given
from mtl_breast.data.case import Case, CaseError, DatasetError, check_times

SPREADSHEET = "clinical_and_imaging_info"
SPLITS = "train_test_splits.csv"
BOX_KEYS = ("x_min", "x_max", "y_min", "y_max", "z_min", "z_max")
META_KEYS = ("dataset", "site", "age", "menopause", "density", "tumor_subtype", "field_strength", "manufacturer",
             "bilateral", "repetition_time", "flip_angle")
_PHASE = re.compile(r"^(?P<pid>.+)_(?P<index>\d{4})\.nii(\.gz)?$", re.IGNORECASE)


def _entries(folder: Path) -> dict[str, Path]:
    """Children of `folder` keyed by lower-case name (empty when the folder does not exist)."""
    if not folder.is_dir():
        return {}
    return {child.name.lower(): child for child in folder.iterdir() if not child.name.startswith(".")}


def _find(folder: Path, *names: str) -> Path | None:
    """First of `names` present in `folder`, matched case-insensitively."""
    entries = _entries(folder)
    return next((entries[n.lower()] for n in names if n.lower() in entries), None)


def is_mamamia_root(root: Path | str) -> bool:
    """True when `root` looks like a MAMA-MIA copy.

    That is an `images/` folder next to a companion file (spreadsheet, splits, segmentations, patient info), or,
    since a test-time copy may hold images alone, one whose first case folders hold `<folder>_0000.nii[.gz]`.
    """
    root = Path(root)
    images = _find(root, "images")
    if images is None or not images.is_dir():
        return False
    companions = ("segmentations", "patient_info_files", SPLITS, SPREADSHEET + ".xlsx", SPREADSHEET + ".csv")
    if _find(root, *companions) is not None:
        return True
    folders = (p for p in sorted(images.iterdir()) if p.is_dir())
    for folder, _ in zip(folders, range(5), strict=False):
        names = _entries(folder)
        if f"{folder.name.lower()}_0000.nii.gz" in names or f"{folder.name.lower()}_0000.nii" in names:
            return True
    return False


def _read_table_file(path: Path, read: Callable[[], Any]) -> Any:
    """`read()` of a CSV/Excel table, its parse errors turned into a DatasetError naming the file."""
    try:
        return read()
    except (ValueError, OSError, zipfile.BadZipFile) as err:  # pandas' parser errors are ValueErrors
        if isinstance(err, FileNotFoundError):
            raise
        raise DatasetError(f"{path}: cannot read the table ({type(err).__name__}: {err})") from err


def read_splits(root: Path | str) -> dict[str, list[str]]:
    """Read `train_test_splits.csv` into {"train": [...], "test": [...]}; empty cells are dropped."""
    root = Path(root)
    path = _find(root, SPLITS)
    if path is None:
        raise FileNotFoundError(f"no {SPLITS} in {root}")
    table = _read_table_file(path, lambda: pd.read_csv(path, dtype=str))
    table.columns = [str(c).strip().lower() for c in table.columns]
    splits = {}
    for name in ("train", "test"):
        column = f"{name}_split"
        if column not in table.columns:
            raise DatasetError(f"{path}: column {column!r} missing (columns: {list(table.columns)})")
        splits[name] = [s.strip() for s in table[column].dropna() if s.strip()]
    return splits


def _read_table(root: Path) -> tuple[Path | None, dict[str, dict[str, Any]]]:
    """The spreadsheet and its rows keyed by lower-case patient id; (None, {}) when there is none."""
    path = _find(root, SPREADSHEET + ".xlsx", SPREADSHEET + ".csv")
    if path is None:
        return None, {}
    if path.suffix.lower() == ".csv":
        table = _read_table_file(path, lambda: pd.read_csv(path))
    else:
        sheets = _read_table_file(path, lambda: pd.read_excel(path, sheet_name=None))
        if "dataset_info" not in sheets:
            warnings.warn(f"{path}: no sheet 'dataset_info', reading {next(iter(sheets))!r}", stacklevel=3)
        table = sheets.get("dataset_info", next(iter(sheets.values())))
    table.columns = [str(c).strip().lower() for c in table.columns]
    if "patient_id" not in table.columns:
        raise DatasetError(f"{path}: column 'patient_id' missing (columns: {list(table.columns)})")
    rows: dict[str, dict[str, Any]] = {}
    for row in table.to_dict("records"):
        if _missing(row["patient_id"]):
            continue
        pid = str(row["patient_id"]).strip()
        if pid.lower() in rows:
            warnings.warn(f"{path}: patient {pid} listed twice, keeping the first row", stacklevel=3)
            continue
        rows[pid.lower()] = {**row, "patient_id": pid}
    return path, rows


def _missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none", "null", "na", "n/a")


def _first(*values: Any) -> Any:
    """First value that is not missing (spreadsheet before JSON), else None."""
    return next((v for v in values if not _missing(v)), None)


def _to_float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def _to_bool(value: Any) -> bool | None:
    if isinstance(value, str):
        words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
        return words.get(value.strip().lower())
    number = _to_float(value)
    return None if number is None else bool(number)


def _density(value: Any) -> str | None:
    """Breast density as "a".."d"; tolerates "B", "b " and "c - heterogeneously dense"."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text[:1] in ("a", "b", "c", "d") and (len(text) == 1 or not text[1].isalpha()):
        return text[0]
    return None


def _plain(value: Any) -> Any:
    """numpy scalars -> Python scalars, so `Case.meta` stays JSON-serialisable."""
    return value.item() if hasattr(value, "item") else value


def _pcr(value: Any, patient_id: str, path: Path | None) -> float:
    if value is None:
        return math.nan
    number = _to_float(value) if not isinstance(value, bool) else float(value)
    if number not in (0.0, 1.0):
        raise CaseError(patient_id, path, f"pcr must be 0 or 1, got {value!r}")
    return number


def _times(value: Any, num_phases: int, patient_id: str, source: Path | None) -> list[float] | None:
    """Parse acquisition times ("[0, 584, 714]" or a list); None with a warning when unusable.

    Times that parse but are out of order or repeated raise a `CaseError` naming `source` (`check_times`).
    """
    if value is None:
        return None
    try:
        items = ast.literal_eval(value) if isinstance(value, str) else value
        times = [float(t) for t in items]
    except (ValueError, TypeError, SyntaxError):
        warnings.warn(f"case {patient_id}: cannot parse acquisition_times {value!r}; ignoring them", stacklevel=3)
        return None
    if len(times) != num_phases:
        warnings.warn(f"case {patient_id}: {len(times)} acquisition times for {num_phases} phases; ignoring them",
                      stacklevel=3)
        return None
    return check_times(times, patient_id, source)


def _acquisition(key: str, row: dict[str, Any], imaging: dict[str, Any], patient_id: str, table_path: Path | None,
                 info_path: Path | None) -> float | None:
    """A sequence parameter (`acquisition.check_given`): the spreadsheet's value, else the JSON's, else None.

    A value that is there but unusable (text, 0, negative) is refused rather than read as missing: the kinetic
    features would otherwise assume a default for it without the table's author knowing why.
    """
    value = _first(row.get(key), imaging.get(key))
    try:
        return check_given(key, _plain(value))
    except ValueError as err:
        raise CaseError(patient_id, info_path if _missing(row.get(key)) else table_path, str(err)) from err


def _read_json(path: Path, patient_id: str) -> tuple[dict[str, Any], tuple[int, ...] | None]:
    """Parse a patient_info JSON; returns (the document, breast box or None).

    The box is the one key the pipeline needs from this file, so only a missing or malformed box raises;
    clinical sections may be absent (test-time files carry none).
    """
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CaseError(patient_id, path, f"cannot parse patient info JSON: {err}") from err
    if not isinstance(doc, dict):
        raise CaseError(patient_id, path, "patient info JSON is not an object")
    lesion = doc.get("primary_lesion")
    if not isinstance(lesion, dict) or not isinstance(lesion.get("breast_coordinates"), dict):
        raise CaseError(patient_id, path, "missing key primary_lesion.breast_coordinates")
    coords = lesion["breast_coordinates"]
    absent = [k for k in BOX_KEYS if k not in coords]
    if absent:
        raise CaseError(patient_id, path, f"primary_lesion.breast_coordinates lacks {', '.join(absent)}")
    try:
        box = tuple(int(coords[k]) for k in BOX_KEYS)
    except (TypeError, ValueError) as err:
        raise CaseError(patient_id, path, f"breast_coordinates must be integers: {coords}") from err
    if any(lo >= hi for lo, hi in zip(box[0::2], box[1::2], strict=True)) or min(box) < 0:
        raise CaseError(patient_id, path, f"breast_coordinates are not a box (need 0 <= min < max): {coords}")
    return doc, box


def _phases(folder: Path, patient_id: str) -> list[Path]:
    """Phase files `<pid>_000k.nii[.gz]` of one case folder, checked to be contiguous from 0000 ([] if none)."""
    found: dict[int, Path] = {}
    for child in sorted(folder.iterdir()):
        match = _PHASE.match(child.name)
        if match and match["pid"].lower() == folder.name.lower() and child.is_file():
            found.setdefault(int(match["index"]), child)
    for index in range(max(found, default=-1) + 1):
        if index not in found:
            missing = folder / f"{folder.name.lower()}_{index:04d}.nii.gz"
            raise CaseError(patient_id, missing, f"missing phase {index} (found {sorted(found)})")
    return [found[i] for i in range(len(found))]


def _no_phases(folder: Path, patient_id: str) -> CaseError:
    """The error of a case folder that holds no `<pid>_0000.nii[.gz]` (empty, or files named otherwise)."""
    names = sorted(c.name for c in folder.iterdir() if not c.name.startswith("."))
    expected = f"{folder.name.lower()}_0000.nii.gz, {folder.name.lower()}_0001.nii.gz, ..."
    if not names:
        return CaseError(patient_id, folder, f"case folder is empty (expected phase files {expected})")
    listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return CaseError(patient_id, folder, f"no phase files named {expected} in the case folder (it holds {listed})")


def _split_ids_without_folder(root: Path, folders: dict[str, Path], images_dir: Path) -> list[CaseError]:
    """One error per id of the split file that has no folder under images/ (each id once)."""
    path = _find(root, SPLITS)
    if path is None:
        return []
    try:
        splits = read_splits(root)
    except ValueError as err:  # a split file without its columns; whoever selects cases by split says so
        warnings.warn(f"cannot check the split file against images/: {err}", stacklevel=3)
        return []
    errors, seen = [], set()
    for name, ids in splits.items():
        for pid in ids:
            if pid.lower() not in folders and pid.lower() not in seen:
                errors.append(CaseError(pid, path, f"listed in the {name} split, but {images_dir} has no folder "
                                                   f"{pid} (expected {images_dir / pid}/{pid.lower()}_0000.nii.gz)"))
            seen.add(pid.lower())
    return errors


def _build_case(patient_id: str, images: list[Path], row: dict[str, Any], masks: dict[str, Path],
                infos: dict[str, Path], table_path: Path | None) -> Case:
    key = patient_id.lower()
    mask = masks.get(f"{key}.nii.gz") or masks.get(f"{key}.nii")
    info_path = infos.get(f"{key}.json")
    doc, box = _read_json(info_path, patient_id) if info_path is not None else ({}, None)

    lesion = doc.get("primary_lesion") or {}
    clinical = doc.get("clinical_data") or {}
    imaging = doc.get("imaging_data") or {}
    get = row.get
    pcr_value = _first(get("pcr"), lesion.get("pcr"))
    pcr_source = info_path if _missing(get("pcr")) else table_path
    dataset = _first(get("dataset"), imaging.get("dataset"), patient_id.split("_")[0].upper())
    age = _to_float(_first(get("age"), clinical.get("age")))
    meta = {
        "dataset": dataset,
        "site": _first(get("site"), imaging.get("site"), dataset),
        "age": age,
        "menopause": _first(get("menopause"), get("menopausal_status"), clinical.get("menopausal_status")),
        "density": _density(_first(get("breast_density"), get("density"), clinical.get("breast_density"))),
        "tumor_subtype": _first(get("tumor_subtype"), lesion.get("tumor_subtype")),
        "field_strength": _acquisition("field_strength", row, imaging, patient_id, table_path, info_path),
        "manufacturer": _first(get("manufacturer"), imaging.get("scanner_manufacturer")),
        "bilateral": _to_bool(_first(get("bilateral"), get("bilateral_mri"), imaging.get("bilateral"))),
        # Sequence parameters of the spoiled gradient echo: with the field strength they turn signal into contrast
        # concentration (models.kinetics); ms and degrees.
        "repetition_time": _acquisition("repetition_time", row, imaging, patient_id, table_path, info_path),
        "flip_angle": _acquisition("flip_angle", row, imaging, patient_id, table_path, info_path),
    }
    meta = {k: (str(v).strip() if isinstance(v, str) else _plain(v)) for k, v in meta.items()}
    times = _first(get("acquisition_times"), imaging.get("acquisition_times"))
    times_source = table_path if not _missing(get("acquisition_times")) else info_path
    return Case(
        patient_id=patient_id,
        image_paths=images,
        mask_path=mask,
        info_path=info_path,
        pcr=_pcr(pcr_value, patient_id, pcr_source),
        acquisition_times=_times(times, len(images), patient_id, times_source) if images else None,
        breast_box=box,
        meta=meta,
    )


def read_mamamia(root: Path | str, require_images: bool = True, *,
                 skipped: list[dict[str, str]] | None = None) -> list[Case]:
    """Read every case of a MAMA-MIA copy, sorted by patient id.

    Args:
        root: dataset root (the folder holding `images/`).
        require_images: read only patients with phase files. Spreadsheet rows without an image folder are
            dropped silently (a copy may hold part of the dataset); a folder under images/ without
            `<pid>_0000.nii[.gz]` and an id of the split file without a folder are bad input of that case.
            When False, patients without phases are returned with empty `image_paths` (useful to read labels
            alone).
        skipped: when given, a case with bad input (phase gap, malformed JSON, empty case folder, split id
            without a folder, acquisition times out of order ...) is appended here as {"patient_id", "reason"}
            and reading goes on; otherwise its `CaseError` propagates.

    Returns:
        Cases with phases in acquisition order, mask/JSON paths when present, pCR (NaN when unknown),
        acquisition times (None when absent or inconsistent) and `meta` with the keys of `META_KEYS`.
        Spreadsheet values win over JSON for clinical data; the breast box comes from the JSON.
    """
    root = Path(root)
    images_dir = _find(root, "images")
    if images_dir is None and require_images:
        raise FileNotFoundError(f"{root} has no images/ folder (not a MAMA-MIA root)")
    folders = {k: p for k, p in _entries(images_dir).items() if p.is_dir()} if images_dir else {}
    table_path, table = _read_table(root)
    # List the mask and JSON folders once: per-case lookups into 1,500-file folders add up.
    seg = _find(root, "segmentations")
    masks = _entries(_find(seg, "expert") or seg / "expert") if seg else {}
    infos = _entries(_find(root, "patient_info_files") or root / "patient_info_files")
    keys = sorted(set(folders) | (set() if require_images else set(table)))
    cases = []
    errors: list[CaseError] = []
    for key in keys:
        row = table.get(key, {})
        patient_id = row.get("patient_id") or folders[key].name
        try:
            images = _phases(folders[key], patient_id) if key in folders else []
            if require_images and not images:
                # A spreadsheet-only patient is not an error (partial copies); a case folder without phases is.
                # Folders such as __MACOSX are archive debris, not cases.
                if key in folders and not key.startswith("__"):
                    raise _no_phases(folders[key], patient_id)
                continue
            cases.append(_build_case(patient_id, images, row, masks, infos, table_path))
        except CaseError as err:
            errors.append(err)
    if require_images and images_dir is not None:
        errors += _split_ids_without_folder(root, folders, images_dir)
    if errors and skipped is None:
        raise errors[0]
    if skipped is not None:
        skipped += [{"patient_id": err.patient_id, "reason": str(err)} for err in errors]
    return cases
