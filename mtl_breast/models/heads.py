# References:
# Gated attention pooling: Ilse et al., "Attention-based Deep Multiple Instance Learning", ICML 2018.
"""pCR head: attention pooling over phases and tokens, steered by the predicted tumour, plus an explicit kinetic
pathway (the tumour's enhancement curve), to one logit."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mtl_breast.models.kinetics import (
    FEATURE_SETS,
    tumour_concentration,
    tumour_kinetics,
    tumour_rim_concentration,
)
from mtl_breast.models.tumour_pathway import LearnedKineticPathway

# The feature sets the kinetic pathway can compute from a batch, by their `models.kinetics.FEATURE_SETS` name:
# (image, tumour_prob, phase_mask, phase_time, acquisition) -> [B, K] in that set's column order.
FEATURE_FUNCTIONS = {
    "curve": lambda image, prob, mask, time, acq: tumour_kinetics(image, prob, mask, time),
    "concentration": tumour_concentration,
    "rim": tumour_rim_concentration,
    "rim_inner": partial(tumour_rim_concentration, surface_layers=1),
}

__all__ = ["PCRHead"]


class PCRHead(nn.Module):
    """Attention-pool encoder tokens into one raw pCR logit per case.

    Each token of each real phase gets a gated-attention score (Ilse et al. 2018); with ``prob_weighted`` the
    score is biased by ``prior_scale * log(p + prob_eps)`` where p is the predicted tumour probability averaged
    over the token's patch, so attention concentrates on the lesion (when the predicted mask is empty every
    token gets the same bias and pooling falls back to plain attention). ``prior_scale`` is learned, starting at 1.
    The softmax runs jointly over (T, N) with padded phases masked out; the pooled vector goes through
    norm -> dropout -> linear.

    With ``kinetic`` the logit also gets a linear term of the tumour's kinetic features under the predicted mask, so
    the response signal that DCE-MRI carries in the enhancement between phases reaches the head directly instead
    of only through pooled tokens: ``kinetic_features="rim"`` (the default; `tumour_rim_concentration`: size, the
    tumour's contrast concentration from the signal equation, which needs the case's ``acquisition`` vector, a rim
    index and the washout of the tumour's surface layer, so rim-enhancing tumours are read on the same scale),
    ``"concentration"`` (`tumour_concentration`: the same with a core ratio in place of the rim columns),
    ``"rim_inner"`` (the rim columns read one voxel layer below the surface, so a predicted boundary off by a voxel
    barely moves them) or ``"curve"`` (`tumour_kinetics`: size, wash-in, peak enhancement, washout of the
    normalised intensities). The sets are named and described once, in `models.kinetics.FEATURE_SETS`.

    With ``learned`` the logit also gets the term of a `LearnedKineticPathway`: the encoder's tokens pooled per phase
    inside the predicted tumour and in a shell around it, read across phases by a small module. It takes no
    hand-built feature and no regression start, so it scores what the encoder's representation carries. The logit
    is the sum of the terms; :meth:`parts` returns them apart ("tokens", "learned", "kinetic").

    Args:
        embed_dim: token width E.
        hidden_dim: width of the attention scorer; default ``embed_dim // 2``.
        dropout: dropout on the pooled vector before the linear layer.
        prob_weighted: bias attention by ``seg_prob`` when it is given (ignored when it is not).
        detach_prob: stop the pCR loss from back-propagating into the segmentation through ``seg_prob``.
        prob_eps: floor added to the probability before the log, bounding the bias at ``log(prob_eps)``.
        kinetic: add the kinetic pathway (needs ``image`` and ``seg_prob`` in :meth:`forward`); its K features are
            standardised with buffers ``kinetic_mean``/``kinetic_std`` (weights format: ``pcr_head.kinetic_fc.weight
            [1, K]``, ``pcr_head.kinetic_mean [K]``, ``pcr_head.kinetic_std [K]``). Weights exported without it load
            with ``kinetic=False``.
        kinetic_features: "rim" (K = 6), "concentration" (K = 5), "rim_inner" or "curve" (K = 6 each). A feature
            that cannot be computed (NaN: the acquisition vector is unknown) takes its training mean, i.e.
            contributes nothing. Joint weights exported before this option existed load with "curve".
        kinetic_threshold: the tumour curve averages the voxels with ``seg_prob >= kinetic_threshold`` (a hard mask,
            like the expert masks the pathway is initialised on); None = weight every voxel by its probability,
            which lets a low-probability halo around the tumour dilute the curve.
        learned: add the learned kinetic pathway (needs ``layers`` and ``seg_prob`` in :meth:`forward`).
        learned_layers: how many of the last encoder layers it pools (the model passes its decoder's skip layers).
        learned_hidden: its width (default ``min(embed_dim, 128)``).
        learned_shell: width in voxels of the shell around the tumour it also pools.
        learned_dropout: dropout before its last linear layer.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        hidden_dim: int | None = None,
        dropout: float = 0.0,
        prob_weighted: bool = True,
        detach_prob: bool = True,
        prob_eps: float = 1e-3,
        kinetic: bool = False,
        kinetic_threshold: float | None = 0.5,
        kinetic_features: str = "rim",
        learned: bool = False,
        learned_layers: int = 1,
        learned_hidden: int | None = None,
        learned_shell: int = 4,
        learned_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        hidden_dim = hidden_dim or max(embed_dim // 2, 1)
        if embed_dim < 1 or hidden_dim < 1 or not 0.0 <= dropout < 1.0 or prob_eps <= 0.0:
            raise ValueError(
                f"PCRHead needs embed_dim, hidden_dim >= 1, 0 <= dropout < 1 and prob_eps > 0; got "
                f"embed_dim={embed_dim}, hidden_dim={hidden_dim}, dropout={dropout}, prob_eps={prob_eps}"
            )
        self.embed_dim = embed_dim
        self.prob_weighted = prob_weighted
        self.detach_prob = detach_prob
        self.prob_eps = prob_eps
        self.attn_norm = nn.LayerNorm(embed_dim)
        self.attn_v = nn.Linear(embed_dim, hidden_dim)  # tanh branch
        self.attn_u = nn.Linear(embed_dim, hidden_dim)  # sigmoid gate
        self.attn_w = nn.Linear(hidden_dim, 1, bias=False)  # a bias would cancel in the softmax
        self.prior_scale = nn.Parameter(torch.ones(())) if prob_weighted else None
        self.norm = nn.LayerNorm(embed_dim)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(embed_dim, 1)
        if kinetic_features not in FEATURE_FUNCTIONS:
            raise ValueError(f"kinetic_features must be one of {sorted(FEATURE_FUNCTIONS)}, got {kinetic_features!r}")
        self.kinetic = kinetic
        self.kinetic_threshold = kinetic_threshold
        self.kinetic_features = kinetic_features
        self.feature_names = FEATURE_SETS[kinetic_features]
        k = len(self.feature_names)
        self.kinetic_fc = nn.Linear(k, 1, bias=False) if kinetic else None
        if self.kinetic_fc is not None:
            nn.init.zeros_(self.kinetic_fc.weight)  # starts as the token-only head
            # Standardisation of the features, part of the weights (see `init_kinetic`).
            self.register_buffer("kinetic_mean", torch.zeros(k))
            self.register_buffer("kinetic_std", torch.ones(k))
        self.learned = learned
        self.learned_threshold = 0.5 if kinetic_threshold is None else kinetic_threshold
        self.learned_pathway = LearnedKineticPathway(
            embed_dim, num_layers=learned_layers, hidden_dim=learned_hidden, shell=learned_shell,
            dropout=learned_dropout) if learned else None

    def forward(self, *args, **kwargs) -> torch.Tensor:
        """The pCR logit ``[B]``: the sum of :meth:`parts` (same arguments)."""
        return self.total(self.parts(*args, **kwargs))

    @staticmethod
    def total(terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """The logit ``[B]`` of the terms :meth:`parts` returns (summed in a fixed order)."""
        logit = terms["tokens"]
        for name in ("learned", "kinetic"):
            if name in terms:
                logit = logit + terms[name]
        return logit

    def parts(
        self,
        tokens: torch.Tensor,
        phase_mask: torch.Tensor | None = None,
        seg_prob: torch.Tensor | None = None,
        grid: Sequence[int] | None = None,
        image: torch.Tensor | None = None,
        phase_time: torch.Tensor | None = None,
        acquisition: torch.Tensor | None = None,
        layers: Sequence[torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The terms of the pCR logit, each ``[B]``: "tokens" (attention-pooled tokens, with the output bias),
        "learned" (the learned kinetic pathway) and "kinetic" (the hand-feature pathway), the last two only when
        the head has them.

        Args:
            tokens: ``[B, T, N, E]`` (N = d*h*w on the patch grid, row-major).
            phase_mask: bool ``[B, T]``, False = padded phase; None = all real.
            seg_prob: predicted tumour probability ``[B, 1, D, H, W]`` (e.g. softmax channel 1 of the decoder).
            grid: token grid ``(d, h, w)``; needed with ``seg_prob`` unless the patch is isotropic.
            image: ``[B, T, D, H, W]`` the phases the tokens came from (kinetic pathway).
            phase_time: ``[B, T]`` seconds after pre-contrast, NaN unknown (kinetic pathway).
            acquisition: ``[B, 5]`` `data.dataset.acquisition_vector` of each case (concentration features);
                None = unknown.
            layers: encoder token maps, shallow to deep, each ``[B, T, N, E]`` (learned pathway: its last
                ``learned_layers``); None = ``[tokens]``.

        Returns:
            Raw logit terms (no sigmoid).
        """
        if tokens.ndim != 4 or tokens.shape[-1] != self.embed_dim:
            raise ValueError(f"tokens must be [B, T, N, E={self.embed_dim}], got shape {tuple(tokens.shape)}")
        b, t, n, _ = tokens.shape
        h = self.attn_norm(tokens)
        logits = self.attn_w(torch.tanh(self.attn_v(h)) * torch.sigmoid(self.attn_u(h))).squeeze(-1).float()
        if self.prior_scale is not None and seg_prob is not None:
            log_prior = torch.log(self._token_prior(seg_prob, grid, b, n) + self.prob_eps)  # [B, N]
            # Shift so each sample's largest bias is 0 (softmax is shift-invariant): keeps fp32 logits near
            # their unbiased scale, and an empty mask adds exactly nothing.
            log_prior = log_prior - log_prior.amax(dim=1, keepdim=True)
            logits = logits + self.prior_scale * log_prior[:, None, :]
        if phase_mask is not None:
            if phase_mask.dtype != torch.bool or tuple(phase_mask.shape) != (b, t):
                raise ValueError(f"phase_mask must be bool [B, T] = {(b, t)}, got {tuple(phase_mask.shape)}")
            keep = phase_mask[:, :, None]
            # finfo.min, not -inf: a sample with no real phase pools to zeros instead of NaN.
            logits = logits.masked_fill(~keep, torch.finfo(logits.dtype).min)
            tokens = tokens.masked_fill(~keep[..., None], 0.0)
        # One softmax over all (phase, token) pairs, in fp32 because N*T can be large.
        weights = rearrange(logits, "b t n -> b (t n)").softmax(dim=-1).to(tokens.dtype)
        pooled = torch.einsum("bk,bke->be", weights, rearrange(tokens, "b t n e -> b (t n) e"))
        terms = {"tokens": self.fc(self.drop(self.norm(pooled))).squeeze(-1)}
        if self.learned_pathway is not None:
            if seg_prob is None:
                raise ValueError("the learned kinetic pathway needs seg_prob [B, 1, D, H, W]")
            layers = list(layers) if layers is not None else [tokens]
            if len(layers) < self.learned_pathway.num_layers:
                raise ValueError(f"the learned kinetic pathway pools {self.learned_pathway.num_layers} encoder "
                                 f"layers, got {len(layers)}")
            tumour = (seg_prob.detach().float() >= self.learned_threshold).float()
            grid = self._grid(seg_prob, grid, n)
            term = self.learned_pathway(layers[-self.learned_pathway.num_layers:], tumour, grid, phase_mask,
                                        phase_time)
            terms["learned"] = term.to(terms["tokens"].dtype)
        if self.kinetic_fc is not None:
            if image is None or seg_prob is None:
                raise ValueError("the kinetic pathway needs image [B, T, D, H, W] and seg_prob [B, 1, D, H, W]")
            prob = seg_prob.detach() if self.detach_prob else seg_prob
            if self.kinetic_threshold is not None:
                prob = (prob >= self.kinetic_threshold).to(prob.dtype)
            features = self.kinetic_inputs(image, prob, phase_mask, phase_time, acquisition)
            features = ((features - self.kinetic_mean) / self.kinetic_std).to(self.kinetic_fc.weight.dtype)
            terms["kinetic"] = self.kinetic_fc(features).squeeze(-1).to(terms["tokens"].dtype)
        return terms

    def kinetic_inputs(self, image: torch.Tensor, tumour: torch.Tensor, phase_mask: torch.Tensor | None = None,
                       phase_time: torch.Tensor | None = None, acquisition: torch.Tensor | None = None) -> torch.Tensor:
        """The ``[B, K]`` kinetic features of ``tumour`` (a mask ``[B, 1, D, H, W]``), unstandardised; a feature
        that cannot be computed is set to its training mean."""
        features = FEATURE_FUNCTIONS[self.kinetic_features](image, tumour, phase_mask, phase_time, acquisition)
        return torch.where(torch.isfinite(features), features, self.kinetic_mean.to(features.dtype))

    @torch.no_grad()
    def init_kinetic(self, mean: Sequence[float], std: Sequence[float], weight: Sequence[float],
                     bias: float) -> None:
        """Start the kinetic pathway from a logistic regression of pCR on the kinetic features.

        Args:
            mean, std: standardisation of the features (``feature_names`` order), kept as buffers.
            weight: regression coefficients on the standardised features.
            bias: intercept, written into the output bias.
        """
        if self.kinetic_fc is None:
            raise ValueError("this PCRHead has no kinetic pathway (kinetic=False)")
        k = len(self.feature_names)
        values = [torch.as_tensor(v, dtype=torch.float32).reshape(-1) for v in (mean, std, weight)]
        if any(v.numel() != k for v in values) or not bool((values[1] > 0).all()):
            raise ValueError(f"need {k} means, {k} positive stds and {k} weights")
        self.kinetic_mean.copy_(values[0])
        self.kinetic_std.copy_(values[1])
        self.kinetic_fc.weight.copy_(values[2][None])
        self.fc.bias.fill_(float(bias))

    def _token_prior(self, seg_prob: torch.Tensor, grid: Sequence[int] | None, b: int, n: int) -> torch.Tensor:
        """Average ``seg_prob [B, 1, D, H, W]`` over each patch -> ``[B, N]``."""
        if seg_prob.ndim != 5 or seg_prob.shape[:2] != (b, 1):
            raise ValueError(f"seg_prob must be [B={b}, 1, D, H, W], got shape {tuple(seg_prob.shape)}")
        grid = self._grid(seg_prob, grid, n)
        if self.detach_prob:
            seg_prob = seg_prob.detach()
        # Exact patch averages since the grid divides the volume; fp32 so log(p + eps) is accurate under bf16.
        prior = F.adaptive_avg_pool3d(seg_prob.float(), grid)
        return rearrange(prior, "b 1 d h w -> b (d h w)")

    @staticmethod
    def _grid(seg_prob: torch.Tensor, grid: Sequence[int] | None, n: int) -> tuple[int, ...]:
        """The token grid ``(d, h, w)`` that maps ``seg_prob [B, 1, D, H, W]`` onto ``n`` tokens."""
        spatial = tuple(seg_prob.shape[2:])
        if grid is None:
            # Isotropic patch assumed: p**3 = voxels per token.
            p = round((math.prod(spatial) / n) ** (1 / 3))
            grid = tuple(s // p for s in spatial) if p > 0 else (0, 0, 0)
        grid = tuple(int(g) for g in grid)
        if len(grid) != 3 or math.prod(grid) != n or any(g < 1 or s % g for s, g in zip(spatial, grid, strict=True)):
            raise ValueError(
                f"cannot map seg_prob of size {spatial} onto {n} tokens with grid {grid}; pass grid=(d, h, w)"
            )
        return grid
