# References:
# Focal loss: Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017.
"""pCR loss: class-balanced BCE or focal loss on raw logits, with missing labels masked out."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PCRLoss"]


class PCRLoss(nn.Module):
    """Binary loss for pCR with NaN labels ignored (never relabeled 0).

    Per labeled sample with target y and p = sigmoid(z)::

        loss = -(w_pos * y * (1 - p)**gamma * log p  +  w_neg * (1 - y) * p**gamma * log(1 - p))

    with gamma = 0 for ``kind="bce"``. The class weights come from ``pos_weight``:

    - ``"balanced"``: ``w_c = n / (n_classes * n_c)`` (scikit-learn's "balanced" class weight). The counts are
      those given to ``set_class_counts`` (e.g. the training-set labels), else the labeled samples of the batch
      (n_classes = classes present, so a one-class batch gets weight 1).
    - a float: ``w_pos = pos_weight``, ``w_neg = 1`` (``BCEWithLogitsLoss(pos_weight=...)`` semantics).
    - ``None``: both 1.

    The result is ``sum_i(s_i * loss_i) / n_labeled`` over the labeled samples, s the optional ``sample_weight``.

    Args:
        kind: ``"bce"`` or ``"focal"``.
        pos_weight: ``"balanced"``, a positive float, or None.
        gamma: focal exponent (``kind="focal"`` only; gamma = 0 reduces focal to BCE).
    """

    def __init__(self, *, kind: str = "bce", pos_weight: str | float | None = "balanced", gamma: float = 2.0) -> None:
        super().__init__()
        if kind not in ("bce", "focal"):
            raise ValueError(f"kind must be 'bce' or 'focal', got {kind!r}")
        if isinstance(pos_weight, str) and pos_weight != "balanced":
            raise ValueError(f"pos_weight must be 'balanced', a positive float or None, got {pos_weight!r}")
        if isinstance(pos_weight, int | float) and not pos_weight > 0:
            raise ValueError(f"pos_weight must be positive, got {pos_weight}")
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.kind = kind
        self.pos_weight = pos_weight
        self.gamma = gamma if kind == "focal" else 0.0
        self.class_counts: tuple[int, int] | None = None

    def set_class_counts(self, n_pos: int, n_neg: int) -> None:
        """Fix the class counts used by ``pos_weight="balanced"`` (instead of per-batch counts)."""
        if n_pos < 0 or n_neg < 0 or n_pos + n_neg == 0:
            raise ValueError(f"class counts must be >= 0 and not both 0, got n_pos={n_pos}, n_neg={n_neg}")
        self.class_counts = (int(n_pos), int(n_neg))

    def class_weights(self, target: torch.Tensor, labeled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w_pos, w_neg)`` as 0-d fp32 tensors for a batch ``target [B]`` with ``labeled [B]`` bool."""
        one = target.new_ones((), dtype=torch.float32)
        if self.pos_weight is None:
            return one, one
        if not isinstance(self.pos_weight, str):
            return one * float(self.pos_weight), one
        if self.class_counts is not None:
            n_pos, n_neg = (one * c for c in self.class_counts)
        else:
            # Soft counts (sum of y) also handle smoothed labels; computed on device, no host sync.
            y = torch.where(labeled, target, 0.0).float()
            n_pos, n_neg = y.sum(), (labeled.float() - y).sum()
        n_classes = (n_pos > 0).float() + (n_neg > 0).float()
        total = n_pos + n_neg
        # An absent class gets weight 0 (it has no terms anyway); clamp avoids 0/0.
        w_pos = torch.where(n_pos > 0, total / (n_classes * n_pos).clamp(min=1e-12), 0.0)
        w_neg = torch.where(n_neg > 0, total / (n_classes * n_neg).clamp(min=1e-12), 0.0)
        return w_pos, w_neg

    def per_sample(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unreduced loss ``[B]`` (0 where unlabeled) and the labeled mask ``[B]``."""
        if logits.ndim != 1 or target.shape != logits.shape:
            raise ValueError(f"logits and target must both be [B], got {tuple(logits.shape)} and {tuple(target.shape)}")
        logits = logits.float()
        labeled = ~torch.isnan(target)
        # where(), not multiplication by the mask: NaN * 0 is NaN, and unlabeled logits must get exactly 0 grad.
        y = torch.where(labeled, target.float(), 0.0)
        w_pos, w_neg = self.class_weights(target, labeled)
        log_p, log_not_p = -F.softplus(-logits), -F.softplus(logits)  # stable log(sigmoid), log(1 - sigmoid)
        pos, neg = -y * log_p, -(1.0 - y) * log_not_p
        if self.gamma > 0:
            # Down-weight easy examples: (1 - p)^gamma for positives, p^gamma for negatives.
            pos = pos * torch.sigmoid(-logits).pow(self.gamma)
            neg = neg * torch.sigmoid(logits).pow(self.gamma)
        loss = w_pos * pos + w_neg * neg
        return torch.where(labeled, loss, 0.0), labeled

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, sample_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scalar loss over the labeled samples.

        Args:
            logits: raw pCR logits ``[B]``.
            target: ``[B]`` float, 1 = pCR, 0 = no pCR, NaN = unknown.
            sample_weight: ``[B]`` non-negative weights, or None.

        Returns:
            fp32 scalar; exactly 0, still attached to the graph (zero gradient), when nothing is labeled.
        """
        loss, labeled = self.per_sample(logits, target)
        if sample_weight is not None:
            if sample_weight.shape != loss.shape:
                raise ValueError(f"sample_weight must be [B] = {tuple(loss.shape)}, got {tuple(sample_weight.shape)}")
            loss = loss * sample_weight.to(loss)
        n = labeled.sum()
        # loss comes out of where(logits...), so even an all-NaN batch returns a graph-attached 0; max(n, 1)
        # avoids 0/0 without a host sync.
        return loss.sum() / n.clamp(min=1).to(loss.dtype)
