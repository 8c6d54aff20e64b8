"""The learned kinetic pathway of the pCR head: the encoder's tokens pooled per phase inside the predicted tumour and
in a shell around it, then a small module across phases, to one logit term.

No hand-built feature enters: the enhancement curve the pathway reads is whatever the encoder's tokens carry about
each phase, so what it scores is what the (pre)trained representation holds. The shell (parenchyma next to the
lesion) gives each case its own reference, as a reader compares the lesion with the tissue around it instead of
trusting absolute intensities that depend on the coil, the gain and an unknown T1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

__all__ = ["LearnedKineticPathway", "tumour_and_shell_weights"]


def tumour_and_shell_weights(tumour: torch.Tensor, grid: Sequence[int],
                             shell: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token weights of the tumour and of the shell around it.

    Args:
        tumour: ``[B, 1, D, H, W]`` mask (0/1) on the image grid.
        grid: token grid ``(d, h, w)``; it divides ``(D, H, W)``.
        shell: shell width in voxels (the tumour dilated by ``shell`` in each direction, less the tumour).

    Returns:
        ``(inside, around)``, each ``[B, N]`` (N = d*h*w): the fraction of each token's patch that is tumour, and
        the fraction that is shell.
    """
    around = F.max_pool3d(tumour, kernel_size=2 * shell + 1, stride=1, padding=shell) - tumour if shell > 0 else \
        torch.zeros_like(tumour)
    pooled = F.adaptive_avg_pool3d(torch.cat([tumour, around], dim=1), tuple(int(g) for g in grid))
    pooled = rearrange(pooled, "b c d h w -> c b (d h w)")
    return pooled[0], pooled[1]


