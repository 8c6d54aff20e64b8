"""Everything that knows about contrast phases: the phase (time) encoding and attention across phases.

A DCE-MRI series is T phases of one volume; phase 0 is the pre-contrast acquisition. Phases per case vary
(2..8), so batches are padded along T and ``phase_mask`` [B, T] (True = real phase) marks the real ones.
Padded phases are excluded as attention keys everywhere, which makes the outputs of the real phases independent
of how much padding a batch carries.
"""
# References:
#   TimeSformer divided space-time attention: https://github.com/facebookresearch/TimeSformer
#   sinusoidal timestep features: https://github.com/openai/guided-diffusion (timestep_embedding)

from __future__ import annotations

import math

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from mtl_breast.models.layers import Attention, attend

__all__ = ["PhaseEncoding", "TemporalAttention", "check_phase_inputs"]


def check_phase_inputs(
    x: Tensor, phase_mask: Tensor | None, phase_time: Tensor | None
) -> tuple[Tensor | None, Tensor | None]:
    """Validate ``phase_mask``/``phase_time`` against an input ``x [B, T, ...]``.

    Returns:
        ``(phase_mask, phase_time)``; the mask is None when absent or all True, so attention can take the
        unmasked (flash) path.
    """
    b, t = x.shape[:2]
    if phase_time is not None and tuple(phase_time.shape) != (b, t):
        raise ValueError(f"phase_time must be [B, T] = {(b, t)}, got {tuple(phase_time.shape)}")
    if phase_mask is None:
        return None, phase_time
    if tuple(phase_mask.shape) != (b, t) or phase_mask.dtype != torch.bool:
        raise ValueError(f"phase_mask must be bool [B, T] = {(b, t)}, got {phase_mask.dtype} {tuple(phase_mask.shape)}")
    if not bool(phase_mask.any(dim=1).all()):
        raise ValueError("every sample needs at least one real phase (phase_mask has an all-False row)")
    return (None if bool(phase_mask.all()) else phase_mask), phase_time


class PhaseEncoding(nn.Module):
    """Embedding of each phase's acquisition time, with a learned phase-index fallback.

    Time t (seconds after the pre-contrast acquisition) is scaled to ``t / time_scale`` (minutes by default),
    expanded into sin/cos features at geometrically spaced frequencies (periods from 2*pi to
    2*pi*``max_period`` scaled units) and mapped by a 2-layer MLP to width E. Where the time is NaN (unknown) or
    no times are given, the learned embedding of the phase index (0..max_phases-1) is used instead.

    Args:
        embed_dim: width E.
        max_phases: size of the phase-index table; inputs with more phases are rejected.
        num_freqs: sin/cos frequency pairs.
        time_scale: seconds per unit of the scaled time.
        max_period: longest period in scaled units (long enough that 0..30 min stays monotonic in phase).
        time_drop: training-only probability of hiding a sample's times, so the index fallback gets trained
            alongside the time path (test data may lack acquisition times).
    """

    def __init__(
        self,
        embed_dim: int,
        *,
        max_phases: int = 8,
        num_freqs: int = 32,
        time_scale: float = 60.0,
        max_period: float = 100.0,
        time_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if max_phases < 1:
            raise ValueError(f"max_phases must be >= 1, got {max_phases}")
        if not 0.0 <= time_drop <= 1.0:
            raise ValueError(f"time_drop must be in [0, 1], got {time_drop}")
        self.max_phases = max_phases
        self.time_scale = time_scale
        self.time_drop = time_drop
        freqs = torch.exp(-math.log(max_period) * torch.arange(num_freqs, dtype=torch.float32) / num_freqs)
        self.register_buffer("freqs", freqs, persistent=False)
        self.time_mlp = nn.Sequential(nn.Linear(2 * num_freqs, embed_dim), nn.GELU(), nn.Linear(embed_dim, embed_dim))
        self.index_embed = nn.Parameter(torch.zeros(max_phases, embed_dim))
        nn.init.trunc_normal_(self.index_embed, std=0.02)

    def forward(self, num_phases: int, phase_time: Tensor | None = None, *, batch_size: int = 1) -> Tensor:
        """Per-phase embeddings.

        Args:
            num_phases: T.
            phase_time: ``[B, T]`` seconds, NaN where unknown; None = all unknown.
            batch_size: B when ``phase_time`` is None.

        Returns:
            ``[B, T, E]``.
        """
        if num_phases > self.max_phases:
            raise ValueError(f"input has {num_phases} phases but the model was built with max_phases={self.max_phases}")
        index_emb = self.index_embed[:num_phases]  # [T, E]
        if phase_time is None:
            return repeat(index_emb, "t e -> b t e", b=batch_size)
        known = ~torch.isnan(phase_time)  # [B, T]
        if self.training and self.time_drop > 0:
            keep = torch.rand(phase_time.shape[0], 1, device=phase_time.device) >= self.time_drop
            known = known & keep
        # NaNs are zeroed BEFORE the MLP: a NaN that only torch.where discards would still turn weight grads NaN.
        t = torch.where(known, phase_time, 0.0).float() / self.time_scale
        angles = t[..., None] * self.freqs  # [B, T, F]
        time_emb = self.time_mlp(torch.cat([angles.sin(), angles.cos()], dim=-1).to(self.index_embed.dtype))
        return torch.where(known[..., None], time_emb, index_emb)


class TemporalAttention(Attention):
    """Self-attention across phases at each spatial token (TimeSformer's time attention).

    Same projections, arguments and parameter names as ``Attention``; only the token axis differs.
    """

    def forward(self, x: Tensor, phase_mask: Tensor | None = None) -> Tensor:
        """Attend over T independently at every token position.

        Args:
            x: ``[B, T, N, E]``.
            phase_mask: bool ``[B, T]``, False = padded phase (never attended to); None = all real.

        Returns:
            ``[B, T, N, E]``.
        """
        b, _, n, _ = x.shape
        seq = rearrange(x, "b t n e -> (b n) t e")
        # Key-padding mask [(B N), 1, 1, T]: every query (padded ones too) sees only real phases.
        mask = None if phase_mask is None else repeat(phase_mask, "b t -> (b n) 1 1 t", n=n)
        out = attend(
            self.qkv(seq),
            num_heads=self.num_heads,
            attn_mask=mask,
            dropout_p=self.attn_drop if self.training else 0.0,
        )
        out = self.proj_drop(self.proj(out))
        return rearrange(out, "(b n) t e -> b t n e", b=b)
