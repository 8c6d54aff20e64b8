"""The baselines a user tries before a foundation model: logistic regression on tumour size and kinetics.

Features come from `models.kinetics`: the curve summaries of `tumour_kinetics` (the same numbers the pCR head's
kinetic pathway sees) and the contrast concentration of `tumour_concentration` and `tumour_rim_concentration`,
computed on the same window
(centred on the tumour's largest component, `data.window`) of the preprocessed case, under the expert mask or a
predicted probability. A pCR model earns its keep only if it beats these on cases it never saw
(docs/RESULTS.md). The feature sets are those of `models.kinetics.FEATURE_SETS`:

    size           log tumour volume
    kinetic        log volume + wash-in + washout ratio of the mean tumour curve
    curve          all six curve features
    concentration  log volume + the tumour's concentration at phase 1 and at the last phase, its log slope per
                   minute and the core/whole enhancement ratio (signal equation inverted per voxel)
    rim            the same, with the rim index and the washout of the tumour's surface layer instead of the
                   core ratio (`tumour_rim_concentration`)
    rim_inner      the same as rim, read one voxel layer below the tumour's surface
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize

from mtl_breast.data.cache import CaseCache
from mtl_breast.data.dataset import acquisition_vector
from mtl_breast.data.window import tumour_window
from mtl_breast.models.kinetics import (
    KINETIC_FEATURES,
    concentration_feature_sets,
    tumour_kinetics,
)

__all__ = ["LogisticBaseline", "case_acquisition", "case_features", "labelled_features"]



def case_features(image: np.ndarray | torch.Tensor, tumour: np.ndarray | torch.Tensor,
                  phase_time: np.ndarray | torch.Tensor | None, roi: Sequence[int],
                  acquisition: torch.Tensor | None = None) -> dict[str, float]:
    """Kinetic features of one preprocessed case on the pCR window.

    Args:
        image: ``[T, D, H, W]`` preprocessed phases.
        tumour: ``[D, H, W]`` expert mask or predicted probability on the same grid; the voxels >= 0.5 are the
            tumour for every feature set, as the pCR head reads its predicted mask (a probability's low tail
            outside the tumour would otherwise add to the curve set's log_volume, which every set shares).
        phase_time: ``[T]`` seconds after pre-contrast (NaN unknown), or None.
        roi: the window size (the model's training crop).
        acquisition: ``[5]`` `data.dataset.acquisition_vector` of the case; None leaves the concentration
            features NaN.

    Returns:
        ``{feature name: value}`` for every name in `KINETIC_FEATURES`, `CONCENTRATION_FEATURES`,
        `RIM_FEATURES` and `INNER_RIM_FEATURES`.
    """
    x = torch.as_tensor(np.asarray(image), dtype=torch.float32)  # [T, D, H, W]
    p = (torch.as_tensor(np.asarray(tumour), dtype=torch.float32) >= 0.5).float()  # [D, H, W] mask
    window = tumour_window(torch.cat([x, p[None]]), p, roi)[None]  # phases and mask cut alike: [1, T + 1, ...]
    times = None if phase_time is None else torch.as_tensor(np.asarray(phase_time), dtype=torch.float32)[None]
    values = tumour_kinetics(window[:, :-1], window[:, -1:], phase_time=times)[0].tolist()
    acq = None if acquisition is None else torch.as_tensor(acquisition, dtype=torch.float32).reshape(1, -1)
    sets = concentration_feature_sets(window[:, :-1], window[:, -1:], phase_time=times, acquisition=acq)
    # Every set starts with log_volume (the same number on a mask), and the concentration sets share four columns.
    features = {}
    for names, columns in sets.items():
        features.update(zip(names, columns[0].tolist(), strict=True))
    return {**features, **dict(zip(KINETIC_FEATURES, values, strict=True))}


def case_acquisition(info: dict) -> torch.Tensor:
    """The ``[5]`` acquisition vector of a cached case's ``info`` (its normalisation and sequence metadata)."""
    return acquisition_vector(info.get("normalization"), info.get("meta"))


def labelled_features(cache: CaseCache, patient_ids: Sequence[str],
                      roi: Sequence[int]) -> tuple[list[str], list[dict[str, float]], list[float]]:
    """Expert-mask kinetic features and pCR of the cached cases that have both; others are left out.

    Returns:
        ``(patient ids, feature rows, pCR labels)`` in the order of ``patient_ids``.
    """
    keep, rows, labels = [], [], []
    for pid in patient_ids:
        if not cache.has(pid):
            continue
        case = cache.read(pid)
        pcr = case["info"].get("pcr")
        if pcr is None or case["label"] is None:
            continue
        keep.append(pid)
        rows.append(case_features(case["image"], case["label"], case["phase_time"], roi,
                                  case_acquisition(case["info"])))
        labels.append(float(pcr))
    return keep, rows, labels


@dataclass
class LogisticBaseline:
    """L2-regularised logistic regression on standardised features (fitted with L-BFGS).

    Attributes:
        features: names of the columns it uses.
        l2: penalty on the weights (not the intercept), per training case.
    """

    features: tuple[str, ...]
    l2: float = 1e-2
    mean_: np.ndarray | None = None
    std_: np.ndarray | None = None
    coef_: np.ndarray | None = None

    def _matrix(self, rows: Sequence[dict[str, float]]) -> np.ndarray:
        return np.array([[float(r[f]) for f in self.features] for r in rows], dtype=np.float64)

    def fit(self, rows: Sequence[dict[str, float]], y: Sequence[float]) -> LogisticBaseline:
        x, y = self._matrix(rows), np.asarray(y, dtype=np.float64)
        if len(np.unique(y)) != 2:
            raise ValueError(f"a logistic baseline needs both pCR classes among its training cases, got {set(y)}")
        self.mean_, self.std_ = x.mean(0), x.std(0) + 1e-9
        z = np.c_[np.ones(len(x)), (x - self.mean_) / self.std_]

        def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
            logits = z @ w
            nll = np.logaddexp(0.0, logits) - y * logits
            grad = z.T @ (1.0 / (1.0 + np.exp(-logits)) - y)
            penalty = np.r_[0.0, w[1:]]
            n = len(y)
            return float(nll.sum() / n + 0.5 * self.l2 * penalty @ penalty), grad / n + self.l2 * penalty

        self.coef_ = minimize(loss, np.zeros(z.shape[1]), jac=True, method="L-BFGS-B").x
        return self

    def predict_proba(self, rows: Sequence[dict[str, float]]) -> np.ndarray:
        if self.coef_ is None:
            raise RuntimeError("fit the baseline first")
        z = np.c_[np.ones(len(rows)), (self._matrix(rows) - self.mean_) / self.std_]
        return 1.0 / (1.0 + np.exp(-(z @ self.coef_)))
