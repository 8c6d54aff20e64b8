"""The data path at real size: phantoms -> case cache -> training loader -> validation and prediction. Prints JSON.

On ``--cases`` phantoms of ``--size`` voxels per breast field of view
(`mtl_breast.phantoms.collection.generate_dataset`;
256 is about a MAMA-MIA series), one run measures:
- ``synth``: phantom generation (seconds, NIfTI.gz MB per case);
- ``preprocess``: `preprocess_dataset` into a fresh cache with 1 and with ``--workers`` processes: cases/min;
- ``cache``: bytes per cached case, the mean cached shape, and the extrapolation to the 1,506 MAMA-MIA cases;
- ``loader``: training samples/s of `FinetuneDataModule.train_dataloader` (random tumour/background crops of
  ``--crop``^3, flips, intensity gain) with 0 and 2 loader workers, timed once the batches the workers prefetched
  while starting have been taken (a consumer that does nothing: the loader's own rate);
- ``predict``: seconds per case of each ``--models`` model (random weights: the cost does not depend on them),
  ``validation_s_per_case`` = `predict_volume` on the cached case (what validation runs per case) and
  ``predict_s_per_case`` = `predict_case` from the NIfTI files (preprocessing + sliding window + mapping back).
Every step runs in its own subprocess; each reports its peak RSS (``getrusage`` of itself), the largest peak RSS of
a worker it started (``RUSAGE_CHILDREN``), and the largest sums of RSS over its workers and over its whole process
tree (sampled from /proc every 0.1 s; pages shared between processes count once per process).

    python bench/real_scale.py --cases 4 --size 256                      # real size (minutes per step on 2 cores)
    python bench/real_scale.py --cases 2 --size 64 --predict-cases 1     # smoke run, minutes on 2 cores
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MAMA_MIA_CASES = 1506
PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 1e6


# ------------------------------------------------------------------------------------------------ steps (children)
def step_synth(p: dict) -> dict:
    from mtl_breast.phantoms.collection import generate_dataset

    t0 = time.perf_counter()
    generate_dataset(p["data"], num_cases=p["cases"], seed=p["seed"], size=p["size"])
    seconds = time.perf_counter() - t0
    nifti = sum(f.stat().st_size for f in Path(p["data"]).rglob("*.nii.gz"))
    return {"seconds": round(seconds, 2), "cases_per_min": round(60 * p["cases"] / seconds, 2),
            "nifti_mb_per_case": round(nifti / p["cases"] / MB, 2)}


def step_preprocess(p: dict) -> dict:
    from mtl_breast.data.build import preprocess_dataset
    from mtl_breast.data.preprocess import PreprocessConfig

    t0 = time.perf_counter()
    report = preprocess_dataset(Path(p["data"]), Path(p["cache"]), PreprocessConfig(), workers=p["workers"],
                                progress=False)
    seconds = time.perf_counter() - t0
    done = len(report["done"])
    if report["skipped"] or not done:
        raise RuntimeError(f"preprocessing skipped cases: {report['skipped']}")
    return {"workers": p["workers"], "cases": done, "seconds": round(seconds, 2),
            "cases_per_min": round(60 * done / seconds, 2)}


def step_loader(p: dict) -> dict:
    import torch

    from mtl_breast.data.datamodule import FinetuneDataModule

    torch.manual_seed(p["seed"])
    dm = FinetuneDataModule(root=p["data"], cache_dir=p["cache"], crop_size=p["crop"], batch_size=p["batch"],
                            num_workers=p["workers"], val_fraction=0.0, repeats=1)
    dm.setup("fit")
    # Enough crops in one epoch for every batch taken: each case appears `repeats` times with fresh random crops.
    # Workers prefetch 2 batches each (prefetch_factor) while the first is made; timing starts once those are taken.
    skip = 2 * p["workers"]
    dm.repeats = math.ceil((1 + skip + p["batches"]) * p["batch"] / len(dm.train_ids))
    loader = dm.train_dataloader()
    t0 = time.perf_counter()
    it = iter(loader)
    first = next(it)
    first_s = time.perf_counter() - t0
    for _ in range(skip):
        next(it)
    t1, samples = time.perf_counter(), 0
    for _ in range(p["batches"]):
        samples += next(it)["image"].shape[0]
    seconds = time.perf_counter() - t1
    shape = list(first["image"].shape)
    del it, loader  # shuts the (persistent) workers down and reaps them, so RUSAGE_CHILDREN covers them
    return {"workers": p["workers"], "train_cases": len(dm.train_ids), "batch_shape_BTDHW": shape,
            "first_batch_s": round(first_s, 3), "skipped_batches": skip, "samples": samples,
            "seconds": round(seconds, 3), "samples_per_s": round(samples / seconds, 3)}


def step_predict(p: dict) -> dict:
    import torch

    from mtl_breast.data.cache import CaseCache
    from mtl_breast.data.folder import read_dataset
    from mtl_breast.data.preprocess import PreprocessConfig
    from mtl_breast.models.registry import create_model
    from mtl_breast.predictor import InferenceSettings, predict_case, predict_volume

    torch.manual_seed(p["seed"])
    model = create_model(p["arch"]).eval()
    roi = tuple(model.encoder.img_size)
    settings = InferenceSettings(roi_size=roi, overlap=0.5)  # validation's default overlap (val_overlap)
    cache = CaseCache(p["cache"], PreprocessConfig())
    cases = read_dataset(p["data"])[: p["predict_cases"]]
    with torch.no_grad():  # one-off costs (allocator, thread pools, kernels) out of the first case's time
        c = len(cases[0].image_paths)
        model(torch.zeros(1, c, *roi), phase_mask=torch.ones(1, c, dtype=torch.bool),
              phase_time=torch.arange(c, dtype=torch.float32).unsqueeze(0) * 90.0)
    validation, predict, shapes = [], [], []
    for case in cases:
        cached = cache.read(case.patient_id)
        image = torch.as_tensor(cached["image"], dtype=torch.float32)
        shapes.append(list(image.shape))
        t0 = time.perf_counter()
        predict_volume(model, image, torch.as_tensor(cached["phase_time"], dtype=torch.float32), settings)
        validation.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        predict_case(model, case, settings)
        predict.append(time.perf_counter() - t0)
    return {"arch": p["arch"], "params": sum(q.numel() for q in model.parameters()), "roi": list(roi),
            "cases": len(cases), "shapes_TDHW": shapes,
            "validation_s_per_case": round(sum(validation) / len(validation), 3),
            "predict_s_per_case": round(sum(predict) / len(predict), 3),
            "validation_s": [round(s, 3) for s in validation], "predict_s": [round(s, 3) for s in predict]}


STEPS = {"synth": step_synth, "preprocess": step_preprocess, "loader": step_loader, "predict": step_predict}


def _maxrss_mb(who: int) -> float:
    return round(resource.getrusage(who).ru_maxrss * 1024 / MB, 1)  # ru_maxrss is in KiB on Linux


def run_step_here(name: str, params: dict) -> None:
    """Child side: run one step, then print its result with this process's and its workers' peak RSS."""
    import torch  # noqa: F401  (importing torch forks a short-lived child: take it out of the worker figure)

    floor = _maxrss_mb(resource.RUSAGE_CHILDREN)
    result = STEPS[name](params)
    result["peak_rss_mb"] = _maxrss_mb(resource.RUSAGE_SELF)
    # The largest reaped child (a worker), not their sum; None when no child outgrew the fork made at import.
    children = _maxrss_mb(resource.RUSAGE_CHILDREN)
    result["peak_worker_rss_mb"] = children if children > floor else None
    print("RESULT " + json.dumps(result))


# ------------------------------------------------------------------------------------------------ parent
def _tree_rss(root: int) -> tuple[int, int]:
    """RSS of ``root`` and the sum over its descendants, bytes (from /proc; 0 once gone)."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    stat = f.read()
                parents[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in tree:
                tree.add(child)
                frontier.append(child)
    own = descendants = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/statm") as f:
                rss = int(f.read().split()[1]) * PAGE
        except (OSError, ValueError, IndexError):
            continue
        if pid == root:
            own = rss
        else:
            descendants += rss
    return own, descendants


def run_step(name: str, params: dict, timeout: float) -> dict:
    """Run one step in a subprocess; its result plus the peak RSS sum of its process tree."""
    proc = subprocess.Popen([sys.executable, __file__, "--step", name, "--params", json.dumps(params)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, done = {"tree": 0, "workers": 0}, threading.Event()

    def sample() -> None:
        while not done.is_set():
            own, workers = _tree_rss(proc.pid)
            peak["tree"], peak["workers"] = max(peak["tree"], own + workers), max(peak["workers"], workers)
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise RuntimeError(f"step {name} {params} ran past {timeout:.0f} s") from None
    finally:
        done.set()
        sampler.join()
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"step {name} {params} failed (exit status {proc.returncode}):\n{err[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["peak_workers_rss_mb"] = round(peak["workers"] / MB, 1)
    result["peak_tree_rss_mb"] = round(peak["tree"] / MB, 1)
    result["wall_s"] = round(time.perf_counter() - started, 2)
    print(f"[real_scale] {name} {params.get('workers', params.get('arch', ''))}: {result['wall_s']} s",
          file=sys.stderr)
    return result


def cache_stats(cache_root: Path) -> dict:
    from mtl_breast.data.cache import CaseCache
    from mtl_breast.data.preprocess import PreprocessConfig

    cache = CaseCache(cache_root, PreprocessConfig())
    ids = cache.patient_ids()
    sizes = [cache.path(pid).stat().st_size for pid in ids]
    shapes = []
    for pid in ids:
        info = cache.read_info(pid)
        shapes.append([info["num_phases"], *info["geometry"]["output"]["size"][::-1]])
    per_case = sum(sizes) / len(sizes)
    return {"cases": len(ids), "bytes_per_case": round(per_case), "mb_per_case": round(per_case / MB, 2),
            "mean_shape_TDHW": [round(sum(s[i] for s in shapes) / len(shapes), 1) for i in range(4)],
            "extrapolated_cases": MAMA_MIA_CASES,
            "extrapolated_gb": round(per_case * MAMA_MIA_CASES / 1e9, 2),
            "note": "image (PreprocessConfig.cache_dtype, float16 by default) + uint8 mask per case, safetensors "
                    "(uncompressed, memory-mappable)"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=4, help="phantom cases")
    p.add_argument("--size", type=int, default=256, help="voxels per side of a breast field of view (256: real size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, help="preprocessing processes of the parallel run (default: min(cases, "
                                               "CPU cores), at least 2)")
    p.add_argument("--crop", type=int, default=128, help="training crop edge")
    p.add_argument("--batch", type=int, default=2, help="training batch size")
    p.add_argument("--loader-workers", default="0,2", help="DataLoader workers to compare, comma-separated")
    p.add_argument("--loader-batches", type=int, default=8, help="batches timed after the first")
    p.add_argument("--models", default="mtl_vit_test,mtl_vit_base", help="models to time, comma-separated")
    p.add_argument("--predict-cases", type=int, help="cases to predict per model (default: all)")
    p.add_argument("--step-timeout", type=float, default=1800.0, help="seconds allowed per step")
    p.add_argument("--workdir", help="keep the phantoms and caches here (default: a temporary folder)")
    p.add_argument("--out", help="also write the JSON to this file")
    p.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)
    p.add_argument("--params", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.step:
        run_step_here(args.step, json.loads(args.params))
        return None
    import torch
    from bench_common import device_name, emit

    workers = args.workers or max(2, min(args.cases, os.cpu_count() or 1))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mtl_breast_real_scale_") as tmp:
        work = Path(args.workdir or tmp)
        data, base = str(work / "data"), {"seed": args.seed, "cases": args.cases, "size": args.size}
        out: dict = {
            "benchmark": "real_scale", "device": device_name(torch.device("cpu")), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "date": datetime.date.today().isoformat(),
            "command": "python bench/real_scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "config": {k: v for k, v in vars(args).items() if k not in ("step", "params", "out")} | {
                "workers": workers},
            "rss_method": "peak_rss_mb: getrusage(RUSAGE_SELF) of the step's process; peak_worker_rss_mb: "
                          "getrusage(RUSAGE_CHILDREN) there, the largest single worker (null: none outgrew the "
                          "child that importing torch forks); peak_workers_rss_mb / peak_tree_rss_mb: largest "
                          "sampled sum over its workers / over its whole process tree (/proc every 0.1 s; pages "
                          "shared between processes counted once per process)",
        }
        out["synth"] = run_step("synth", {**base, "data": data}, args.step_timeout)
        out["preprocess"] = {}
        for w in dict.fromkeys([1, workers]):
            cache = str(work / f"cache_w{w}")  # a fresh cache each: a warm one would skip every case
            out["preprocess"][f"workers_{w}"] = run_step("preprocess", {**base, "data": data, "cache": cache,
                                                                        "workers": w}, args.step_timeout)
        cache = str(work / "cache_w1")
        out["cache"] = cache_stats(Path(cache))
        out["loader"] = {}
        for w in [int(v) for v in args.loader_workers.split(",")]:
            params = {**base, "data": data, "cache": cache, "workers": w, "crop": args.crop, "batch": args.batch,
                      "batches": args.loader_batches}
            out["loader"][f"workers_{w}"] = run_step("loader", params, args.step_timeout)
        out["predict"] = {}
        for arch in args.models.split(","):
            params = {**base, "data": data, "cache": cache, "arch": arch,
                      "predict_cases": args.predict_cases or args.cases}
            out["predict"][arch] = run_step("predict", params, args.step_timeout)
    out["seconds"] = round(time.perf_counter() - started, 1)
    return emit(out, args.out)


if __name__ == "__main__":
    main()
