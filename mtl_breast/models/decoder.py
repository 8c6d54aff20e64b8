# References:
# UNETR: Hatamizadeh et al., "UNETR: Transformers for 3D Medical Image Segmentation", WACV 2022.
# Block layout follows MONAI's networks/nets/unetr.py and networks/blocks/unetr_block.py (Apache-2.0),
# reimplemented in plain torch and generalised to any encoder depth, patch size and number of phases.
"""UNETR-style segmentation decoder fed by encoder token maps of several depths plus a full-resolution stem."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from einops import rearrange
from torch import nn

from mtl_breast.sizes import to_3tuple

__all__ = ["PhaseAttentionPool", "SegDecoder", "phase_pool", "skip_indices"]


def skip_indices(depth: int, num_skips: int) -> list[int]:
    """Encoder block indices (0-based) whose outputs feed the decoder, spaced evenly and ending at the last block.

    Index ``k`` is ``ceil((k + 1) * depth / num_skips) - 1``: depth 12 with 4 skips gives ``[2, 5, 8, 11]``
    (UNETR's hidden states 3, 6, 9, 12). When ``num_skips > depth`` indices repeat (depth 2, 4 skips gives
    ``[0, 0, 1, 1]``) so the decoder always receives ``num_skips`` maps; an encoder that de-duplicates
    ``indices`` must map its outputs back, e.g. ``[outs[sorted(set(idx)).index(i)] for i in idx]``.

    Args:
        depth: number of encoder blocks (>= 1).
        num_skips: number of token maps the decoder consumes (>= 1).
    """
    if depth < 1 or num_skips < 1:
        raise ValueError(f"skip_indices needs depth >= 1 and num_skips >= 1, got depth={depth}, num_skips={num_skips}")
    # Integer ceil division avoids float rounding (round(0.5) == 0 would give index -1).
    return [-(-(k + 1) * depth // num_skips) - 1 for k in range(num_skips)]


def phase_pool(x: torch.Tensor, logits: torch.Tensor, phase_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax-weighted sum over the phase axis, ignoring padded phases.

    Args:
        x: values ``[B, T, N, E]``.
        logits: attention scores ``[B, T, N]``.
        phase_mask: bool ``[B, T]``, False = padded phase (its values and scores never reach the output).

    Returns:
        Pooled tokens ``[B, N, E]``.
    """
    if phase_mask is not None:
        keep = phase_mask[:, :, None]
        # finfo.min rather than -inf: a sample with no real phase yields zeros instead of NaN.
        logits = logits.masked_fill(~keep, torch.finfo(logits.dtype).min)
        # Zero padded values too, so NaN/inf in a padded phase cannot leak through 0 * NaN.
        x = x.masked_fill(~keep[..., None], 0.0)
    # Softmax in fp32: under bf16 autocast T-way weights would otherwise lose ~3 digits.
    weights = logits.float().softmax(dim=1).to(x.dtype)
    return torch.einsum("btn,btne->bne", weights, x)


