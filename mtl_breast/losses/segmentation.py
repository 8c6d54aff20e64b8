"""Dice + cross-entropy segmentation loss with per-sample weights (for fairness reweighting).

References: nnU-Net's batch Dice (Isensee et al., Nature Methods 2021) pools the Dice sums over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

__all__ = ["DiceCELoss"]


class DiceCELoss(nn.Module):
    """``monai.losses.DiceCELoss(softmax=True, to_onehot_y=True)`` with per-sample weights.

    With ``batch_dice`` (the default, as nnU-Net) the soft-Dice sums (intersection, prediction, target) are pooled
    over the batch, weighted per sample: ``Dice = 1 - (2 sum_i w_i I_i + nr) / (sum_i w_i (P_i + G_i) + dr)`` per
    scored channel, averaged over channels. A tumour-free crop then adds its false positives to the denominator
    (a gradient that suppresses them) instead of a near-constant per-sample Dice of 1 with almost no gradient.
    Unweighted it equals MONAI's ``DiceCELoss(batch=True)``. The cross-entropy is ``mean_i(w_i * CE_i)``, so
    weights from ``SubgroupReweighter`` (mean 1) keep the loss scale.

    Without ``batch_dice`` each sample gets its own Dice: the loss is ``mean_i(w_i * (lambda_dice * Dice_i +
    lambda_ce * CE_i))``, equal to MONAI's ``DiceCELoss(batch=False)`` when unweighted.

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
        batch_dice: pool the Dice sums over the batch (see above).
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
        batch_dice: bool = True,
    ) -> None:
        super().__init__()
        if lambda_dice < 0 or lambda_ce < 0 or not 0.0 <= label_smoothing < 1.0:
            raise ValueError("lambda_dice and lambda_ce must be >= 0 and label_smoothing in [0, 1)")
        self.lambda_dice = lambda_dice
        self.lambda_ce = lambda_ce
        self.label_smoothing = label_smoothing
        self.batch_dice = batch_dice
        self.include_background = include_background
        self.smooth_nr, self.smooth_dr = smooth_nr, smooth_dr
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

    def _check(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        if logits.ndim != 5 or logits.shape[1] < 2:
            raise ValueError(f"logits must be [B, K>=2, D, H, W], got shape {tuple(logits.shape)}")
        expected = (logits.shape[0], 1, *logits.shape[2:])
        if tuple(target.shape) != expected:
            raise ValueError(f"target must be [B, 1, D, H, W] = {expected}, got shape {tuple(target.shape)}")
        if target.is_floating_point():
            raise ValueError(f"target must hold integer class indices, got {target.dtype}")

    def _cross_entropy(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean voxel cross-entropy per sample ``[B]``."""
        ce = F.cross_entropy(logits, target[:, 0], reduction="none", label_smoothing=self.label_smoothing)
        return ce.flatten(1).mean(dim=1)

    def per_sample(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Unreduced loss with a Dice per sample (``batch_dice`` does not apply here).

        Args:
            logits: raw scores ``[B, K, D, H, W]`` (K >= 2).
            target: class indices ``[B, 1, D, H, W]`` (uint8 or long).

        Returns:
            ``[B]`` fp32 loss per sample, differentiable w.r.t. ``logits``.
        """
        self._check(logits, target)
        # fp32 loss: under bf16 autocast the softmax/log over millions of voxels loses precision.
        logits = logits.float()
        target = target.long()
        dice = self.dice(logits, target).flatten(1).mean(dim=1)
        return self.lambda_dice * dice + self.lambda_ce * self._cross_entropy(logits, target)

    def _batch_dice(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Soft Dice loss with the sums pooled over the batch, each sample's sums scaled by ``weight [B]``."""
        prob = logits.softmax(dim=1)
        onehot = F.one_hot(target[:, 0], num_classes=logits.shape[1]).movedim(-1, 1).to(prob.dtype)
        if not self.include_background:
            prob, onehot = prob[:, 1:], onehot[:, 1:]
        dims = tuple(range(2, prob.ndim))
        w = weight.to(prob)[:, None]  # [B, 1]
        intersection = (w * (prob * onehot).sum(dims)).sum(0)  # [C]
        denominator = (w * (prob.sum(dims) + onehot.sum(dims))).sum(0)
        return (1.0 - (2.0 * intersection + self.smooth_nr) / (denominator + self.smooth_dr)).mean()

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, sample_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scalar loss.

        Args:
            logits: raw scores ``[B, K, D, H, W]``.
            target: class indices ``[B, 1, D, H, W]``.
            sample_weight: ``[B]`` non-negative weights, or None for all ones.
        """
        self._check(logits, target)
        b = logits.shape[0]
        if sample_weight is not None and tuple(sample_weight.shape) != (b,):
            raise ValueError(f"sample_weight must be [B] = {(b,)}, got {tuple(sample_weight.shape)}")
        weight = torch.ones(b, device=logits.device) if sample_weight is None else sample_weight.float()
        if not self.batch_dice:
            return (self.per_sample(logits, target) * weight.to(logits.device)).mean()
        logits, target = logits.float(), target.long()
        ce = (self._cross_entropy(logits, target) * weight.to(logits.device)).mean()
        return self.lambda_dice * self._batch_dice(logits, target, weight) + self.lambda_ce * ce
