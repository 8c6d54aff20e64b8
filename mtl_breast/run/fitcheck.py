"""Will a training configuration fit on the GPU? Peak memory estimated on a machine without one.

`estimate_training_memory(config)` parses the config with the LightningCLI parser of `mtl-breast pretrain|finetune
fit` (`run.train.parse_training_config`: the same classes, links and defaults, nothing instantiated), builds its
LightningModule (`MAEPretrainModule` for a ``mae_*`` arch, `MTLFinetuneModule` for ``mtl_*``) from the parsed
``model`` values on fake tensors (shapes and dtypes, no data), and runs one steady-state training step: AdamW's moments
already allocated (and, when the trainer accumulates gradients, the previous micro-batch's gradients), then
``training_step`` under the configured precision, ``backward``, gradient clipping and the AdamW step (built
by the module's own ``configure_optimizers``). `mtl_breast.memtrace.LiveBytes` follows every allocation and
free, so the peak is that of the real step, comparable to ``torch.cuda.max_memory_allocated``.

Included: parameters, gradients, AdamW state, the batch, everything the forward keeps for backward (with
or without gradient checkpointing), autocast's low-precision weight copies, recomputation in checkpointed
blocks, activation gradients and every other transient, at 512-byte allocator granularity.
Approximated (listed in the result's ``assumptions``): CUDA autocast (CPU autocast + CUDA's float32
policy), attention (PyTorch's CPU flash kernel keeps the same tensors for backward as CUDA's flash and
memory-efficient kernels: q, k, v, output, log-sum-exp), all phases real. Not in the peak: allocator
fragmentation, cuDNN/cuBLAS workspaces, the CUDA context; ``fits`` adds ``fragmentation`` (5% of the peak)
and ``context_gib`` (0.5 GiB) for them.

    mtl-breast fit-check --config configs/finetune/vit_b.yaml --phases 6
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml
from jsonargparse import Namespace

from mtl_breast.memtrace import CudaAutocastPolicy, FakeMode, LiveBytes, block_bytes
from mtl_breast.run.fitcheck_flags import add_arguments
from mtl_breast.run.train import parse_training_config, task_classes
from mtl_breast.sizes import to_3tuple

__all__ = ["DEFAULT_PHASES", "FitCheckError", "add_arguments", "estimate_training_memory", "format_table",
           "load_config", "prepare_module", "run", "synthetic_batch"]

GIB = 1 << 30
DEFAULT_PHASES = {"pretrain": 4, "finetune": 3}
# Lightning precision flag -> (autocast dtype, parameter dtype).
PRECISIONS: dict[str, tuple[torch.dtype | None, torch.dtype]] = {
    "32-true": (None, torch.float32), "32": (None, torch.float32),
    "bf16-mixed": (torch.bfloat16, torch.float32), "bf16": (torch.bfloat16, torch.float32),
    "16-mixed": (torch.float16, torch.float32), "16": (torch.float16, torch.float32),
    "bf16-true": (None, torch.bfloat16), "16-true": (None, torch.float16),
}


class FitCheckError(ValueError):
    """A configuration the fit check cannot read or build; the message says which file or key."""


def load_config(config: str | Path | dict) -> dict:
    """A LightningCLI config as a dict: the YAML file at ``config``, or a dict passed through."""
    if isinstance(config, dict):
        data, where = config, "config"
    else:
        path = Path(config)
        if not path.is_file():
            raise FitCheckError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise FitCheckError(f"{path}: not valid YAML: {err}") from err
        where = str(path)
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict) or "arch" not in data["model"]:
        raise FitCheckError(f"{where}: expected a LightningCLI config with 'model: {{arch: ...}}'")
    return data


def _dtypes(flag: str) -> tuple[torch.dtype | None, torch.dtype]:
    """(autocast dtype, parameter dtype) of a Lightning precision flag the fit check knows."""
    if flag not in PRECISIONS:
        raise FitCheckError(f"precision {flag!r} is not supported by the fit check; one of {sorted(PRECISIONS)}")
    return PRECISIONS[flag]


def _task_of(arch: str) -> str:
    if arch.startswith("mae_"):
        return "pretrain"
    if arch.startswith("mtl_"):
        return "finetune"
    raise FitCheckError(f"model.arch {arch!r}: the fit check knows MAE ('mae_*') and joint ('mtl_*') models")


def _parse(config: str | Path | dict, raw: dict, task: str, overrides: dict) -> Namespace:
    """``config`` (``raw``: its content, from `load_config`) and ``overrides`` (dotted keys) through the parser of
    ``mtl-breast <task> fit``: the values and defaults training would use, with the trainer defaults of a bf16 GPU
    (the kind a config is checked for)."""
    # A dict goes in as the text of a config file (JSON is YAML), so both take the same path through the parser.
    args = ["--config", json.dumps(raw) if isinstance(config, dict) else str(config)]
    # The data root is required by the data module but never read here: a placeholder satisfies the parser.
    args += [f"--{key}={json.dumps(value) if not isinstance(value, str) else value}"
             for key, value in {"data.root": "unused", **overrides}.items()]
    try:
        return parse_training_config(task, args, bf16=True)
    except argparse.ArgumentError as err:
        where = "config" if isinstance(config, dict) else str(config)
        raise FitCheckError(f"{where}: not a valid `mtl-breast {task} fit` config: {err}") from err


def _build_module(model_cfg: Namespace, task: str, grad_checkpointing: bool | None):
    """The task's LightningModule from the parsed ``model`` section (pretrained weights not loaded)."""
    kwargs = {k: v for k, v in model_cfg.as_dict().items() if k != "pretrained"}
    cls = task_classes(task)[0]
    try:
        module = cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise FitCheckError(f"the model section does not build a {cls.__name__}: {err}") from err
    if grad_checkpointing is False:  # also off when model_args switched it on
        module.model.set_grad_checkpointing(False)
    return module


