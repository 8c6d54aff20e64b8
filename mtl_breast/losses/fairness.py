# References:
# Group DRO: Sagawa et al., "Distributionally Robust Neural Networks for Group Shifts", ICLR 2020.
"""Fairness-aware reweighting: raise the loss weight of subgroups that perform worse on validation.

Subgroup metadata (age, menopausal status, breast density) is used during training only, to weight the
loss; the model never sees it, so prediction needs none of it. Groups are the labels the scoring code
uses (e.g. age bins ``"(40,50]"``, menopause ``"pre"/"post"/"unknown"``, density ``"a".."d"``); the caller bins
metadata with the same function for both ``update`` and ``weights`` (keys are compared as strings).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["SubgroupReweighter", "group_weighted_loss"]


class SubgroupReweighter:
    """Per-sample loss weights from per-epoch subgroup scores.

    After each validation epoch, ``update`` receives a score in [0, 1] per group of each variable (higher is
    better: Dice, balanced accuracy, ...). Per variable with G scored groups the target weights are
    ``G * softmax_g(-score_g / temperature)`` (mean 1 over groups; the worst group gets the largest), optionally
    capped at ``max_weight``, and the stored weights move towards them: ``w <- momentum * w + (1 - momentum) *
    target`` (a group starts at 1). A sample's raw weight is the geometric mean over variables of its groups'
    weights, a group that was never scored (unknown, missing metadata) counting as 1; ``weights`` then
    rescales the batch to mean 1 so the loss scale, and thus the learning rate, is unchanged.

    The weights are constants for the optimizer: multiplying per-sample losses by them keeps the loss
    differentiable w.r.t. the model. Use ``state_dict``/``load_state_dict`` to carry them across a resume.

    Args:
        variables: metadata variables to balance.
        temperature: softmax temperature on scores; smaller is more aggressive (0.1: a group 0.1 worse gets
            ~2.7x the weight).
        momentum: smoothing of the weights across updates, in [0, 1) (0 = use only the latest scores).
        max_weight: optional cap on a group's target weight.
    """

    def __init__(
        self,
        *,
        variables: Sequence[str] = ("age", "menopausal_status", "breast_density"),
        temperature: float = 0.1,
        momentum: float = 0.5,
        max_weight: float | None = None,
    ) -> None:
        variables = (variables,) if isinstance(variables, str) else tuple(variables)
        if not variables:
            raise ValueError("variables must not be empty")
        if temperature <= 0 or not 0.0 <= momentum < 1.0 or (max_weight is not None and max_weight < 1.0):
            raise ValueError(
                f"need temperature > 0, 0 <= momentum < 1 and max_weight >= 1 (or None); got "
                f"temperature={temperature}, momentum={momentum}, max_weight={max_weight}"
            )
        self.variables = variables
        self.temperature = temperature
        self.momentum = momentum
        self.max_weight = max_weight
        self.group_weights: dict[str, dict[str, float]] = {v: {} for v in variables}

    def update(self, group_scores: Mapping[str, Mapping[Any, float]]) -> dict[str, dict[str, float]]:
        """Fold one epoch's subgroup scores into the weights.

        Args:
            group_scores: ``{variable: {group: score in [0, 1]}}``; variables not configured are ignored, NaN
                scores (a group absent from validation) leave that group's weight unchanged.

        Returns:
            The updated ``{variable: {group: weight}}`` (a copy, for logging).
        """
        for var, scores in group_scores.items():
            if var not in self.group_weights:
                continue
            valid = {str(g): float(s) for g, s in scores.items() if not math.isnan(float(s))}
            bad = {g: s for g, s in valid.items() if not 0.0 <= s <= 1.0}
            if bad:
                raise ValueError(f"subgroup scores must be in [0, 1]; {var}: {bad}")
            if not valid:
                continue
            logits = torch.tensor([-s / self.temperature for s in valid.values()], dtype=torch.float64)
            target = (len(valid) * logits.softmax(dim=0)).tolist()
            stored = self.group_weights[var]
            for g, t in zip(valid, target, strict=True):
                if self.max_weight is not None:
                    t = min(t, self.max_weight)
                stored[g] = self.momentum * stored.get(g, 1.0) + (1.0 - self.momentum) * t
        return self.state_dict()["group_weights"]

    def raw_weight(self, groups: Mapping[str, Any]) -> float:
        """Geometric mean over variables of the sample's group weights (unknown group -> 1), before batch norm."""
        logs = [math.log(self.group_weights[v].get(str(groups.get(v)), 1.0)) for v in self.variables]
        return math.exp(sum(logs) / len(logs))

    def weights(
        self, meta_groups: Sequence[Mapping[str, Any]], device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Per-sample weights ``[B]`` for a batch, mean 1.

        Args:
            meta_groups: one ``{variable: group}`` per sample (missing variables and None count as unknown).
            device: where to put the result.
        """
        if len(meta_groups) == 0:
            raise ValueError("meta_groups is empty")
        w = torch.tensor([self.raw_weight(g) for g in meta_groups], dtype=torch.float32, device=device)
        return w / w.mean()

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state (JSON-serialisable) for checkpoints."""
        return {"group_weights": {v: dict(g) for v, g in self.group_weights.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from ``state_dict()`` output."""
        weights = state["group_weights"]
        self.group_weights = {v: {str(g): float(w) for g, w in weights.get(v, {}).items()} for v in self.variables}


def group_weighted_loss(
    per_sample_loss: torch.Tensor,
    group_ids: torch.Tensor,
    num_groups: int,
    *,
    temperature: float = 1.0,
    detach_weights: bool = False,
) -> torch.Tensor:
    """Differentiable group-DRO style loss: a soft maximum over the mean losses of the groups in the batch.

    With group means ``L_g`` over the groups present, ``q = softmax(L_g / temperature)`` and the group term is
    ``sum_g q_g L_g`` (temperature -> 0: the worst group's loss, Sagawa et al. 2020; -> inf: the mean of group
    means). Samples with ``group_id < 0`` (unknown) join through a plain mean, each part weighted by its share
    of the batch. With ``detach_weights`` the gradient does not flow through q (weights as constants).

    Args:
        per_sample_loss: ``[B]`` unreduced loss.
        group_ids: ``[B]`` integer group index in ``[0, num_groups)``, or -1 for unknown.
        num_groups: number of groups.
        temperature: softmax temperature (> 0), in loss units.
        detach_weights: treat q as constants.

    Returns:
        Scalar loss.
    """
    if per_sample_loss.ndim != 1 or group_ids.shape != per_sample_loss.shape:
        raise ValueError(
            f"per_sample_loss and group_ids must both be [B], got {tuple(per_sample_loss.shape)} "
            f"and {tuple(group_ids.shape)}"
        )
    if num_groups < 1 or temperature <= 0:
        raise ValueError(f"need num_groups >= 1 and temperature > 0, got {num_groups}, {temperature}")
    loss = per_sample_loss.float()
    known = group_ids >= 0
    ids = torch.where(known, group_ids.long(), num_groups)  # unknown -> an extra slot, dropped below
    sums = loss.new_zeros(num_groups + 1).index_add(0, ids, loss)[:num_groups]
    counts = loss.new_zeros(num_groups + 1).index_add(0, ids, torch.ones_like(loss))[:num_groups]
    present = counts > 0
    means = sums / counts.clamp(min=1)
    # finfo.min, not -inf: absent groups get q = 0 exactly, and an all-unknown batch stays NaN-free (grads too).
    logits = (means / temperature).masked_fill(~present, torch.finfo(means.dtype).min)
    q = logits.softmax(dim=0)
    if detach_weights:
        q = q.detach()
    group_term = (q * means).sum()
    n = loss.numel()
    n_known = known.sum()
    unknown_term = torch.where(known, 0.0, loss).sum() / (n - n_known).clamp(min=1)
    return (n_known / n) * group_term + ((n - n_known) / n) * unknown_term
