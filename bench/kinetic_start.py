"""How well the pCR head's starting point ranks pCR: the logistic regression its kinetic pathway is initialised from.

`FinetuneModule` starts the kinetic pathway from a logistic regression of pCR on the concentration features of its
training cases (expert masks). With few labelled cases that regression is noisy; this script fits it exactly as
fine-tuning does (the datamodule's training cases, the head's feature columns) for each fine-tuned run given, and
scores it on the labelled TRAINING cases of other demo runs (`--against`; no held-out case is read), next to its
coefficients. A run whose start ranks pCR no better than chance on other cases drew an unrepresentative set of
labelled cases. JSON.

    python bench/kinetic_start.py runs/science_conc/label_efficiency/seed0_n16_MAE ... \
        --against runs/science_conc/seed0 runs/science_conc/seed1 runs/science_conc/seed2
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
from mtl_breast.data.datamodule import FinetuneDataModule
from mtl_breast.data.mamamia import read_splits
from mtl_breast.metrics.classification import roc_auc
from mtl_breast.predictor import InferenceSettings, load_joint_model, read_weights_config


def _cache(run: Path) -> tuple[CaseCache, tuple[int, ...]]:
    settings = InferenceSettings.from_config(read_weights_config(run / "weights" / "mtl"))
    return CaseCache(run / "cache" / "data", settings.preprocess), tuple(settings.roi_size)


def starting_regression(run: Path) -> tuple[LogisticBaseline, int, int]:
    """The regression `FinetuneModule._init_kinetic_pathway` fits for `run` (the datamodule's training cases, with
    its default division of the training split, as the demo and the experiments' runs use): (model, training
    cases, pCR among them)."""
    model, config = load_joint_model(run / "weights" / "mtl", "cpu")
    settings = InferenceSettings.from_config(config)
    dm = FinetuneDataModule(str(run / "data"), cache_dir=str(run / "cache" / "data"), preprocess=settings.preprocess)
    dm.setup("fit")
    _, rows, y = labelled_features(dm.cache, dm.train_ids, settings.roi_size)
    return LogisticBaseline(tuple(model.pcr_head.feature_names)).fit(rows, y), len(y), int(sum(y))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="fine-tuned run folders (data/, cache/data, weights/mtl)")
    p.add_argument("--against", nargs="+", required=True, help="demo runs whose labelled training cases score it")
    args = p.parse_args(argv)
    started = time.perf_counter()
    rows, labels = [], []
    for run in map(Path, args.against):
        cache, roi = _cache(run)
        _, r, y = labelled_features(cache, read_splits(run / "data")["train"], roi)
        rows, labels = rows + r, labels + y
    y = np.array(labels)
    results = []
    for run in map(Path, args.runs):
        model, n, positives = starting_regression(run)
        results.append({"run": str(run), "training_cases": n, "pcr": positives,
                        "auc_on_other_cases": roc_auc(y, model.predict_proba(rows)),
                        "coefficients": dict(zip(model.features, model.coef_[1:].round(3).tolist(), strict=True))})
    out = {"experiment": "kinetic-start", "scored_on": len(y), "scored_pcr": int(y.sum()), "results": results,
           **run_meta(sys.argv, started)}
    return emit(out)


if __name__ == "__main__":
    main()
