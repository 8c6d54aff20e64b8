"""MONAI dictionary transforms for pretraining, fine-tuning and evaluation.

A sample entering these pipelines is a dict from `dataset.CachedCaseDataset`:
    image       float [T, D, H, W]   phases are MONAI's channel axis
    label       uint8 [1, D, H, W]   (fine-tuning only)
    phase_mask  bool  [T]            True = real phase
    phase_time  float [T]            seconds after pre-contrast, NaN unknown
    acquisition float [5]            intensity offset/scale of the normalisation, field strength, TR, flip angle
plus non-tensor keys (patient_id, pcr, meta) that the transforms leave alone. Fine-tuning crops add
    tumour_window bool               True = the crop is centred on the tumour (the pCR window rule)

Intensity augmentation multiplies all phases of a case by ONE gain (phases of a series share the
receiver gain) and scales the normalisation offset in `acquisition` with it, so the signal ratios S_t / S_0
inside the tumour, the signal pCR depends on, survive augmentation exactly; an optional per-phase gain is off
by default.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    MapTransform,
    RandFlipd,
    RandomizableTransform,
    RandScaleIntensityd,
    RandSpatialCropd,
    SpatialPadd,
)

from mtl_breast.data.window import tumour_centre, window_start
from mtl_breast.sizes import to_3tuple


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


class RandCaseGaind(RandomizableTransform, MapTransform):
    """Multiply every phase of a case by one random receiver gain ``1 + u``, ``u ~ U(-factor, factor)``.

    The image is the case normalised with one offset and scale (``(S - offset) / scale``); a gain on the scanner
    signal S scales the normalised image by ``1 + u`` only if the offset scales with it, so the sample's
    ``acquisition`` vector (`data.dataset.acquisition_vector`) gets ``offset * (1 + u)``: the signal ratios
    between phases, and with them the contrast concentration, stay exact.
    """

    def __init__(self, factor: float = 0.1, prob: float = 0.5, image_key: str = "image",
                 acquisition_key: str = "acquisition"):
        MapTransform.__init__(self, [image_key])
        RandomizableTransform.__init__(self, prob)
        self.factor, self.image_key, self.acquisition_key = factor, image_key, acquisition_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        gain = 1.0 + self.R.uniform(-self.factor, self.factor)
        d[self.image_key] = torch.as_tensor(d[self.image_key]) * gain
        if self.acquisition_key in d:
            acquisition = torch.as_tensor(d[self.acquisition_key]).clone()
            acquisition[0] = acquisition[0] * gain  # the offset, in the units of the signal
            d[self.acquisition_key] = acquisition
        return d


class RandTumourCropd(RandomizableTransform, MapTransform):
    """Crop ``roi_size``: with probability ``pos_fraction`` centred on the tumour, otherwise anywhere.

    A tumour crop is centred on the centroid of the largest connected component of the label (the same rule that
    places the pCR window at inference, `window.tumour_centre`), moved by a uniform jitter of up to
    ``jitter * roi_size`` voxels per axis, and flagged with ``tumour_window = True``; the pCR loss is computed on
    those crops only. A case without tumour voxels always gets a random crop. Volumes must already be padded to at
    least ``roi_size``.

    Args:
        keys: the arrays to crop alike (``[C, D, H, W]`` each).
        label_key: the mask that places tumour crops.
        roi_size: crop size (D, H, W).
        pos_fraction: probability of a tumour crop.
        jitter: largest shift of the centre, as a fraction of the crop size.
    """

    def __init__(self, keys: Sequence[str], label_key: str, roi_size: Sequence[int], pos_fraction: float = 0.67,
                 jitter: float = 0.2):
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob=1.0)
        if not 0.0 <= pos_fraction <= 1.0 or not 0.0 <= jitter <= 0.5:
            raise ValueError(f"need 0 <= pos_fraction <= 1 and 0 <= jitter <= 0.5, got {pos_fraction}, {jitter}")
        self.label_key, self.roi, self.pos_fraction, self.jitter = label_key, tuple(roi_size), pos_fraction, jitter
        # Tumour centre per (case, padded shape): labelling the components of a whole volume costs far more than
        # the crop, and a case's mask never changes between epochs.
        self._centres: dict[tuple, tuple[float, float, float] | None] = {}

    def _centre(self, d: Mapping[Hashable, Any], label: np.ndarray) -> tuple[float, float, float] | None:
        key = (d.get("patient_id"), label.shape)
        if key[0] is None:
            return tumour_centre(label > 0)
        if key not in self._centres:
            self._centres[key] = tumour_centre(label > 0)
        return self._centres[key]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        label = np.asarray(torch.as_tensor(d[self.label_key]).detach().cpu())[0]
        spatial = label.shape
        centre = self._centre(d, label) if self.R.random_sample() < self.pos_fraction else None
        if centre is not None:
            shift = [self.R.uniform(-self.jitter * r, self.jitter * r) for r in self.roi]
            start = window_start([c + s for c, s in zip(centre, shift, strict=True)], self.roi, spatial)
        else:
            start = tuple(int(self.R.randint(0, s - r + 1)) for s, r in zip(spatial, self.roi, strict=True))
        window = tuple(slice(a, a + r) for a, r in zip(start, self.roi, strict=True))
        for key in self.key_iterator(d):
            d[key] = d[key][(slice(None), *window)]
        d["tumour_window"] = centre is not None
        return d


def _augment(keys: list[str], flip_prob: float, intensity_jitter: float, intensity_prob: float,
             phase_jitter: float) -> list:
    # Flips along every spatial axis (axes 0..2 of [D, H, W] after the channel axis).
    ops: list = [RandFlipd(keys=keys, prob=flip_prob, spatial_axis=axis) for axis in range(3)]
    if intensity_jitter > 0:
        # One factor for every phase of the case (a series shares its receiver gain). No additive shift: an offset
        # would change the enhancement ratios between phases.
        ops.append(RandCaseGaind(factor=intensity_jitter, prob=intensity_prob))
    if phase_jitter > 0:
        ops.append(RandScaleIntensityd(keys="image", factors=phase_jitter, prob=intensity_prob, channel_wise=True))
    return ops


def finetune_transforms(
    crop_size: int | Sequence[int] = 64,
    pos_fraction: float = 0.67,
    flip_prob: float = 0.5,
    intensity_jitter: float = 0.1,
    intensity_prob: float = 0.5,
    phase_dropout: float = 0.0,
    phase_jitter: float = 0.0,
    crop_jitter: float = 0.2,
) -> Compose:
    """Tumour-centred or random crops, flips, one intensity gain per case, optional phase dropout.

    Args:
        crop_size: spatial size of the training crop (D, H, W); volumes smaller than it are padded.
        pos_fraction: probability that a crop is centred on the tumour (the rest fall anywhere).
        flip_prob: probability of a flip, drawn separately for each axis.
        intensity_jitter: relative range of the gain shared by all phases of a case.
        intensity_prob: probability of applying each intensity jitter.
        phase_dropout: probability of hiding one post-contrast phase.
        phase_jitter: relative range of an extra gain drawn per phase (0 = off: it changes the enhancement).
        crop_jitter: largest shift of a tumour crop's centre, as a fraction of the crop size.
    """
    size = to_3tuple(crop_size, name="crop_size")
    keys = ["image", "label"]
    ops: list = [
        SpatialPadd(keys=keys, spatial_size=size),
        RandTumourCropd(keys=keys, label_key="label", roi_size=size, pos_fraction=pos_fraction, jitter=crop_jitter),
        *_augment(keys, flip_prob, intensity_jitter, intensity_prob, phase_jitter),
    ]
    if phase_dropout > 0:
        ops.append(RandPhaseDropoutd(prob=phase_dropout))
    return Compose(ops)


def pretrain_transforms(
    crop_size: int | Sequence[int] = 64,
    flip_prob: float = 0.5,
    intensity_jitter: float = 0.1,
    intensity_prob: float = 0.5,
    phase_jitter: float = 0.0,
) -> Compose:
    """Random crops anywhere in the volume, flips and one intensity gain per case (no labels needed)."""
    size = to_3tuple(crop_size, name="crop_size")
    return Compose([
        SpatialPadd(keys="image", spatial_size=size),
        RandSpatialCropd(keys="image", roi_size=size, random_size=False),
        *_augment(["image"], flip_prob, intensity_jitter, intensity_prob, phase_jitter),
    ])


def seeded(transform: Compose, seed: int) -> Compose:
    """Return `transform` with its random state set, for reproducible validation crops."""
    transform.set_random_state(seed=int(np.uint32(seed)))
    return transform
