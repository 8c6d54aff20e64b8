"""Where the pCR window goes: centred on the tumour's largest connected component.

One rule for training and inference. Training centres its tumour crops on the largest component of the
expert mask; prediction centres the pCR window on the largest component of the thresholded predicted
probability. A soft centre of mass over the whole volume would be pulled away from the tumour by background
probability and false-positive blobs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

__all__ = ["tumour_centre", "tumour_window", "window_start"]


def tumour_centre(prob: np.ndarray, threshold: float = 0.5) -> tuple[float, float, float] | None:
    """Centroid (voxel indices) of the largest connected component of ``prob >= threshold``.

    Args:
        prob: tumour probability or binary mask ``[D, H, W]``.
        threshold: voxels at or above it are tumour.

    Returns:
        ``(d, h, w)`` as floats; the voxel of highest probability when no voxel reaches the threshold; None when
        the volume holds no positive value at all (nothing to centre on).
    """
    prob = np.asarray(prob)
    if prob.ndim != 3:
        raise ValueError(f"tumour probability must be [D, H, W], got shape {prob.shape}")
    mask = prob >= threshold
    if mask.any():
        labels, n = ndimage.label(mask)
        if n > 1:
            sizes = np.bincount(labels.ravel())[1:]
            mask = labels == int(np.argmax(sizes)) + 1
        return tuple(float(c) for c in np.argwhere(mask).mean(axis=0))  # type: ignore[return-value]
    if not (prob > 0).any():
        return None
    return tuple(float(i) for i in np.unravel_index(int(np.argmax(prob)), prob.shape))  # type: ignore[return-value]


def window_start(centre: Sequence[float], roi: Sequence[int], spatial: Sequence[int]) -> tuple[int, int, int]:
    """First voxel of the ``roi`` window centred on ``centre``, shifted to lie inside a volume of size ``spatial``.

    The volume must be at least ``roi`` along every axis (pad it first).
    """
    if any(r > s for r, s in zip(roi, spatial, strict=True)):
        raise ValueError(f"window {tuple(roi)} is larger than the volume {tuple(spatial)}: pad the volume first")
    # The middle of a window of r voxels is at index (r - 1) / 2; floor(. + 0.5) rounds halves up on every axis.
    return tuple(int(min(max(0, math.floor(c - (r - 1) / 2 + 0.5)), s - r))  # type: ignore[return-value]
                 for c, r, s in zip(centre, roi, spatial, strict=True))


def tumour_window(volume: torch.Tensor, prob: torch.Tensor, roi: Sequence[int], threshold: float = 0.5) -> torch.Tensor:
    """The ``roi`` window of ``volume [..., D, H, W]`` centred on the largest component of ``prob [D, H, W]``.

    The volume is zero-padded at the end of each axis smaller than ``roi`` (so voxel indices of ``prob`` stay
    valid); the window is centred by `tumour_centre` (the volume centre when ``prob`` is zero everywhere).
    """
    pad = [max(0, r - s) for r, s in zip(roi, volume.shape[-3:], strict=True)]
    if any(pad):
        flat = [v for d in reversed(pad) for v in (0, d)]  # F.pad takes (last dim first) pairs
        volume, prob = torch.nn.functional.pad(volume, flat), torch.nn.functional.pad(prob, flat)
    spatial = tuple(volume.shape[-3:])
    centre = tumour_centre(prob.float().cpu().numpy(), threshold)
    if centre is None:
        centre = tuple(s / 2 for s in spatial)
    a, b, c = window_start(centre, roi, spatial)
    return volume[..., a:a + roi[0], b:b + roi[1], c:c + roi[2]]
