"""`mtl-breast evaluate`: read a prediction folder and a MAMA-MIA root, score with the challenge formulas
(`metrics.mamamia`), write `scores.json` and `report.md`.

How files are read (all deliberate):

- The cases scored come from `cases` (ids, or a file of one id per line), else from the test split of the
  dataset's `train_test_splits.csv` (what `predict` predicts), else (no split file) from every dataset case. A case
  whose prediction is missing (e.g. it failed in `predict`) is scored as the challenge scores a failure, never
  dropped: an empty mask (DSC 0, HD95 infinite, NormHD 1; the official script stops with a file error instead) and
  pCR 0, as the official `fillna(0)` does. Its AUC score is 0 as well (our choice: the AUC is not part of the
  ranking, and a missing score counted as a confident "no pCR", like the hard prediction, keeps a failure from
  improving the AUC by dropping out of it). Such cases are listed in `missing_predictions` (top level: any task;
  per task: that task's) and in the report. A task with no prediction file at all (no `pred_segmentations/`, no
  `predictions.csv`) is skipped, not scored as failed. Unknown pCR truth counts as 0.
- predictions.csv is validated before scoring (`PredictionsError` naming the file, line, patient and value): columns
  patient_id and pcr (score optional; a score column left entirely empty counts as absent), pcr exactly 0 or 1,
  score a finite number in [0, 1], no patient twice, no patient unknown to the dataset.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk

from mtl_breast.data.case import Case, CaseError
from mtl_breast.data.mamamia import SPLITS, read_mamamia, read_splits
from mtl_breast.data.volumes import read_volume
from mtl_breast.figures import make_overlay
from mtl_breast.files import write_text
from mtl_breast.metrics.classification import reliability_curve
from mtl_breast.metrics.mamamia import score_classification, score_segmentation
from mtl_breast.metrics.segmentation import segmentation_case_metrics
from mtl_breast.metrics.subgroups import subgroup_table
from mtl_breast.run.report import write_report

log = logging.getLogger(__name__)
_LISTED = 10  # ids named in one error message


class PredictionsError(ValueError):
    """Predictions or a case list that cannot be scored: a bad value, a missing column, an unknown or repeated id."""


def _some(items: list[str]) -> str:
    """The first few of `items`, with how many more there are."""
    more = f" and {len(items) - _LISTED} more" if len(items) > _LISTED else ""
    return ", ".join(items[:_LISTED]) + more


def json_safe(value: Any) -> Any:
    """Nested dicts/lists with inf and NaN replaced by None (strict JSON has neither)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _read_mask(path: Path, patient_id: str) -> tuple[np.ndarray, tuple[float, ...]]:
    """Mask `[D, H, W]` as SimpleITK orders it, and its spacing in the same axis order.

    Read as the input readers read images (`data.volumes.read_volume`): a truncated or garbled file is refused
    with a `CaseError` naming it (SimpleITK alone zero-fills the missing end of a truncated .nii.gz and a wrong
    score would follow).
    """
    image = read_volume(Path(path), patient_id, what="mask")
    return sitk.GetArrayViewFromImage(image) > 0, tuple(image.GetSpacing())[::-1]


def _nifti_files(folder: Path) -> dict[str, Path]:
    """`<pid>.nii.gz` / `<pid>.nii` files keyed by lower-case patient id."""
    files = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        name = path.name.lower()
        for suffix in (".nii.gz", ".nii"):
            if name.endswith(suffix) and path.is_file():
                files.setdefault(name[: -len(suffix)], path)
                break
    return files


