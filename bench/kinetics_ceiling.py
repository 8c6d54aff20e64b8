"""How much pCR signal the tumour's kinetics carry, measured from the images and from the phantoms' truth. JSON.

Cross-validated logistic regressions on the labelled TRAINING cases of one or more demo runs (no held-out case is
read): features under the expert mask (curve summaries of `models.kinetics`, a Tofts fit of the mean
relative-enhancement curve, and the tumour's contrast concentration from inverting the spoiled-gradient-echo
signal equation, `models.kinetics.tumour_concentration`, and a Tofts fit of that concentration with the arrival
searched) next to the generating model's own tumour radius, Ktrans and kep read from the phantoms' truth files
(`phantoms.collection.read_truth`), and next to the same concentration features and Tofts fit computed from the
noise-free Tofts curve at the case's acquisition times (what a perfect estimate from the images could reach:
Ktrans and kep themselves are not identifiable from 3-6 late samples). The gaps say how much a better kinetic
estimate could add, and where it is lost: per enhancement pattern, the
cross-validated AUC within the pattern and the offset of the image's washout from the noise-free one (a pooled
regression reads every pattern on one scale), next to the rim-aware sets (`models.kinetics.tumour_rim_concentration`
on the surface layer and one layer below it);
and for the image features, the AUC when the held-out folds' features come from the expert mask grown or shrunk by
one voxel (a predicted boundary is rarely exact).

    python bench/kinetics_ceiling.py runs/science/seed0 runs/science/seed1 runs/science/seed2

The noise-free reference assumes the fixed physics (Parker input, extended Tofts): on randomised phantoms it is
only an approximation (other input forms, the 2CXM family, B1, motion).
"""

from __future__ import annotations

import argparse
import functools
import json

import numpy as np
import torch
from monai.transforms.utils_morphological_ops import dilate, erode

from mtl_breast.baselines import LogisticBaseline, case_features
from mtl_breast.data.cache import CaseCache
from mtl_breast.data.dataset import acquisition_vector
from mtl_breast.data.mamamia import read_splits
from mtl_breast.metrics.classification import roc_auc
from mtl_breast.models.kinetics import (
    FEATURE_SETS,
    enhancing_half,
    spgr_concentration,
)
from mtl_breast.phantoms.collection import read_truth
from mtl_breast.phantoms.physics import tofts_concentration
from mtl_breast.predictor import InferenceSettings, read_weights_config

_KEP_GRID = np.logspace(-1, 1.3, 48)  # /min
_ARRIVAL_S = 15.0  # assumed bolus arrival after the pre-contrast acquisition
_ARRIVAL_GRID_S = (10.0, 15.0, 20.0, 25.0)  # the phantoms draw arrival in 10-25 s
_RIM_SET = "rim-aware concentration (the same with rim index and surface-layer washout instead of core ratio)"
_INNER_RIM_SET = "inner-rim concentration (the rim-aware set read one voxel layer below the surface)"

# The study's feature combinations, by display label; the package's named sets come from
# `models.kinetics.FEATURE_SETS`, the others exist only here (fits and the phantoms' TRUE parameters).
CEILING_SETS = {
    "log volume": ("log_volume",),
    "log volume + washout per minute": ("log_volume", "washout_per_min"),
    "log volume + wash-in + washout ratio": ("log_volume", "wash_in", "washout_ratio"),
    "all six kinetic features": ("log_volume", "wash_in", "peak_enhancement", "washout_ratio", "washout_per_min",
                                 "contrast_to_surround"),
    "log volume + Tofts ln kep": ("log_volume", "tofts_ln_kep"),
    "log volume + Tofts ln kep + ln amplitude": ("log_volume", "tofts_ln_kep", "tofts_ln_amplitude"),
    "log volume + concentration (phase 1, last, log slope)": ("log_volume", "ln_conc_first", "ln_conc_last",
                                                              "conc_log_slope"),
    "concentration baseline (the same + core ratio)": FEATURE_SETS["concentration"],
    _RIM_SET: FEATURE_SETS["rim"],
    _INNER_RIM_SET: FEATURE_SETS["rim_inner"],
    "log volume + Tofts fit of the tumour concentration (ln Ktrans, ln kep)": ("log_volume", "conc_tofts_ln_ktrans",
                                                                            "conc_tofts_ln_kep"),
    "log volume + Tofts fit of the noise-free concentration (true arrival, with vp)": (
        "log_volume", "ideal_tofts_ln_ktrans", "ideal_tofts_ln_kep"),
    "TRUE radius + noise-free concentration (phase 1, last, log slope)": ("true_radius", "ideal_ln_first",
                                                                          "ideal_ln_last", "ideal_log_slope"),
    "log volume + noise-free concentration (phase 1, last, log slope)": ("log_volume", "ideal_ln_first",
                                                                         "ideal_ln_last", "ideal_log_slope"),
    "TRUE radius": ("true_radius",),
    "TRUE ln kep": ("true_ln_kep",),
    "TRUE ln Ktrans": ("true_ln_ktrans",),
    "TRUE radius + ln kep": ("true_radius", "true_ln_kep"),
    "TRUE radius + ln Ktrans + ln kep": ("true_radius", "true_ln_ktrans", "true_ln_kep"),
}