def synthetic_batch(task: str, batch_size: int, phases: int, crop: tuple[int, int, int],
                    dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> dict:
    """A training batch as the data modules collate it: all phases real, a tumour and a pCR label in every crop."""
    b, t = batch_size, phases
    batch = {"image": torch.randn(b, t, *crop, dtype=dtype, device=device),
             "phase_mask": torch.ones(b, t, dtype=torch.bool, device=device),
             "phase_time": (torch.arange(t, dtype=torch.float32, device=device) * 90.0).expand(b, t).contiguous()}
    if task == "finetune":
        label = torch.zeros(b, 1, *crop, dtype=torch.uint8, device=device)
        label[:, :, : crop[0] // 2, : crop[1] // 2, : crop[2] // 2] = 1
        batch.update(label=label, pcr=torch.arange(b, dtype=torch.float32, device=device) % 2,
                     meta=[{"age": 50.0, "menopause": "post", "density": "b"}] * b,
                     patient_id=[f"case_{i}" for i in range(b)])
    return batch


def prepare_module(module, *, batch_size: int, accumulate: int = 1) -> torch.optim.Optimizer:
    """Make a task LightningModule steppable without a Trainer; returns its ``configure_optimizers`` optimizer.

    ``training_step`` then runs as under Lightning (its ``log`` calls do nothing); the optimizer is the one
    Lightning would use (AdamW, fused when the parameters are on a CUDA device).
    """
    module.log = module.log_dict = lambda *a, **k: None
    module._trainer = SimpleNamespace(estimated_stepping_batches=1000, world_size=1, num_devices=1,
                                      accumulate_grad_batches=accumulate,
                                      datamodule=SimpleNamespace(batch_size=batch_size))
    return module.configure_optimizers()["optimizer"]


def _simulate(module, task: str, *, batch_size: int, phases: int, crop, autocast_dtype, param_dtype,
              accumulate: int, clip: float | None, fake: bool) -> dict:
    """One steady-state training step of ``module`` traced by `LiveBytes`; its peak and what was live then."""
    tracker = LiveBytes(fake=fake)
    module.train()
    optimizer = prepare_module(module, batch_size=batch_size, accumulate=accumulate)
    for group in optimizer.param_groups:  # build_optimizer picks fused AdamW on CUDA; fake tensors sit on the CPU
        group["fused"], group["foreach"] = True, False
    params = [p for p in module.parameters() if p.requires_grad]
    for p in module.parameters():
        tracker.add(p, "parameters")
    for buf in module.buffers():
        tracker.add(buf, "buffers")
    amp = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if tracker.tag_of(t) == "forward":
            saved[t.untyped_storage()._cdata] = block_bytes(t.untyped_storage().nbytes())
        return t

    with CudaAutocastPolicy() if fake else contextlib.nullcontext(), tracker:
        tracker.tag = tracker.where = "warm-up"  # AdamW allocates its moments at its first step
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        tracker.retag([v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)],
                      "optimizer_state")
        if accumulate > 1:  # micro-batches after the first start with the gradients of the previous ones
            tracker.retag([p.grad for p in params], "gradients")
        else:
            optimizer.zero_grad(set_to_none=True)
        tracker.tag = tracker.where = "batch"
        batch = synthetic_batch(task, batch_size, phases, crop, param_dtype)
        tracker.tag = tracker.where = "forward"
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
                loss = module.training_step(batch, 0)
        except ValueError as err:
            raise FitCheckError(f"the model rejects a batch of {phases} phases of {crop}: {err}") from err
        activations = tracker.by_tag["forward"]
        tracker.tag = tracker.where = "backward"
        (loss / accumulate).backward()  # Lightning divides the loss by accumulate_grad_batches
        del loss, batch
        tracker.retag([p.grad for p in params if p.grad is not None], "gradients")
        tracker.tag = tracker.where = "optimizer"
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)  # as on CUDA
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"peak": tracker.peak, "peak_by_tag": tracker.peak_by_tag, "peak_at": tracker.peak_at,
            "activations": activations, "saved_tensors": sum(saved.values()),
            "data_dependent": dict(tracker.data_dependent)}


