# References:
# LoRA: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022 (microsoft/LoRA loralib).
"""Low-rank adapters for the encoder's linear layers, and merging them back into plain layers for export."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LoRALinear", "apply_lora", "merge_lora"]


class LoRALinear(nn.Module):
    """``y = base(x) + (alpha / rank) * dropout(x) @ A^T @ B^T`` around a frozen ``nn.Linear``.

    ``lora_b`` starts at zero, so a freshly wrapped layer returns exactly what the base layer returned.
    State-dict keys are ``<name>.base.weight``, ``<name>.base.bias``, ``<name>.lora_a`` ``[rank, in]`` and
    ``<name>.lora_b`` ``[out, rank]``; call ``merge_lora`` before exporting so released weights carry plain
    ``<name>.weight`` / ``<name>.bias`` keys.

    Args:
        base: the linear layer to adapt (its parameters are frozen).
        rank: rank r of the update.
        alpha: scaling numerator; the update is multiplied by ``alpha / rank``.
        dropout: dropout on the adapter's input (training only).
    """

    def __init__(self, base: nn.Linear, *, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"LoRALinear wraps nn.Linear, got {type(base).__name__}")
        if rank < 1 or not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRALinear needs rank >= 1 and 0 <= dropout < 1, got rank={rank}, dropout={dropout}")
        self.base = base
        self.base.requires_grad_(False)
        self.rank = rank
        self.scaling = alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        # Same init as loralib: A ~ Kaiming-uniform, B = 0, so training starts from the pretrained function.
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)

    # Read-through attributes, for code that inspects the layer it expects to find (e.g. ``qkv.weight.dtype``).
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in] -> [..., out]``."""
        update = F.linear(F.linear(self.dropout(x), self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))
        return self.base(x) + self.scaling * update

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function (dropout aside) with the update folded in."""
        base = self.base
        out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
        out = out.to(device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            # Fold in fp32 so a bf16 base does not lose the (small) update to rounding twice.
            delta = self.scaling * (self.lora_b.float() @ self.lora_a.float())
            out.weight.copy_((base.weight.float() + delta).to(base.weight.dtype))
            if base.bias is not None:
                out.bias.copy_(base.bias)
        return out

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}"


def _matches(name: str, targets: Sequence[str]) -> bool:
    # "qkv" matches "blocks.0.attn.qkv"; "attn.proj" matches attention projections but not "mlp.proj".
    return any(name == t or name.endswith("." + t) for t in targets)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def apply_lora(
    module: nn.Module,
    target_names: Sequence[str] = ("qkv", "proj"),
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    freeze_others: bool = False,
) -> list[str]:
    """Wrap every ``nn.Linear`` submodule whose qualified name ends with a target in a ``LoRALinear``.

    A target matches a whole name component suffix: ``"proj"`` matches ``blocks.0.attn.proj`` and
    ``blocks.0.mlp.proj`` style names but not ``proj_out``; non-Linear modules of that name (e.g. a patch
    embedding ``Conv3d`` called ``proj``) are left alone. Already wrapped layers are skipped, so calling twice
    is harmless.

    Args:
        module: the model (typically the encoder) to adapt in place.
        target_names: name suffixes to adapt.
        rank: LoRA rank.
        alpha: LoRA scaling numerator.
        dropout: dropout on the adapter input.
        freeze_others: also freeze every other parameter of ``module``, leaving only the LoRA factors trainable
            (the usual parameter-efficient setup); by default only the wrapped base layers are frozen.

    Returns:
        Qualified names of the replaced layers.
    """
    if isinstance(target_names, str):
        target_names = (target_names,)
    names = [
        name
        for name, sub in module.named_modules()
        if name and type(sub) is nn.Linear and _matches(name, target_names) and not name.endswith(".base")
    ]
    for name in names:
        _replace(module, name, LoRALinear(module.get_submodule(name), rank=rank, alpha=alpha, dropout=dropout))
    if freeze_others:
        for pname, param in module.named_parameters():
            param.requires_grad_(pname.endswith(("lora_a", "lora_b")))
    return names


def merge_lora(module: nn.Module) -> list[str]:
    """Replace every ``LoRALinear`` in ``module`` by the equivalent plain ``nn.Linear`` (in place).

    After merging, the state dict has the original plain keys (``blocks.0.attn.qkv.weight``), which is what
    ``save_pretrained`` should write. The merged layers keep the base layer's ``requires_grad`` (frozen).

    Returns:
        Qualified names of the merged layers.
    """
    names = [name for name, sub in module.named_modules() if isinstance(sub, LoRALinear)]
    if isinstance(module, LoRALinear):
        raise ValueError("merge_lora merges submodules; call module.merged() on a bare LoRALinear")
    for name in names:
        lora = module.get_submodule(name)
        merged = lora.merged()
        merged.requires_grad_(lora.base.weight.requires_grad)
        _replace(module, name, merged)
    return names
