"""Ablations: one change at a time to the demo's recipe, each fine-tuned (and, where it changes the encoder,
MAE-pretrained) from every given demo run with the run's seed, then scored on the held-out phantoms as acquired and
with the washout removed, next to the run's own joint model (the reference).

The changes are the `variants.VARIANTS`, config overlays in configs/experiments/. Each variant's models go to
``WORKDIR/<run name>_<key>/`` and are reused when there, so a stopped ablation resumes.

    python -m experiments ablations --runs runs/science/seed0 runs/science/seed1 --only reference no_kinetic \\
        --workdir runs/science/ablations --out runs/science/ablations_no_kinetic.json
    python -m experiments ablations --list          # the variants: key, then label
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from experiments.common import (
    add_heldout_arguments,
    finetune,
    held_out_for,
    pretrain,
    run_meta,
    run_seed,
    score_model,
)
from experiments.variants import VARIANTS, Variant, variant
from mtl_breast.data.mamamia import read_splits


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", nargs="+", help="demo run folders")
    p.add_argument("--only", nargs="*", help="variant keys to run (default: all; see --list)")
    p.add_argument("--list", action="store_true", help="print each variant's key and label, and stop")
    p.add_argument("--steps", type=int, default=870, help="fine-tuning steps (the demo's count; 770 before)")
    p.add_argument("--labelled", type=int, help="labelled cases in the run's data, for the steps per epoch "
                                                "(default: its training split's size)")
    p.add_argument("--workdir", default="runs/science/ablations")
    add_heldout_arguments(p)
    p.add_argument("--out", help="JSON file to write")


def work_folder(work: Path, run: Path, v: Variant) -> Path:
    """``WORKDIR/<run>_<key>``; a folder named after the label's first words (``seed0_no_kinetic_pathway``, as
    variants were named before they had keys) when only that one exists, so its trained models are reused."""
    folder = work / f"{run.name}_{v.key}"
    named = work / f"{run.name}_{v.label.split(' (')[0].replace(' ', '_')}"
    return named if named.exists() and not folder.exists() else folder


def run(args: argparse.Namespace) -> dict | None:
    if args.list:
        print("\n".join(f"{v.key}\t{v.label}" for v in VARIANTS))
        return None
    if not args.runs or not args.out:
        raise SystemExit("ablations: give --runs and --out (or --list)")
    chosen = [variant(key) for key in args.only] if args.only else list(VARIANTS)
    chosen = [v for v in VARIANTS if v in chosen]  # in table order
    started = time.perf_counter()
    work = Path(args.workdir)
    results = []
    for run_dir in map(Path, args.runs):
        seed, (data_h, cache_h) = run_seed(run_dir), held_out_for(run_dir, args)
        for v in chosen:
            if not v.trains:  # the reference: the run's own joint model
                out, weights = run_dir, run_dir / "weights" / "mtl"
            else:
                out = work_folder(work, run_dir, v)
                out.mkdir(parents=True, exist_ok=True)
                (out / "data").exists() or (out / "data").symlink_to((run_dir / "data").resolve())
                pretrained = (pretrain(out, run_dir / "pool", seed, v) if v.pretrain is not None
                              else run_dir / "weights" / "mae")
                labelled = args.labelled or len(read_splits(run_dir / "data")["train"])
                weights = finetune(out, run_dir / "data", seed, pretrained, args.steps, labelled, v)
            results.append({"run": str(run_dir), "key": v.key, **score_model(v.label, out, weights, data_h, cache_h)})
    return {"experiment": "ablations", "held_out_cases": args.cases, "heldout_seed": args.heldout_seed,
            "results": results, **run_meta(started)}
