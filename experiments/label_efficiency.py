"""Label efficiency: for each demo run and each count n, fine-tune the joint model on n fresh labelled phantoms from
the run's MAE weights and from scratch (the demo's settings, about the demo's number of steps), and score both on
the held-out phantoms.

The n labelled phantoms of run seed s are drawn with seed 20_000 + 100 s + n into ``WORKDIR/<run>_n<n>/``; the
models go to ``WORKDIR/<run>_n<n>_MAE`` and ``..._scratch`` and are reused when there.

    python -m experiments label-efficiency --runs runs/science/seed0 --labelled 16 32 64 \\
        --heldout-dir runs/science/heldout_data --out runs/science/label_efficiency.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from experiments.common import add_heldout_arguments, finetune, held_out_for, run_meta, run_seed, score_model
from mtl_breast.phantoms.collection import MANIFEST, generate_dataset


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", nargs="+", required=True, help="demo run folders")
    p.add_argument("--labelled", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--steps", type=int, default=870, help="fine-tuning steps (the demo's count; 770 before it "
                                                          "fine-tuned on 288 labelled cases)")
    p.add_argument("--workdir", default="runs/science/label_efficiency")
    add_heldout_arguments(p)
    p.add_argument("--out", required=True, help="JSON file to write")


def labelled_set(out: Path, labelled: int, seed: int, size: int) -> Path:
    """`labelled` phantoms with expert masks and pCR, all for training/validation (seed 20_000 + 100 seed + n)."""
    data = out / "data"
    if not (data / MANIFEST).exists():
        generate_dataset(data, num_cases=labelled, seed=20_000 + 100 * seed + labelled, size=size, test_fraction=0.0)
    return data


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    work = Path(args.workdir)
    results = []
    for run_dir in map(Path, args.runs):
        seed, (data_h, cache_h) = run_seed(run_dir), held_out_for(run_dir, args)
        for n in args.labelled:
            data = labelled_set(work / f"{run_dir.name}_n{n}", n, seed, args.size)
            for init, pretrained in (("MAE", run_dir / "weights" / "mae"), ("scratch", None)):
                out = work / f"{run_dir.name}_n{n}_{init}"
                out.mkdir(parents=True, exist_ok=True)
                (out / "data").exists() or (out / "data").symlink_to(data.resolve())
                weights = finetune(out, data, seed, pretrained, args.steps, n)
                row = score_model(f"{n} labelled, {init}", out, weights, data_h, cache_h, flat=False)
                results.append({"run": str(run_dir), "labelled": n, "init": init, **row})
    return {"experiment": "label-efficiency", "held_out_cases": args.cases, "heldout_seed": args.heldout_seed,
            "steps": args.steps, "results": results, **run_meta(started)}
