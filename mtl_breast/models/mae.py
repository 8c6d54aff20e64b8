"""Masked-autoencoder pretraining of :class:`ViTEncoder3d` on multi-phase volumes.

Tube masking hides the same spatial patches in every phase (a phase cannot simply copy the voxel from another
phase), optional whole-phase masking hides one post-contrast phase entirely (predict its enhancement from the
others), the encoder sees visible tokens only, and a light joint-attention decoder predicts the voxels of every
patch; the loss is the MSE over masked patches of real phases.
"""
# References:
#   MAE: https://github.com/facebookresearch/mae/blob/main/models_mae.py (random_masking, patchify/unpatchify,
#   forward_encoder/forward_decoder/forward_loss, norm_pix_loss)

from __future__ import annotations

import torch
import torch.utils.checkpoint
from einops import rearrange, repeat
from torch import Tensor, nn

from mtl_breast.models.encoder import Block, ViTEncoder3d
from mtl_breast.models.layers import init_linear_and_norm, sincos_pos_embed_3d
from mtl_breast.models.temporal import PhaseEncoding

__all__ = ["MAEPretrainer"]


class MAEPretrainer(nn.Module):
    """MAE around an encoder (composition: the encoder is built outside and passed in).

    Args:
        encoder: the ViT to pretrain; kept at attribute ``encoder`` so its weights export as ``encoder.*``.
        decoder_embed_dim: decoder width.
        decoder_depth: decoder blocks (joint attention over all T*N tokens).
        decoder_num_heads: decoder heads.
        decoder_mlp_ratio: decoder MLP hidden width / width.
        mask_ratio: fraction of spatial patches hidden (tube masking, same patches in every phase).
        phase_mask_ratio: probability per sample of also hiding one whole real phase (never phase 0, and only
            when at least two real phases remain visible).
        norm_pix_loss: normalise each spatial tube (one patch across all real phases) to zero mean, unit variance
            with ONE mean/std, MAE's better-features option adapted to DCE: a per-phase normalisation would subtract
            each phase's enhancement level, so the target would no longer hold the wash-in and washout between
            phases that a DCE encoder has to learn.
        target: what the decoder predicts per patch: ``"intensity"`` (every phase as acquired) or ``"enhancement"``
            (phase 0 as acquired, every later phase minus phase 0: the subtraction images a reader looks at, so
            the loss of the post-contrast phases is spent on the contrast uptake, not on the anatomy every phase
            repeats).
    """

    def __init__(
        self,
        encoder: ViTEncoder3d,
        *,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 4,
        decoder_num_heads: int = 16,
        decoder_mlp_ratio: float = 4.0,
        mask_ratio: float = 0.75,
        phase_mask_ratio: float = 0.0,
        norm_pix_loss: bool = True,
        target: str = "intensity",
    ) -> None:
        super().__init__()
        if target not in ("intensity", "enhancement"):
            raise ValueError(f"target must be 'intensity' or 'enhancement', got {target!r}")
        self.target = target
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        if not 0.0 <= phase_mask_ratio <= 1.0:
            raise ValueError(f"phase_mask_ratio must be in [0, 1], got {phase_mask_ratio}")
        if decoder_embed_dim % decoder_num_heads:
            raise ValueError(
                f"decoder_num_heads ({decoder_num_heads}) must divide decoder_embed_dim ({decoder_embed_dim})"
            )
        self.encoder = encoder
        self.mask_ratio, self.phase_mask_ratio, self.norm_pix_loss = mask_ratio, phase_mask_ratio, norm_pix_loss
        self.patch_size = encoder.patch_size
        patch_dim = self.patch_size[0] * self.patch_size[1] * self.patch_size[2]

        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, decoder_embed_dim))
        # Fixed sin-cos table for the default grid, recomputed for other grids; not part of the weights.
        self.register_buffer(
            "decoder_pos_embed", sincos_pos_embed_3d(encoder.grid_size, decoder_embed_dim)[None], persistent=False
        )
        # Tells the decoder which phase (time) each token belongs to: essential when a whole phase is hidden.
        self.decoder_phase_embed = PhaseEncoding(decoder_embed_dim, max_phases=encoder.max_phases)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, num_heads=decoder_num_heads, mlp_ratio=decoder_mlp_ratio, attn_mode="joint")
            for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_dim)
        self._init_decoder()

    def _init_decoder(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        for name, m in self.named_modules():
            if name.startswith("encoder"):
                continue  # the encoder initialised itself (or holds loaded weights)
            init_linear_and_norm(m)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Per-block recomputation in encoder and decoder."""
        self.encoder.set_grad_checkpointing(enable)

    # ---- patches ---------------------------------------------------------------------------------------------
    def patchify(self, x: Tensor) -> Tensor:
        """``[B, T, D, H, W] -> [B, T, N, pd*ph*pw]`` in the token order of the encoder's tokenizer."""
        pd, ph, pw = self.patch_size
        self.encoder.patch_embed.grid_size(x.shape[-3:])
        return rearrange(x, "b t (d pd) (h ph) (w pw) -> b t (d h w) (pd ph pw)", pd=pd, ph=ph, pw=pw)

    def unpatchify(self, patches: Tensor, grid_size: tuple[int, int, int]) -> Tensor:
        """Exact inverse of :meth:`patchify`: ``[B, T, N, pd*ph*pw] -> [B, T, D, H, W]`` on token grid ``grid_size``."""
        (pd, ph, pw), (d, h, w) = self.patch_size, grid_size
        pattern = "b t (d h w) (pd ph pw) -> b t (d pd) (h ph) (w pw)"
        return rearrange(patches, pattern, d=d, h=h, w=w, pd=pd, ph=ph, pw=pw)

    # ---- masking ---------------------------------------------------------------------------------------------
    def random_masking(
        self, batch_size: int, num_patches: int, *, device: torch.device | None = None, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-sample random tube mask over spatial patches (MAE's argsort of uniform noise).

        Args:
            batch_size: B.
            num_patches: N spatial patches per phase.
            device: where to build the indices.
            noise: optional ``[B, N]`` scores (lowest are kept), for reproducible masks.

        Returns:
            ``ids_keep [B, N_keep]`` with ``N_keep = int(N * (1 - mask_ratio))``, ``ids_restore [B, N]`` (inverse
            permutation), ``mask [B, N]`` float with 1 = masked, in original token order.
        """
        len_keep = int(num_patches * (1 - self.mask_ratio))
        if len_keep < 1:
            raise ValueError(f"mask_ratio {self.mask_ratio} leaves no visible patch out of {num_patches}")
        if noise is None:
            noise = torch.rand(batch_size, num_patches, device=device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        mask = torch.ones(batch_size, num_patches, device=noise.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)
        return ids_keep, ids_restore, mask

    def random_phase_masking(self, phase_mask: Tensor) -> Tensor:
        """Pick at most one whole phase per sample to hide.

        Args:
            phase_mask: bool ``[B, T]``, True = real phase.

        Returns:
            bool ``[B, T]``, True = hidden phase: with probability ``phase_mask_ratio``, one random real phase other
            than phase 0, only in samples with >= 3 real phases (so >= 2 stay visible).
        """
        b, t = phase_mask.shape
        hidden = torch.zeros_like(phase_mask)
        if self.phase_mask_ratio <= 0 or t < 3:
            return hidden
        eligible = phase_mask.clone()
        eligible[:, 0] = False
        scores = torch.where(eligible, torch.rand(b, t, device=phase_mask.device), -1.0)
        pick = scores.argmax(dim=1)  # a random eligible phase per sample
        apply = (phase_mask.sum(dim=1) >= 3) & (torch.rand(b, device=phase_mask.device) < self.phase_mask_ratio)
        hidden[torch.arange(b, device=phase_mask.device), pick] = True
        return hidden & apply[:, None]

    # ---- decoder and loss ------------------------------------------------------------------------------------
    def forward_decoder(
        self,
        latent: Tensor,
        ids_restore: Tensor,
        hidden_phase: Tensor,
        phase_mask: Tensor | None,
        phase_time: Tensor | None,
        grid_size: tuple[int, int, int],
    ) -> Tensor:
        """Predict all patches.

        Args:
            latent: encoder output ``[B, T, N_keep, E]``.
            ids_restore: ``[B, N]`` from :meth:`random_masking`.
            hidden_phase: bool ``[B, T]`` whole phases to predict from the others.
            phase_mask: bool ``[B, T]`` real phases, or None (all real).
            phase_time: ``[B, T]`` seconds, NaN = unknown, or None.
            grid_size: token grid of the input.

        Returns:
            ``[B, T, N, pd*ph*pw]`` predicted voxels (normalised per tube when ``norm_pix_loss``).
        """
        b, t, k, _ = latent.shape
        n = ids_restore.shape[1]
        x = self.decoder_embed(latent)
        x = torch.cat([x, self.mask_token.expand(b, t, n - k, -1).to(x.dtype)], dim=2)
        x = torch.gather(x, dim=2, index=repeat(ids_restore, "b n -> b t n e", t=t, e=x.shape[-1]))  # unshuffle
        x = torch.where(hidden_phase[:, :, None, None], self.mask_token.to(x.dtype), x)
        pos = self.decoder_pos_embed
        if tuple(grid_size) != tuple(self.encoder.grid_size):
            pos = sincos_pos_embed_3d(grid_size, x.shape[-1])[None].to(x.device)
        x = x + pos[:, None].to(x.dtype) + self.decoder_phase_embed(t, phase_time, batch_size=b)[:, :, None]
        for blk in self.decoder_blocks:
            if self.encoder.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, phase_mask, use_reentrant=False)
            else:
                x = blk(x, phase_mask)
        return self.decoder_pred(self.decoder_norm(x))

    def _target(self, x: Tensor, phase_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Patch targets ``[B, T, N, P]`` (``target``: the phases, or phase 0 and the subtractions) plus the per-tube
        mean and std ``[B, 1, N, 1]`` used by ``norm_pix_loss``.

        The statistics of a tube pool the voxels of that spatial patch over all real phases (padded or dropped
        phases are left out), so the normalised target keeps the relative enhancement between phases.
        """
        target = self.patchify(x).float()
        if self.target == "enhancement":
            target = torch.cat([target[:, :1], target[:, 1:] - target[:, :1]], dim=1)
        real = torch.ones(target.shape[:2], dtype=torch.bool, device=x.device) if phase_mask is None else phase_mask
        w = real[:, :, None, None].float()  # [B, T, 1, 1]
        count = (w.sum(dim=1, keepdim=True) * target.shape[-1]).clamp_min(1.0)  # voxels per tube
        # where(), not a product: padded phases may hold NaN, and NaN * 0 is NaN.
        kept = torch.where(w > 0, target, 0.0)
        mean = kept.sum(dim=(1, 3), keepdim=True) / count
        var = (torch.where(w > 0, target - mean, 0.0).pow(2)).sum(dim=(1, 3), keepdim=True) / count
        std = (var + 1e-6).sqrt()
        return target, mean, std

    def forward_loss(self, x: Tensor, pred: Tensor, mask: Tensor, phase_mask: Tensor | None = None) -> Tensor:
        """MSE over masked patches of real phases.

        Args:
            x: ``[B, T, D, H, W]`` input volumes.
            pred: ``[B, T, N, P]``.
            mask: ``[B, T, N]``, 1 = masked (scored).
            phase_mask: bool ``[B, T]``; padded phases never count.

        Returns:
            Scalar loss (0 when nothing is scored).
        """
        target, mean, std = self._target(x, phase_mask)
        if self.norm_pix_loss:
            target = (target - mean) / std
        per_patch = (pred.float() - target).pow(2).mean(dim=-1)  # [B, T, N]
        weight = mask.float()
        if phase_mask is not None:
            weight = weight * phase_mask[:, :, None]
        # where(), not a product: padded phases may hold NaN, and NaN * 0 is NaN.
        per_patch = torch.where(weight > 0, per_patch, 0.0)
        return (per_patch * weight).sum() / weight.sum().clamp_min(1.0)

    def forward(
        self, x: Tensor, phase_mask: Tensor | None = None, phase_time: Tensor | None = None
    ) -> dict[str, Tensor]:
        """One MAE pass.

        Args:
            x: ``[B, T, D, H, W]``.
            phase_mask: bool ``[B, T]``, True = real phase; None = all real.
            phase_time: ``[B, T]`` seconds since the pre-contrast acquisition, NaN = unknown.

        Returns:
            ``{"loss": scalar, "pred": [B, T, N, P], "mask": [B, T, N] (1 = masked)}``.
        """
        if x.ndim != 5:
            raise ValueError(f"expected an input [B, T, D, H, W], got shape {tuple(x.shape)}")
        b, t = x.shape[:2]
        grid = self.encoder.patch_embed.grid_size(x.shape[-3:])
        n = grid[0] * grid[1] * grid[2]
        real = torch.ones(b, t, dtype=torch.bool, device=x.device) if phase_mask is None else phase_mask
        ids_keep, ids_restore, tube = self.random_masking(b, n, device=x.device)
        hidden = self.random_phase_masking(real)
        # The encoder treats a hidden phase like a padded one: no real token can attend to it.
        latent = self.encoder.forward_features(x, real & ~hidden, phase_time, ids_keep)
        decoder_mask = None if phase_mask is None or bool(phase_mask.all()) else phase_mask
        pred = self.forward_decoder(latent, ids_restore, hidden, decoder_mask, phase_time, grid)
        mask = torch.maximum(repeat(tube, "b n -> b t n", t=t), hidden[:, :, None].float())
        loss = self.forward_loss(x, pred, mask, phase_mask)
        return {"loss": loss, "pred": pred, "mask": mask}

    @torch.no_grad()
    def reconstruct(
        self, pred: Tensor, mask: Tensor, x: Tensor, phase_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Volumes for visualisation.

        Args:
            pred: ``[B, T, N, P]`` from :meth:`forward`.
            mask: ``[B, T, N]``, 1 = masked.
            x: ``[B, T, D, H, W]`` the input.
            phase_mask: bool ``[B, T]`` as given to :meth:`forward` (None = all real).

        Returns:
            ``(masked_input, reconstruction)``, both ``[B, T, D, H, W]``: the input with masked patches zeroed, and
            the input with masked patches replaced by the prediction (de-normalised when ``norm_pix_loss``).
        """
        grid = self.encoder.patch_embed.grid_size(x.shape[-3:])
        target, mean, std = self._target(x, phase_mask)
        pred = pred.float() * std + mean if self.norm_pix_loss else pred.float()
        hide = mask[..., None].bool()
        recon = torch.where(hide, pred, target)
        if self.target == "enhancement":  # back from subtractions to phases
            target = torch.cat([target[:, :1], target[:, 1:] + target[:, :1]], dim=1)
            recon = torch.cat([recon[:, :1], recon[:, 1:] + recon[:, :1]], dim=1)
        masked = torch.where(hide, 0.0, target)
        return self.unpatchify(masked, grid).to(x.dtype), self.unpatchify(recon, grid).to(x.dtype)
