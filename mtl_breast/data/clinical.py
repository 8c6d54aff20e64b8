"""pCR from a collection's clinical table, joined to converted DICOM studies (`mtl-breast convert --clinical`).

TCIA's collections publish pCR in spreadsheets of their own shape (I-SPY1: `SUBJECTID` and `PCR`; Duke: a
spreadsheet whose column names sit below a row of group titles). The reader looks for the header in the first four
rows, takes the patient-id column (`--id-column`, else the first of `patient_id`, `patient id`, `subjectid`, `pid`,
`case_id`) and the pCR column (`--pcr-column`, else the one column whose name holds "pcr"). The column names of the
real tables are taken from the collections' documentation and were not checked against the files here: name the
columns when the defaults do not find them.

A row matches a study when its id equals the study's PatientID, when both have the same identity under the rules of
`collections.csv` (Breast_MRI_001 = DUKE_001), or when the row id is a bare number equal to the number that ends the
PatientID (I-SPY1's SUBJECTID 1001 = ISPY1_1001).
"""

from __future__ import annotations

import math
import re
import zipfile
from pathlib import Path
from typing import Any

import pandas as pd

from mtl_breast.data.case import DatasetError
from mtl_breast.data.identity import patient_identity

ID_COLUMNS = ("patient_id", "patient id", "subjectid", "subject_id", "pid", "case_id", "patientid")
_TRUE = {"1", "1.0", "yes", "true", "pcr", "y"}
_FALSE = {"0", "0.0", "no", "false", "rd", "non-pcr", "n"}


def _frame(path: Path, header: int) -> pd.DataFrame:
    if path.suffix.lower() in (".xlsx", ".xls"):
        return pd.read_excel(path, header=header, dtype=str)
    return pd.read_csv(path, header=header, dtype=str)


def _pcr_value(value: Any) -> float:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return math.nan
    text = str(value).strip().lower()
    return 1.0 if text in _TRUE else 0.0 if text in _FALSE else math.nan


def read_clinical(path: Path | str, id_column: str | None = None, pcr_column: str | None = None) -> dict[str, float]:
    """{patient id as written: pCR 1.0 / 0.0 / NaN} from a CSV or Excel table (module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"clinical table {path} does not exist")
    for header in range(4):
        try:
            table = _frame(path, header)
        except (ValueError, OSError, zipfile.BadZipFile) as err:
            raise DatasetError(f"{path}: cannot read the table ({type(err).__name__}: {err})") from err
        columns = {str(c).strip().lower(): c for c in table.columns}
        ident = columns.get(id_column.strip().lower()) if id_column else \
            next((columns[c] for c in ID_COLUMNS if c in columns), None)
        if ident is None:
            continue
        if pcr_column:
            pcr = columns.get(pcr_column.strip().lower())
        else:
            found = [c for name, c in columns.items() if "pcr" in name]
            pcr = found[0] if len(found) == 1 else None
        if pcr is None:
            raise DatasetError(f"{path}: no pCR column (name it with --pcr-column; columns: {list(table.columns)})")
        return {str(r[ident]).strip(): _pcr_value(r[pcr]) for _, r in table.iterrows()
                if isinstance(r[ident], str) and r[ident].strip()}
    raise DatasetError(f"{path}: no patient-id column in the first four rows (name it with --id-column)")


def pcr_for(patient_id: str, table: dict[str, float]) -> float:
    """The pCR of `patient_id` in `table` (module docstring for the matching), NaN when no row matches."""
    if patient_id in table:
        return table[patient_id]
    mine = patient_identity(patient_id)
    number = re.search(r"(\d+)$", patient_id)
    for row_id, value in table.items():
        if mine is not None and (theirs := patient_identity(row_id)) is not None and theirs[0] == mine[0]:
            return value
        if row_id.isdigit() and number is not None and int(row_id) == int(number.group(1)):
            return value
    return math.nan
