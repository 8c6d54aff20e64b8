"""Models to and from weights folders: ``save_pretrained``, ``load_pretrained`` and partial encoder loads.

``config.json`` = ``{"arch", "model_args", "format_version", "num_parameters", "weights_sha256", ...extra keys}``;
the model is rebuilt with ``create_model(arch, **model_args)`` and loaded strictly, after the config has been
checked against the file's header on the ``meta`` device. Every exported folder also holds ``README.md``, a model
card rendered from ``config.json`` (`hub.modelcard`). Files are read through `hub.weightfiles`.
"""
# References:
#   timm _hub.py (save_for_hf: safetensors + config.json) and checkpoint_filter_fn; MAE util/pos_embed.py
#   (interpolate_pos_embed); nanoGPT (model_args stored with the weights).

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mtl_breast.files import safetensors_bytes, write_bytes, write_text
from mtl_breast.hub.modelcard import render_model_card
from mtl_breast.hub.weightfiles import (
    CONFIG_NAME,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    WeightsError,
    read_safetensors,
    read_safetensors_shapes,
    weights_and_config,
)
from mtl_breast.models.encoder import ViTEncoder3d
from mtl_breast.models.layers import resample_pos_embed_3d
from mtl_breast.models.registry import MODELS, create_model
from mtl_breast.sizes import positive_int_triple, to_3tuple

__all__ = ["CARD_NAME", "checkpoint_filter_fn", "clean_state_dict", "load_encoder_into", "load_pretrained",
           "save_pretrained"]

CARD_NAME = "README.md"
_RESERVED = ("arch", "model_args", "format_version", "num_parameters", "weights_sha256")
# Keys of an MAE export that are not the encoder: dropped when only the encoder is wanted.
_MAE_DECODER_PATTERNS = ("decoder_*", "mask_token")
# model_args keys that set how many modules a model holds: building on the meta device still makes one Python
# object per module, so an absurd value is refused from the header alone before anything is built.
_COUNT_KEY = re.compile(r"(^|_)(depth|num_skips|num_layers|num_blocks)$")
# The largest ``img_size`` (voxels of the model's default volume) a config may ask for: the default volume sets
# the position-embedding table built with the model, so ``img_size: [100000, 100000, 100000]`` would allocate
# terabytes before anything runs. 512^3 is four times a MAMA-MIA breast at 1 mm and 512 times the default crop.
MAX_IMG_VOXELS = 512**3
# What each family of registry names is, for messages about weights of the wrong kind.
_FAMILIES = {"mtl_": "a joint segmentation + pCR model", "mae_": "an MAE pretrainer",
             "vit_": "a bare encoder"}


def clean_state_dict(state_dict: Mapping[str, Tensor], model: nn.Module | None = None) -> dict[str, Tensor]:
    """Plain module keys: drop ``_orig_mod.`` (torch.compile) anywhere, and a ``module.`` (DDP) or ``model.``
    (LightningModule) prefix carried by every key (kept when ``model`` itself has a ``model`` submodule)."""
    sd = {k.replace("_orig_mod.", ""): v for k, v in state_dict.items()}
    own_model_prefix = model is not None and any(k.startswith("model.") for k in model.state_dict())
    for prefix in ("module.", "model."):
        if sd and all(k.startswith(prefix) for k in sd) and not (prefix == "model." and own_model_prefix):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def _model_grid(model: nn.Module) -> tuple[int, int, int] | None:
    return next((m.grid_size for m in model.modules() if isinstance(m, ViTEncoder3d)), None)


