# References:
# Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry and
# Semantics", CVPR 2018.
"""Combining per-task losses: fixed weights or learned homoscedastic-uncertainty weights."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

__all__ = ["MultiTaskLoss"]


class MultiTaskLoss(nn.Module):
    """Weighted sum of task losses.

    - ``"fixed"``: ``total = sum_t w_t * L_t``.
    - ``"uncertainty"``: ``total = sum_t exp(-s_t) * L_t + s_t / 2`` with ``s_t = log sigma_t^2`` a learnable
      parameter per task (Kendall et al. 2018, their form for classification likelihoods, which both
      Dice+CE and BCE are). The effective weight is ``exp(-s_t)``; the ``s_t / 2`` term stops the weights
      from collapsing to 0. ``s_t`` starts at ``-log(w_t)``, so training starts from the given weights.

    The log-variances are parameters of this module: the optimizer must include them (the LightningModule
    owns this module, so ``self.parameters()`` does), without weight decay.

    Args:
        tasks: task names, in logging order.
        weighting: ``"fixed"`` or ``"uncertainty"``.
        weights: per-task weights (a mapping or a sequence aligned with ``tasks``); default 1 each.
    """

    def __init__(
        self,
        *,
        tasks: Sequence[str] = ("seg", "pcr"),
        weighting: str = "fixed",
        weights: Mapping[str, float] | Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
        if not tasks or len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks must be non-empty and unique, got {tasks}")
        if weighting not in ("fixed", "uncertainty"):
            raise ValueError(f"weighting must be 'fixed' or 'uncertainty', got {weighting!r}")
        if weights is None:
            w = dict.fromkeys(tasks, 1.0)
        elif isinstance(weights, Mapping):
            if set(weights) != set(tasks):
                raise ValueError(f"weights keys {sorted(weights)} must equal tasks {sorted(tasks)}")
            w = {t: float(weights[t]) for t in tasks}
        else:
            if len(weights) != len(tasks):
                raise ValueError(f"got {len(weights)} weights for {len(tasks)} tasks")
            w = {t: float(v) for t, v in zip(tasks, weights, strict=True)}
        if any(v < 0 for v in w.values()) or (weighting == "uncertainty" and any(v == 0 for v in w.values())):
            raise ValueError(f"weights must be >= 0 (> 0 for uncertainty weighting), got {w}")
        self.tasks = tasks
        self.weighting = weighting
        self.fixed_weights = w
        self.log_vars = None
        if weighting == "uncertainty":
            self.log_vars = nn.ParameterDict(
                {t: nn.Parameter(torch.tensor(-math.log(w[t]), dtype=torch.float32)) for t in tasks}
            )

    def forward(self, losses: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Combine scalar task losses.

        Args:
            losses: ``{task: scalar loss}``; a task may be absent from a step (it then contributes nothing,
                its log-variance included). Unknown task names raise.

        Returns:
            ``(total, logs)`` with ``logs`` holding detached ``loss_<task>``, ``weight_<task>`` (effective weight),
            ``log_var_<task>`` (uncertainty only) and ``loss_total``.
        """
        unknown = set(losses) - set(self.tasks)
        if unknown:
            raise ValueError(f"unknown task losses {sorted(unknown)}; this MultiTaskLoss combines {list(self.tasks)}")
        present = [t for t in self.tasks if t in losses]
        if not present:
            raise ValueError("no task loss given")
        logs: dict[str, torch.Tensor] = {}
        terms = []
        for t in present:
            loss = losses[t].float()
            if loss.ndim != 0:
                raise ValueError(f"loss for task {t!r} must be a scalar, got shape {tuple(loss.shape)}")
            if self.log_vars is not None:
                s = self.log_vars[t]
                weight = torch.exp(-s)
                terms.append(weight * loss + 0.5 * s)
                logs[f"log_var_{t}"] = s.detach()
            else:
                weight = loss.new_tensor(self.fixed_weights[t])
                terms.append(weight * loss)
            logs[f"loss_{t}"] = loss.detach()
            logs[f"weight_{t}"] = weight.detach()
        total = torch.stack(terms).sum()
        logs["loss_total"] = total.detach()
        return total, logs