def read_case_list(path: str | Path) -> list[str]:
    """Patient ids of a case-list file: one per line; blank lines and `#` comments are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"case list {path}: no such file")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not ids:
        raise PredictionsError(f"case list {path}: no patient ids in it (one per line)")
    return ids


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def _repeated(ids: list[str]) -> list[str]:
    """Ids present more than once, compared case-insensitively, in first-seen order."""
    seen: dict[str, int] = {}
    for pid in ids:
        seen[pid.lower()] = seen.get(pid.lower(), 0) + 1
    return list(dict.fromkeys(pid for pid in ids if seen[pid.lower()] > 1))


def _read_predictions(path: Path, known: Collection[str]) -> tuple[pd.DataFrame, bool]:
    """predictions.csv, checked, indexed by lower-case patient id: (columns pcr 0/1 and score, has scores).

    Args:
        path: the CSV (patient_id, pcr[, score]).
        known: lower-case ids of the dataset; any other id is an error.
    """
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise PredictionsError(f"{path}: not a CSV table with columns patient_id, pcr[, score]: {err}") from err
    table.columns = [str(c).strip().lower() for c in table.columns]
    absent = [c for c in ("patient_id", "pcr") if c not in table.columns]
    if absent:
        raise PredictionsError(f"{path}: missing column(s) {absent}; needs patient_id, pcr[, score]; "
                               f"found {list(table.columns)}")
    # A score column left entirely empty is no score at all; one blank among numbers is a bad value.
    has_score = "score" in table and (table.empty or (table["score"].str.strip() != "").any())
    rows = [{k: str(v).strip() for k, v in row.items()} for row in table.to_dict("records")]
    ids = [row["patient_id"] for row in rows]
    blank = [f"line {i + 2}" for i, pid in enumerate(ids) if not pid]  # line 1 is the header
    if blank:
        raise PredictionsError(f"{path}: empty patient_id on {_some(blank)}")
    if _repeated(ids):
        raise PredictionsError(f"{path}: patient(s) listed more than once: {_some(_repeated(ids))}")
    unknown = [pid for pid in ids if pid.lower() not in known]
    if unknown:
        raise PredictionsError(f"{path}: {len(unknown)} patient id(s) not in the dataset: {_some(unknown)}")
    pcr = [_number(row["pcr"]) for row in rows]
    score = [_number(row["score"]) if has_score else math.nan for row in rows]
    bad = []
    for i, row in enumerate(rows):
        if pcr[i] not in (0.0, 1.0):
            bad.append(f"line {i + 2} ({row['patient_id']}): pcr {row['pcr']!r}")
        if has_score and not 0.0 <= score[i] <= 1.0:  # NaN, inf and text fail too
            bad.append(f"line {i + 2} ({row['patient_id']}): score {row['score']!r}")
    if bad:
        raise PredictionsError(f"{path}: pcr must be 0 or 1 and score a number in [0, 1]; bad values on "
                               f"{_some(bad)}")
    return pd.DataFrame({"pcr": pcr, "score": score}, index=[pid.lower() for pid in ids], dtype=float), has_score


def _case_list(cases: Iterable[str] | str | Path | None, data_dir: Path, by_key: dict[str, Case],
               unreadable: set[str], notes: list[str]) -> tuple[list[Case], str]:
    """(cases to score, where the list came from): `cases`, else the test split, else every dataset case."""

    if cases is not None:
        source = f"case list {cases}" if isinstance(cases, str | Path) else "cases given"
        ids = read_case_list(cases) if isinstance(cases, str | Path) else list(cases)
        unknown = [pid for pid in ids if pid.lower() not in by_key]
        if unknown:
            raise PredictionsError(f"{source}: {len(unknown)} case(s) not in the dataset {data_dir}: {_some(unknown)}")
    else:
        try:
            ids, source = read_splits(data_dir)["test"], f"test split of {SPLITS}"
        except FileNotFoundError:
            ids, source = [c.patient_id for c in by_key.values()], "every dataset case (no split file)"
        except ValueError as err:
            raise PredictionsError(str(err)) from err
        for pid in (pid for pid in ids if pid.lower() not in by_key):
            why = "unreadable in the dataset" if pid.lower() in unreadable else "not in the dataset"
            notes.append(f"cases: {pid} is in the {SPLITS} test split but {why}; not scored")
        ids = [pid for pid in ids if pid.lower() in by_key]
    if _repeated(ids):
        raise PredictionsError(f"{source}: case(s) listed more than once: {_some(_repeated(ids))}")
    if not ids:
        raise PredictionsError(f"{source}: no case to score in {data_dir}")
    return [by_key[pid.lower()] for pid in ids], source


def _score_masks(cases: list[Case], preds: dict[str, Path], spacing_aware: bool, notes: list[str]) -> pd.DataFrame:
    """Per-case dsc, hd95, norm_hd (and expert_voxels, for picking overlays), indexed by patient_id."""
    rows = {}
    for case in cases:
        expert, spacing = _read_mask(case.mask_path, case.patient_id)
        pred_path = preds.get(case.patient_id.lower())
        if pred_path is None:  # a failed case: scored as an empty prediction, as the challenge scores it
            pred = np.zeros_like(expert)
        else:
            pred, _ = _read_mask(pred_path, case.patient_id)
            if pred.shape != expert.shape:
                raise CaseError(case.patient_id, pred_path, f"predicted mask shape {pred.shape} differs from the "
                                f"expert mask {case.mask_path} shape {expert.shape}")
        metrics = segmentation_case_metrics(pred, expert, spacing=spacing if spacing_aware else None)
        rows[case.patient_id] = {**metrics, "expert_voxels": int(expert.sum())}
    return pd.DataFrame.from_dict(rows, orient="index")


def _overlays(cases: list[Case], preds: dict[str, Path], per_case: pd.DataFrame) -> list:
    """Overlays (first post-contrast phase when present) of the worst and best case by DSC with a tumour."""

    with_tumour = per_case[per_case["expert_voxels"] > 0].sort_values("dsc", kind="stable")
    if with_tumour.empty:
        return []
    picks = {"worst": with_tumour.index[0], "best": with_tumour.index[-1]}
    by_id = {c.patient_id: c for c in cases}
    out = []
    for label, pid in picks.items() if len(with_tumour) > 1 else [("best", with_tumour.index[-1])]:
        case = by_id[pid]
        expert, _ = _read_mask(case.mask_path, pid)
        pred_path = preds.get(pid.lower())
        pred = _read_mask(pred_path, pid)[0] if pred_path is not None else np.zeros_like(expert)
        image = None
        phase = case.image_paths[1] if len(case.image_paths) > 1 else next(iter(case.image_paths), None)
        if phase is not None and Path(phase).is_file():
            try:
                image = sitk.GetArrayFromImage(sitk.ReadImage(str(phase))).astype(np.float32)
            except RuntimeError as err:  # the overlay is a courtesy: draw the masks alone rather than fail
                log.warning("case %s (%s): cannot read image for the overlay: %s", pid, phase, err)
            image = image if image is not None and image.shape == expert.shape else None  # mask grid = this grid
        title = f"{label}: {pid} (DSC {per_case.loc[pid, 'dsc']:.3f})"
        out.append(make_overlay(pid, expert, pred, image, title=title))
    return out


def _classification_inputs(
    pool: list[Case], table: pd.DataFrame, has_score: bool, notes: list[str]
) -> tuple[pd.Series, pd.Series, pd.Series | None, list[str]]:
    """(truth, hard prediction, score, ids without a prediction) indexed by the dataset's patient ids.

    A case without a prediction gets pCR 0 and score 0 (module docstring); score is None without a score column.
    """
    ids = pd.Index([c.patient_id for c in pool], name="patient_id")
    rows = table.reindex([c.patient_id.lower() for c in pool]).set_axis(ids)
    missing = ids[rows["pcr"].isna()].tolist()
    y_true = pd.Series([c.pcr for c in pool], index=ids, dtype=float)
    unknown = ids[y_true.isna()].tolist()
    if unknown:
        notes.append(f"classification: pCR truth unknown for {len(unknown)} case(s), counted as 0: {unknown[:10]}")
    return y_true, rows["pcr"].fillna(0.0), rows["score"].fillna(0.0) if has_score else None, missing


def evaluate(
    pred_dir: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    spacing_aware: bool = False,
    cases: Iterable[str] | str | Path | None = None,
) -> dict[str, Any]:
    """Score a prediction folder against a MAMA-MIA root; write `scores.json` and `report.md`.

    Args:
        pred_dir: holds `pred_segmentations/<pid>.nii.gz` and/or `predictions.csv` (patient_id, pcr, score).
        data_dir: MAMA-MIA root with expert masks and clinical metadata.
        out_dir: where scores.json, report.md and the plots go (created).
        spacing_aware: measure HD95 in mm (expert mask spacing) instead of voxel indices (official).
        cases: patient ids to score, or the path of a file of them (one per line). None: the test split of the
            dataset's split file, or every dataset case when it has none. A case without a prediction is scored
            as a failure (module docstring), never left out.

    Returns:
        The dict written to scores.json: "segmentation" and/or "classification" (absent when their prediction
        file or folder is absent), each with its "missing_predictions"; "missing_predictions" (ids missing in any
        task), "scored_cases" ({"source", "n"}) and "notes" (skipped inputs, fallbacks).

    Raises:
        PredictionsError: a bad predictions.csv or case list (named, with the offending rows or ids).
        CaseError: an unreadable mask, or a predicted mask on another grid than the expert one.
    """

    pred_dir, data_dir, out_dir = Path(pred_dir), Path(data_dir), Path(out_dir)
    notes: list[str] = []
    skipped: list[dict[str, str]] = []
    dataset = read_mamamia(data_dir, require_images=False, skipped=skipped)
    notes += [f"dataset: skipped {s['patient_id']}: {s['reason']}" for s in skipped]
    by_key = {c.patient_id.lower(): c for c in dataset}
    known = set(by_key) | {str(s["patient_id"]).lower() for s in skipped}
    selected, source = _case_list(cases, data_dir, by_key, known - set(by_key), notes)
    scored = {c.patient_id.lower() for c in selected}
    groups = subgroup_table(
        [{"patient_id": c.patient_id, **{k: c.meta.get(k) for k in ("age", "menopause", "density")}} for c in dataset]
    )
    scores: dict[str, Any] = {}
    overlays, reliability, missing = [], None, set()

    seg_dir = pred_dir / "pred_segmentations"
    if not seg_dir.is_dir():
        notes.append(f"segmentation: no folder {seg_dir}; not scored")
    else:
        seg_preds = _nifti_files(seg_dir)
        notes += [f"segmentation: {p.name} " + ("is not among the scored cases" if k in known else
                  "matches no dataset case") + "; ignored" for k, p in seg_preds.items() if k not in scored]
        seg_cases = [c for c in selected if c.mask_path is not None]
        notes += [f"segmentation: {c.patient_id} has no expert mask; not scored" for c in selected
                  if c.mask_path is None]
        if seg_cases:
            per_case = _score_masks(seg_cases, seg_preds, spacing_aware, notes)
            absent = [c.patient_id for c in seg_cases if c.patient_id.lower() not in seg_preds]
            if absent:
                notes.append(f"segmentation: no predicted mask for {len(absent)} case(s), each scored as an empty "
                             f"prediction (DSC 0, NormHD 1): {_some(absent)}")
            scores["segmentation"] = {**score_segmentation(per_case, groups, intervals=True),
                                      "missing_predictions": absent}
            overlays, missing = _overlays(seg_cases, seg_preds, per_case), missing | set(absent)
        else:
            notes.append("segmentation: no scored case has an expert mask; not scored")

    csv_path = pred_dir / "predictions.csv"
    if not csv_path.is_file():
        notes.append(f"classification: {csv_path} not found; not scored")
    else:
        table, has_score = _read_predictions(csv_path, known)
        notes += [f"classification: {k} is not among the scored cases; ignored" for k in table.index
                  if k not in scored]
        y_true, y_pred, score, absent = _classification_inputs(selected, table, has_score, notes)
    if csv_path.is_file() and y_true.isna().all():
        # Unknown truth counts as 0 (the challenge's rule); with no truth at all every score would be an artefact.
        notes.append(f"classification: none of the {len(y_true)} scored case(s) has a pCR truth; not scored")
    elif csv_path.is_file():
        if absent:
            notes.append(f"classification: no pCR prediction for {len(absent)} case(s), each counted as pCR 0"
                         + (" with score 0" if has_score else "") + f": {_some(absent)}")
        scores["classification"] = {**score_classification(y_true, y_pred, score, groups, intervals=True),
                                    "missing_predictions": absent}
        missing |= set(absent)
        if score is not None:  # calibration of the probabilities really predicted, not of the failures' zeros
            present = ~y_true.index.isin(absent)
            reliability = reliability_curve(y_true.to_numpy()[present], score.to_numpy()[present])

    for note in notes:
        log.warning(note)
    scores["missing_predictions"] = [c.patient_id for c in selected if c.patient_id in missing]
    scores["scored_cases"] = {"source": source, "n": len(selected)}
    scores["notes"] = notes
    scores = json_safe(scores)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "scores.json", json.dumps(scores, indent=2) + "\n")
    write_report(scores, out_dir, overlays=overlays, reliability=reliability)
    return scores


def headline(scores: dict) -> dict:
    """The summary numbers of a scores.json (no per-case or per-group tables)."""
    return {part: {k: v for k, v in values.items() if not isinstance(v, dict)}
            for part, values in scores.items() if isinstance(values, dict)}