def _grid_from_args(model_args: Mapping[str, Any] | None) -> tuple[int, int, int] | None:
    if model_args and isinstance(model_args.get("encoder"), Mapping):  # joint model: encoder args nested
        model_args = model_args["encoder"]
    if not model_args or "img_size" not in model_args or "patch_size" not in model_args:
        return None
    img, patch = to_3tuple(model_args["img_size"]), to_3tuple(model_args["patch_size"])
    return tuple(i // p for i, p in zip(img, patch, strict=True))  # type: ignore[return-value]


def checkpoint_filter_fn(
    state_dict: Mapping[str, Tensor], model: nn.Module, *, src_grid: Sequence[int] | None = None
) -> dict[str, Tensor]:
    """Adapt a state dict to ``model``: plain keys, and position embeddings resampled to the model's token grid.

    Args:
        state_dict: weights, possibly with ``model.``/``module.``/``_orig_mod.`` prefixes.
        model: the target module (an encoder, or a model holding a :class:`ViTEncoder3d`).
        src_grid: token grid the stored position embeddings were made for; inferred as a cube when None.

    Returns:
        A new dict; keys ending in ``pos_embed`` whose token count differs from the model's are resampled
        trilinearly (the stored ``[1, N, E]`` table of a learnable position embedding).
    """
    sd = clean_state_dict(state_dict, model)
    target = model.state_dict()
    grid = _model_grid(model)
    for key, value in sd.items():
        ref = target.get(key)
        if not key.endswith("pos_embed") or ref is None or value.shape == ref.shape or grid is None:
            continue
        if value.ndim != 3 or ref.ndim != 3 or value.shape[-1] != ref.shape[-1]:
            continue  # a width mismatch is reported by the shape check, not papered over
        old = tuple(src_grid) if src_grid is not None else None
        if old is None:
            side = round(value.shape[1] ** (1 / 3))
            if side**3 != value.shape[1]:
                raise WeightsError(f"{key}: cannot infer the token grid of {value.shape[1]} tokens; pass src_grid")
            old = (side, side, side)
        sd[key] = resample_pos_embed_3d(value, old, grid)
    return sd


def _shape_mismatches(target: Mapping[str, Sequence[int]], source: Mapping[str, Sequence[int]]) -> list[str]:
    """``key: weights (shape) vs model (shape)`` for every key both hold with different shapes."""
    return [f"{k}: weights {tuple(v)} vs model {tuple(target[k])}" for k, v in source.items()
            if k in target and tuple(v) != tuple(target[k])]


def _check_shapes(model: nn.Module, sd: Mapping[str, Tensor], source: Path | str) -> None:
    target = {k: v.shape for k, v in model.state_dict().items()}
    bad = _shape_mismatches(target, {k: v.shape for k, v in sd.items()})
    if bad:
        raise WeightsError(f"{source}: tensors do not match the model built from the config:\n  " + "\n  ".join(bad))


def _family(arch: str) -> str:
    """What a registry name builds ("a joint segmentation + pCR model", ...), or the name itself when unknown."""
    return next((what for prefix, what in _FAMILIES.items() if arch.startswith(prefix)), arch)


def _find_args(args: Any, accept: Callable[[str, Any], bool], where: str = "model_args") -> list[tuple[str, Any]]:
    """``(path, value)`` of every leaf of ``args`` (nested dicts too) for which ``accept(key, value)`` holds."""
    if not isinstance(args, Mapping):
        return []
    found = []
    for key, value in args.items():
        if isinstance(value, Mapping):
            found += _find_args(value, accept, f"{where}.{key}")
        elif accept(str(key), value):
            found.append((f"{where}.{key}", value))
    return found


def _count_args(args: Any) -> list[tuple[str, int]]:
    """``(path, value)`` of every integer in ``args`` (nested dicts too) whose key sets a number of modules."""
    return _find_args(args, lambda key, value: bool(_COUNT_KEY.search(key)) and isinstance(value, int)
                      and not isinstance(value, bool))


def _check_img_size(config_path: Path, model_args: Mapping[str, Any]) -> None:
    """Refuse an ``img_size`` that is not 1 or 3 positive integers, or that holds more than `MAX_IMG_VOXELS`."""
    for where, value in _find_args(model_args, lambda key, _: key == "img_size"):
        sizes = positive_int_triple(value)
        if sizes is None:
            raise WeightsError(f"{config_path}: {where} must be one or three positive integers, got {value!r}")
        if math.prod(sizes) > MAX_IMG_VOXELS:
            raise WeightsError(f"{config_path}: {where}={list(sizes)} is {math.prod(sizes):,} voxels, more than the "
                               f"{MAX_IMG_VOXELS:,} (512^3) accepted; refusing to build that model")


def _check_arch(weights: Path, config: dict[str, Any], arch: str | None) -> str:
    """The registry name to build: the config's, checked against the registry and against ``arch`` when given."""
    found = config.get("arch")
    where = weights.parent if weights.name == WEIGHTS_NAME else weights
    if found is not None and not isinstance(found, str):
        raise WeightsError(f"{where / CONFIG_NAME}: 'arch' must be a registry name, got {found!r}")
    name = arch or found
    if not name:
        raise ValueError(f"no {CONFIG_NAME} next to {weights}: pass arch=")
    if name not in MODELS:
        said = f"its {CONFIG_NAME} names arch {name!r}" if name == found else f"arch {name!r} was asked for"
        raise WeightsError(f"{where}: {said}, which this version of mtl-breast does not know; known archs: "
                           f"{', '.join(sorted(MODELS))}")
    if found and arch and _family(found) != _family(arch):
        raise WeightsError(f"{where} holds {found!r} weights ({_family(found)}), but {arch!r} "
                           f"({_family(arch)}) was asked for")
    return name


def _check_before_building(weights: Path, arch: str, model_args: dict[str, Any], strict: bool) -> None:
    """Refuse a config that does not describe the weights file, from its header alone and without allocating.

    The header's shapes are compared with those of the model built on the ``meta`` device (no memory, no init): a
    config asking for a bigger model than the file holds (``depth: 100000``, ``embed_dim: 10**6``) is refused before
    the real model is allocated. Counts of modules are bounded first by the number of tensors in the header, since
    even a meta build makes one Python object per module, and ``img_size`` by `MAX_IMG_VOXELS` (it sets the size of
    the position embedding, which a sin-cos table does not store in the file).
    """
    shapes = read_safetensors_shapes(weights)
    config_path = weights.parent / CONFIG_NAME
    _check_img_size(config_path, model_args)
    too_many = [(k, v) for k, v in _count_args(model_args) if v > len(shapes)]
    if too_many:
        detail = ", ".join(f"{k}={v}" for k, v in too_many)
        raise WeightsError(f"{config_path}: {detail} asks for more layers than {weights} holds tensors "
                           f"({len(shapes)}); refusing to build that model")
    try:
        with torch.device("meta"):
            meta = create_model(arch, **model_args)
    except (TypeError, ValueError) as err:
        raise WeightsError(f"{config_path}: model_args do not build {arch!r}: {err}") from err
    target = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    source = clean_state_dict(shapes, meta)
    # A position embedding of another token grid is resampled on load (checkpoint_filter_fn): same width is enough.
    source = {k: (target[k] if k.endswith("pos_embed") and k in target and len(v) == 3 == len(target[k])
                  and v[-1] == target[k][-1] else v) for k, v in source.items()}
    bad = _shape_mismatches(target, source)
    if bad:
        wanted, held = sum(math.prod(s) for s in target.values()), sum(math.prod(s) for s in source.values())
        more = [f"... and {len(bad) - 50} more"] if len(bad) > 50 else []
        raise WeightsError(f"{weights}: tensors do not match the model built from the config ({config_path} asks "
                           f"for {wanted:,} elements, the file holds {held:,}); not built:\n  "
                           + "\n  ".join(bad[:50] + more))
    missing, unexpected = sorted(set(target) - set(source)), sorted(set(source) - set(target))
    if strict and (missing or unexpected):
        raise WeightsError(f"{weights} does not fit {arch!r}: missing keys {missing}, unexpected keys {unexpected}")


def save_pretrained(model: nn.Module, out_dir: str | Path, extra_config: dict[str, Any] | None = None) -> Path:
    """Export ``model.safetensors`` + ``config.json`` + ``README.md`` to ``out_dir`` (created), each atomically.

    The model card is rendered from the final config (after the checksum), so it states nothing the config
    does not.

    Args:
        model: a module built by ``create_model`` (it carries ``arch`` and ``model_args``); a torch.compile
            wrapper is unwrapped.
        out_dir: target directory.
        extra_config: more JSON keys (preprocessing, pCR threshold, ...); may not use the reserved keys.

    Returns:
        ``out_dir`` as a Path.
    """
    model = getattr(model, "_orig_mod", model)
    arch, model_args = getattr(model, "arch", None), getattr(model, "model_args", None)
    if not arch or not isinstance(model_args, dict):
        raise ValueError("save_pretrained needs a model built by create_model (with .arch and .model_args)")
    extra = dict(extra_config or {})
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise ValueError(f"extra_config may not set reserved key(s) {clash}")
    num_parameters = sum(p.numel() for p in model.parameters())
    config = {"arch": arch, "model_args": model_args, "format_version": FORMAT_VERSION,
              "num_parameters": num_parameters, **extra}
    json.dumps(config)  # fail before writing anything if a value is not JSON-serialisable
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in clean_state_dict(model.state_dict(), model).items()}

    weights = safetensors_bytes(tensors, {"format": "pt", "arch": arch})
    config["weights_sha256"] = hashlib.sha256(weights).hexdigest()
    write_bytes(out / WEIGHTS_NAME, weights)
    del weights
    write_text(out / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    write_text(out / CARD_NAME, render_model_card(config))
    return out


def load_pretrained(path: str | Path, arch: str | None = None, strict: bool = True, **overrides: Any) -> nn.Module:
    """Rebuild a model from ``config.json`` and load its weights.

    Args:
        path: weights directory, or a ``.safetensors`` file (its folder's ``config.json`` is used when present),
            or a Hub id ``org/name[@revision]`` already in the local Hugging Face cache (see :func:`resolve_weights`).
        arch: registry name; defaults to the config's (required when there is no config). When both are given they
            must name the same kind of model (joint / MAE / encoder).
        strict: require the exact key set (shape mismatches always raise).
        **overrides: ``model_args`` replacements (e.g. ``img_size``: learnable position embeddings are resampled,
            ``grad_checkpointing``, ``drop_path_rate``).

    Returns:
        The model in eval mode, with the config dict at ``model.pretrained_config``.

    Raises:
        WeightsError: an arch the registry does not know or of another kind than ``arch``; a config whose model does
            not match the tensors of the file (checked from the file's header on the ``meta`` device, before the
            model is allocated); bad or foreign weight files.
    """
    weights, config = weights_and_config(path)
    arch = _check_arch(weights, config, arch)
    if not isinstance(config.get("model_args", {}), dict):
        raise WeightsError(f"{weights.parent / CONFIG_NAME}: model_args must be a JSON object")
    model_args = dict(config.get("model_args", {}))
    if isinstance(model_args.get("pcr_head"), dict) and "kinetic" not in model_args["pcr_head"]:
        # Joint-model weights exported before the kinetic pathway existed have no `pcr_head.kinetic_fc`.
        model_args["pcr_head"] = {**model_args["pcr_head"], "kinetic": False}
    if isinstance(model_args.get("pcr_head"), dict) and "kinetic_features" not in model_args["pcr_head"]:
        # ... and those exported before the concentration features read the 6 curve features.
        model_args["pcr_head"] = {**model_args["pcr_head"], "kinetic_features": "curve"}
    _check_before_building(weights, arch, {**model_args, **overrides}, strict)
    model = create_model(arch, **{**model_args, **overrides})
    sd = read_safetensors(weights, expected_sha256=config.get("weights_sha256"))
    sd = checkpoint_filter_fn(sd, model, src_grid=_grid_from_args(config.get("model_args")))
    _check_shapes(model, sd, weights)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if strict and (missing or unexpected):
        raise WeightsError(f"{weights} does not fit {arch!r}: missing keys {missing}, unexpected keys {unexpected}")
    model.pretrained_config = config
    return model.eval()


def _matches(key: str, patterns: Sequence[str]) -> bool:
    # A pattern with a wildcard is an fnmatch pattern; otherwise a key prefix.
    return any(fnmatchcase(key, p) if any(c in p for c in "*?[") else key.startswith(p) for p in patterns)


def load_encoder_into(
    model: nn.Module,
    source: str | Path | Mapping[str, Tensor],
    *,
    expected_missing_prefixes: Sequence[str] | None = None,
    expected_unexpected_prefixes: Sequence[str] = (),
    encoder_attr: str = "encoder",
    src_grid: Sequence[int] | None = None,
) -> list[str]:
    """Load encoder weights (an encoder export, or an MAE export's ``encoder.*``) into a larger model.

    The key sets are asserted exactly: the keys left missing must be precisely the model keys matching
    ``expected_missing_prefixes``, and the unused source keys precisely those matching
    ``expected_unexpected_prefixes`` (an MAE export's decoder is always dropped).

    Args:
        model: the target; its encoder sits at attribute ``encoder_attr`` ("" = the model is the encoder).
        source: weights directory / ``.safetensors`` file / cached Hub id, or a state dict.
        expected_missing_prefixes: key prefixes (or fnmatch patterns, e.g. ``"encoder.blocks.*.time_attn.*"``) of
            model keys the source does not provide; None = every key outside the encoder.
        expected_unexpected_prefixes: prefixes/patterns (in the model's key space, e.g. ``"encoder.pos_embed"``) of
            source keys to ignore.
        encoder_attr: attribute path of the encoder inside ``model``.
        src_grid: token grid of the source's position embedding (read from its config when available).

    Returns:
        The sorted keys of ``model`` that were left at their current values.
    """
    if isinstance(source, Mapping):
        sd, name = clean_state_dict(source), "state dict"
    else:
        weights, config = weights_and_config(source)
        sd, name = clean_state_dict(read_safetensors(weights, expected_sha256=config.get("weights_sha256"))), weights
        src_grid = src_grid or _grid_from_args(config.get("model_args"))
        if isinstance(config.get("arch"), str):  # say what the folder holds: the key lists alone do not
            name = f"{weights} ({config['arch']!r}: {_family(config['arch'])})"
    if any(k.startswith("encoder.") for k in sd):
        # A model holding the encoder (MAE export): keep the encoder; the MAE decoder is expected to be dropped.
        sd = {k: v for k, v in sd.items() if not _matches(k, _MAE_DECODER_PATTERNS)}
        sd = {k.removeprefix("encoder."): v for k, v in sd.items()}
    prefix = f"{encoder_attr}." if encoder_attr else ""
    sd = checkpoint_filter_fn({prefix + k: v for k, v in sd.items()}, model, src_grid=src_grid)
    model_keys = set(model.state_dict())
    if expected_missing_prefixes is None:
        expected_missing = {k for k in model_keys if not k.startswith(prefix)}
    else:
        expected_missing = {k for k in model_keys if _matches(k, expected_missing_prefixes)}
    missing = model_keys - set(sd)
    unexpected = {k for k in set(sd) - model_keys}
    ignored = {k for k in unexpected if _matches(k, expected_unexpected_prefixes)}
    problems = {
        "missing from the source": sorted(missing - expected_missing),
        "expected missing but provided": sorted(expected_missing - missing),
        "unexpected in the source": sorted(unexpected - ignored),
    }
    if any(problems.values()):
        detail = "\n".join(f"  {what}: {keys}" for what, keys in problems.items() if keys)
        raise WeightsError(f"encoder weights from {name} do not fit {type(model).__name__}:\n{detail}")
    sd = {k: v for k, v in sd.items() if k not in ignored}
    _check_shapes(model, sd, name)
    model.load_state_dict(sd, strict=False)
    return sorted(missing)
