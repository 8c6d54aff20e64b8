"""Optimizer and learning-rate schedule shared by the pretraining and fine-tuning tasks.

AdamW over timm's parameter groups (no weight decay on biases, norms and embeddings; optional
layer-wise LR decay), linear warmup then cosine decay, stepped every optimizer step. Under DDP the
learning rate can follow the linear scaling rule: lr = lr * effective_batch / lr_reference_batch.
"""

from __future__ import annotations

import math

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier at `step`: linear 0 -> 1 over `warmup_steps`, cosine 1 -> `min_lr_ratio` after."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def effective_batch_size(trainer, batch_size: int) -> int:
    """Samples per optimizer step across all devices and nodes."""
    return batch_size * trainer.world_size * trainer.accumulate_grad_batches


# Last name component of parameters that are lookup tables or tokens, not weights of a map: position and phase
# embeddings, the MAE mask token. Weight decay would pull them towards 0, which means nothing for a table.
_TABLE_NAMES = ("pos_embed", "index_embed", "phase_embed", "mask_token", "cls_token")


def embedding_tables(model: nn.Module) -> tuple[str, ...]:
    """Names of the parameters of ``model`` that are embedding tables or tokens (no weight decay on those)."""
    return tuple(name for name, _ in model.named_parameters() if name.rsplit(".", 1)[-1] in _TABLE_NAMES)


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    layer_decay: float | None = None,
    no_weight_decay: tuple[str, ...] = (),
) -> torch.optim.AdamW:
    """AdamW with parameter groups; fused kernels when every parameter is on a CUDA device.

    No weight decay on biases, norm parameters (1-D), the embedding tables and tokens (`embedding_tables`) and the
    names in ``no_weight_decay``.
    """
    no_weight_decay = tuple(no_weight_decay) + embedding_tables(model)
    if layer_decay is not None and layer_decay < 1.0:
        # timm groups blocks by depth (model.group_matcher or automatic) and scales each group's lr.
        groups = param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=no_weight_decay,
                                          layer_decay=layer_decay)
    else:
        groups = param_groups_weight_decay(model, weight_decay=weight_decay, no_weight_decay_list=no_weight_decay)
    for g in groups:
        g.setdefault("lr_scale", 1.0)
        g["lr"] = lr * g["lr_scale"]
    groups = [g for g in groups if any(p.requires_grad for p in g["params"])]
    if not groups:
        raise ValueError("no trainable parameters")
    params = [p for g in groups for p in g["params"]]
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def build_scheduler(optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                    min_lr_ratio: float = 0.01) -> dict:
    """A per-step LambdaLR in Lightning's `lr_scheduler` dict format."""
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps, min_lr_ratio))
    return {"scheduler": sched, "interval": "step", "frequency": 1}
