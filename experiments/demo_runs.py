"""Demo runs: one `mtl-breast demo` per seed (its own phantoms: unlabeled pool -> MAE -> joint fine-tuning ->
prediction of its held-out split), each in ``WORKDIR/seed<K>``, the folders the other experiments read. A seed whose
joint weights exist is not run again.

    python -m experiments demo-runs --seeds 0 1 2 --workdir runs/science --out runs/science/demo_runs.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from experiments.common import ROOT, run_meta


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workdir", default="runs/science")
    p.add_argument("--out", required=True, help="JSON file to write")


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    out = Path(args.workdir)
    for seed in args.seeds:
        workdir = out / f"seed{seed}"
        if not (workdir / "weights" / "mtl" / "model.safetensors").exists():
            subprocess.run([sys.executable, "-m", "mtl_breast.cli", "demo", "--workdir", str(workdir), "--seed",
                            str(seed)], check=True, cwd=ROOT)
        (workdir / "seed.json").write_text(json.dumps({"seed": seed}) + "\n")
    return {"experiment": "demo-runs", "runs": [str(out / f"seed{s}") for s in args.seeds], **run_meta(started)}
