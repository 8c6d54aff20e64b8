"""Time to predict one case: sliding-window segmentation + pCR of a synthetic MAMA-MIA-sized volume. Prints JSON.

Runs `mtl_breast.predictor.predict_volume` (the routine of `mtl-breast predict` and of validation) on a random
tensor of ``--shape`` T D H W (default 3 phases of 100 x 512 x 512 voxels, a MAMA-MIA DCE-MRI series) with a
freshly initialised model: the cost does not depend on the weights. Reports the median wall time over
``--repeats`` runs after one warm-up run, the number of windows and, on CUDA, the peak memory.

    python bench/inference.py                                             # GPU: mtl_vit_base, roi 128^3
    python bench/inference.py --shape 3 380 190 190 --repeats 3           # GPU: a MAMA-MIA case after preprocessing
    python bench/inference.py --shape 3 32 96 96 --repeats 1              # CPU smoke run (mtl_vit_test)

Without ``--bf16`` the model runs in float32, as `mtl-breast predict` runs it; validation under Lightning's
bf16-mixed precision runs it under bf16 autocast (``--bf16``).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time

import torch
from bench_common import device_name, emit, sync

from mtl_breast.models.registry import create_model
from mtl_breast.predictor import InferenceSettings, predict_volume


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="mtl_vit_base" if cuda else "mtl_vit_test")
    p.add_argument("--roi", type=int, help="sliding-window edge (default: the model's img_size)")
    p.add_argument("--shape", type=int, nargs=4, default=[3, 100, 512, 512], metavar=("T", "D", "H", "W"))
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--tta", action="store_true", help="flip test-time augmentation (4 passes)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--out", help="also write the JSON to this file")
    return p.parse_args(argv)


def windows(shape: tuple[int, ...], roi: tuple[int, ...], overlap: float) -> int:
    """Sliding windows MONAI visits (one pass): per axis ceil((size - roi) / step) + 1, size padded up to roi."""
    count = 1
    for s, r in zip(shape, roi, strict=True):
        step = max(int(r * (1 - overlap)), 1)
        count *= 1 if s <= r else math.ceil((s - r) / step) + 1
    return count


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = create_model(args.arch, **({"img_size": args.roi} if args.roi else {})).to(device).eval()
    roi = tuple(model.encoder.img_size)
    t, d, h, w = args.shape
    image = torch.randn(t, d, h, w)
    phase_time = torch.arange(t, dtype=torch.float32) * 90.0
    settings = InferenceSettings(roi_size=roi, overlap=args.overlap, tta_flips=args.tta)
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext())

    def run_once() -> float:
        sync(device)
        t0 = time.perf_counter()
        with amp:
            predict_volume(model, image, phase_time, settings)
        sync(device)
        return time.perf_counter() - t0

    warmup = run_once()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = [run_once() for _ in range(args.repeats)]
    passes = 4 if args.tta else 1
    out = {
        "benchmark": "inference_case", "device": device_name(device), "torch": torch.__version__,
        "config": {"arch": args.arch, "shape_TDHW": args.shape, "roi": list(roi), "overlap": args.overlap,
                   "tta_flips": args.tta, "bf16": args.bf16, "sw_batch_size": 2},
        "params": sum(p.numel() for p in model.parameters()),
        "windows_per_pass": windows((d, h, w), roi, args.overlap), "passes": passes,
        "warmup_s": round(warmup, 3),
        "case_s_median": round(statistics.median(times), 3), "case_s_min": round(min(times), 3),
    }
    if device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return emit(out, args.out)


if __name__ == "__main__":
    main()