def estimate_training_memory(
    config: str | Path | dict,
    *,
    phases: int | None = None,
    batch_size: int | None = None,
    grad_checkpointing: bool | None = None,
    precision: str | None = None,
    crop_size: int | list[int] | None = None,
    budget_gib: float = 24.0,
    context_gib: float = 0.5,
    fragmentation: float = 0.05,
    real_cpu: bool = False,
) -> dict:
    """Estimate the peak GPU memory of training with ``config``.

    Args:
        config: a LightningCLI YAML path (e.g. ``configs/finetune/vit_b.yaml``) or its content as a dict.
        phases: phases per sample T (default 4 for pretraining, 3 for fine-tuning).
        batch_size, grad_checkpointing, precision, crop_size: override ``data.batch_size``,
            ``model.grad_checkpointing``, ``trainer.precision`` (a Lightning flag; default "bf16-mixed", what
            `mtl-breast` uses on a GPU) and ``data.crop_size``.
        budget_gib: GPU memory available.
        context_gib: GiB added for the CUDA context and cuDNN/cuBLAS workspaces.
        fragmentation: fraction of the peak added for allocator fragmentation.
        real_cpu: trace real tensors on the CPU instead of fake ones (slow; validates the method on tiny models).

    Returns:
        A JSON-serialisable dict: ``params`` (total, trainable), ``bytes`` (exact sizes of parameters,
        gradients, optimizer_state and batch; ``activations`` = bytes the forward left alive for backward,
        ``saved_tensors`` = those of them autograd saved outside checkpointed blocks), ``peak_breakdown``
        (live bytes by tag at the peak; "forward" = activations, "backward" = recomputed activations,
        activation gradients and new parameter gradients), ``peak_at``, ``peak_bytes``, ``peak_gib``,
        ``required_gib`` (peak plus fragmentation and context), ``budget_gib``, ``fits``, ``assumptions``
        and ``data_dependent_values`` (where a value of a large fake tensor was read and assumed).

    Raises:
        FitCheckError: unreadable config, unknown arch or precision, or a model that rejects the input.
    """
    raw = load_config(config)
    task = _task_of(str(raw["model"]["arch"]))
    if precision is not None:  # checked here too, so a bad flag is named before the parser's list of every flag
        _dtypes(str(precision))
    overrides = {"data.batch_size": batch_size, "data.crop_size": crop_size, "trainer.precision": precision,
                 "model.grad_checkpointing": grad_checkpointing}
    cfg = _parse(config, raw, task, {k: v for k, v in overrides.items() if v is not None})
    flag = str(cfg.trainer.precision)
    autocast_dtype, param_dtype = _dtypes(flag)
    crop = to_3tuple(cfg.data.crop_size, name="crop_size")
    b = int(cfg.data.batch_size)
    t = int(phases if phases is not None else DEFAULT_PHASES[task])
    accumulate = int(cfg.trainer.accumulate_grad_batches or 1)
    clip = cfg.trainer.gradient_clip_val
    if b < 1 or t < 1 or len(crop) != 3 or min(crop) < 1:
        raise FitCheckError(f"batch size ({b}) and phases ({t}) must be >= 1 and crop_size three sizes ({crop})")

    if real_cpu:
        fake_mode = contextlib.nullcontext()
        module = _build_module(cfg.model, task, grad_checkpointing).to(param_dtype)
    else:
        with torch.device("meta"):  # initialisers do nothing on meta; storage comes from to_empty below
            module = _build_module(cfg.model, task, grad_checkpointing).to(param_dtype)
        fake_mode = FakeMode()
    with fake_mode:
        if not real_cpu:
            module = module.to_empty(device="cpu")
            for m in module.modules():  # Lightning's `module.device` remembers "meta" from construction
                if hasattr(m, "_device"):
                    m._device = torch.device("cpu")
        sim = _simulate(module, task, batch_size=b, phases=t, crop=crop, autocast_dtype=autocast_dtype,
                        param_dtype=param_dtype, accumulate=accumulate, clip=clip, fake=not real_cpu)
    n_total = sum(p.numel() for p in module.parameters())
    n_train = sum(p.numel() for p in module.parameters() if p.requires_grad)
    size = torch.finfo(param_dtype).bits // 8
    voxels = b * math.prod(crop)
    peak = sim["peak"]
    required = peak * (1 + fragmentation) + context_gib * GIB
    assumptions = [
        ("real CPU tensors" if real_cpu else "CUDA emulated with fake CPU tensors")
        + ": one steady-state step (AdamW moments allocated"
        + (", gradients of the previous micro-batch held)" if accumulate > 1 else ")"),
        "all phases real and acquisition times known; tumour and pCR label in every crop",
        "attention through a fused kernel keeping q, k, v, output and log-sum-exp for backward",
        f"precision {flag}" + (": CPU autocast following CUDA autocast's float32 policy"
                               if autocast_dtype is not None and not real_cpu else ""),
        "AdamW fused (as build_optimizer makes it on CUDA); gradient clipping "
        + (f"at {clip}" if clip else "off"),
        "allocations rounded up to 512 bytes (CUDA caching allocator); peak excludes fragmentation",
        f"required = peak + {fragmentation:.0%} fragmentation + {context_gib} GiB CUDA context and "
        "cuDNN/cuBLAS workspaces (neither is in torch.cuda.max_memory_allocated)",
        "not counted: DDP/FSDP buffers, validation (sliding-window inference), pinned host memory",
    ]
    return {
        "config": None if isinstance(config, dict) else str(config),
        "task": task, "arch": cfg.model.arch, "crop_size": list(crop), "phases": t, "batch_size": b,
        "precision": flag, "grad_checkpointing": bool(module.model.encoder.grad_checkpointing),
        "accumulate_grad_batches": accumulate,
        "params": {"total": n_total, "trainable": n_train},
        "bytes": {"parameters": n_total * size, "gradients": n_train * size, "optimizer_state": 2 * n_train * size,
                  "batch": voxels * t * size + (voxels if task == "finetune" else 0),
                  "activations": sim["activations"], "saved_tensors": sim["saved_tensors"]},
        "peak_breakdown": sim["peak_by_tag"], "peak_at": sim["peak_at"],
        "peak_bytes": peak, "peak_gib": round(peak / GIB, 3), "required_gib": round(required / GIB, 3),
        "budget_gib": budget_gib, "fits": required <= budget_gib * GIB,
        "assumptions": assumptions, "data_dependent_values": sim["data_dependent"],
    }


