"""The held-out comparison: the joint models of several demo runs (seeds) against the baselines and against
themselves with the washout removed and with the post-contrast phases reversed, all on the same held-out phantoms
(by default the development set of configs/evaluation/sets.yaml); seed-averaged AUC and balanced accuracy with 95%
bootstrap intervals over the cases, and the paired differences of `variants.COMPARISONS`.

    python -m experiments heldout --runs runs/science/seed0 runs/science/seed1 runs/science/seed2 \\
        --heldout-dir runs/science/heldout_data --scores-dir runs/science/heldout_scores --out runs/science/heldout.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from experiments.common import add_heldout_arguments, held_out_for, kept_scores, run_meta, score_run, summarise
from mtl_breast.data.cache import CaseCache


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", nargs="+", required=True, help="demo run folders")
    p.add_argument("--scores-dir", help="keep each run's per-case scores here and reuse them (runs scored by "
                                        "separate processes join one summary)")
    add_heldout_arguments(p)
    p.add_argument("--out", required=True, help="JSON file to write")


def scored_run(run: Path, data: Path, cache: CaseCache, heldout_seed: int, scores_dir: str | None) -> dict:
    """`score_run` of a run's joint model on the held-out set, kept in `scores_dir` (`kept_scores`)."""
    return kept_scores(run, scores_dir, heldout_seed, lambda: score_run(run, run / "weights" / "mtl", data, cache))


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    runs = [Path(r) for r in args.runs]
    data, cache = held_out_for(runs[0], args)
    scored = [scored_run(r, data, cache, args.heldout_seed, args.scores_dir) for r in runs]
    return {"experiment": "heldout", **summarise(scored), "runs": [str(r) for r in runs],
            "heldout_seed": args.heldout_seed, **run_meta(started)}
