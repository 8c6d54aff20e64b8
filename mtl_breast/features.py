"""Feature extraction with a pretrained encoder: per token, per phase and pooled.

`extract_features` is the library call; `mtl_breast.run.extract.extract_dataset` runs it over a dataset root
(the `mtl-breast extract` command). Whole preprocessed volumes are padded to a multiple of the patch size; the
position embedding is sin-cos and follows the grid, so any volume size and any number of phases (2..8) work.
"""

from __future__ import annotations

import logging

import torch
from einops import reduce
from torch import nn

log = logging.getLogger(__name__)


def encoder_of(model: nn.Module) -> nn.Module:
    # An encoder, an MAE pretrainer or a joint model: all keep the encoder at `.encoder`.
    return model.encoder if hasattr(model, "encoder") else model


@torch.no_grad()
def extract_features(model: nn.Module, image: torch.Tensor, phase_mask: torch.Tensor | None = None,
                     phase_time: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Encode DCE-MRI volumes.

    Args:
        model: a `ViTEncoder3d`, or a model holding one at `.encoder` (MAE, joint model).
        image: [B, T, D, H, W], spatial size divisible by the patch size.
        phase_mask: bool [B, T], True = real phase (default all real).
        phase_time: float [B, T], seconds after pre-contrast, NaN unknown.

    Returns:
        tokens [B, T, N, E]; per_phase [B, T, E] (token mean, zero for padded phases);
        pooled [B, E] (mean over real phases).
    """
    encoder = encoder_of(model)
    was_training = encoder.training
    encoder.eval()
    try:
        tokens = encoder.forward_features(image, phase_mask=phase_mask, phase_time=phase_time)
    finally:
        encoder.train(was_training)
    if phase_mask is None:
        phase_mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    per_phase = reduce(tokens, "b t n e -> b t e", "mean") * phase_mask[..., None]
    pooled = per_phase.sum(1) / phase_mask.sum(1, keepdim=True).clamp(min=1)
    return {"tokens": tokens, "per_phase": per_phase, "pooled": pooled}


def pad_to_patch_multiple(image: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """Zero-pad [T, D, H, W] at the end of each spatial axis up to a multiple of the patch size."""
    pads = [(-s) % p for s, p in zip(image.shape[1:], patch, strict=True)]
    return torch.nn.functional.pad(image, [x for d in reversed(pads) for x in (0, d)])
