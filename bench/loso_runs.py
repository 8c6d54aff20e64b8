"""Leave-one-site-out fine-tunes of a demo run: for each site, the joint model fine-tuned from the run's MAE weights
on the run's training cases of the OTHER sites only (validation drawn from them too), exported as a run folder that
`bench/robustness.py score --loso-run SITE=FOLDER` scores on the left-out site's cases.

Each site's folder is OUT/<SITE>: data/ (links to the run's images, masks and records, with a split file that
leaves the site out of training), cache/data, finetune/, weights/mtl. A site whose weights exist is skipped, so a
stopped job resumes; a fine-tune stopped midway resumes from its last.ckpt.

    python bench/loso_runs.py --run /work/runs/demo0 --out /work/runs/loso [--sites DUKE NACT] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
from bench_common import run_meta

from mtl_breast.data.mamamia import read_splits
from mtl_breast.files import write_text
from mtl_breast.run.demo import _best_checkpoint, _config
from mtl_breast.run.train import lightning_cli
from mtl_breast.tasks.export import export_checkpoint

SITES = ("DUKE", "ISPY1", "ISPY2", "NACT")
_LINKED = ("images", "segmentations", "patient_info_files", "clinical_and_imaging_info.xlsx")


def site_of(patient_id: str) -> str:
    """The site of a phantom case: its PID prefix (DUKE_001 -> DUKE)."""
    return patient_id.split("_")[0].upper()


def loso_data(run_data: Path, out: Path, site: str) -> dict[str, list[str]]:
    """A dataset root that shows `run_data`'s cases with `site` left out of the training split (links, no copies)."""
    splits = read_splits(run_data)
    train = [pid for pid in splits["train"] if site_of(pid) != site]
    if len(train) == len(splits["train"]):
        raise SystemExit(f"no training case of site {site} in {run_data}")
    out.mkdir(parents=True, exist_ok=True)
    for name in _LINKED:
        link = out / name
        if not link.exists():
            link.symlink_to((run_data / name).resolve())
    test = splits["test"]
    width = max(len(train), len(test))
    table = pd.DataFrame({"train_split": train + [None] * (width - len(train)),
                          "test_split": test + [None] * (width - len(test))})
    write_text(out / "train_test_splits.csv", table.to_csv(index=False))
    return {"train": train, "test": test}


def loso_run(run: Path, out: Path, site: str, seed: int) -> dict:
    """Fine-tune and export one left-out-site model (skipped when its weights exist)."""
    weights = out / "weights" / "mtl"
    if (weights / "model.safetensors").exists():
        return {"site": site, "weights": str(weights), "skipped": True}
    t0 = time.perf_counter()
    splits = loso_data(run / "data", out / "data", site)
    args = ["fit", "--config", str(_config("finetune/demo.yaml")), "--data.root", str(out / "data"),
            "--data.cache_dir", str(out / "cache" / "data"), "--seed_everything", str(seed),
            "--trainer.default_root_dir", str(out / "finetune"), "--model.pretrained", str(run / "weights" / "mae")]
    if (out / "finetune" / "checkpoints" / "last.ckpt").exists():
        args += ["--ckpt_path", "last"]
    lightning_cli("finetune", args)
    export_checkpoint(_best_checkpoint(out / "finetune"), weights)
    return {"site": site, "weights": str(weights), "train_cases": len(splits["train"]),
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a `mtl-breast demo` work folder")
    p.add_argument("--out", type=Path, required=True, help="one folder per left-out site goes here")
    p.add_argument("--sites", nargs="+", default=list(SITES), choices=SITES)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    results = [loso_run(args.run, args.out / site, site, args.seed) for site in args.sites]
    print(json.dumps({"meta": run_meta(), "runs": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
