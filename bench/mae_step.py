"""One MAE training step (forward + backward + AdamW step): ours vs MONAI's MaskedAutoEncoderViT. Prints JSON.

Both models get the same width, depth, heads, patch, decoder size, input shape and mask ratio. Ours encodes the
T phases as T*N tokens (shared tokenizer, temporal attention); MONAI's takes the phases as input channels, so it
sees N tokens that mix all phases in the patch embedding. Memory: CUDA ``max_memory_allocated`` on a GPU; on CPU
the bytes of tensors saved for backward (a ``saved_tensors_hooks`` count, deduplicated by storage).

    python bench/mae_step.py --model test --size 32 --phases 2 --batch 2          # CPU smoke run
    python bench/mae_step.py --model base --size 128 --phases 4 --batch 2 --bf16  # GPU

``--find-max-batch`` instead searches the largest batch whose pretraining step (the task module's
``training_step``, fused AdamW, clipping: what `mtl-breast pretrain fit` runs) stays within ``--limit-gib``, then
reports volumes/s at that batch and the model FLOP utilisation against the device's dense bf16 peak. On CUDA the
memory is measured; on a CPU it is the `mtl-breast fit-check` estimate and the speed is that of the CPU:

    python bench/mae_step.py --find-max-batch --model base --bf16 --grad-ckpt     # GPU: ViT-B, 4 x 128^3
    python bench/mae_step.py --find-max-batch --model test --size 32 --limit-gib 0.05 --steps 2   # CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import statistics
import time
from collections.abc import Callable

import torch
from einops import rearrange

from mtl_breast.models.registry import ENCODER_SIZES, MAE_DECODER_SIZES, create_model


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["test", "small", "base"], default="base")
    p.add_argument("--size", type=int, default=128, help="cubic volume edge in voxels")
    p.add_argument("--phases", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--grad-ckpt", action="store_true", help="per-block gradient checkpointing (ours; MONAI has none)")
    p.add_argument("--attn-mode", choices=["divided", "joint"], default="divided")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--skip-monai", action="store_true")
    p.add_argument("--find-max-batch", action="store_true",
                   help="largest batch of the pretraining step within --limit-gib, its volumes/s and MFU")
    p.add_argument("--limit-gib", type=float, default=22.0, help="memory limit of --find-max-batch")
    p.add_argument("--max-batch", type=int, default=512, help="upper bound of the --find-max-batch search")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the device for MFU (default: known GPUs)")
    return p.parse_args()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def build_ours(args: argparse.Namespace) -> tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    model = create_model(
        f"mae_vit_{args.model}",
        img_size=args.size,
        mask_ratio=args.mask_ratio,
        attn_mode=args.attn_mode,
        grad_checkpointing=args.grad_ckpt,
        max_phases=max(8, args.phases),
    )
    return model, lambda x: model(x)["loss"]


def build_monai(args: argparse.Namespace) -> tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    from monai.networks.nets import MaskedAutoEncoderViT

    enc, dec = ENCODER_SIZES[args.model], MAE_DECODER_SIZES[args.model]
    patch = enc["patch_size"]
    # MONAI's sin-cos table needs a width divisible by 6; otherwise use its learnable table (same cost).
    model = MaskedAutoEncoderViT(
        in_channels=args.phases,
        img_size=args.size,
        patch_size=patch,
        hidden_size=enc["embed_dim"],
        mlp_dim=4 * enc["embed_dim"],
        num_layers=enc["depth"],
        num_heads=enc["num_heads"],
        masking_ratio=args.mask_ratio,
        decoder_hidden_size=dec["decoder_embed_dim"],
        decoder_mlp_dim=4 * dec["decoder_embed_dim"],
        decoder_num_layers=dec["decoder_depth"],
        decoder_num_heads=dec["decoder_num_heads"],
        pos_embed_type="sincos" if enc["embed_dim"] % 6 == 0 else "learnable",
        decoder_pos_embed_type="sincos" if dec["decoder_embed_dim"] % 6 == 0 else "learnable",
        qkv_bias=True,
    )

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        pred, mask = model(x)  # [B, N, P*C], [B, N] (1 = masked)
        target = rearrange(x, "b c (d pd) (h ph) (w pw) -> b (d h w) (pd ph pw c)", pd=patch, ph=patch, pw=patch)
        per_patch = (pred.float() - target.float()).pow(2).mean(-1)
        return (per_patch * mask).sum() / mask.sum()

    return model, loss_fn


def measure(build, args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(0)
    model, loss_fn = build(args)
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(args.batch, args.phases, args.size, args.size, args.size, device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()

    def step() -> None:
        with amp:
            loss = loss_fn(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    result = {
        "step_ms_median": round(1000 * statistics.median(times), 2),
        "step_ms_min": round(1000 * min(times), 2),
        "params": sum(p.numel() for p in model.parameters()),
    }
    if device.type == "cuda":
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    else:
        seen: dict[tuple[int, int], int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
            loss = loss_fn(x)
        loss.backward()
        result["saved_activation_bytes"] = sum(seen.values())
    return result


# Dense bf16 tensor-core peaks (TFLOPS) by device-name fragment, first match wins; --peak-tflops overrides.
PEAK_BF16_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L4", 121.0),
                    ("4090", 165.0)]


def peak_tflops(args: argparse.Namespace, device: torch.device) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def pretrain_config(args: argparse.Namespace, batch: int) -> dict:
    """The `mtl-breast pretrain` config of this benchmark (model section as in configs/pretrain/*.yaml)."""
    model_args = {"mask_ratio": args.mask_ratio, "attn_mode": args.attn_mode, "max_phases": max(8, args.phases)}
    return {"model": {"arch": f"mae_vit_{args.model}", "model_args": model_args, "grad_checkpointing": args.grad_ckpt},
            "data": {"crop_size": args.size, "batch_size": batch},
            "trainer": {"precision": "bf16-mixed" if args.bf16 else "32-true", "gradient_clip_val": 1.0}}


def model_flops_per_volume(args: argparse.Namespace) -> int:
    """FLOPs of forward + backward per volume (no checkpoint recomputation), counted on fake tensors."""
    from torch.utils import flop_counter

    from mtl_breast.memtrace import FakeMode, LiveBytes

    # The CPU flash kernel that fake tensors run costs what CUDA's flash kernel does.
    cpu_flash = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *a, **kw: flop_counter.sdpa_flop_count(q, k, v),
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *a, **kw: flop_counter.sdpa_backward_flop_count(g, q, k, v),
    }
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=cpu_flash)
    with torch.device("meta"):  # no initialisation work; storage comes from to_empty
        model = create_model(f"mae_vit_{args.model}", img_size=args.size, mask_ratio=args.mask_ratio,
                             attn_mode=args.attn_mode, max_phases=max(8, args.phases))
    with FakeMode(), LiveBytes(fake=True):  # LiveBytes answers the model's small data-dependent checks
        model = model.to_empty(device="cpu")
        x = torch.randn(1, args.phases, args.size, args.size, args.size)
        with counter:
            model(x)["loss"].backward()
    return counter.get_total_flops()


def find_max_batch(args: argparse.Namespace, device: torch.device) -> dict:
    """Largest batch within args.limit_gib (doubling, then bisection), then volumes/s and MFU at that batch."""
    from mtl_breast.fitcheck import estimate_training_memory, prepare_module, synthetic_batch
    from mtl_breast.tasks.pretrain import MAEPretrainModule

    limit = args.limit_gib * 2**30
    torch.manual_seed(0)
    cfg = pretrain_config(args, 1)
    module = MAEPretrainModule(**cfg["model"], img_size=args.size).to(device).train()
    optimizer = prepare_module(module, batch_size=1)  # fused AdamW on CUDA, as in training
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()

    def step(batch: dict) -> None:
        with amp:
            loss = module.training_step(batch, 0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def peak(b: int) -> float:
        if device.type != "cuda":
            return estimate_training_memory(pretrain_config(args, b), phases=args.phases)["peak_bytes"]
        torch.cuda.empty_cache()
        try:
            batch = synthetic_batch("pretrain", b, args.phases, (args.size,) * 3, device=device)
            step(batch)  # the first step of a batch size may differ (workspaces, AdamW state at the very first)
            torch.cuda.reset_peak_memory_stats(device)
            step(batch)
            return torch.cuda.max_memory_allocated(device)
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            return math.inf

    tried: dict[int, float] = {}
    lo, hi, b = 0, args.max_batch + 1, 1
    while b < hi:  # double until a batch does not fit
        tried[b] = peak(b)
        if tried[b] > limit:
            hi = b
            break
        lo, b = b, 2 * b
    while hi - lo > 1:
        mid = (lo + hi) // 2
        tried[mid] = peak(mid)
        lo, hi = (mid, hi) if tried[mid] <= limit else (lo, mid)
    result = {"config": {**vars(args)}, "memory_metric": "cuda max_memory_allocated" if device.type == "cuda"
              else "fit-check estimate (no CUDA device)", "limit_gib": args.limit_gib,
              "peak_gib_by_batch": {k: (round(v / 2**30, 3) if math.isfinite(v) else "out of memory")
                                    for k, v in sorted(tried.items())},
              "largest_batch": lo}
    if lo == 0:
        return result
    batch = synthetic_batch("pretrain", lo, args.phases, (args.size,) * 3, device=device)
    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    flops = model_flops_per_volume(args) * lo
    peak_flops = peak_tflops(args, device)
    result.update(step_s_median=round(step_s, 4), volumes_per_s=round(lo / step_s, 2),
                  model_tflop_per_step=round(flops / 1e12, 6), achieved_tflops=round(flops / step_s / 1e12, 4),
                  peak_bf16_tflops=peak_flops,
                  mfu=round(flops / step_s / (peak_flops * 1e12), 4) if peak_flops else None)
    return result


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # AdamW's tiny second moments otherwise slow CPU math badly
    if args.find_max_batch:
        print(json.dumps({"benchmark": "mae_max_batch", "device": device_name(device), "torch": torch.__version__,
                          **find_max_batch(args, device)}, indent=2))
        return
    grid = args.size // ENCODER_SIZES[args.model]["patch_size"]
    visible = int(grid**3 * (1 - args.mask_ratio))
    out = {
        "benchmark": "mae_train_step",
        "device": device_name(device),
        "torch": torch.__version__,
        "config": {**vars(args), "tokens_per_phase": grid**3, "visible_per_phase": visible},
        "memory_metric": "cuda max_memory_allocated" if device.type == "cuda" else "saved tensors for backward",
    }
    runs = {"ours": build_ours} if args.skip_monai else {"ours": build_ours, "monai": build_monai}
    for name, build in runs.items():
        try:
            out[name] = measure(build, args, device)
        except torch.OutOfMemoryError:
            out[name] = {"error": "out of memory"}
        except ImportError as err:
            out[name] = {"error": f"not available in the installed monai: {err}"}
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the previous model is garbage by now; start the next from a clean pool
    if "monai" in out:
        out["monai_notes"] = (
            "phases as input channels (N tokens, not T*N); TransformerBlock default attention "
            "(einsum, no fused SDPA); no gradient checkpointing; loss computed here as masked-patch MSE"
        )
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
