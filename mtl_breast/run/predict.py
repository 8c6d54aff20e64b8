"""`mtl-breast predict`: masks (NIfTI, on each case's original grid) and `predictions.csv` for a folder of cases.

Every requested case is predicted or listed with its reason; a case that fails loses its mask from an earlier run
in the same folder, so `evaluate` cannot score a stale file as this run's prediction.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from mtl_breast.acquisition import assumed_report, assumed_text
from mtl_breast.data.case import Case, CaseError
from mtl_breast.data.folder import read_dataset
from mtl_breast.data.mamamia import is_mamamia_root, read_splits
from mtl_breast.data.preprocess import original_image_reference
from mtl_breast.files import DiskFullError, NotWritableError, atomic_path, write_text
from mtl_breast.predictor import (
    InferenceSettings,
    check_device,
    load_joint_model,
    predict_case,
    read_weights_config,
)


def write_mask(mask: np.ndarray, geometry: dict, path: Path) -> Path:
    """Write a uint8 mask [D, H, W] (SimpleITK array order) with the original image's geometry, atomically."""
    ref = original_image_reference(geometry)
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    img.CopyInformation(ref)
    with atomic_path(path) as tmp:
        sitk.WriteImage(img, str(tmp), useCompression=True)
    return path


# The challenge's columns, then what the kinetic features assumed for the case (`acquisition.assumed_text`), then
# the calibrated pCR logit's terms by pathway (`PCRHead.parts`; empty where the model has no such pathway; they sum
# to logit(score)): the scorers read the first three and ignore the rest.
TERM_COLUMNS = {"tokens": "logit_tokens", "learned": "logit_learned", "kinetic": "logit_kinetic"}
CSV_COLUMNS = ("patient_id", "pcr", "score", "assumed_acquisition", *TERM_COLUMNS.values())


def write_predictions_csv(rows: list[dict], path: Path) -> Path:
    """`patient_id,pcr,score` as the challenge expects, then `assumed_acquisition` and the logit's terms, written
    atomically."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(CSV_COLUMNS))
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, text.getvalue())


def run_predictions(model: torch.nn.Module, cases: list[Case], out_dir: Path, settings: InferenceSettings,
                    write_masks: bool = True) -> dict:
    """Predict every case; a failing case is reported and the others still run.

    Writes `out_dir/pred_segmentations/<pid>.nii.gz` and `out_dir/predictions.csv`; returns
    {"done": [...], "skipped": [{"patient_id", "reason"}], "rows": [...], "assumed": the once-per-job report of
    the acquisition values assumed for the predicted cases (`acquisition.assumed_report`)}. The caller reports the
    skipped cases and the assumed values (once; nothing is logged here). A skipped case's mask from an earlier run
    in `out_dir` is removed, so it cannot be scored as this run's prediction.

    Raises:
        DiskFullError, NotWritableError: a mask could not be written whole (no room, a read-only folder); the masks
            already written stay, the one that failed keeps its earlier version, and predictions.csv is not rewritten.
    """
    out_dir = Path(out_dir)
    model.eval()
    rows, skipped, done, assumed = [], [], [], []
    for case in cases:
        mask_path = out_dir / "pred_segmentations" / f"{case.patient_id}.nii.gz"
        try:
            terms: dict[str, float] = {}
            mask, geometry, score = predict_case(model, case, settings, terms)
            if write_masks:
                write_mask(mask, geometry, mask_path)
        except (DiskFullError, NotWritableError):  # no room or no right for this mask: none for the next
            raise
        except (CaseError, RuntimeError, ValueError, OSError, MemoryError) as err:
            why = str(err) or type(err).__name__  # a MemoryError has no message
            reason = why if isinstance(err, CaseError) else f"case {case.patient_id}: {why}"
            skipped.append({"patient_id": case.patient_id, "reason": reason})
            mask_path.unlink(missing_ok=True)
            continue
        # The decision is taken on the score as written, so the CSV never shows a score at or above the threshold
        # next to pcr 0 (a probability 1 - 1e-7 is written as 1.0; a threshold chosen on saturated scores can be 1.0).
        score = round(score, 6)
        assumed.append(case.assumed())  # what preprocessing recorded as the case's info["assumed"]
        rows.append({"patient_id": case.patient_id, "pcr": int(score >= settings.pcr_threshold), "score": score,
                     "assumed_acquisition": assumed_text(assumed[-1]),
                     **{col: round(terms[name], 6) if name in terms else "" for name, col in TERM_COLUMNS.items()}})
        done.append(case.patient_id)
    write_predictions_csv(rows, out_dir / "predictions.csv")
    return {"done": done, "skipped": skipped, "rows": rows, "assumed": assumed_report(assumed)}


def predict_dataset(weights: Path | str, data: Path | str, out: Path | str, *, device: str | None = None,
                    split: str | None = "test", **overrides) -> dict:
    """`mtl-breast predict`: load exported weights, predict the cases of a dataset root.

    Args:
        weights: exported weights folder (model.safetensors + config.json).
        data: MAMA-MIA root or folder of cases.
        out: output folder.
        device: torch device; default CUDA when available.
        split: for a MAMA-MIA root with a split file, which split to predict ("test", "train" or None = all).
        overrides: InferenceSettings fields (tta_flips, overlap, largest_component ...).
    """
    weights, data, out = Path(weights), Path(data), Path(out)
    # Every setting is checked before the model is built and before anything in `out` is touched: a bad flag
    # must not cost the masks and the predictions.csv of an earlier run.
    settings = InferenceSettings.from_config(read_weights_config(weights), **overrides)
    check_device(device)
    if not data.is_dir():
        raise FileNotFoundError(f"data folder {data} does not exist")
    model, _ = load_joint_model(weights, device)
    # Cases the reader could not even list (a missing phase file, an empty case folder, a split id without a
    # folder ...) are skipped too, and said so: every requested case is predicted or reported.
    unreadable: list[dict[str, str]] = []
    cases = read_dataset(data, skipped=unreadable)
    what = f"in {data}"
    if split and is_mamamia_root(data) and (data / "train_test_splits.csv").exists():
        splits = read_splits(data)
        if split not in splits:
            raise ValueError(f"unknown split {split!r} for {data}: use one of {sorted(splits)} or all")
        wanted = {p.lower() for p in splits[split]}
        cases = [c for c in cases if c.patient_id.lower() in wanted]
        unreadable = [s for s in unreadable if str(s["patient_id"]).lower() in wanted]
        what = f"in the {split} split of {data / 'train_test_splits.csv'}"
    if not cases and not unreadable:  # nothing to predict is an error of the job, not an empty success
        raise FileNotFoundError(f"no cases to predict {what} (expected images/<PID>/<pid>_0000.nii.gz, or one "
                                "folder of phase files per case)")
    report = run_predictions(model, cases, out, settings)
    report["skipped"] = unreadable + report["skipped"]
    report["out"] = str(out)
    return report