@functools.lru_cache(maxsize=4096)
def _tofts_basis(times_s: tuple, arrival_s: float) -> tuple[np.ndarray, np.ndarray]:
    """``([K, T], [T])``: the Tofts tissue curve per kep of `_KEP_GRID` at Ktrans 1, ve 1/kep, and the plasma AIF."""
    curves = np.stack([np.asarray(tofts_concentration(np.array([1.0]), np.array([1.0 / kep]), np.array([0.0]),
                                                      list(times_s), arrival_s)).reshape(-1) for kep in _KEP_GRID])
    plasma = np.asarray(tofts_concentration(np.array([0.0]), np.array([1.0]), np.array([1.0]), list(times_s),
                                            arrival_s)).reshape(-1)
    return curves, plasma


def tofts_fit(curve: np.ndarray, times_s: np.ndarray, arrivals_s: tuple[float, ...] = (_ARRIVAL_S,),
              with_vp: bool = False, nonnegative: bool = False) -> tuple[float, float]:
    """(amplitude, kep) of ``curve[1:] ~ amplitude * C(t; Ktrans=1, kep) [+ vp * Cp(t)]``: least squares over a grid
    of kep and bolus arrival times, amplitude (and vp) solved per grid point. On a concentration curve the amplitude
    is Ktrans (/min); `nonnegative` keeps it and vp >= 0, as physics does (the relative-enhancement fit of a
    falling curve is left free to take a negative amplitude)."""
    y = np.asarray(curve, dtype=np.float64)[1:]
    best = (np.inf, 0.0, 1.0)
    for arrival in arrivals_s:
        curves, plasma = _tofts_basis(tuple(times_s), float(arrival))  # times as given (float32 from the cache)
        for kep, tissue in zip(_KEP_GRID, curves[:, 1:], strict=True):
            columns = np.stack([tissue, plasma[1:]], axis=1) if with_vp else tissue[:, None]
            residual, amplitude = _least_squares(columns, y, nonnegative)
            if residual < best[0]:
                best = (residual, amplitude, float(kep))
    return best[1], best[2]


def _least_squares(columns: np.ndarray, y: np.ndarray, nonnegative: bool) -> tuple[float, float]:
    """(residual sum of squares, first coefficient) of ``y ~ columns @ coef`` ([T, 1] or [T, 2] columns), with
    ``coef >= 0`` if `nonnegative` (for two columns: the free solution, else the best one-column solution)."""
    coef = np.linalg.lstsq(columns, y, rcond=None)[0]
    if nonnegative and (coef < 0).any():
        candidates = [np.zeros(columns.shape[1])]
        for k in range(columns.shape[1]):
            c = columns[:, k]
            candidates.append(np.eye(columns.shape[1])[k] * max(float(y @ c / max(c @ c, 1e-12)), 0.0))
        coef = min(candidates, key=lambda v: float(((y - columns @ v) ** 2).sum()))
    return float(((y - columns @ coef) ** 2).sum()), float(coef[0])


def enhancing_concentration_curve(image: torch.Tensor, mask: torch.Tensor, normalization: dict,
                                  acquisition: torch.Tensor) -> np.ndarray:
    """``[T]`` mean contrast concentration (mM) of the tumour's enhancing half (`models.kinetics.enhancing_half`,
    the region `models.kinetics.tumour_concentration` reads), from ``[T, D, H, W]`` preprocessed phases."""
    signal = image.float()[:, mask] * normalization["std"] + normalization["mean"]  # [T, V] scanner units
    acq = acquisition[None]
    conc = spgr_concentration(signal[None], signal[None, :1], acq[:, 2], acq[:, 3], acq[:, 4])[0]  # [T, V]
    weights = enhancing_half(conc[1][None], torch.ones_like(conc[1], dtype=torch.bool)[None])[0]  # [V]
    return ((conc * weights).sum(dim=1) / weights.sum()).numpy()


