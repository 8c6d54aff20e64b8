"""Contrast kinetics of the tumour: the enhancement curve under a (soft) tumour mask, summarised in a few numbers.

Breast DCE-MRI reads response from how the tumour takes up and releases contrast: how strongly it enhances in
the first post-contrast phase (wash-in), whether its signal keeps rising, plateaus or falls afterwards
(washout), and how large it is. These are the classic semi-quantitative features (Hylton's signal enhancement
ratio, curve type); the pCR head gets them as an explicit pathway next to the pooled encoder tokens, and the
baselines in ``bench/science`` fit a logistic regression on the same numbers from the expert mask.

Intensities are those of the preprocessed case: all phases normalised with ONE mean/std, so differences
between phases are enhancement in units of the case's intensity spread. The ratios below are invariant to that
affine normalisation.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["KINETIC_FEATURES", "tumour_kinetics"]

# Names of the columns returned by `tumour_kinetics`, in order.
KINETIC_FEATURES = ("log_volume", "wash_in", "peak_enhancement", "washout_ratio", "washout_per_min",
                    "contrast_to_surround")
_DEFAULT_INTERVAL_S = 90.0  # assumed spacing between post-contrast phases when acquisition times are unknown
_EPS = 1e-6


def tumour_kinetics(image: Tensor, tumour_prob: Tensor, phase_mask: Tensor | None = None,
                    phase_time: Tensor | None = None) -> Tensor:
    """Kinetic features of the tumour in each volume.

    Args:
        image: ``[B, T, D, H, W]`` preprocessed phases, phase 0 pre-contrast, phase 1 the first post-contrast.
        tumour_prob: ``[B, 1, D, H, W]`` tumour probability or mask (weights of the tumour curve).
        phase_mask: bool ``[B, T]``, False = padded/missing phase; None = all real.
        phase_time: ``[B, T]`` seconds after pre-contrast, NaN unknown; None = unknown.

    Returns:
        ``[B, 6]`` float32, columns `KINETIC_FEATURES`:
        log_volume: ``log(1 + sum p) - 6`` (voxels of the preprocessed grid; 6 centres a ~1 cm tumour near 0);
        wash_in: ``S_1 - S_0`` of the tumour curve;
        peak_enhancement: ``max_t S_t - S_0`` over real post-contrast phases;
        washout_ratio: ``(S_last - S_1) / (|S_1 - S_0| + 0.1)``, clipped to [-2, 2] (negative = washout);
        washout_per_min: the same ratio per minute between phase 1 and the last real phase, clipped to [-2, 2];
        contrast_to_surround: wash-in of the tumour minus wash-in of the rest of the volume.
        With fewer than 3 real phases the washout columns are 0; with no tumour probability all are finite.
    """
    if image.ndim != 5 or tumour_prob.ndim != 5 or tumour_prob.shape[1] != 1:
        raise ValueError(f"need image [B, T, D, H, W] and tumour_prob [B, 1, D, H, W], got {tuple(image.shape)} "
                         f"and {tuple(tumour_prob.shape)}")
    if image.shape[1] < 2:
        raise ValueError(f"kinetics need a pre-contrast and a post-contrast phase, got T = {image.shape[1]}")
    b, t = image.shape[:2]
    x = image.float().flatten(2)  # [B, T, V]
    p = tumour_prob.float().flatten(1)  # [B, V]
    real = torch.ones(b, t, dtype=torch.bool, device=image.device) if phase_mask is None else phase_mask.bool()
    x = torch.where(real[:, :, None], x, 0.0)  # padded phases may hold anything

    mass = p.sum(dim=1)  # [B]
    curve = torch.einsum("btv,bv->bt", x, p) / (mass[:, None] + _EPS)  # tumour curve [B, T]
    rest = 1.0 - p
    surround = torch.einsum("btv,bv->bt", x, rest) / (rest.sum(dim=1)[:, None] + _EPS)

    enhancement = curve - curve[:, :1]  # [B, T], 0 at phase 0
    wash_in = enhancement[:, 1]
    post = real.clone()
    post[:, 0] = False
    peak = torch.where(post, enhancement, torch.finfo(enhancement.dtype).min).amax(dim=1)
    peak = torch.where(post.any(dim=1), peak, 0.0)
    # The last real phase (phase dropout may hide a middle one, padding hides the tail).
    index = torch.arange(t, device=image.device)
    last = torch.where(real, index, 0).amax(dim=1)  # [B]
    s_last = curve.gather(1, last[:, None])[:, 0]
    has_washout = last >= 2
    ratio = (s_last - curve[:, 1]) / (wash_in.abs() + 0.1)
    ratio = torch.where(has_washout, ratio.clamp(-2.0, 2.0), 0.0)
    if phase_time is None:
        phase_time = torch.full((b, t), float("nan"), device=image.device)
    dt = phase_time.float().gather(1, last[:, None])[:, 0] - phase_time.float()[:, 1]
    fallback = (last - 1).clamp_min(1).float() * _DEFAULT_INTERVAL_S
    dt = torch.where(torch.isfinite(dt) & (dt > 0), dt, fallback)
    per_min = torch.where(has_washout, (ratio / (dt / 60.0)).clamp(-2.0, 2.0), 0.0)
    contrast = wash_in - (surround[:, 1] - surround[:, 0])
    log_volume = torch.log1p(mass) - 6.0
    return torch.stack([log_volume, wash_in, peak, ratio, per_min, contrast], dim=1)
