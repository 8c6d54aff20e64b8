"""pCR AUC of the logistic baselines against the number of labelled training cases. JSON.

How many labelled cases the kinetic regressions need before they pull ahead of tumour size on cases they never
saw. The pCR head's kinetic pathway starts from the same regression on the fine-tuning cases
(`tasks.finetune`, ``kinetic_init``), so this curve also says how many labelled cases the demo must fine-tune on.

The labelled training cases of several demo runs are pooled; for each count N, ``--draws`` random subsets of N fit
every feature set of `models.kinetics.FEATURE_SETS` on expert-mask features. Each fit is scored on the pooled held-out
splits of the same runs (their phantoms are disjoint from every run's training cases) and, with ``--heldout-dir``,
on a fresh held-out set (a `python -m experiments heldout` folder). Reported per N and feature set: the mean AUC
over draws and the mean paired difference to the size baseline fitted on the same subset, with its 2.5 and 97.5
percentiles over draws: the spread that one training set of that size sees, not a bootstrap over held-out cases.

    python bench/label_curve.py runs/sci/seed0 runs/sci/seed1 runs/sci/seed2 runs/sci/seed3 runs/sci/seed4 \
        --heldout-dir runs/sci/heldout_data --counts 48 96 144 192 288 --out runs/sci/label_curve.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from bench_common import emit, run_meta

from mtl_breast.baselines import LogisticBaseline, labelled_features
from mtl_breast.data.cache import CaseCache
from mtl_breast.data.mamamia import read_splits
from mtl_breast.metrics.classification import roc_auc
from mtl_breast.models.kinetics import FEATURE_SETS
from mtl_breast.predictor import InferenceSettings, read_weights_config

Cases = tuple[list[dict[str, float]], np.ndarray]  # (feature rows, pCR labels)


def run_cases(run: Path) -> tuple[Cases, Cases]:
    """Expert-mask features of a demo run's training split and of its held-out split (cases with known pCR)."""
    settings = InferenceSettings.from_config(read_weights_config(run / "weights" / "mtl"))
    cache, roi = CaseCache(run / "cache" / "data", settings.preprocess), settings.roi_size
    splits = read_splits(run / "data")
    out = []
    for part in ("train", "test"):
        _, rows, y = labelled_features(cache, splits[part], roi)
        out.append((rows, np.asarray(y)))
    return out[0], out[1]


def heldout_cases(folder: Path, run: Path) -> Cases:
    """Expert-mask features of a `python -m experiments heldout` folder, preprocessed as the run's weights expect."""
    settings = InferenceSettings.from_config(read_weights_config(run / "weights" / "mtl"))
    cache = CaseCache(folder / "cache", settings.preprocess)
    if not cache.patient_ids():
        raise SystemExit(f"{folder / 'cache'} holds no case preprocessed for {run}'s weights: run "
                         "`python -m experiments heldout` on it first")
    _, rows, y = labelled_features(cache, cache.patient_ids(), settings.roi_size)
    return rows, np.asarray(y)


def curve(train: Cases, scored: dict[str, Cases], counts: list[int], draws: int, seed: int) -> dict:
    """``{N: {set: {held-out name: {"auc", "minus_size", "minus_size_low", "minus_size_high"}}}}``."""
    rows, y = train
    rng = np.random.default_rng(seed)
    table = {}
    for n in counts:
        if n > len(rows):
            raise SystemExit(f"--counts {n} is more than the {len(rows)} pooled training cases")
        repeats = 1 if n == len(rows) else draws
        auc = {name: {where: [] for where in scored} for name in FEATURE_SETS}
        for _ in range(repeats):
            pick = rng.choice(len(rows), n, replace=False)
            while len(np.unique(y[pick])) < 2:  # a subset needs both classes to fit a regression
                pick = rng.choice(len(rows), n, replace=False)
            for name, features in FEATURE_SETS.items():
                fitted = LogisticBaseline(features).fit([rows[i] for i in pick], y[pick])
                for where, (x_held, y_held) in scored.items():
                    auc[name][where].append(roc_auc(y_held, fitted.predict_proba(x_held)))
        table[n] = {}
        for name in FEATURE_SETS:
            table[n][name] = {}
            for where in scored:
                diff = np.subtract(auc[name][where], auc["size"][where])
                table[n][name][where] = {"auc": float(np.mean(auc[name][where])), "minus_size": float(diff.mean()),
                                         "minus_size_low": float(np.percentile(diff, 2.5)),
                                         "minus_size_high": float(np.percentile(diff, 97.5))}
        table[n]["draws"] = repeats
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="demo work folders (data/, cache/data, weights/mtl)")
    p.add_argument("--heldout-dir", type=Path, help="an experiments heldout folder (data/, cache/) to score as well")
    p.add_argument("--counts", type=int, nargs="+", default=[48, 96, 144, 192, 288])
    p.add_argument("--draws", type=int, default=40, help="random training subsets per count")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out")
    args = p.parse_args()
    started = time.perf_counter()
    train_rows, train_y, own_rows, own_y = [], [], [], []
    for run in args.runs:
        (rows, y), (held_rows, held_y) = run_cases(run)
        train_rows, train_y = train_rows + rows, train_y + y.tolist()
        own_rows, own_y = own_rows + held_rows, own_y + held_y.tolist()
    scored = {"own held-out splits": (own_rows, np.asarray(own_y))}
    if args.heldout_dir is not None:
        scored["held-out set"] = heldout_cases(args.heldout_dir, args.runs[0])
    table = curve((train_rows, np.asarray(train_y)), scored, sorted(args.counts), args.draws, args.seed)
    emit({"experiment": "label_curve", "runs": [str(r) for r in args.runs], "training_cases": len(train_rows),
          "held_out_cases": {where: len(y) for where, (_, y) in scored.items()}, "table": table,
          **run_meta(sys.argv, started)}, args.out)


if __name__ == "__main__":
    main()