def concentration_features(curve: np.ndarray, times_s: np.ndarray, prefix: str) -> dict[str, float]:
    """ln C at phase 1 and at the last phase, and ln(C_last / C_1) per minute between them (noise-free curve)."""
    first, last = max(float(curve[1]), 1e-3), max(float(curve[-1]), 1e-3)
    minutes = max((float(times_s[-1]) - float(times_s[1])) / 60.0, 1e-3)
    return {f"{prefix}_ln_first": np.log(first), f"{prefix}_ln_last": np.log(last),
            f"{prefix}_log_slope": float(np.log(last / first) / minutes)}


def shifted_mask(mask: torch.Tensor, step: int) -> torch.Tensor:
    """The bool ``[D, H, W]`` mask grown (`step` = +1) or shrunk (-1) by one voxel (3^3 MONAI dilate / erode): where a
    predicted boundary may lie against the expert one."""
    x = mask.float()[None, None]
    out = dilate(x, filter_size=3) if step > 0 else erode(x, filter_size=3)
    return out[0, 0] > 0.5


def training_rows(run: str) -> tuple[list[dict], list[float]]:
    settings = InferenceSettings.from_config(read_weights_config(f"{run}/weights/mtl"))
    cache = CaseCache(f"{run}/cache/data", settings.preprocess)
    rows, labels = [], []
    for pid in read_splits(f"{run}/data")["train"]:
        case = cache.read(pid)
        pcr = case["info"].get("pcr")
        if pcr is None or case["label"] is None:
            continue
        norm = case["info"]["normalization"]
        mask = case["label"].bool()
        curve = (case["image"].float()[:, mask].mean(1) * norm["std"] + norm["mean"]).numpy()  # original units
        amplitude, kep = tofts_fit((curve - curve[0]) / max(abs(curve[0]), 1e-3), case["phase_time"].numpy())
        truth = read_truth(f"{run}/data", pid)
        truth["bolus_arrival_s"] = truth["aif"]["arrival_s"]
        times = case["phase_time"].numpy()
        # The sequence as run (the truth file): randomised phantoms never record the flip angle.
        meta = {**case["info"]["meta"], "repetition_time": truth["repetition_time"], "flip_angle": truth["flip_angle"]}
        ideal = np.asarray(tofts_concentration(np.array([truth["ktrans"]]), np.array([truth["ve"]]),
                                               np.array([truth["vp"]]), list(times), truth["bolus_arrival_s"]))
        acquisition = acquisition_vector(case["info"]["normalization"], meta)
        # Concentration-domain Tofts fits: of the image's enhancing half (arrival unknown: a grid), and of the
        # noise-free curve with everything the images cannot tell (true arrival, the vp term) given.
        conc_ktrans, conc_kep = tofts_fit(enhancing_concentration_curve(case["image"], mask, norm, acquisition),
                                          times, _ARRIVAL_GRID_S, nonnegative=True)
        ideal_ktrans, ideal_kep = tofts_fit(ideal.reshape(-1), times, (truth["bolus_arrival_s"],), with_vp=True,
                                            nonnegative=True)
        # The same features under the expert mask grown and shrunk by one voxel (boundary sensitivity).
        shifted = {name: case_features(case["image"], shifted_mask(mask, step), case["phase_time"], settings.roi_size,
                                       acquisition) for name, step in (("dilated", 1), ("eroded", -1))}
        rows.append({**case_features(case["image"], case["label"], case["phase_time"], settings.roi_size,
                                     acquisition), **shifted,
                     "conc_tofts_ln_ktrans": float(np.log(max(conc_ktrans, 1e-4))),
                     "conc_tofts_ln_kep": float(np.log(conc_kep)),
                     "ideal_tofts_ln_ktrans": float(np.log(max(ideal_ktrans, 1e-4))),
                     "ideal_tofts_ln_kep": float(np.log(ideal_kep)),
                     **concentration_features(ideal.reshape(-1), times, "ideal"),
                     "pattern": truth["enhancement_pattern"],
                     "tofts_ln_kep": float(np.log(kep)), "tofts_ln_amplitude": float(np.log(max(amplitude, 1e-3))),
                     "true_radius": truth["radius_mm"], "true_ln_ktrans": float(np.log(truth["ktrans"])),
                     "true_ln_kep": float(np.log(truth["ktrans"] / truth["ve"]))})
        labels.append(float(pcr))
    return rows, labels


