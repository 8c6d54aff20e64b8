"""How much pCR signal the tumour's kinetics carry, measured from the images and from the phantoms' truth. JSON.

Cross-validated logistic regressions on the labelled TRAINING cases of one or more demo runs (no held-out case is
read): features under the expert mask (curve summaries of `models.kinetics`, a Tofts fit of the mean
relative-enhancement curve, and the tumour's contrast concentration from inverting the spoiled-gradient-echo
signal equation, `models.kinetics.tumour_concentration`) next to the generating model's own tumour
radius, Ktrans and kep read from the phantoms' `patient_info_files/*.json`, and next to the same concentration
features computed from the noise-free Tofts curve at the case's acquisition times (what a perfect estimate from
the images could reach: Ktrans and kep themselves are not identifiable from 3-6 late samples). The gaps say how
much a better kinetic estimate could add, and where it is lost (per enhancement pattern).

    python bench/kinetics_ceiling.py runs/science/seed0 runs/science/seed1 runs/science/seed2
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from mtl_breast.baselines import LogisticBaseline, case_features
from mtl_breast.data.cache import CaseCache
from mtl_breast.data.mamamia import read_splits
from mtl_breast.metrics.classification import roc_auc
from mtl_breast.models.kinetics import CONCENTRATION_FEATURES, acquisition_vector
from mtl_breast.phantoms.physics import tofts_concentration
from mtl_breast.predictor import InferenceSettings, read_weights_config

_KEP_GRID = np.logspace(-1, 1.3, 48)  # /min
_ARRIVAL_S = 15.0  # assumed bolus arrival after the pre-contrast acquisition

FEATURE_SETS = {
    "log volume": ("log_volume",),
    "log volume + washout per minute": ("log_volume", "washout_per_min"),
    "log volume + wash-in + washout ratio": ("log_volume", "wash_in", "washout_ratio"),
    "all six kinetic features": ("log_volume", "wash_in", "peak_enhancement", "washout_ratio", "washout_per_min",
                                 "contrast_to_surround"),
    "log volume + Tofts ln kep": ("log_volume", "tofts_ln_kep"),
    "log volume + Tofts ln kep + ln amplitude": ("log_volume", "tofts_ln_kep", "tofts_ln_amplitude"),
    "log volume + concentration (phase 1, last, log slope)": ("log_volume", "ln_conc_first", "ln_conc_last",
                                                              "conc_log_slope"),
    "concentration baseline (the same + core ratio)": CONCENTRATION_FEATURES,
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


def tofts_fit(relative: np.ndarray, times_s: np.ndarray) -> tuple[float, float]:
    """(amplitude, kep) of ``relative[1:] ~ amplitude * C(t; Ktrans=1, kep)`` by a grid over kep (least squares)."""
    best = (np.inf, 0.0, 1.0)
    for kep in _KEP_GRID:
        conc = np.asarray(tofts_concentration(np.array([1.0]), np.array([1.0 / kep]), np.array([0.0]),
                                              list(times_s), _ARRIVAL_S)).reshape(-1)[1:]
        amplitude = float(relative[1:] @ conc / max(conc @ conc, 1e-12))
        residual = float(((relative[1:] - amplitude * conc) ** 2).sum())
        if residual < best[0]:
            best = (residual, amplitude, float(kep))
    return best[1], best[2]


def concentration_features(curve: np.ndarray, times_s: np.ndarray, prefix: str) -> dict[str, float]:
    """ln C at phase 1 and at the last phase, and ln(C_last / C_1) per minute between them (noise-free curve)."""
    first, last = max(float(curve[1]), 1e-3), max(float(curve[-1]), 1e-3)
    minutes = max((float(times_s[-1]) - float(times_s[1])) / 60.0, 1e-3)
    return {f"{prefix}_ln_first": np.log(first), f"{prefix}_ln_last": np.log(last),
            f"{prefix}_log_slope": float(np.log(last / first) / minutes)}


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
        info = json.loads(open(f"{run}/data/patient_info_files/{pid.lower()}.json").read())
        truth, imaging = info["phantom"], info["imaging_data"]
        times = case["phase_time"].numpy()
        # The sequence parameters from the case's JSON (caches written before the reader kept them lack them).
        meta = {**case["info"]["meta"], "repetition_time": imaging["repetition_time"],
                "flip_angle": imaging["flip_angle"]}
        ideal = np.asarray(tofts_concentration(np.array([truth["ktrans"]]), np.array([truth["ve"]]),
                                               np.array([truth["vp"]]), list(times), truth["bolus_arrival_s"]))
        rows.append({**case_features(case["image"], case["label"], case["phase_time"], settings.roi_size,
                                     acquisition_vector(case["info"]["normalization"], meta)),
                     **concentration_features(ideal.reshape(-1), times, "ideal"),
                     "pattern": truth["enhancement_pattern"],
                     "tofts_ln_kep": float(np.log(kep)), "tofts_ln_amplitude": float(np.log(max(amplitude, 1e-3))),
                     "true_radius": truth["radius_mm"], "true_ln_ktrans": float(np.log(truth["ktrans"])),
                     "true_ln_kep": float(np.log(truth["ktrans"] / truth["ve"]))})
        labels.append(float(pcr))
    return rows, labels


def cross_validated_auc(rows: list[dict], labels: np.ndarray, features: tuple[str, ...], repeats: int) -> list[float]:
    aucs = []
    for repeat in range(repeats):
        order = np.random.default_rng(repeat).permutation(len(labels))
        scores = np.zeros(len(labels))
        for fold in np.array_split(order, 5):
            train = np.setdiff1d(order, fold)
            model = LogisticBaseline(features).fit([rows[i] for i in train], labels[train])
            scores[fold] = model.predict_proba([rows[i] for i in fold])
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
    for name, features in FEATURE_SETS.items():
        aucs = cross_validated_auc(rows, y, features, args.repeats)
        table[name] = {"cv_auc": float(np.mean(aucs)), "sd_over_repeats": float(np.std(aucs))}
    truth = {k: np.array([r[k] for r in rows]) for k in ("true_ln_ktrans", "true_ln_kep")}
    correlation = {f"{f} vs {k}": float(np.corrcoef([r[f] for r in rows], truth[k])[0, 1])
                   for f in ("wash_in", "washout_per_min", "tofts_ln_kep") for k in truth}
    # How well the image concentration follows the noise-free one, per enhancement pattern.
    by_pattern = {}
    for pattern in sorted({r["pattern"] for r in rows}):
        sub = [r for r in rows if r["pattern"] == pattern]
        by_pattern[pattern] = {"cases": len(sub)}
        for part, feature in (("ln_first", "ln_conc_first"), ("ln_last", "ln_conc_last"),
                              ("log_slope", "conc_log_slope")):
            image, ideal = [r[feature] for r in sub], [r[f"ideal_{part}"] for r in sub]
            by_pattern[pattern][f"corr {part}"] = float(np.corrcoef(image, ideal)[0, 1])
    print(json.dumps({"runs": args.runs, "cases": len(y), "positives": int(y.sum()), "folds": 5,
                      "repeats": args.repeats, "table": table, "correlation": correlation,
                      "image_vs_noise_free_concentration": by_pattern}, indent=2))


if __name__ == "__main__":
    main()
