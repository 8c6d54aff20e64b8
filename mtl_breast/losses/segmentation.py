"""Dice + cross-entropy segmentation loss with per-sample weights (for fairness reweighting)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

__all__ = ["DiceCELoss"]


class DiceCELoss(nn.Module):
    """``monai.losses.DiceCELoss(softmax=True, to_onehot_y=True)`` computed per sample, then weighted.

    Per sample i: ``lambda_dice * Dice_i + lambda_ce * CE_i`` where Dice_i is MONAI's soft Dice loss of that
    sample averaged over the scored channels and CE_i the mean voxel cross-entropy. With no weights the result
    equals MONAI's ``DiceCELoss`` (``reduction="mean"``, ``batch=False``) on the same arguments; with weights it
    is ``mean_i(w_i * loss_i)``, so weights from ``SubgroupReweighter`` (mean 1) keep the loss scale.

    ``include_background`` defaults to False: with K = 2 the Dice term then scores the tumour channel only, the
    quantity the challenge measures; the background channel (nearly all voxels) would otherwise dilute it.
    The cross-entropy always uses every channel.

    Args:
        include_background: include channel 0 in the Dice term.
        lambda_dice: weight of the Dice term.
        lambda_ce: weight of the cross-entropy term.
        smooth_nr: Dice numerator smoothing (MONAI's default).
        smooth_dr: Dice denominator smoothing (MONAI's default).
        label_smoothing: cross-entropy label smoothing in [0, 1).
    """

    def __init__(
        self,
        *,
        include_background: bool = False,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if lambda_dice < 0 or lambda_ce < 0 or not 0.0 <= label_smoothing < 1.0:
            raise ValueError("lambda_dice and lambda_ce must be >= 0 and label_smoothing in [0, 1)")
        self.lambda_dice = lambda_dice
        self.lambda_ce = lambda_ce
        self.label_smoothing = label_smoothing
        # reduction="none" keeps [B, C, 1, 1, 1]: MONAI's Dice per sample and channel (batch=False).
        self.dice = DiceLoss(
            include_background=include_background,
            to_onehot_y=True,
            softmax=True,
            reduction="none",
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            batch=False,
        )

    def per_sample(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Unreduced loss.

        Args:
            logits: raw scores ``[B, K, D, H, W]`` (K >= 2).
            target: class indices ``[B, 1, D, H, W]`` (uint8 or long).

        Returns:
            ``[B]`` fp32 loss per sample, differentiable w.r.t. ``logits``.
        """
        if logits.ndim != 5 or logits.shape[1] < 2:
            raise ValueError(f"logits must be [B, K>=2, D, H, W], got shape {tuple(logits.shape)}")
        expected = (logits.shape[0], 1, *logits.shape[2:])
        if tuple(target.shape) != expected:
            raise ValueError(f"target must be [B, 1, D, H, W] = {expected}, got shape {tuple(target.shape)}")
        if target.is_floating_point():
            raise ValueError(f"target must hold integer class indices, got {target.dtype}")
        # fp32 loss: under bf16 autocast the softmax/log over millions of voxels loses precision.
        logits = logits.float()
        target = target.long()
        dice = self.dice(logits, target).flatten(1).mean(dim=1)
        ce = F.cross_entropy(logits, target[:, 0], reduction="none", label_smoothing=self.label_smoothing)
        return self.lambda_dice * dice + self.lambda_ce * ce.flatten(1).mean(dim=1)

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, sample_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scalar loss ``mean_i(w_i * loss_i)``.

        Args:
            logits: raw scores ``[B, K, D, H, W]``.
            target: class indices ``[B, 1, D, H, W]``.
            sample_weight: ``[B]`` non-negative weights, or None for all ones.
        """
        loss = self.per_sample(logits, target)
        if sample_weight is None:
            return loss.mean()
        if sample_weight.shape != loss.shape:
            raise ValueError(f"sample_weight must be [B] = {tuple(loss.shape)}, got {tuple(sample_weight.shape)}")
        return (loss * sample_weight.to(loss)).mean()
