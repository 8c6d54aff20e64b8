"""How much pCR signal the tumour's kinetics carry, measured from the images and from the phantoms' truth. JSON.

Cross-validated logistic regressions on the labelled TRAINING cases of one or more demo runs (no held-out case is
read): features under the expert mask (curve summaries of `models.kinetics`, a Tofts fit of the mean
relative-enhancement curve) next to the generating model's own tumour radius, Ktrans and kep read from the
phantoms' `patient_info_files/*.json`. The gap between the two says how much a better kinetic estimate could add.

    python bench/kinetics_ceiling.py runs/science/seed0 runs/science/seed1 runs/science/seed2
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from mtl_breast.baselines import LogisticBaseline, case_features
from mtl_breast.data.cache import CaseCache
from mtl_breast.data.mamamia import read_splits
from mtl_breast.data.phantom import tofts_concentration
from mtl_breast.inference import InferenceSettings, read_weights_config
from mtl_breast.metrics.classification import roc_auc

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
        truth = json.loads(open(f"{run}/data/patient_info_files/{pid.lower()}.json").read())["phantom"]
        rows.append({**case_features(case["image"], case["label"], case["phase_time"], settings.roi_size),
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
    print(json.dumps({"runs": args.runs, "cases": len(y), "positives": int(y.sum()), "folds": 5,
                      "repeats": args.repeats, "table": table, "correlation": correlation}, indent=2))


if __name__ == "__main__":
    main()
