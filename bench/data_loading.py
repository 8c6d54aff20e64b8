"""Benchmark: how much faster training reads the case cache than it would decode NIfTI.gz.

Generates phantom cases (MAMA-MIA layout) into a temporary folder and, in one run, measures cases/s for
- `nifti_decode`: reading every phase and the mask from .nii.gz (no resampling);
- `nifti_preprocess`: decoding + `preprocess_case` (what a loader without a cache would do per case);
- `cache_full_read`: `CaseCache.read` of the whole preprocessed case;
- `cache_crop_read`: `read_cached_crop` of a random crop (default 32^3), as training does.
All files sit in the OS page cache after the first pass, so the numbers compare decoding work, not disks.

Usage:
    python bench/data_loading.py --cases 8 --size 48
Prints one JSON object (device named) with cases/s and the cache's speed-up ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from mtl_breast.data.build import preprocess_dataset
from mtl_breast.data.cache import CaseCache, read_cached_crop
from mtl_breast.data.folder import read_dataset
from mtl_breast.data.preprocess import PreprocessConfig, preprocess_case
from mtl_breast.phantoms.collection import generate_dataset


def _rate(fn, items: list, min_seconds: float) -> dict[str, float]:
    """Cases/s of `fn` over `items`, repeating whole passes until `min_seconds` have elapsed (at least one)."""
    fn(items[0])  # warm-up: imports, thread pools, page cache
    passes, started = 0, time.perf_counter()
    while True:
        for item in items:
            fn(item)
        passes += 1
        elapsed, count = time.perf_counter() - started, passes * len(items)
        if elapsed >= min_seconds:
            return {"cases_per_s": round(count / elapsed, 2), "ms_per_case": round(1e3 * elapsed / count, 3)}


def _device() -> dict[str, object]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "itk_threads": sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=8, help="phantom cases to generate")
    parser.add_argument("--size", type=int, default=48, help="voxels per side of a phantom")
    parser.add_argument("--crop", type=int, default=32, help="crop side for the crop read")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-seconds", type=float, default=2.0, help="time each measurement at least this long")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="mtl_breast_bench_") as tmp:
        data, cache_root = Path(tmp) / "data", Path(tmp) / "cache"
        generate_dataset(data, num_cases=args.cases, seed=args.seed, size=args.size)
        cases = read_dataset(data)
        config = PreprocessConfig()
        report = preprocess_dataset(data, cache_root, config, progress=False)
        if report["skipped"]:
            raise RuntimeError(f"phantom cases failed to preprocess: {report['skipped']}")
        cache = CaseCache(cache_root, config)
        paths = [cache.path(c.patient_id) for c in cases]
        rng = np.random.default_rng(args.seed)

        def decode(case):
            for path in [*case.image_paths, *([case.mask_path] if case.mask_path else [])]:
                sitk.GetArrayFromImage(sitk.ReadImage(str(path), sitk.sitkFloat32))

        def crop(path):
            shape = cache.read_info(path.stem)["geometry"]["output"]["size"][::-1]
            start = [int(rng.integers(0, max(1, s - args.crop + 1))) for s in shape]
            read_cached_crop(path, start, (args.crop,) * 3)

        results = {
            "nifti_decode": _rate(decode, cases, args.min_seconds),
            "nifti_preprocess": _rate(lambda c: preprocess_case(c, config), cases, args.min_seconds),
            "cache_full_read": _rate(lambda c: cache.read(c.patient_id), cases, args.min_seconds),
            "cache_crop_read": _rate(crop, paths, args.min_seconds),
        }
        shapes = [cache.read_info(c.patient_id)["geometry"]["output"]["size"][::-1] for c in cases]
        nifti_mb = sum(p.stat().st_size for c in cases for p in [*c.image_paths, c.mask_path]) / 2**20
        cache_mb = sum(p.stat().st_size for p in paths) / 2**20

    base = results["nifti_preprocess"]["cases_per_s"]
    summary = {
        "benchmark": "data_loading",
        "device": _device(),
        "cases": args.cases,
        "size": args.size,
        "crop": args.crop,
        "mean_phases": round(float(np.mean([c.num_phases for c in cases])), 2),
        "mean_cached_shape": [round(float(v), 1) for v in np.mean(shapes, axis=0)],
        "nifti_gz_mb_per_case": round(nifti_mb / len(cases), 3),
        "cache_mb_per_case": round(cache_mb / len(cases), 3),
        "results": results,
        "speedup_full_read_vs_preprocess": round(results["cache_full_read"]["cases_per_s"] / base, 1),
        "speedup_crop_read_vs_preprocess": round(results["cache_crop_read"]["cases_per_s"] / base, 1),
        "speedup_full_read_vs_decode_only": round(results["cache_full_read"]["cases_per_s"]
                                                  / results["nifti_decode"]["cases_per_s"], 1),
    }
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