def _joint_standardise(x: torch.Tensor, real: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``x [B, R, T, E]`` (R regions) standardised with one mean and one standard deviation per sample, taken over
    the regions, real phases (``real [B, T]``) and channels.

    One statistic for all phases and both regions, not a LayerNorm per vector: a per-vector norm would remove what
    changes between phases and between the tumour and its shell when it is a change of scale or a shift shared by
    the channels -- the enhancement itself.
    """
    weight = real.to(x.dtype)[:, None, :, None].expand_as(x)
    count = weight.sum(dim=(1, 2, 3)).clamp_min(1.0)
    mean = (x * weight).sum(dim=(1, 2, 3)) / count
    centred = torch.where(weight > 0, x - mean[:, None, None, None], torch.zeros_like(x))
    std = (centred.square().sum(dim=(1, 2, 3)) / count + eps).sqrt()
    return centred / std[:, None, None, None]


def _weighted_mean(tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``tokens [B, T, N, E]`` averaged over N with ``weights [B, N]`` -> ``[B, T, E]`` (zeros where all weights
    are 0)."""
    total = weights.sum(dim=1).clamp_min(1e-6)[:, None, None]
    return torch.einsum("bn,btne->bte", weights.to(tokens.dtype), tokens) / total.to(tokens.dtype)


class LearnedKineticPathway(nn.Module):
    """pCR logit term from encoder tokens pooled per phase in the tumour and its shell.

    For each encoder layer given, the tokens of each phase are averaged over the tumour (weights: the fraction of
    each token's patch inside the predicted mask) and over a ``shell``-voxel shell around it, and standardised
    jointly (one mean and deviation per case and layer over both regions, the real phases and the channels, then a
    learned scale and shift per channel), so changes between phases survive the normalisation.
    Per phase, a linear map of [tumour, shell] over all layers gives ``u_t`` ``[B, T, H]``; a per-phase MLP reads
    ``[u_t, u_t - u_0, time]`` (its own state, its change from the pre-contrast phase, and when it was acquired: the
    phase time in minutes and whether it is known), and the mean and maximum over the real post-contrast phases,
    with the log of the predicted tumour volume (the fraction of the window it fills), go through a linear layer
    to the logit term. Washout is reachable: the mean of per-phase functions of (enhancement, time) can weigh late
    phases against early ones.

    Args:
        embed_dim: token width E.
        num_layers: encoder layers pooled (the head is given that many token maps).
        hidden_dim: width H (default ``min(E, 128)``).
        shell: shell width in voxels.
        dropout: dropout before the last linear layer.
    """

    def __init__(self, embed_dim: int, num_layers: int = 1, hidden_dim: int | None = None, shell: int = 4,
                 dropout: float = 0.1) -> None:
        super().__init__()
        hidden_dim = hidden_dim or min(embed_dim, 128)
        if embed_dim < 1 or num_layers < 1 or hidden_dim < 1 or shell < 0 or not 0.0 <= dropout < 1.0:
            raise ValueError(f"LearnedKineticPathway needs embed_dim, num_layers, hidden_dim >= 1, shell >= 0 and "
                             f"0 <= dropout < 1; got {embed_dim}, {num_layers}, {hidden_dim}, {shell}, {dropout}")
        self.num_layers, self.shell = num_layers, shell
        # Per-channel scale and shift after the joint standardisation, per layer and region.
        self.norm_weight = nn.Parameter(torch.ones(num_layers, 2, embed_dim))
        self.norm_bias = nn.Parameter(torch.zeros(num_layers, 2, embed_dim))
        self.phase_proj = nn.Sequential(nn.Linear(2 * num_layers * embed_dim, hidden_dim), nn.GELU())
        self.phase_mlp = nn.Sequential(nn.Linear(2 * hidden_dim + 2, hidden_dim), nn.GELU(),
                                       nn.Linear(hidden_dim, hidden_dim), nn.GELU())
        self.out_norm = nn.LayerNorm(2 * hidden_dim)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * hidden_dim + 1, 1)

    def forward(self, layers: Sequence[torch.Tensor], tumour: torch.Tensor, grid: Sequence[int],
                phase_mask: torch.Tensor | None = None, phase_time: torch.Tensor | None = None) -> torch.Tensor:
        """Args:
            layers: ``num_layers`` token maps, each ``[B, T, N, E]``.
            tumour: ``[B, 1, D, H, W]`` predicted tumour mask (0/1), detached.
            grid: token grid ``(d, h, w)``.
            phase_mask: bool ``[B, T]`` (False = padded phase); None = all real.
            phase_time: ``[B, T]`` seconds after pre-contrast, NaN unknown; None = all unknown.

        Returns:
            The logit term ``[B]``.
        """
        if len(layers) != self.num_layers:
            raise ValueError(f"the learned pathway pools {self.num_layers} encoder layer(s), got {len(layers)}")
        b, t = layers[0].shape[:2]
        real = torch.ones(b, t, dtype=torch.bool, device=layers[0].device) if phase_mask is None else phase_mask
        inside, around = tumour_and_shell_weights(tumour.float(), grid, self.shell)
        pooled = []
        for i, tokens in enumerate(layers):
            tokens = tokens.float().masked_fill(~real[:, :, None, None], 0.0)  # padded phases may hold anything
            regions = torch.stack([_weighted_mean(tokens, inside), _weighted_mean(tokens, around)], dim=1)
            regions = _joint_standardise(regions, real) * self.norm_weight[i, :, None] + self.norm_bias[i, :, None]
            pooled.extend(regions.unbind(dim=1))  # [B, T, E] each
        u = self.phase_proj(torch.cat(pooled, dim=-1))  # [B, T, H]
        if phase_time is None:
            phase_time = torch.full((b, t), math.nan, device=u.device)
        known = torch.isfinite(phase_time)
        minutes = torch.where(known, phase_time.float() / 60.0, torch.zeros_like(phase_time, dtype=torch.float32))
        when = torch.stack([minutes.clamp(-1.0, 30.0) / 10.0, known.float()], dim=-1)  # [B, T, 2]
        z = self.phase_mlp(torch.cat([u, u - u[:, :1], when.to(u.dtype)], dim=-1))  # [B, T, H]
        post = real.clone()
        post[:, 0] = False  # phase 0 is the pre-contrast acquisition: the reference, not a point of the curve
        weight = post.to(z.dtype)[..., None]
        mean = (z * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0)
        peak = z.masked_fill(~post[..., None], torch.finfo(z.dtype).min).amax(dim=1)
        peak = torch.where(post.any(dim=1, keepdim=True), peak, torch.zeros_like(peak))  # no post-contrast phase
        fill = tumour.flatten(1).float().mean(dim=1, keepdim=True)  # [B, 1] share of the window that is tumour
        size = torch.log(fill + 1e-4) / math.log(1e-4)  # 1 for an empty mask, 0 when the tumour fills the window
        features = torch.cat([self.out_norm(torch.cat([mean, peak], dim=-1)), size.to(mean.dtype)], dim=-1)
        return self.fc(self.drop(features)).squeeze(-1)