def format_table(r: dict) -> str:
    """A readable summary of an `estimate_training_memory` result."""
    def gib(n: int) -> str:
        return f"{n / GIB:8.3f} GiB"

    crop = "x".join(map(str, r["crop_size"]))
    lines = [f"{r['arch']} ({r['task']}): {r['phases']} phases of {crop}, batch {r['batch_size']}, {r['precision']}, "
             f"checkpointing {'on' if r['grad_checkpointing'] else 'off'}",
             f"  parameters        {r['params']['total']:,} ({r['params']['trainable']:,} trainable)"]
    lines += [f"  {k:<18}{gib(v)}" for k, v in r["bytes"].items()]
    lines.append(f"  live at the peak ({r['peak_at']}):")
    lines += [f"    {k:<16}{gib(v)}" for k, v in sorted(r["peak_breakdown"].items(), key=lambda kv: -kv[1])]
    verdict = "fits" if r["fits"] else "does NOT fit"
    lines += [f"  peak              {gib(r['peak_bytes'])}  (as torch.cuda.max_memory_allocated)",
              f"  required          {r['required_gib']:8.3f} GiB  -> {verdict} in {r['budget_gib']:g} GiB"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Print the estimate. Exit status 0 when it fits the budget, 1 when it does not, 2 for a bad config."""
    try:
        result = estimate_training_memory(
            args.config, phases=args.phases, batch_size=args.batch_size, precision=getattr(args, "precision", None),
            crop_size=getattr(args, "crop_size", None), budget_gib=args.budget_gib,
            grad_checkpointing=False if args.no_checkpointing else None)
    except FitCheckError as err:
        print(f"fit-check: {err}")
        return 2
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0 if result["fits"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtl_breast.run.fitcheck", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
