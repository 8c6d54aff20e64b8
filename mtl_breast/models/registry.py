"""Named model variants and ``create_model``.

``MODELS`` maps a name to a factory ``factory(**overrides) -> nn.Module``. Each factory stores the full resolved
constructor arguments on the module as ``model.model_args`` (JSON-serialisable), and ``create_model`` stores the
name as ``model.arch``, so ``create_model(model.arch, **model.model_args)`` rebuilds the same architecture: that is
the ``config.json`` of released weights (``{"arch", "model_args", "format_version"}``).

Groups: ``vit_<size>`` (encoder), ``mae_vit_<size>`` (MAE pretrainer), ``mtl_vit_<size>`` (joint segmentation +
pCR model; its ``model_args`` nest ``encoder``, ``seg_decoder``, ``pcr_head`` and ``skip_indices``). Another
group is added with a builder that sets ``model_args`` (``resolve_kwargs`` helps) and ``register_model``.

Sizes (width E / depth / heads / patch / default volume):
    test   64 / 2 / 2 / 8^3 / 32^3 -- CPU tests; patch 8 so a 32^3 volume still has 4^3 tokens per phase.
    small  384 / 12 / 6 / 16^3 / 128^3
    base   768 / 12 / 12 / 16^3 / 128^3 -- ViT-B: 89M parameters without temporal attention (ViT-B's 86M plus a
           16^3-voxel tokenizer), 117M with divided temporal attention (the default).
    large  1024 / 24 / 16 / 16^3 / 128^3
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial
from typing import Any

from torch import nn

from mtl_breast.models.decoder import SegDecoder
from mtl_breast.models.decoder import skip_indices as skip_indices_default
from mtl_breast.models.encoder import ViTEncoder3d
from mtl_breast.models.heads import PCRHead
from mtl_breast.models.mae import MAEPretrainer
from mtl_breast.models.mtl import MTLModel

__all__ = [
    "ENCODER_SIZES",
    "MAE_DECODER_SIZES",
    "MODELS",
    "build_encoder",
    "build_mae",
    "build_mtl",
    "create_model",
    "list_models",
    "register_model",
    "resolve_kwargs",
]

ENCODER_SIZES: dict[str, dict[str, Any]] = {
    "test": {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2},
    "small": {"img_size": 128, "patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6},
    "base": {"img_size": 128, "patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12},
    "large": {"img_size": 128, "patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16},
}
# Light decoders (MAE: narrower and shallower than the encoder); the decoder attends over all T*N tokens.
MAE_DECODER_SIZES: dict[str, dict[str, Any]] = {
    "test": {"decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2},
    "small": {"decoder_embed_dim": 256, "decoder_depth": 4, "decoder_num_heads": 8},
    "base": {"decoder_embed_dim": 512, "decoder_depth": 4, "decoder_num_heads": 16},
    "large": {"decoder_embed_dim": 512, "decoder_depth": 8, "decoder_num_heads": 16},
}


def _jsonable(value: Any) -> Any:
    # Tuples become lists so model_args equal their own JSON round trip.
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def resolve_kwargs(fn: Callable[..., Any], kwargs: dict[str, Any], *, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """All keyword arguments of ``fn`` with defaults filled in, tuples as lists.

    Args:
        fn: a class or function with keyword arguments.
        kwargs: given values; an unknown name raises ValueError listing the accepted ones.
        skip: parameters supplied separately (e.g. a submodule), excluded from the result.

    Returns:
        ``{name: value}`` for every parameter of ``fn`` except ``skip``.
    """
    params = {
        name: p
        for name, p in inspect.signature(fn).parameters.items()
        if name not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} for {fn.__name__}; accepted: {sorted(params)}")
    missing = sorted(n for n, p in params.items() if p.default is p.empty and n not in kwargs)
    if missing:
        raise ValueError(f"missing required argument(s) {missing} for {fn.__name__}")
    return {name: _jsonable(kwargs.get(name, p.default)) for name, p in params.items()}


def build_encoder(**kwargs: Any) -> ViTEncoder3d:
    """``ViTEncoder3d(**kwargs)`` with ``model_args`` recorded."""
    args = resolve_kwargs(ViTEncoder3d, kwargs)
    model = ViTEncoder3d(**args)
    model.model_args = args
    return model


def build_mae(**kwargs: Any) -> MAEPretrainer:
    """``MAEPretrainer(ViTEncoder3d(**encoder_kwargs), **mae_kwargs)``; kwargs are split by name."""
    mae_names = set(inspect.signature(MAEPretrainer).parameters) - {"encoder"}
    mae_args = resolve_kwargs(MAEPretrainer, {k: v for k, v in kwargs.items() if k in mae_names}, skip=("encoder",))
    encoder_args = resolve_kwargs(ViTEncoder3d, {k: v for k, v in kwargs.items() if k not in mae_names})
    model = MAEPretrainer(ViTEncoder3d(**encoder_args), **mae_args)
    model.model_args = {**encoder_args, **mae_args}
    return model


# Decoder widths per size: UNETR's feature_size 16 for ViT-B; the test size stays tiny for CPU tests.
MTL_DECODER_SIZES: dict[str, dict[str, Any]] = {
    "test": {"feature_size": 8, "num_skips": 2},
    "small": {"feature_size": 16, "num_skips": 4},
    "base": {"feature_size": 16, "num_skips": 4},
    "large": {"feature_size": 16, "num_skips": 4},
}


def build_mtl(
    *,
    encoder: dict[str, Any] | None = None,
    seg_decoder: dict[str, Any] | None = None,
    pcr_head: dict[str, Any] | None = None,
    skip_indices: list[int] | None = None,
    **encoder_overrides: Any,
) -> MTLModel:
    """``MTLModel(ViTEncoder3d, SegDecoder, PCRHead)`` with ``model_args`` recorded.

    Args:
        encoder, seg_decoder, pcr_head: constructor arguments of each part. The decoder's and head's
            ``embed_dim``/``patch_size`` always follow the encoder's.
        skip_indices: encoder blocks feeding the decoder; default evenly spaced by depth.
        **encoder_overrides: shorthand for encoder arguments (``img_size=96``, ``grad_checkpointing=True``).

    Returns:
        The model; ``model_args = {"encoder": .., "seg_decoder": .., "pcr_head": .., "skip_indices": ..}``.
    """
    enc_args = resolve_kwargs(ViTEncoder3d, {**(encoder or {}), **encoder_overrides})
    enc = ViTEncoder3d(**enc_args)
    tied = {"embed_dim": enc_args["embed_dim"], "patch_size": enc_args["patch_size"]}
    dec_args = resolve_kwargs(SegDecoder, {**(seg_decoder or {}), **tied})
    head_args = resolve_kwargs(PCRHead, {**(pcr_head or {}), "embed_dim": enc_args["embed_dim"]})
    skips = list(skip_indices) if skip_indices is not None else skip_indices_default(enc.depth, dec_args["num_skips"])
    model = MTLModel(enc, SegDecoder(**dec_args), PCRHead(**head_args), skip_indices=skips)
    model.model_args = {"encoder": enc_args, "seg_decoder": dec_args, "pcr_head": head_args, "skip_indices": skips}
    return model


def _mtl_factory(size: str) -> Callable[..., MTLModel]:
    def factory(*, encoder=None, seg_decoder=None, pcr_head=None, **kwargs: Any) -> MTLModel:
        # The kinetic pathway is on for every registered joint model (see heads.PCRHead).
        return build_mtl(encoder={**ENCODER_SIZES[size], **(encoder or {})},
                         seg_decoder={**MTL_DECODER_SIZES[size], **(seg_decoder or {})},
                         pcr_head={"kinetic": True, **(pcr_head or {})}, **kwargs)

    return factory


MODELS: dict[str, Callable[..., nn.Module]] = {}
MODELS.update({f"vit_{size}": partial(build_encoder, **cfg) for size, cfg in ENCODER_SIZES.items()})
MODELS.update(
    {f"mae_vit_{size}": partial(build_mae, **cfg, **MAE_DECODER_SIZES[size]) for size, cfg in ENCODER_SIZES.items()}
)
MODELS.update({f"mtl_vit_{size}": _mtl_factory(size) for size in ENCODER_SIZES})


def register_model(name: str, factory: Callable[..., nn.Module]) -> None:
    """Add a variant; ``factory(**overrides)`` must return a module carrying ``model_args``."""
    if name in MODELS:
        raise ValueError(f"model {name!r} is already registered")
    MODELS[name] = factory


def list_models() -> list[str]:
    """Registered names, sorted."""
    return sorted(MODELS)


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered variant.

    Args:
        name: a key of ``MODELS`` (see :func:`list_models`).
        **overrides: constructor arguments replacing the variant's defaults (e.g. ``img_size``, ``attn_mode``).

    Returns:
        The module, with ``model.arch = name`` and ``model.model_args`` = the full resolved arguments.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    model = MODELS[name](**overrides)
    if not isinstance(getattr(model, "model_args", None), dict):
        raise TypeError(f"factory of {name!r} did not set model.model_args")
    model.arch = name
    return model
