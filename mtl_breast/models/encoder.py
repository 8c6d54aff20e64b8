"""3D ViT encoder for multi-phase volumes, with divided space-time or joint attention.

Contract (other modules code against it):
    ``forward_features(x [B, T, D, H, W], phase_mask, phase_time, ids_keep) -> [B, T, N, E]`` after the final norm;
    with ``phase_layout="channels"`` the one token map of the stacked phases is repeated (a view) for every phase,
    so decoders and heads built for ``[B, T, N, E]`` take it unchanged;
    ``get_intermediate_layers(x, indices, ...) -> list of [B, T, N, E]``; ``forward = forward_features``.
Attribute names (``patch_embed``, ``pos_embed``, ``phase_embed``, ``blocks.{i}``, ``norm``) are the weight format.
"""
# References:
#   timm vision_transformer.py (Block, forward_features, get_intermediate_layers contract)
#   TimeSformer (divided space-time attention), MAE models_mae.py (visible-token encoding, initialisation)

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.utils.checkpoint
from einops import rearrange, repeat
from timm.layers import DropPath, LayerScale, Mlp
from torch import Tensor, nn

from mtl_breast.models.layers import (
    Attention,
    PatchEmbed3d,
    init_linear_and_norm,
    resample_pos_embed_3d,
    sincos_pos_embed_3d,
)
from mtl_breast.models.temporal import PhaseEncoding, TemporalAttention, check_phase_inputs
from mtl_breast.sizes import to_3tuple

__all__ = ["ATTN_MODES", "PHASE_LAYOUTS", "POS_EMBED_TYPES", "Block", "ViTEncoder3d"]

ATTN_MODES = ("divided", "joint")
POS_EMBED_TYPES = ("sincos", "learnable", "none")
# "tokens": every phase is tokenized on its own and phases meet through temporal (or joint) attention.
# "channels": the phases are stacked as input channels of one spatial ViT (MONAI's ViT on a multi-channel
# volume), padded with zero channels up to max_phases; no phase encoding and no temporal attention.
PHASE_LAYOUTS = ("tokens", "channels")