def cross_validated_auc(rows: list[dict], labels: np.ndarray, features: tuple[str, ...], repeats: int,
                        scored_as: str | None = None) -> list[float]:
    """AUC per repeat of 5-fold cross-validation; with `scored_as` ("dilated" or "eroded") each held-out fold is
    scored with its features under that shifted mask (the regression is always fitted on expert-mask features)."""
    aucs = []
    for repeat in range(repeats):
        order = np.random.default_rng(repeat).permutation(len(labels))
        scores = np.zeros(len(labels))
        for fold in np.array_split(order, 5):
            train = np.setdiff1d(order, fold)
            model = LogisticBaseline(features).fit([rows[i] for i in train], labels[train])
            scores[fold] = model.predict_proba([rows[i][scored_as] if scored_as else rows[i] for i in fold])
        aucs.append(roc_auc(labels, scores))
    return aucs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="demo work folders (data/, cache/data, weights/mtl)")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    rows, labels = [], []
    for run in args.runs:
        r, y = training_rows(run)
        rows, labels = rows + r, labels + y
    y = np.array(labels)
    table = {}
    for name, features in CEILING_SETS.items():
        aucs = cross_validated_auc(rows, y, features, args.repeats)
        table[name] = {"cv_auc": float(np.mean(aucs)), "sd_over_repeats": float(np.std(aucs))}
        if all(f in rows[0]["dilated"] for f in features):  # image features: how they fare one voxel off
            for shift in ("dilated", "eroded"):
                table[name][f"cv_auc scored on {shift} masks"] = float(np.mean(
                    cross_validated_auc(rows, y, features, args.repeats, scored_as=shift)))
    truth = {k: np.array([r[k] for r in rows]) for k in ("true_ln_ktrans", "true_ln_kep")}
    correlation = {f"{f} vs {k}": float(np.corrcoef([r[f] for r in rows], truth[k])[0, 1])
                   for f in ("wash_in", "washout_per_min", "tofts_ln_kep", "conc_tofts_ln_ktrans", "conc_tofts_ln_kep",
                             "ideal_tofts_ln_kep") for k in truth}
    # How well the image concentration follows the noise-free one, per enhancement pattern.
    by_pattern = {}
    for pattern in sorted({r["pattern"] for r in rows}):
        sub = [r for r in rows if r["pattern"] == pattern]
        by_pattern[pattern] = {"cases": len(sub)}
        for part, feature in (("ln_first", "ln_conc_first"), ("ln_last", "ln_conc_last"),
                              ("log_slope", "conc_log_slope")):
            image, ideal = [r[feature] for r in sub], [r[f"ideal_{part}"] for r in sub]
            by_pattern[pattern][f"corr {part}"] = float(np.corrcoef(image, ideal)[0, 1])
    # Within each enhancement pattern on its own, and how far the image's washout lies from the noise-free one:
    # a pooled regression reads one scale of washout for all patterns, so an offset by pattern costs AUC there.
    non_rim = np.array([r["pattern"] != "rim" for r in rows])
    for feature in ("conc_log_slope", "shell_log_slope", "inner_shell_log_slope"):
        image = np.array([r[feature] for r in rows])
        ideal = np.array([r["ideal_log_slope"] for r in rows])
        fit = np.polyfit(ideal[non_rim], image[non_rim], 1)  # the image washout as the other patterns relate it
        residual = image - np.polyval(fit, ideal)
        for pattern in by_pattern:
            sub = np.array([r["pattern"] == pattern for r in rows])
            by_pattern[pattern][f"{feature} offset from non-rim fit"] = float(residual[sub].mean())
            by_pattern[pattern][f"{feature} sd around it"] = float(residual[sub].std())
    for pattern in by_pattern:
        sub = [i for i, r in enumerate(rows) if r["pattern"] == pattern]
        for index in ("rim_index", "inner_rim_index"):
            by_pattern[pattern][f"{index} quartiles"] = np.percentile([rows[i][index] for i in sub],
                                                                      [25, 50, 75]).round(3).tolist()
        for name in ("log volume", "concentration baseline (the same + core ratio)", _RIM_SET, _INNER_RIM_SET,
                     "log volume + noise-free concentration (phase 1, last, log slope)"):
            aucs = cross_validated_auc([rows[i] for i in sub], y[sub], CEILING_SETS[name], args.repeats)
            by_pattern[pattern][f"cv_auc {name}"] = float(np.mean(aucs))
    print(json.dumps({"runs": args.runs, "cases": len(y), "positives": int(y.sum()), "folds": 5,
                      "repeats": args.repeats, "table": table, "correlation": correlation,
                      "image_vs_noise_free_concentration": by_pattern}, indent=2))


if __name__ == "__main__":
    main()
