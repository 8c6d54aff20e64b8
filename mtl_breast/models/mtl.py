"""The joint model: shared encoder, UNETR-style segmentation decoder and pCR head.

    image [B, T, D, H, W] --encoder--> intermediate tokens, each [B, T, N, E]
        --seg_decoder (+ full-resolution stem on the raw phases)--> seg_logits [B, K, D, H, W]
        --pcr_head (last layer's tokens, pooled, weighted by the tumour probability,
                    + the learned kinetic pathway: the skip layers' tokens pooled per phase in the tumour and its shell,
                    + kinetic features of the tumour's enhancement curve in the image)--> pcr_logits [B]

The pCR head sees the tumour probability detached from the graph: pCR supervision should shape the
features, not push the segmentation towards whatever region helps the classifier.
"""

from __future__ import annotations

import torch
from torch import nn

from mtl_breast.models.decoder import skip_indices as default_skips


class MTLModel(nn.Module):
    """Joint segmentation + pCR model built by composition.

    Args:
        encoder: a `ViTEncoder3d` (forward contract: get_intermediate_layers -> list of [B, T, N, E]).
        seg_decoder: a `SegDecoder` consuming those token maps and the raw image.
        pcr_head: a `PCRHead` consuming the last layer's tokens.
        skip_indices: encoder layers that feed the decoder, shallow to deep; the last one also feeds
            the pCR head. Default: evenly spaced by depth, ending at the last block.
    """

    def __init__(self, encoder: nn.Module, seg_decoder: nn.Module, pcr_head: nn.Module,
                 skip_indices: list[int] | None = None):
        super().__init__()
        self.encoder = encoder
        self.seg_decoder = seg_decoder
        self.pcr_head = pcr_head
        if skip_indices is None:
            skip_indices = default_skips(encoder.depth, seg_decoder.num_skips)
        if any(not 0 <= i < encoder.depth for i in skip_indices):
            raise ValueError(f"skip_indices {skip_indices} out of range for an encoder of depth {encoder.depth}")
        self.skip_indices = list(skip_indices)

    def forward(self, image: torch.Tensor, phase_mask: torch.Tensor | None = None,
                phase_time: torch.Tensor | None = None,
                acquisition: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Args: image [B, T, D, H, W]; phase_mask bool [B, T]; phase_time float [B, T] (NaN unknown); acquisition
        float [B, 5] (`data.dataset.acquisition_vector`, for the pCR head's concentration features; None unknown).

        Returns: {"seg_logits": [B, K, D, H, W], "pcr_logits": [B], "pcr_parts": {term: [B]}} -- raw logits, no
        activation; ``pcr_parts`` holds the terms the pCR logit sums (`PCRHead.parts`).
        """
        features = self.encoder.get_intermediate_layers(image, self.skip_indices, phase_mask=phase_mask,
                                                        phase_time=phase_time)
        seg_logits = self.seg_decoder(features, image, phase_mask=phase_mask)
        # Foreground probability [B, 1, D, H, W] (channel 1 = tumour for K = 2).
        tumour_prob = seg_logits.detach().float().softmax(dim=1)[:, 1:].sum(dim=1, keepdim=True)
        grid = tuple(s // p for s, p in zip(image.shape[-3:], self.encoder.patch_size, strict=True))
        pcr_parts = self.pcr_head.parts(features[-1], phase_mask=phase_mask, seg_prob=tumour_prob, grid=grid,
                                        image=image, phase_time=phase_time, acquisition=acquisition, layers=features)
        return {"seg_logits": seg_logits, "pcr_logits": self.pcr_head.total(pcr_parts), "pcr_parts": pcr_parts}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for timm's layer-wise LR decay: encoder embeddings first, then each block; the
        decoder and head are unmatched, so they take the last group (full learning rate)."""
        return {
            "stem": r"^encoder\.(?:patch_embed|phase_embed|pos_embed)",
            "blocks": [(r"^encoder\.blocks\.(\d+)", None), (r"^encoder\.norm", (99999,))],
        }
