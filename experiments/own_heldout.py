"""Each demo run on its own held-out split (the cases `mtl-breast demo` predicted and scored; no two runs share a
case), as acquired and with the washout removed: the comparisons of `heldout` on as many case sets as there are
runs, and the mean over runs of each paired difference (`variants.COMPARISONS`) with a bootstrap interval that
resamples each run's cases on its own.

    python -m experiments own-heldout --runs runs/science/seed0 runs/science/seed1 runs/science/seed2 \\
        --scores-dir runs/science/own_heldout_scores --out runs/science/own_heldout.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from experiments.common import (
    AS_ACQUIRED,
    OWN_SPLIT,
    WASHOUT_REMOVED,
    kept_scores,
    pooled_differences,
    run_meta,
    score_run,
    summarise,
)
from mtl_breast.data.build import preprocess_dataset
from mtl_breast.data.cache import CaseCache
from mtl_breast.data.folder import read_dataset
from mtl_breast.data.mamamia import read_splits
from mtl_breast.predictor import InferenceSettings, read_weights_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", nargs="+", required=True, help="demo run folders")
    p.add_argument("--scores-dir", help="keep each run's per-case scores here and reuse them (as `heldout`'s)")
    p.add_argument("--out", required=True, help="JSON file to write")


def score_own_split(run: Path) -> dict:
    """`score_run` of a run's joint model on its own test split, as acquired and with the washout removed."""
    weights = run / "weights" / "mtl"
    settings = InferenceSettings.from_config(read_weights_config(weights))
    test_ids = read_splits(run / "data")["test"]
    wanted = set(test_ids)
    cases = [case for case in read_dataset(run / "data") if case.patient_id in wanted]
    preprocess_dataset(run / "data", run / "cache" / "data", settings.preprocess, cases=cases, progress=False)
    cache = CaseCache(run / "cache" / "data", settings.preprocess)
    return score_run(run, weights, run / "data", cache, (AS_ACQUIRED, WASHOUT_REMOVED), ids=test_ids)


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    scored = [{"run": str(r), **kept_scores(r, args.scores_dir, OWN_SPLIT, lambda r=r: score_own_split(r))}
              for r in map(Path, args.runs)]
    return {"experiment": "own-heldout", "runs": [s["run"] for s in scored],
            "per_run": [{"run": s["run"], **summarise([s])} for s in scored],
            "pooled": pooled_differences(scored), "raw": scored, **run_meta(started)}
