"""Subgroups the MAMA-MIA challenge measures fairness over: age bin, menopausal status, breast density.

Mapping rules, as in the official scoring scripts:

- age: `pd.cut(age, bins=[0, 40, 50, 60, 70, 100])`, right-closed, so 40 -> "0-40", 40.5 -> "40-50",
  100 -> "70-100"; ages that are missing, <= 0 or > 100 fall outside every bin and drop out of the age
  variable. (The official labels read "0-40", "41-50", ..., "71+"; the bins are the same, only the names
  differ, and names do not enter any score.)
- menopausal status: missing -> "unknown"; otherwise lower-cased text containing "peri" or "pre" ->
  "pre", else containing "post" -> "post", else the lower-cased text itself stays its own group. This is
  the task-2 script's order (pre/peri before post). The task-1 script tests "post" before "pre" and is
  case-sensitive; the two agree on every value the MAMA-MIA spreadsheet holds ("pre", "post",
  "pre (<6 months since LMP ...)", "peri (6-12 months ...)", "post (...)"), and differ only on text such
  as "Indeterminate (neither Pre or Postmenopausal)", which is "pre" here.
- breast density: "a".."d" (case and surrounding blanks ignored); anything else is missing and drops out
  of the density variable only.
"""
# References:
#   LidiaGarrucho/MAMA-MIA, src/challenge/scoring_task1.py (age bins, menopause mapping, fairness variables)
#   LidiaGarrucho/MAMA-MIA, src/challenge/scoring_task2.py (menopause mapping with lower-casing)

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

FAIRNESS_VARIABLES = ("age", "menopausal_status", "breast_density")
AGE_EDGES = (0, 40, 50, 60, 70, 100)
AGE_LABELS = tuple(f"{lo}-{hi}" for lo, hi in zip(AGE_EDGES[:-1], AGE_EDGES[1:], strict=True))
DENSITY_LABELS = ("a", "b", "c", "d")
MENOPAUSE_LABELS = ("pre", "post", "unknown")


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # list-like values are not "missing"
        return False


def age_group(age: Any) -> str | None:
    """Age bin label ("0-40", "40-50", "50-60", "60-70", "70-100"), None when missing or outside (0, 100]."""
    if _is_missing(age):
        return None
    try:
        years = float(age)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(years):
        return None
    for lo, hi, label in zip(AGE_EDGES[:-1], AGE_EDGES[1:], AGE_LABELS, strict=True):
        if lo < years <= hi:
            return label
    return None


def menopause_group(text: Any) -> str:
    """"pre", "post" or "unknown" (missing/blank); other text is kept, lower-cased, as its own group."""
    if _is_missing(text):
        return "unknown"
    value = str(text).strip().lower()
    if not value:
        return "unknown"
    if "peri" in value or "pre" in value:
        return "pre"
    if "post" in value:
        return "post"
    return value


def density_group(density: Any) -> str | None:
    """BI-RADS breast density "a".."d", None when missing or unrecognised."""
    if _is_missing(density):
        return None
    value = str(density).strip().lower()
    return value if value in DENSITY_LABELS else None


def _first_present(row: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        if key in row and not _is_missing(row[key]):
            return row[key]
    return None


def subgroup_labels(meta: Mapping[str, Any]) -> dict[str, str | None]:
    """The fairness subgroups of one case: {"age", "menopausal_status", "breast_density"} labels (None: the case
    drops out of that variable) from its metadata, whose keys are the readers' ("menopause", "density") or the
    challenge's ("menopausal_status", "breast_density")."""
    return {
        "age": age_group(meta.get("age")),
        "menopausal_status": menopause_group(_first_present(meta, ("menopause", "menopausal_status"))),
        "breast_density": density_group(_first_present(meta, ("density", "breast_density"))),
    }


def subgroup_table(meta_rows: Iterable[Mapping[str, Any]] | pd.DataFrame) -> pd.DataFrame:
    """Subgroup labels per patient, the `groups` argument of the challenge scores.

    Args:
        meta_rows: one mapping per patient with "patient_id" and any of "age", "menopause" (or
            "menopausal_status"), "density" (or "breast_density"); a DataFrame with those columns works too.

    Returns:
        DataFrame indexed by patient_id with columns age, menopausal_status, breast_density (object dtype,
        None where the patient drops out of that variable; menopause is never None).
    """
    if isinstance(meta_rows, pd.DataFrame):
        frame = meta_rows if "patient_id" in meta_rows else meta_rows.rename_axis("patient_id").reset_index()
        meta_rows = frame.to_dict("records")
    records = []
    for row in meta_rows:
        if _is_missing(row.get("patient_id")):
            raise ValueError(f"subgroup row without a patient_id: {dict(row)}")
        records.append({"patient_id": str(row["patient_id"]), **subgroup_labels(row)})
    table = pd.DataFrame.from_records(records, columns=["patient_id", *FAIRNESS_VARIABLES])
    duplicated = table["patient_id"][table["patient_id"].duplicated()].tolist()
    if duplicated:
        raise ValueError(f"patient_id listed more than once in the subgroup metadata: {duplicated}")
    table = table.set_index("patient_id").astype(object)
    return table.where(table.notna(), None)  # None, not NaN, marks "drops out of this variable"
