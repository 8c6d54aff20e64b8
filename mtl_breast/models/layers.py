"""Building blocks shared by the encoder, the MAE decoder and the task heads.

Axes: B batch, T phases, D H W voxels, N tokens (per phase), E width, L sequence length of one attention call.
"""
# References:
#   MAE: https://github.com/facebookresearch/mae (util/pos_embed.py: 2D sin-cos embedding, interpolate_pos_embed)
#   timm: https://github.com/huggingface/pytorch-image-models (layers/patch_embed.py, layers/attention.py)

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from mtl_breast.sizes import to_3tuple

__all__ = [
    "Attention",
    "PatchEmbed3d",
    "attend",
    "resample_pos_embed_3d",
    "sincos_pos_embed_3d",
]


def sincos_pos_embed_3d(grid_size: Sequence[int], embed_dim: int, *, temperature: float = 10000.0) -> Tensor:
    """Fixed 3D sin-cos position embedding (MAE's 2D recipe with a third axis).

    Each axis (d, h, w) gets ``2 * (E // 6)`` channels: half sines, half cosines of the grid coordinate at
    geometrically spaced frequencies. When E is not a multiple of 6 the last ``E % 6`` channels stay zero, so
    every width works (ViT-L's 1024 included).

    Args:
        grid_size: token grid (gd, gh, gw).
        embed_dim: width E.
        temperature: longest wavelength, as in MAE.

    Returns:
        ``[N, E]`` float32 with N = gd * gh * gw in (d h w) order, the order of :class:`PatchEmbed3d`'s tokens.
    """
    if embed_dim < 6:
        raise ValueError(f"embed_dim must be >= 6 for a 3D sin-cos embedding, got {embed_dim}")
    n_freq = embed_dim // 6
    omega = 1.0 / temperature ** (torch.arange(n_freq, dtype=torch.float64) / n_freq)
    coords = torch.meshgrid(*(torch.arange(g, dtype=torch.float64) for g in grid_size), indexing="ij")
    parts = []
    for c in coords:
        angles = c.reshape(-1, 1) * omega  # [N, E//6]
        parts += [angles.sin(), angles.cos()]
    emb = torch.cat(parts, dim=1)
    emb = F.pad(emb, (0, embed_dim - emb.shape[1]))  # zero channels when E % 6 != 0
    return emb.float()


def resample_pos_embed_3d(pos_embed: Tensor, old_grid: Sequence[int], new_grid: Sequence[int]) -> Tensor:
    """Trilinearly resample a stored position embedding to a new token grid (MAE ``interpolate_pos_embed`` in 3D).

    Args:
        pos_embed: ``[N_old, E]`` or ``[1, N_old, E]`` in (d h w) token order.
        old_grid: grid the embedding was made for; its product must be N_old.
        new_grid: target grid.

    Returns:
        The embedding on ``new_grid``, with the rank and dtype of the input.
    """
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    squeeze = pos_embed.ndim == 2
    pe = pos_embed[None] if squeeze else pos_embed
    if pe.ndim != 3 or pe.shape[0] != 1 or pe.shape[1] != old_grid[0] * old_grid[1] * old_grid[2]:
        raise ValueError(f"position embedding of shape {tuple(pos_embed.shape)} does not fit grid {old_grid}")
    if old_grid != new_grid:
        d, h, w = old_grid
        vol = rearrange(pe, "1 (d h w) e -> 1 e d h w", d=d, h=h, w=w)
        # Interpolate in float32: bf16 trilinear weights lose the fine structure of the sin-cos channels.
        vol = F.interpolate(vol.float(), size=new_grid, mode="trilinear", align_corners=False)
        pe = rearrange(vol, "1 e d h w -> 1 (d h w) e").to(pos_embed.dtype)
    return pe[0] if squeeze else pe


