"""One MAE training step (forward + backward + AdamW step): ours vs MONAI's MaskedAutoEncoderViT. Prints JSON.

Both models get the same width, depth, heads, patch, decoder size, input shape and mask ratio. Ours encodes the
T phases as T*N tokens (shared tokenizer, temporal attention); MONAI's takes the phases as input channels, so it
sees N tokens that mix all phases in the patch embedding. Memory: CUDA ``max_memory_allocated`` on a GPU; on CPU
the bytes of tensors saved for backward (a ``saved_tensors_hooks`` count, deduplicated by storage).

    python bench/mae_step.py --model test --size 32 --phases 2 --batch 2          # CPU smoke run
    python bench/mae_step.py --model base --size 128 --phases 4 --batch 2 --bf16  # GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
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


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # AdamW's tiny second moments otherwise slow CPU math badly
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
