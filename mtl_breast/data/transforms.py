"""MONAI dictionary transforms for pretraining, fine-tuning and evaluation.

A sample entering these pipelines is a dict from `dataset.CachedCaseDataset`:
    image       float [T, D, H, W]   phases are MONAI's channel axis
    label       uint8 [1, D, H, W]   (fine-tuning only)
    phase_mask  bool  [T]            True = real phase
    phase_time  float [T]            seconds after pre-contrast, NaN unknown
plus non-tensor keys (patient_id, pcr, meta) that the transforms leave alone.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    MapTransform,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandomizableTransform,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    SpatialPadd,
)


def _as_size(size: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(size, int):
        return (size, size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 3:
        raise ValueError(f"crop size must be an int or 3 ints, got {size}")
    return size  # type: ignore[return-value]


class RandPhaseDropoutd(RandomizableTransform, MapTransform):
    """Hide one random post-contrast phase (mask it out, zero its voxels) with probability `prob`.

    Teaches the model to work when a site acquires fewer phases. Phase 0 (pre-contrast) is never
    dropped and at least `min_phases` real phases always remain.
    """

    def __init__(self, prob: float = 0.2, min_phases: int = 2, image_key: str = "image", mask_key: str = "phase_mask"):
        MapTransform.__init__(self, [image_key])
        RandomizableTransform.__init__(self, prob)
        self.image_key, self.mask_key, self.min_phases = image_key, mask_key, min_phases

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        phase_mask = torch.as_tensor(d[self.mask_key]).clone()
        candidates = [t for t in range(1, phase_mask.numel()) if phase_mask[t]]
        if int(phase_mask.sum()) <= self.min_phases or not candidates:
            return d
        drop = candidates[self.R.randint(len(candidates))]
        phase_mask[drop] = False
        image = torch.as_tensor(d[self.image_key]).clone()
        image[drop] = 0
        d[self.image_key], d[self.mask_key] = image, phase_mask
        return d


def _augment(keys: list[str], flip_prob: float, intensity_jitter: float, intensity_prob: float) -> list:
    # Flips along every spatial axis (axes 0..2 of [D, H, W] after the channel axis).
    ops: list = [RandFlipd(keys=keys, prob=flip_prob, spatial_axis=axis) for axis in range(3)]
    if intensity_jitter > 0:
        # channel_wise=True draws a separate factor per phase: the scanner's scale differs per acquisition.
        ops += [
            RandScaleIntensityd(keys="image", factors=intensity_jitter, prob=intensity_prob, channel_wise=True),
            RandShiftIntensityd(keys="image", offsets=intensity_jitter, prob=intensity_prob, channel_wise=True),
        ]
    return ops


def finetune_transforms(
    crop_size: int | Sequence[int] = 64,
    pos_fraction: float = 0.67,
    flip_prob: float = 0.5,
    intensity_jitter: float = 0.1,
    intensity_prob: float = 0.5,
    phase_dropout: float = 0.0,
) -> Compose:
    """Random crops that oversample the tumour, flips, per-phase intensity jitter, optional phase dropout.

    Args:
        crop_size: spatial size of the training crop (D, H, W); volumes smaller than it are padded.
        pos_fraction: probability that a crop is centred on a tumour voxel (the rest on background).
        flip_prob: probability of a flip, drawn separately for each axis.
        intensity_jitter: relative scale and absolute shift range drawn per phase.
        intensity_prob: probability of applying each intensity jitter.
        phase_dropout: probability of hiding one post-contrast phase.
    """
    size = _as_size(crop_size)
    if not 0.0 <= pos_fraction <= 1.0:
        raise ValueError(f"pos_fraction must be in [0, 1], got {pos_fraction}")
    keys = ["image", "label"]
    ops: list = [
        SpatialPadd(keys=keys, spatial_size=size),
        # pos/neg are relative weights; a case without tumour voxels falls back to random centres.
        # It returns a one-element list (num_samples=1); Compose maps the later transforms over it and
        # CachedCaseDataset unwraps it.
        RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=size, pos=pos_fraction,
                               neg=1.0 - pos_fraction, num_samples=1, allow_smaller=False),
        *_augment(keys, flip_prob, intensity_jitter, intensity_prob),
    ]
    if phase_dropout > 0:
        ops.append(RandPhaseDropoutd(prob=phase_dropout))
    return Compose(ops)


def pretrain_transforms(
    crop_size: int | Sequence[int] = 64,
    flip_prob: float = 0.5,
    intensity_jitter: float = 0.1,
    intensity_prob: float = 0.5,
) -> Compose:
    """Random crops anywhere in the volume, flips and per-phase intensity jitter (no labels needed)."""
    size = _as_size(crop_size)
    return Compose([
        SpatialPadd(keys="image", spatial_size=size),
        RandSpatialCropd(keys="image", roi_size=size, random_size=False),
        *_augment(["image"], flip_prob, intensity_jitter, intensity_prob),
    ])


def seeded(transform: Compose, seed: int) -> Compose:
    """Return `transform` with its random state set, for reproducible validation crops."""
    transform.set_random_state(seed=int(np.uint32(seed)))
    return transform