class PatchEmbed3d(nn.Module):
    """One Conv3d tokenizer shared by all phases: each phase is a 1-channel volume cut into non-overlapping patches.

    Args:
        patch_size: patch edge (pd, ph, pw) in voxels.
        embed_dim: width E.
        in_chans: channels per phase (1 for DCE-MRI).
    """

    def __init__(self, *, patch_size: int | Sequence[int] = 16, embed_dim: int = 768, in_chans: int = 1) -> None:
        super().__init__()
        self.patch_size = to_3tuple(patch_size, name="patch_size")
        self.in_chans = in_chans
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def grid_size(self, spatial_shape: Sequence[int]) -> tuple[int, int, int]:
        """Token grid (gd, gh, gw) for a volume of ``spatial_shape`` (D, H, W); ValueError if not divisible."""
        spatial_shape = tuple(int(s) for s in spatial_shape)
        if len(spatial_shape) != 3 or any(s % p or s < p for s, p in zip(spatial_shape, self.patch_size, strict=True)):
            raise ValueError(
                f"volume shape {spatial_shape} (D, H, W) is not divisible by the patch size {self.patch_size}: "
                "crop or pad the input to a multiple of the patch size"
            )
        return tuple(s // p for s, p in zip(spatial_shape, self.patch_size, strict=True))  # type: ignore[return-value]

    def forward(self, x: Tensor) -> Tensor:
        """Tokenize every phase.

        Args:
            x: ``[B, T, D, H, W]`` (or ``[B, T, C, D, H, W]`` when ``in_chans > 1``).

        Returns:
            ``[B, T, N, E]`` tokens in (d h w) order.
        """
        if x.ndim == 5 and self.in_chans == 1:
            x = x.unsqueeze(2)
        if x.ndim != 6 or x.shape[2] != self.in_chans:
            raise ValueError(f"expected an input [B, T, D, H, W], got shape {tuple(x.shape)}")
        b = x.shape[0]
        self.grid_size(x.shape[-3:])
        x = self.proj(rearrange(x, "b t c d h w -> (b t) c d h w"))
        return rearrange(x, "(b t) e d h w -> b t (d h w) e", b=b)


def attend(qkv: Tensor, *, num_heads: int, attn_mask: Tensor | None = None, dropout_p: float = 0.0) -> Tensor:
    """Multi-head attention from a fused qkv projection, through ``scaled_dot_product_attention``.

    Args:
        qkv: ``[B, L, 3 * E]`` laid out (qkv, heads, head_dim) like timm and MONAI ``SABlock``.
        num_heads: heads; E must be divisible by it.
        attn_mask: bool, True = may be attended; broadcastable to ``[B, heads, L, L]`` (usually ``[B, 1, 1, L]``).
        dropout_p: attention dropout, already zeroed by the caller outside training.

    Returns:
        ``[B, L, E]`` before the output projection.
    """
    q, k, v = rearrange(qkv, "b l (three h d) -> three b h l d", three=3, h=num_heads).unbind(0)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    return rearrange(x, "b h l d -> b l (h d)")


def init_linear_and_norm(module: nn.Module) -> None:
    """MAE initialisation of one module: xavier-uniform linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class Attention(nn.Module):
    """Multi-head self-attention over a token sequence (parameters named like timm's ``Attention``).

    Args:
        dim: width E.
        num_heads: heads; must divide ``dim``.
        qkv_bias: bias on the qkv projection.
        attn_drop: dropout on attention weights (training only).
        proj_drop: dropout after the output projection.
    """

    def __init__(
        self, dim: int, *, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0
    ) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide the width ({dim})")
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """Args: x ``[B, L, E]``; attn_mask bool broadcastable to ``[B, heads, L, L]``. Returns ``[B, L, E]``."""
        x = attend(
            self.qkv(x),
            num_heads=self.num_heads,
            attn_mask=attn_mask,
            dropout_p=self.attn_drop if self.training else 0.0,
        )
        return self.proj_drop(self.proj(x))