class PhaseAttentionPool(nn.Module):
    """Attention pooling over phases: one learned score per (phase, token), softmax over T.

    Args:
        embed_dim: token width E.
    """

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        # No bias: softmax over T is shift-invariant, so a bias would be dead weight (always zero gradient).
        self.score = nn.Linear(embed_dim, 1, bias=False)

    def forward(self, x: torch.Tensor, phase_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pool ``x [B, T, N, E]`` over T (padded phases masked) into ``[B, N, E]``."""
        logits = self.score(self.norm(x)).squeeze(-1)  # [B, T, N]
        return phase_pool(x, logits, phase_mask)


def _norm(name: str, channels: int) -> nn.Module:
    if name == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if name == "batch":
        return nn.BatchNorm3d(channels)
    if name == "group":
        return nn.GroupNorm(math.gcd(8, channels), channels)
    raise ValueError(f"norm must be 'instance', 'batch' or 'group', got {name!r}")


class ResBlock(nn.Module):
    """Two 3x3x3 conv-norm layers with a residual connection (MONAI ``UnetResBlock``, LeakyReLU 0.01)."""

    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm1 = _norm(norm, out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _norm(norm, out_channels)
        self.act = nn.LeakyReLU(0.01, inplace=True)
        # A 1x1x1 projection only when the widths differ, as in UnetResBlock.
        self.shortcut = None
        if in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, bias=False), _norm(norm, out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.shortcut is None else self.shortcut(x)
        x = self.act(self.norm1(self.conv1(x)))
        x = self.norm2(self.conv2(x))
        return self.act(x + residual)


def _up(in_channels: int, out_channels: int, stride: tuple[int, int, int]) -> nn.ConvTranspose3d:
    # kernel == stride: each coarse voxel expands into a non-overlapping block (UNETR's transposed convs).
    return nn.ConvTranspose3d(in_channels, out_channels, kernel_size=stride, stride=stride)


class SkipProjection(nn.Module):
    """Token grid -> intermediate level: transposed conv, then (transposed conv + ResBlock) per further step.

    MONAI ``UnetrPrUpBlock`` with ``conv_block=True, res_block=True``.
    """

    def __init__(self, in_channels: int, out_channels: int, strides: Sequence[tuple[int, int, int]], norm: str):
        super().__init__()
        self.up_init = _up(in_channels, out_channels, strides[0])
        self.blocks = nn.ModuleList(
            nn.Sequential(_up(out_channels, out_channels, s), ResBlock(out_channels, out_channels, norm))
            for s in strides[1:]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up_init(x)
        for block in self.blocks:
            x = block(x)
        return x


class UpBlock(nn.Module):
    """Upsample by ``stride``, concatenate the skip of that level (if any), fuse with a ResBlock (``UnetrUpBlock``)."""

    def __init__(self, in_channels: int, out_channels: int, stride: tuple[int, int, int], has_skip: bool, norm: str):
        super().__init__()
        self.up = _up(in_channels, out_channels, stride)
        self.block = ResBlock(out_channels * (2 if has_skip else 1), out_channels, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.up(x)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.block(x)


class PhaseStem(nn.Module):
    """Full-resolution convolutional stem on the raw phases, for any number of phases with the same weights.

    Each phase goes through one shared conv as two channels, its intensity and its subtraction from the
    pre-contrast phase 0 (the enhancement radiologists read), plus a learned per-phase-index bias so phase
    order (wash-in vs wash-out) stays visible. Phases are then fused by a masked mean and a masked max over T,
    so padded phases never contribute, and a ResBlock mixes the two.
    """

    def __init__(self, out_channels: int, in_phases_max: int, norm: str) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, out_channels, 3, padding=1, bias=False)
        self.norm = _norm(norm, out_channels)
        self.phase_embed = nn.Parameter(torch.zeros(in_phases_max, out_channels))
        self.act = nn.LeakyReLU(0.01, inplace=True)
        self.fuse = ResBlock(2 * out_channels, out_channels, norm)

    def forward(self, image: torch.Tensor, phase_mask: torch.Tensor) -> torch.Tensor:
        """``image [B, T, D, H, W]``, ``phase_mask [B, T]`` -> ``[B, C, D, H, W]``."""
        b, t = image.shape[:2]
        keep = phase_mask[:, :, None, None, None]
        image = image.masked_fill(~keep, 0.0)
        x = torch.stack([image, image - image[:, :1]], dim=2)  # [B, T, 2, D, H, W]
        x = self.norm(self.conv(rearrange(x, "b t c d h w -> (b t) c d h w")))
        x = rearrange(x, "(b t) c d h w -> b t c d h w", b=b, t=t)
        x = self.act(x + self.phase_embed[:t, :, None, None, None].to(x.dtype))
        keep = keep[:, :, None]  # [B, T, 1, 1, 1, 1]
        mean = x.masked_fill(~keep, 0.0).sum(dim=1) / keep.sum(dim=1).clamp(min=1).to(x.dtype)
        peak = x.masked_fill(~keep, torch.finfo(x.dtype).min).amax(dim=1)
        peak = peak.masked_fill(~keep.any(dim=1), 0.0)  # a sample with no real phase: zeros, not finfo.min
        return self.fuse(torch.cat([mean, peak], dim=1))


class SegDecoder(nn.Module):
    """UNETR-style decoder: phase-pooled token maps of several depths -> full-resolution segmentation logits.

    With S = log2(max patch) upsampling stages, level j (0 = full resolution, S = token grid) has
    ``feature_size * 2**j`` channels. The deepest map is the bottleneck at level S; skip map k goes to level
    ``min(k + 1, S)`` (UNETR: layers 3, 6, 9 -> 1/2, 1/4, 1/8 resolution), being upsampled there by transposed
    convs; skips that land on level S (more skips than levels, e.g. patch 8 with 4 skips) are concatenated with
    the bottleneck. The stem supplies level 0. Patches may be anisotropic powers of two, e.g. ``(4, 8, 8)``: an
    axis with a smaller patch is upsampled only in the finest stages.

    Padded phases (``phase_mask`` False) never change the output with ``norm="instance"`` or ``"group"``;
    ``"batch"`` in training mode pools statistics over every phase volume of the batch, padded ones included.

    Args:
        embed_dim: encoder token width E.
        patch_size: encoder patch size p, an int or a 3-tuple of powers of two.
        num_skips: how many encoder layers feed the decoder (see ``skip_indices``); the last is the bottleneck.
        in_phases_max: largest number of phases T accepted (sizes the stem's per-phase-index bias only).
        feature_size: channel width at full resolution (UNETR's ``feature_size``).
        out_channels: number of classes K.
        stem: add the full-resolution convolutional stem on the raw phases.
        norm: ``"instance"``, ``"batch"`` or ``"group"``.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        patch_size: int | Sequence[int],
        num_skips: int = 4,
        in_phases_max: int = 8,
        feature_size: int = 16,
        out_channels: int = 2,
        stem: bool = True,
        norm: str = "instance",
    ) -> None:
        super().__init__()
        patch = to_3tuple(patch_size, name="patch_size")
        if len(patch) != 3 or any(p < 1 or p & (p - 1) for p in patch) or max(patch) < 2:
            raise ValueError(f"patch_size must be powers of two (3 values, largest >= 2), got {patch_size}")
        if num_skips < 1 or in_phases_max < 1 or feature_size < 1 or out_channels < 1 or embed_dim < 1:
            raise ValueError("embed_dim, num_skips, in_phases_max, feature_size and out_channels must be >= 1")
        _norm(norm, feature_size)  # validate the name early
        self.embed_dim = embed_dim
        self.patch_size = patch
        self.num_skips = num_skips
        self.in_phases_max = in_phases_max
        stages = int(math.log2(max(patch)))
        # Stride of the step from level j + 1 to level j, per axis: 2 while that axis still needs upsampling.
        strides = [tuple(2 if p >= 2 ** (j + 1) else 1 for p in patch) for j in range(stages)]
        channels = [feature_size * 2**j for j in range(stages)]
        self.skip_levels = [min(k + 1, stages) for k in range(num_skips - 1)]
        n_bottleneck = 1 + sum(level == stages for level in self.skip_levels)

        self.pools = nn.ModuleList(PhaseAttentionPool(embed_dim) for _ in range(num_skips))
        self.stem = PhaseStem(feature_size, in_phases_max, norm) if stem else None
        # One projection per skip below the token grid; level j needs the steps S-1 .. j.
        self.skips = nn.ModuleList(
            SkipProjection(embed_dim, channels[level], strides[level:][::-1], norm)
            for level in self.skip_levels
            if level < stages
        )
        has_skip = [(j in self.skip_levels) or (j == 0 and stem) for j in range(stages)]
        in_ch = [channels[j + 1] if j + 1 < stages else embed_dim * n_bottleneck for j in range(stages)]
        # ups[0] is the deepest step (token grid -> level S-1); ups[-1] reaches full resolution.
        self.ups = nn.ModuleList(
            UpBlock(in_ch[j], channels[j], strides[j], has_skip[j], norm) for j in reversed(range(stages))
        )
        self.out = nn.Conv3d(feature_size, out_channels, 1)

    def forward(
        self, features: Sequence[torch.Tensor], image: torch.Tensor, phase_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Decode token maps into segmentation logits.

        Args:
            features: ``num_skips`` encoder outputs, each ``[B, T, N, E]`` on the patch grid (row-major d, h, w),
                ordered shallow to deep (as ``skip_indices`` returns them).
            image: raw phases ``[B, T, D, H, W]``, D H W divisible by the patch size.
            phase_mask: bool ``[B, T]``, False = padded phase; None = all phases real.

        Returns:
            Raw logits ``[B, K, D, H, W]`` at the input resolution.
        """
        grid = self._check(features, image, phase_mask)
        b, t = image.shape[:2]
        if phase_mask is None:
            phase_mask = torch.ones(b, t, dtype=torch.bool, device=image.device)
        d, h, w = grid
        maps = [
            rearrange(pool(f, phase_mask), "b (d h w) e -> b e d h w", d=d, h=h, w=w)
            for pool, f in zip(self.pools, features, strict=True)
        ]
        stages = len(self.ups)
        # Bottleneck: deepest map plus any skip assigned to the token-grid level.
        skip_maps = list(zip(maps[:-1], self.skip_levels, strict=True))
        x = torch.cat([maps[-1]] + [m for m, lv in skip_maps if lv == stages], dim=1)
        level_skip: dict[int, torch.Tensor] = {}
        projections = iter(self.skips)
        for m, level in skip_maps:
            if level < stages:
                level_skip[level] = next(projections)(m)
        if self.stem is not None:
            level_skip[0] = self.stem(image, phase_mask)
        for j, up in zip(reversed(range(stages)), self.ups, strict=True):
            x = up(x, level_skip.get(j))
        return self.out(x)

    def _check(
        self, features: Sequence[torch.Tensor], image: torch.Tensor, phase_mask: torch.Tensor | None
    ) -> tuple[int, int, int]:
        # Shape errors surface here with a readable message rather than deep inside a conv or einops.
        if image.ndim != 5:
            raise ValueError(f"image must be [B, T, D, H, W], got shape {tuple(image.shape)}")
        b, t, *spatial = image.shape
        if not 1 <= t <= self.in_phases_max:
            raise ValueError(f"image has {t} phases; this decoder accepts 1..{self.in_phases_max}")
        if any(s % p for s, p in zip(spatial, self.patch_size, strict=True)):
            raise ValueError(f"image size {tuple(spatial)} is not divisible by the patch size {self.patch_size}")
        grid = tuple(s // p for s, p in zip(spatial, self.patch_size, strict=True))
        if len(features) != self.num_skips:
            raise ValueError(f"expected {self.num_skips} feature maps, got {len(features)}")
        expected = (b, t, math.prod(grid), self.embed_dim)
        for i, f in enumerate(features):
            if tuple(f.shape) != expected:
                raise ValueError(f"features[{i}] has shape {tuple(f.shape)}, expected [B, T, N, E] = {expected}")
        if phase_mask is not None and (phase_mask.dtype != torch.bool or tuple(phase_mask.shape) != (b, t)):
            got = f"{phase_mask.dtype} {tuple(phase_mask.shape)}"
            raise ValueError(f"phase_mask must be bool [B, T] = {(b, t)}, got {got}")
        return grid  # type: ignore[return-value]
