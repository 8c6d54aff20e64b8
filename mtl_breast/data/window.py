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
from scipy import ndimage

__all__ = ["tumour_centre", "window_start"]


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