class Block(nn.Module):
    """Pre-norm transformer block over ``[B, T, N, E]`` tokens.

    ``divided``: spatial attention within each phase, then (if ``time_attn``) temporal attention across phases at
    each token, then MLP. ``joint``: one attention over all T*N tokens, then MLP. Padded phases are excluded as
    keys in both modes; in divided mode spatial attention never mixes phases, so it needs no mask.

    Args:
        dim: width E.
        num_heads: heads.
        mlp_ratio: MLP hidden width / E.
        qkv_bias: bias on qkv projections.
        attn_mode: "divided" or "joint".
        time_attn: add the temporal sub-block in divided mode (False = a plain per-phase spatial ViT block).
        drop: dropout after projections and in the MLP.
        attn_drop: attention-weight dropout.
        drop_path: stochastic-depth rate of this block.
        init_values: LayerScale init; None = no LayerScale.
        norm_eps: LayerNorm epsilon (1e-6 as in timm/MAE; 1e-5 matches MONAI).
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        attn_mode: str = "divided",
        time_attn: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        init_values: float | None = None,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if attn_mode not in ATTN_MODES:
            raise ValueError(f"attn_mode must be one of {ATTN_MODES}, got {attn_mode!r}")
        self.attn_mode = attn_mode

        def scale() -> nn.Module:
            return LayerScale(dim, init_values=init_values) if init_values else nn.Identity()

        def path() -> nn.Module:
            return DropPath(drop_path) if drop_path > 0 else nn.Identity()

        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.ls1, self.drop_path1 = scale(), path()
        if attn_mode == "divided" and time_attn:
            self.norm_time = nn.LayerNorm(dim, eps=norm_eps)
            self.time_attn = TemporalAttention(
                dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop
            )
            self.ls_time, self.drop_path_time = scale(), path()
        else:
            self.time_attn = None
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), drop=drop)
        self.ls2, self.drop_path2 = scale(), path()

    def forward(self, x: Tensor, phase_mask: Tensor | None = None) -> Tensor:
        """Args: x ``[B, T, N, E]``; phase_mask bool ``[B, T]`` (False = padded) or None. Returns ``[B, T, N, E]``."""
        b, t, n, _ = x.shape
        if self.attn_mode == "joint":
            mask = None if phase_mask is None else repeat(phase_mask, "b t -> b 1 1 (t n)", n=n)
            y = self.attn(rearrange(self.norm1(x), "b t n e -> b (t n) e"), mask)
            x = x + self.drop_path1(self.ls1(rearrange(y, "b (t n) e -> b t n e", t=t)))
        else:
            y = self.attn(rearrange(self.norm1(x), "b t n e -> (b t) n e"))
            x = x + self.drop_path1(self.ls1(rearrange(y, "(b t) n e -> b t n e", b=b)))
            if self.time_attn is not None:
                x = x + self.drop_path_time(self.ls_time(self.time_attn(self.norm_time(x), phase_mask)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class ViTEncoder3d(nn.Module):
    """3D ViT over T phases of a volume: shared patch tokenizer, position + phase encodings, transformer blocks.

    Args:
        img_size: default volume (D, H, W); fixes the stored grid of a learnable position embedding. Other sizes
            divisible by the patch size run too (sin-cos is recomputed, learnable is resampled).
        patch_size: patch edge (int or 3-tuple).
        embed_dim: width E.
        depth: number of blocks.
        num_heads: attention heads; must divide ``embed_dim``.
        mlp_ratio: MLP hidden width / E.
        qkv_bias: bias on qkv projections.
        attn_mode: "divided" (space then time) or "joint" (all T*N tokens).
        max_phases: largest T accepted (size of the phase-index table).
        drop_rate: dropout on tokens, projections and MLPs.
        attn_drop_rate: attention-weight dropout.
        drop_path_rate: stochastic depth, increasing linearly to this rate over the blocks.
        grad_checkpointing: recompute each block in backward (saves activation memory).
        init_values: LayerScale init; None = off.
        pos_embed_type: "sincos" (fixed, not stored), "learnable" (stored ``[1, N, E]``), or "none".
        phase_embed: add the phase (time) encoding; False only to mirror a single-phase ViT (MONAI equivalence).
        time_attn: temporal sub-blocks in divided mode; False = per-phase spatial ViT (single-phase equivalence).
        norm_eps: LayerNorm epsilon.
        phase_time_drop: training-only probability of hiding a sample's acquisition times (trains the fallback).
        phase_layout: "tokens" (each phase its own tokens) or "channels" (phases stacked as input channels of a
            plain spatial ViT; acquisition times are not used, ``attn_mode``/``time_attn``/``phase_embed`` ignored).
    """

    def __init__(
        self,
        *,
        img_size: int | Sequence[int] = (128, 128, 128),
        patch_size: int | Sequence[int] = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        attn_mode: str = "divided",
        max_phases: int = 8,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        grad_checkpointing: bool = False,
        init_values: float | None = None,
        pos_embed_type: str = "sincos",
        phase_embed: bool = True,
        time_attn: bool = True,
        norm_eps: float = 1e-6,
        phase_time_drop: float = 0.0,
        phase_layout: str = "tokens",
    ) -> None:
        super().__init__()
        if phase_layout not in PHASE_LAYOUTS:
            raise ValueError(f"phase_layout must be one of {PHASE_LAYOUTS}, got {phase_layout!r}")
        if attn_mode not in ATTN_MODES:
            raise ValueError(f"attn_mode must be one of {ATTN_MODES}, got {attn_mode!r}")
        if pos_embed_type not in POS_EMBED_TYPES:
            raise ValueError(f"pos_embed_type must be one of {POS_EMBED_TYPES}, got {pos_embed_type!r}")
        if embed_dim < 1 or num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide embed_dim ({embed_dim})")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        rates = {"drop_rate": drop_rate, "attn_drop_rate": attn_drop_rate, "drop_path_rate": drop_path_rate}
        for name, rate in rates.items():
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {rate}")
        self.embed_dim, self.depth, self.num_heads = embed_dim, depth, num_heads
        self.attn_mode, self.pos_embed_type = attn_mode, pos_embed_type
        self.max_phases = max_phases
        self.grad_checkpointing = grad_checkpointing
        self.phase_layout = phase_layout
        stacked = phase_layout == "channels"
        if stacked:  # one token per patch over all phases: nothing to attend across, nothing to encode per phase
            phase_embed, time_attn = False, False

        self.patch_embed = PatchEmbed3d(
            patch_size=patch_size, embed_dim=embed_dim, in_chans=max_phases if stacked else 1
        )
        self.patch_size: tuple[int, int, int] = self.patch_embed.patch_size
        self.img_size = to_3tuple(img_size, name="img_size")
        self.grid_size = self.patch_embed.grid_size(self.img_size)  # ValueError when not divisible
        num_patches = self.grid_size[0] * self.grid_size[1] * self.grid_size[2]
        if pos_embed_type == "learnable":
            self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, embed_dim))
        elif pos_embed_type == "sincos":
            # Fixed table for the default grid; not stored in weights (recomputed for any grid).
            self.register_buffer("pos_embed", sincos_pos_embed_3d(self.grid_size, embed_dim)[None], persistent=False)
        else:
            self.pos_embed = None
        self.phase_embed = (
            PhaseEncoding(embed_dim, max_phases=max_phases, time_drop=phase_time_drop) if phase_embed else None
        )
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth grows with depth
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                attn_mode=attn_mode,
                time_attn=time_attn,
                drop=drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=dpr[i],
                init_values=init_values,
                norm_eps=norm_eps,
            )
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.init_weights()

    def init_weights(self) -> None:
        """MAE initialisation: xavier-uniform linears and tokenizer (as a linear), unit LayerNorms."""
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        for m in self.modules():
            init_linear_and_norm(m)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block during backward (trades ~30% compute for activation memory)."""
        self.grad_checkpointing = enable

    def _pos_embed(self, grid: tuple[int, int, int], ref: Tensor) -> Tensor | None:
        """Position embedding ``[1, N, E]`` for ``grid``, on the device/dtype of ``ref``."""
        if self.pos_embed is None:
            return None
        if grid == self.grid_size:
            return self.pos_embed
        if self.pos_embed_type == "sincos":
            return sincos_pos_embed_3d(grid, self.embed_dim)[None].to(device=ref.device, dtype=ref.dtype)
        return resample_pos_embed_3d(self.pos_embed, self.grid_size, grid)

    def prepare_tokens(
        self,
        x: Tensor,
        phase_mask: Tensor | None = None,
        phase_time: Tensor | None = None,
        ids_keep: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Tokenize and add encodings.

        Args:
            x: ``[B, T, D, H, W]``.
            phase_mask: bool ``[B, T]``, False = padded phase.
            phase_time: ``[B, T]`` seconds after the pre-contrast acquisition, NaN = unknown.
            ids_keep: ``[B, N_keep]`` spatial token indices to keep in every phase (MAE tube masking).

        Returns:
            Tokens ``[B, T, N or N_keep, E]`` (``T = 1`` with ``phase_layout="channels"``) and the attention phase
            mask (None when all phases are real, and always with stacked phases).
        """
        if x.ndim != 5:
            raise ValueError(f"expected an input [B, T, D, H, W], got shape {tuple(x.shape)}")
        b, t = x.shape[:2]
        if t > self.max_phases:
            raise ValueError(f"input has {t} phases but the encoder was built with max_phases={self.max_phases}")
        grid = self.patch_embed.grid_size(x.shape[-3:])
        phase_mask, phase_time = check_phase_inputs(x, phase_mask, phase_time)
        if phase_mask is not None:
            # Padded phases may hold anything (NaN included); zero them so they stay finite as (ignored) queries.
            x = torch.where(phase_mask[:, :, None, None, None], x, 0.0)
        if self.phase_layout == "channels":
            # [B, T, D, H, W] -> one volume of max_phases channels [B, 1, max_phases, D, H, W], padded phases zero;
            # tokens [B, 1, N, E] attend spatially only, so no attention mask is needed.
            x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, 0, 0, self.max_phases - t))[:, None]
            t, phase_mask = 1, None
        tokens = self.patch_embed(x)  # [B, T, N, E]
        pos = self._pos_embed(grid, tokens)
        if pos is not None:
            tokens = tokens + pos[:, None]
        if self.phase_embed is not None:
            tokens = tokens + self.phase_embed(t, phase_time, batch_size=b)[:, :, None]
        if ids_keep is not None:
            if ids_keep.ndim != 2 or ids_keep.shape[0] != b:
                raise ValueError(f"ids_keep must be [B, N_keep] with B={b}, got {tuple(ids_keep.shape)}")
            index = repeat(ids_keep, "b k -> b t k e", t=t, e=tokens.shape[-1])
            tokens = torch.gather(tokens, dim=2, index=index)
        return self.pos_drop(tokens), phase_mask

    def _run_block(self, blk: nn.Module, x: Tensor, phase_mask: Tensor | None) -> Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(blk, x, phase_mask, use_reentrant=False)
        return blk(x, phase_mask)

    def forward_features(
        self,
        x: Tensor,
        phase_mask: Tensor | None = None,
        phase_time: Tensor | None = None,
        ids_keep: Tensor | None = None,
    ) -> Tensor:
        """Encode a multi-phase volume.

        Args:
            x: ``[B, T, D, H, W]``; D, H, W divisible by the patch size.
            phase_mask: bool ``[B, T]`` (True = real phase); padded phases change nothing in the real ones.
            phase_time: ``[B, T]`` seconds since the pre-contrast acquisition; NaN/None = use the phase index.
            ids_keep: ``[B, N_keep]`` visible spatial tokens (same in every phase) for MAE.

        Returns:
            ``[B, T, N, E]`` (``N_keep`` tokens with ``ids_keep``) after the final norm.
        """
        t = x.shape[1]
        x, phase_mask = self.prepare_tokens(x, phase_mask, phase_time, ids_keep)
        for blk in self.blocks:
            x = self._run_block(blk, x, phase_mask)
        return self._per_phase(self.norm(x), t)

    def _per_phase(self, tokens: Tensor, t: int) -> Tensor:
        """``[B, 1, N, E]`` of the stacked phases -> ``[B, T, N, E]`` (a view); tokens of other layouts unchanged."""
        return tokens.expand(-1, t, -1, -1) if self.phase_layout == "channels" else tokens

    def get_intermediate_layers(
        self,
        x: Tensor,
        indices: Sequence[int],
        phase_mask: Tensor | None = None,
        phase_time: Tensor | None = None,
        norm: bool = True,
    ) -> list[Tensor]:
        """Outputs of the blocks at ``indices`` (0-based, negative counts from the end), in the order given.

        Returns:
            A list of ``[B, T, N, E]``, each passed through the final norm when ``norm``.
        """
        wanted = [i + self.depth if i < 0 else i for i in indices]
        if any(not 0 <= i < self.depth for i in wanted):
            raise ValueError(f"block indices {list(indices)} out of range for depth {self.depth}")
        t = x.shape[1]
        x, phase_mask = self.prepare_tokens(x, phase_mask, phase_time)
        outputs: dict[int, Tensor] = {}
        for i, blk in enumerate(self.blocks[: max(wanted) + 1]):
            x = self._run_block(blk, x, phase_mask)
            if i in wanted:
                outputs[i] = self._per_phase(self.norm(x) if norm else x, t)
        return [outputs[i] for i in wanted]

    def forward(self, x: Tensor, phase_mask: Tensor | None = None, phase_time: Tensor | None = None) -> Tensor:
        """Same as :meth:`forward_features` (no ``ids_keep``). Returns ``[B, T, N, E]``."""
        return self.forward_features(x, phase_mask, phase_time)
