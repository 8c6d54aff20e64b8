"""Weight converters from other codebases' ViTs to :class:`ViTEncoder3d` keys. Key and tensor mapping only.

MONAI ``monai.networks.nets.ViT`` (proj_type="conv") maps onto a single-phase encoder built with::

    ViTEncoder3d(img_size=..., patch_size=..., embed_dim=hidden_size, depth=num_layers, num_heads=num_heads,
                 mlp_ratio=mlp_dim / hidden_size, qkv_bias=qkv_bias, pos_embed_type="learnable",
                 phase_embed=False, norm_eps=1e-5, attn_mode="joint")   # or attn_mode="divided", time_attn=False

and fed ``x [B, 1, D, H, W]`` (MONAI's channel axis is our phase axis). MONAI's position table (learnable or its
fixed sin-cos) is copied into the learnable ``pos_embed``. The qkv layout (qkv, heads, head_dim) is the same as
ours, so fused qkv weights copy unchanged; separate ``to_q/to_k/to_v`` are concatenated in that order.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

__all__ = ["convert_monai_vit_state_dict"]

# MONAI suffix -> ours, inside blocks.{i}.
_BLOCK_RENAMES = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "attn.qkv.weight": "attn.qkv.weight",
    "attn.qkv.bias": "attn.qkv.bias",
    "attn.out_proj.weight": "attn.proj.weight",
    "attn.out_proj.bias": "attn.proj.bias",
    "mlp.linear1.weight": "mlp.fc1.weight",
    "mlp.linear1.bias": "mlp.fc1.bias",
    "mlp.linear2.weight": "mlp.fc2.weight",
    "mlp.linear2.bias": "mlp.fc2.bias",
}
_TOP_RENAMES = {
    "patch_embedding.patch_embeddings.weight": "patch_embed.proj.weight",
    "patch_embedding.patch_embeddings.bias": "patch_embed.proj.bias",
    "patch_embedding.position_embeddings": "pos_embed",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
}
# Present in MONAI checkpoints but meaningless for a feature encoder: the unused cross-attention norm (always
# built), stale cross-attention weights of old MONAI versions, and the classification token/head.
_DROPPED = re.compile(r"^(blocks\.\d+\.(norm_cross_attn|cross_attn)\.|cls_token$|classification_head\.)")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def convert_monai_vit_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map a MONAI ``ViT`` state dict (conv patch embedding, 1 input channel) to ``ViTEncoder3d`` keys.

    Args:
        state_dict: ``monai.networks.nets.ViT(...).state_dict()`` (a ``model.``/``module.`` prefix is removed).

    Returns:
        A new dict for ``ViTEncoder3d.load_state_dict(..., strict=True)`` of the configuration in the module doc.

    Raises:
        ValueError: on keys with no counterpart (perceptron patch embedding, relative position embedding, ...), or a
            patch embedding with more than one input channel.
    """
    sd = dict(state_dict)
    for prefix in ("module.", "model."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    out: dict[str, Tensor] = {}
    split_qkv: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for key, value in sd.items():
        if _DROPPED.match(key):
            continue
        if key in _TOP_RENAMES:
            out[_TOP_RENAMES[key]] = value
            continue
        m = _BLOCK_KEY.match(key)
        if m and m.group(2) in _BLOCK_RENAMES:
            out[f"blocks.{m.group(1)}.{_BLOCK_RENAMES[m.group(2)]}"] = value
        elif m and (sub := re.fullmatch(r"attn\.to_([qkv])\.(weight|bias)", m.group(2))):
            # use_combined_linear=False: q, k, v projections stored apart; ours is one fused [3E, E] linear.
            split_qkv.setdefault(f"blocks.{m.group(1)}.attn.qkv.{sub.group(2)}", {})[sub.group(1)] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"MONAI ViT keys with no ViTEncoder3d counterpart: {sorted(unknown)}")
    for key, parts in split_qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"{key}: found only to_{'/to_'.join(sorted(parts))} of q, k, v")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    w = out.get("patch_embed.proj.weight")
    if w is not None and w.shape[1] != 1:
        raise ValueError(
            f"MONAI patch embedding takes {w.shape[1]} input channels; ViTEncoder3d tokenizes one phase at a time"
        )
    return out
