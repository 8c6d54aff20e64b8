"""One MAE training step (forward + backward + AdamW step): ours vs MONAI's MaskedAutoEncoderViT. Prints JSON.

Both models get the same width, depth, heads, patch, decoder size, input shape and mask ratio. Ours encodes the
T phases as T*N tokens (shared tokenizer, temporal attention); MONAI's takes the phases as input channels, so it
sees N tokens that mix all phases in the patch embedding. Memory: CUDA ``max_memory_allocated`` on a GPU; on CPU
the bytes of tensors saved for backward (a ``saved_tensors_hooks`` count, deduplicated by storage).
Throughput: volumes/s and tokens/s, a token being one element of the model's own sequence (ours T*N per volume,
MONAI's N), so the per-token ratio credits ours for the T-times longer sequence it attends over. Model FLOP
utilisation: FLOPs of one forward + backward of the measured step (``torch.utils.flop_counter.FlopCounterMode`` on
the same input, gradient checkpointing off while counting, so recomputation is not credited), divided by the step
time and by the device's dense bf16 peak (`bench_common.PEAK_BF16_TFLOPS`, or ``--peak-tflops``).

    python bench/mae_step.py --model test --size 32 --phases 2 --batch 2          # CPU smoke run
    python bench/mae_step.py --model base --size 128 --phases 4 --batch 2 --bf16  # GPU

``--find-max-batch`` instead searches the largest batch whose pretraining step (the task module's
``training_step``, fused AdamW, clipping: what `mtl-breast pretrain fit` runs) stays within ``--limit-gib``, then
reports volumes/s at that batch and the model FLOP utilisation against the device's dense bf16 peak. On CUDA the
memory is measured; on a CPU it is the `mtl-breast fit-check` estimate and the speed is that of the CPU:

    python bench/mae_step.py --find-max-batch --model base --bf16 --grad-ckpt     # GPU: ViT-B, 4 x 128^3
    python bench/mae_step.py --find-max-batch --model test --size 32 --limit-gib 0.05 --steps 2   # CPU smoke run

``--memory measured`` makes a CPU search measure too (traced live bytes, `bench_common.PeakMemory`; test sizes).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time
from collections.abc import Callable

import torch
from bench_common import (
    PeakMemory,
    count_flops,
    device_name,
    emit,
    flop_counter_mode,
    peak_bf16_tflops,
    pick_device,
    sync,
    tensors_of,
)
from einops import rearrange

from mtl_breast.models.registry import ENCODER_SIZES, MAE_DECODER_SIZES, create_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    p.add_argument("--memory", choices=["measured", "estimate"],
                   help="--find-max-batch memory: measured (CUDA default) or the fit-check estimate (CPU default)")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--out", help="also write the JSON to this file")
    return p.parse_args(argv)


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
    if args.bf16:
        # Under autocast MONAI's forward index-puts the bf16 output of `decoder_embed` into a float32 copy of its mask
        # token and fails (dtype mismatch, on CUDA as on CPU); handing the decoder float32 tokens, as the forward
        # expects, costs one small cast.
        model.decoder_embed.register_forward_hook(lambda module, inputs, output: output.float())

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        pred, mask = model(x)  # [B, N, P*C], [B, N] (1 = masked)
        target = rearrange(x, "b c (d pd) (h ph) (w pw) -> b (d h w) (pd ph pw c)", pd=patch, ph=patch, pw=patch)
        per_patch = (pred.float() - target.float()).pow(2).mean(-1)
        return (per_patch * mask).sum() / mask.sum()

    return model, loss_fn


def measure(build, args: argparse.Namespace, device: torch.device, tokens_per_volume: int) -> dict:
    """Step time, throughput, FLOPs and MFU, memory of one model on the seeded input (the same for every model)."""
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

    for _ in range(args.warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    result = {
        "step_ms_median": round(1000 * step_s, 2),
        "step_ms_min": round(1000 * min(times), 2),
        "params": sum(p.numel() for p in model.parameters()),
        "tokens_per_volume": tokens_per_volume,
        "volumes_per_s": round(args.batch / step_s, 3),
        "tokens_per_s": round(args.batch * tokens_per_volume / step_s, 1),
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

    def forward_backward() -> None:
        with amp:
            loss = loss_fn(x)
        loss.backward()

    ckpt = getattr(model, "set_grad_checkpointing", None)
    if ckpt is not None:
        ckpt(False)  # model FLOPs: recomputation is extra work, not credited to utilisation
    result["flops_per_step"] = count_flops(forward_backward)
    opt.zero_grad(set_to_none=True)
    if ckpt is not None:
        ckpt(args.grad_ckpt)
    peak, _ = peak_bf16_tflops(device, args.peak_tflops)
    result["achieved_tflops"] = round(result["flops_per_step"] / step_s / 1e12, 6)
    result["mfu"] = round(result["flops_per_step"] / step_s / (peak * 1e12), 5) if peak else None
    return result


def pretrain_config(args: argparse.Namespace, batch: int) -> dict:
    """The `mtl-breast pretrain` config of this benchmark (model section as in configs/pretrain/*.yaml)."""
    model_args = {"mask_ratio": args.mask_ratio, "attn_mode": args.attn_mode, "max_phases": max(8, args.phases)}
    return {"model": {"arch": f"mae_vit_{args.model}", "model_args": model_args, "grad_checkpointing": args.grad_ckpt},
            "data": {"crop_size": args.size, "batch_size": batch},
            "trainer": {"precision": "bf16-mixed" if args.bf16 else "32-true", "gradient_clip_val": 1.0}}


def model_flops_per_volume(args: argparse.Namespace) -> int:
    """FLOPs of forward + backward per volume (no checkpoint recomputation), counted on fake tensors."""
    from mtl_breast.memtrace import FakeMode, LiveBytes

    counter = flop_counter_mode()  # fake tensors run the CPU flash kernel, which costs what CUDA's does
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
    from mtl_breast.run.fitcheck import estimate_training_memory, prepare_module, synthetic_batch
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

    measured = (args.memory or ("measured" if device.type == "cuda" else "estimate")) == "measured"
    metric = "fit-check estimate"

    def peak(b: int) -> float:
        nonlocal metric
        if not measured:
            return estimate_training_memory(pretrain_config(args, b), phases=args.phases)["peak_bytes"]
        if device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            batch = synthetic_batch("pretrain", b, args.phases, (args.size,) * 3, device=device)
            step(batch)  # the first step of a batch size may differ (workspaces, AdamW state at the very first)
            with PeakMemory(device, baseline=tensors_of(module, optimizer, batch)) as tracked:
                step(batch)
            metric = tracked.metric
            return tracked.peak_bytes
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
    result = {"config": {**vars(args)}, "memory_metric": metric, "limit_gib": args.limit_gib,
              "peak_gib_by_batch": {k: (round(v / 2**30, 3) if math.isfinite(v) else "out of memory")
                                    for k, v in sorted(tried.items())},
              "largest_batch": lo}
    if lo == 0:
        return result
    batch = synthetic_batch("pretrain", lo, args.phases, (args.size,) * 3, device=device)
    times = []
    for i in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        step(batch)
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    flops = model_flops_per_volume(args) * lo
    peak_flops, source = peak_bf16_tflops(device, args.peak_tflops)
    result.update(step_s_median=round(step_s, 4), volumes_per_s=round(lo / step_s, 2),
                  model_tflop_per_step=round(flops / 1e12, 6), achieved_tflops=round(flops / step_s / 1e12, 6),
                  peak_bf16_tflops=peak_flops, peak_source=source,
                  mfu=round(flops / step_s / (peak_flops * 1e12), 5) if peak_flops else None)
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # AdamW's tiny second moments otherwise slow CPU math badly
    if args.find_max_batch:
        return emit({"benchmark": "mae_max_batch", "device": device_name(device), "torch": torch.__version__,
                     **find_max_batch(args, device)}, args.out)
    grid = args.size // ENCODER_SIZES[args.model]["patch_size"]
    visible = int(grid**3 * (1 - args.mask_ratio))
    peak, source = peak_bf16_tflops(device, args.peak_tflops)
    out = {
        "benchmark": "mae_train_step",
        "device": device_name(device),
        "torch": torch.__version__,
        "config": {**vars(args), "tokens_per_phase": grid**3, "visible_per_phase": visible},
        "memory_metric": "cuda max_memory_allocated" if device.type == "cuda" else "saved tensors for backward",
        "token_definition": "an element of the model's own input sequence, masked or not: ours T*N per volume "
                            "(phases x patches), MONAI's N (phases are channels of one patch)",
        "flops_method": "torch.utils.flop_counter.FlopCounterMode over one forward + backward of the step on the "
                        "same input (matmuls, convolutions, attention; optimizer and elementwise ops not counted; "
                        "gradient checkpointing off while counting)",
        "peak_bf16_tflops": peak,
        "peak_source": source,
        "mfu_assumption": "MFU = counted FLOPs per step / median step time / dense bf16 peak (no sparsity), "
                          "whatever the autocast dtype",
    }
    runs = {"ours": build_ours} if args.skip_monai else {"ours": build_ours, "monai": build_monai}
    tokens = {"ours": args.phases * grid**3, "monai": grid**3}
    for name, build in runs.items():
        try:
            out[name] = measure(build, args, device, tokens[name])
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
            + ("; under bf16 autocast decoder_embed's output is cast to float32 (MONAI's index_put of it into "
               "the float32 mask tokens fails otherwise)" if args.bf16 else "")
        )
        ours, monai = out["ours"], out["monai"]
        if "tokens_per_s" in ours and "tokens_per_s" in monai:
            out["ours_vs_monai"] = {
                "tokens_per_s_ratio": round(ours["tokens_per_s"] / monai["tokens_per_s"], 3),
                "volumes_per_s_ratio": round(ours["volumes_per_s"] / monai["volumes_per_s"], 3),
                "step_time_ratio": round(ours["step_ms_median"] / monai["step_ms_median"], 3),
            }
    return emit(out, args.out)


if __name__ == "__main__":
    main()
