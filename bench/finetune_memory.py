"""Peak memory of joint fine-tuning steps, measured and as `mtl-breast fit-check` estimates it. Prints JSON.

For every (phases, gradient checkpointing) pair: the fit-check estimate (fake tensors, any machine) and, on a
CUDA device, ``torch.cuda.max_memory_allocated`` over steady-state training steps (the task module's
``training_step`` under bf16 autocast, backward, clipping, fused AdamW) and the relative error of the
estimate. On a CPU only the estimates run, plus, with ``--measure-test``, the same check on the test-size
model whose real CPU step is traced tensor by tensor, or, with ``--measure-on-cpu``, the measured loop itself on
the CPU (peak = live tensor bytes traced op by op, see `bench_common.PeakMemory`; test sizes only).

    python bench/finetune_memory.py                                   # GPU: ViT-B, 3 and 6 phases of 128^3
    python bench/finetune_memory.py --measure-test --phases 3         # CPU smoke run
    python bench/finetune_memory.py --arch mtl_vit_test --size 32 --precision 32-true --measure-on-cpu --steps 1
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_common import PeakMemory, device_name, emit, pick_device, sync, tensors_of

from mtl_breast.run.fitcheck import estimate_training_memory, prepare_module, synthetic_batch

GIB = 1 << 30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="mtl_vit_base")
    p.add_argument("--size", type=int, default=128, help="cubic crop edge in voxels")
    p.add_argument("--phases", default="3,6", help="comma-separated numbers of phases")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--checkpointing", default="on,off", help="'on', 'off' or 'on,off'")
    p.add_argument("--precision", default="bf16-mixed", choices=["bf16-mixed", "16-mixed", "32-true"])
    p.add_argument("--steps", type=int, default=3, help="measured steps after one warm-up step (CUDA)")
    p.add_argument("--measure-test", action="store_true",
                   help="also check the estimate against a traced real CPU step of mtl_vit_test at 32^3")
    p.add_argument("--measure-on-cpu", action="store_true",
                   help="run the measured loop on a CPU too (traced live bytes; slow, for test sizes)")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--out", help="also write the JSON to this file")
    return p.parse_args(argv)


def config(arch: str, size: int, batch: int, checkpointing: bool, precision: str) -> dict:
    # accumulate_grad_batches 1: the measured loop below zeroes the gradients after every step, as this does.
    return {"model": {"arch": arch, "grad_checkpointing": checkpointing},
            "data": {"crop_size": size, "batch_size": batch},
            "trainer": {"precision": precision, "gradient_clip_val": 1.0, "accumulate_grad_batches": 1}}


def measure_step(cfg: dict, phases: int, steps: int, device: torch.device) -> dict:
    """Peak bytes over steady-state steps (after one warm-up step that creates AdamW's state), see `PeakMemory`."""
    from mtl_breast.tasks.finetune import MTLFinetuneModule

    size, batch_size = cfg["data"]["crop_size"], cfg["data"]["batch_size"]
    amp_dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(cfg["trainer"]["precision"])
    torch.manual_seed(0)
    module = MTLFinetuneModule(**cfg["model"], img_size=size).to(device).train()
    optimizer = prepare_module(module, batch_size=batch_size)
    batch = synthetic_batch("finetune", batch_size, phases, (size,) * 3, device=device)

    def step() -> float:
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = module.training_step(batch, 0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - t0

    step()
    with PeakMemory(device, baseline=tensors_of(module, optimizer, batch)) as peak:
        times = [step() for _ in range(steps)]
    result = {"peak_bytes": peak.peak_bytes, "metric": peak.metric,
              "step_s_median": round(sorted(times)[len(times) // 2], 4)}
    if device.type == "cuda":
        result["reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    return result


def one(cfg: dict, phases: int, args: argparse.Namespace, device: torch.device) -> dict:
    t0 = time.perf_counter()
    est = estimate_training_memory(cfg, phases=phases)
    row = {"phases": phases, "grad_checkpointing": cfg["model"]["grad_checkpointing"],
           "estimate_gib": est["peak_gib"], "estimate_required_gib": est["required_gib"],
           "estimate_breakdown_gib": {k: round(v / GIB, 3) for k, v in est["peak_breakdown"].items()},
           "estimate_s": round(time.perf_counter() - t0, 1)}
    if device.type == "cuda" or args.measure_on_cpu:
        try:
            measured = measure_step(cfg, phases, args.steps, device)
        except torch.OutOfMemoryError:
            row["measured"] = "out of memory"
            return row
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the step's module is garbage now; start the next from a clean pool
        row.update(measured_gib=round(measured["peak_bytes"] / GIB, 3),
                   step_s_median=measured["step_s_median"],
                   relative_error=round(est["peak_bytes"] / measured["peak_bytes"] - 1, 4))
        if "reserved_bytes" in measured:
            row["measured_reserved_gib"] = round(measured["reserved_bytes"] / GIB, 3)
    return row


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # AdamW's tiny second moments otherwise slow CPU math badly
    phases = [int(p) for p in args.phases.split(",")]
    modes = [m.strip() == "on" for m in args.checkpointing.split(",")]
    out = {"benchmark": "finetune_memory", "device": device_name(device), "torch": torch.__version__,
           "config": {"arch": args.arch, "size": args.size, "batch": args.batch, "precision": args.precision},
           "steps": args.steps,
           "memory_metric": ("cuda max_memory_allocated vs fit-check estimate" if device.type == "cuda" else
                             "CPU step traced live bytes vs fit-check estimate" if args.measure_on_cpu
                             else "fit-check estimate only (no CUDA device)"),
           "runs": []}
    for t in phases:
        for ckpt in modes:
            cfg = config(args.arch, args.size, args.batch, ckpt, args.precision)
            out["runs"].append(one(cfg, t, args, device))
    if args.measure_test:
        # The same method against a real step traced tensor by tensor on the CPU (fp32: CPU autocast is not CUDA's).
        cfg = config("mtl_vit_test", 32, args.batch, False, "32-true")
        fake = estimate_training_memory(cfg, phases=phases[0])
        real = estimate_training_memory(cfg, phases=phases[0], real_cpu=True)
        out["test_size_check"] = {"arch": "mtl_vit_test", "size": 32, "phases": phases[0],
                                  "estimate_bytes": fake["peak_bytes"], "traced_cpu_bytes": real["peak_bytes"],
                                  "relative_error": round(fake["peak_bytes"] / real["peak_bytes"] - 1, 6)}
    return emit(out, args.out)


if __name__ == "__main__":
    main()
