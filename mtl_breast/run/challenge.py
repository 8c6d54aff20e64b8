"""MAMA-MIA challenge adapter: the `Model(dataset)` class the submission platform instantiates.

The platform hands over a restricted dataset offering `get_patient_id_list()`,
`get_dce_mri_path_list(pid)` (phase 0 pre-contrast first) and `read_json_file(pid)` (breast box and
imaging metadata; no labels), then calls `predict_segmentation(output_dir)` (writes
`pred_segmentations/<pid>.nii.gz`) and `predict_classification(output_dir)` (returns and writes a
`patient_id, pcr, score` table), or `predict_segmentation_and_classification(output_dir)`.
The weights folder comes from the `weights` argument or the MTL_BREAST_WEIGHTS environment variable.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

from mtl_breast.data.case import Case
from mtl_breast.predictor import InferenceSettings, load_joint_model
from mtl_breast.run.predict import run_predictions

log = logging.getLogger(__name__)


def _breast_box(info: dict) -> tuple[int, int, int, int, int, int] | None:
    coords = (info.get("primary_lesion") or {}).get("breast_coordinates")
    if not coords:
        return None
    return tuple(int(coords[k]) for k in ("x_min", "x_max", "y_min", "y_max", "z_min", "z_max"))  # type: ignore


def _acquisition_times(imaging: dict, num_phases: int) -> list[float] | None:
    # As the MAMA-MIA reader does: the JSON's times when they fit the phases, else unknown (phase index used).
    times = imaging.get("acquisition_times")
    if not isinstance(times, list) or len(times) != num_phases:
        return None
    try:
        return [float(t) for t in times]
    except (TypeError, ValueError):
        return None


class Model:
    """Joint segmentation + pCR submission for the MAMA-MIA challenge.

    Args:
        dataset: the platform's restricted dataset (see module docstring).
        weights: exported weights folder; default $MTL_BREAST_WEIGHTS.
        device: torch device; default CUDA when available.
        tta_flips: flip test-time augmentation (4x slower, usually a little better).
    """

    def __init__(self, dataset, weights: str | os.PathLike | None = None, device: str | None = None,
                 tta_flips: bool = False):
        self.dataset = dataset
        weights = weights or os.environ.get("MTL_BREAST_WEIGHTS")
        if not weights:
            raise ValueError("no weights folder: pass weights=... or set MTL_BREAST_WEIGHTS")
        self.weights = Path(weights)
        self.model, config = load_joint_model(self.weights, device)
        self.settings = InferenceSettings.from_config(config, tta_flips=tta_flips)
        self.predicted_segmentations: str | None = None
        self._table: pd.DataFrame | None = None

    def _cases(self) -> list[Case]:
        cases = []
        for pid in self.dataset.get_patient_id_list():
            info = self.dataset.read_json_file(pid) or {}
            imaging = dict(info.get("imaging_data") or {})
            paths = [Path(p) for p in self.dataset.get_dce_mri_path_list(pid)]
            cases.append(Case(patient_id=pid, image_paths=paths, breast_box=_breast_box(info), meta=imaging,
                              acquisition_times=_acquisition_times(imaging, len(paths))))
        return cases

    def predict_segmentation_and_classification(self, output_dir: str) -> pd.DataFrame:
        report = run_predictions(self.model, self._cases(), Path(output_dir), self.settings)
        for item in report["skipped"]:  # the challenge scores these as failures; say why in the container log
            log.error("skipped %s", item["reason"])
        log.info("%s", report["assumed"]["line"])  # the JSONs give no flip angle: say what the kinetics assumed
        self.predicted_segmentations = str(Path(output_dir) / "pred_segmentations")
        self._table = pd.DataFrame(report["rows"], columns=["patient_id", "pcr", "score"])
        return self._table

    def predict_segmentation(self, output_dir: str) -> str:
        self.predict_segmentation_and_classification(output_dir)
        return self.predicted_segmentations  # type: ignore[return-value]

    def predict_classification(self, output_dir: str) -> pd.DataFrame:
        # One forward pass gives both outputs; reuse it when segmentation already ran.
        if self._table is None:
            self.predict_segmentation_and_classification(output_dir)
        return self._table  # type: ignore[return-value]
