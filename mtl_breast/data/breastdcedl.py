"""Reader for BreastDCEDL (I-SPY1, I-SPY2 and Duke DCE-MRI repackaged as NIfTI with pCR; naomifridman/BreastDCEDL).

The layout read here follows the file names the collection's repository builds (its `utils/data_utils.py`; its
`preprocess_full_dataset.py` keeps them under `<root>/<ISPY1|ISPY2|DUKE>/.../dce/` and `.../mask/`, which the search
below, three folder levels deep, covers); it has not been checked against the released files, so a copy named
otherwise is not recognised:

```
<root>/BreastDCEDL_metadata.csv                      optional: columns pid, pCR (0/1), dataset, age ... (any case)
<root>/**/<pid>_spy2_vis1_dce_aqc_<k>.nii.gz         I-SPY2 phase k (0 = pre-contrast)
<root>/**/<pid>_spy1_vis1_acq<k>.nii.gz              I-SPY1 phase k
<root>/**/<pid>_duke_aqc_<k>.nii.gz                  Duke phase k
<root>/**/<pid>_<spy1_vis1|spy2_vis1|duke>_mask.nii.gz   tumour mask (optional)
```
`pid` is the TCIA patient id (Breast_MRI_###, ISPY1_####, ACRIN-6698-###### or ISPY2-######), so the identity
rules of `collections.csv` match BreastDCEDL cases with the same patients in MAMA-MIA, Duke and I-SPY copies.
Acquisition times are not in the layout (NaN: the model falls back to the phase index).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pandas as pd

from mtl_breast.data.case import Case, CaseError, DatasetError
from mtl_breast.data.mamamia import META_KEYS

METADATA = re.compile(r"^breastdcedl_metadata.*\.csv$", re.IGNORECASE)
_PHASE = re.compile(r"^(?P<pid>.+?)_(?P<ds>spy1|spy2|duke)_(?:vis1_)?(?:dce_)?(?:aqc|acq)_?(?P<k>\d+)\.nii(?:\.gz)?$",
                    re.IGNORECASE)
_MASK = re.compile(r"^(?P<pid>.+?)_(?P<ds>spy1|spy2|duke)_(?:vis1_)?mask\.nii(?:\.gz)?$", re.IGNORECASE)
DATASETS = {"spy1": "ISPY1", "spy2": "ISPY2", "duke": "DUKE"}


def _files(root: Path, depth: int = 3):
    base = len(root.parts)
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if len(Path(folder).parts) - base < depth else []
        for name in sorted(files):
            yield Path(folder) / name


def is_breastdcedl_root(root: Path | str) -> bool:
    """A BreastDCEDL metadata table in `root`, or phase files named as above within three levels."""
    root = Path(root)
    if not root.is_dir():
        return False
    if any(METADATA.match(p.name) for p in root.iterdir()):
        return True
    return any(_PHASE.match(p.name) for _, p in zip(range(500), _files(root), strict=False))


def _table(root: Path) -> dict[str, dict]:
    path = next((p for p in sorted(root.iterdir()) if METADATA.match(p.name) and "crop" not in p.name.lower()),
                next((p for p in sorted(root.iterdir()) if METADATA.match(p.name)), None))
    if path is None:
        return {}
    try:
        table = pd.read_csv(path)
    except (ValueError, OSError) as err:
        raise DatasetError(f"{path}: cannot read the table ({type(err).__name__}: {err})") from err
    table.columns = [str(c).strip().lower() for c in table.columns]
    if "pid" not in table.columns:
        raise DatasetError(f"{path}: column 'pid' missing (columns: {list(table.columns)})")
    return {str(r["pid"]).strip().lower(): {**r, "_path": path} for r in table.to_dict("records")}


def read_breastdcedl(root: Path | str, *, skipped: list[dict[str, str]] | None = None) -> list[Case]:
    """Every case of a BreastDCEDL copy, sorted by pid; phases contiguous from 0 or the case is bad input."""
    root = Path(root)
    phases: dict[str, dict[int, Path]] = {}
    masks: dict[str, Path] = {}
    kinds: dict[str, str] = {}
    for path in _files(root):
        if match := _PHASE.match(path.name):
            phases.setdefault(match["pid"], {})[int(match["k"])] = path
            kinds[match["pid"]] = match["ds"].lower()
        elif match := _MASK.match(path.name):
            masks[match["pid"]] = path
    table = _table(root)
    cases, errors = [], []
    for pid in sorted(phases):
        found = phases[pid]
        gap = next((k for k in range(max(found) + 1) if k not in found), None)
        if gap is not None:
            errors.append(CaseError(pid, found[min(found)].parent, f"missing phase {gap} (found {sorted(found)})"))
            continue
        row = table.get(pid.lower(), {})
        pcr = row.get("pcr")
        pcr = float(pcr) if pcr is not None and not (isinstance(pcr, float) and math.isnan(pcr)) else math.nan
        if not math.isnan(pcr) and pcr not in (0.0, 1.0):
            errors.append(CaseError(pid, row.get("_path"), f"pCR must be 0 or 1, got {row.get('pcr')!r}"))
            continue
        meta = dict.fromkeys(META_KEYS)
        dataset = DATASETS[kinds[pid]]
        age = row.get("age")
        meta.update(dataset=dataset, site=dataset, collection="BreastDCEDL",
                    age=None if age is None or (isinstance(age, float) and math.isnan(age)) else float(age))
        cases.append(Case(patient_id=pid, image_paths=[found[k] for k in sorted(found)], mask_path=masks.get(pid),
                          pcr=pcr, meta=meta))
    if errors and skipped is None:
        raise errors[0]
    if skipped is not None:
        skipped += [{"patient_id": e.patient_id, "reason": str(e)} for e in errors]
    return cases
