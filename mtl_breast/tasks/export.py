"""Turn a Lightning training checkpoint into released weights (model.safetensors + config.json).

Checkpoints are for resuming; weights are for everyone else. The checkpoint is read with
`torch.load(weights_only=True)`, so a tampered file cannot execute code. LoRA adapters are merged
into plain linear layers first, so released weights have the plain module keys of the registry model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mtl_breast.hub import WeightsError, save_pretrained
from mtl_breast.models.lora import apply_lora, merge_lora
from mtl_breast.models.registry import create_model
from mtl_breast.sizes import to_3tuple


def export_checkpoint(ckpt_path: Path | str, out_dir: Path | str) -> Path:
    """Rebuild the model of a pretraining or fine-tuning checkpoint and save it with `save_pretrained`.

    Returns the output folder. Raises FileNotFoundError when there is no such file, and WeightsError (a
    ValueError) naming the file when it is not a checkpoint of this package.
    """
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt_path} does not exist (runs keep theirs in RUN/checkpoints/)")
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for bad files
        raise WeightsError(f"{ckpt_path}: not a loadable Lightning checkpoint ({type(err).__name__}: {err})") from err
    spec = checkpoint_model_spec(ckpt, ckpt_path)
    model = create_model(spec["arch"], **spec["model_args"])
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    if spec.get("lora"):
        apply_lora(model.encoder, rank=spec["lora"]["rank"], alpha=spec["lora"]["alpha"])
        model.load_state_dict(state, strict=True)
        merge_lora(model.encoder)
    else:
        model.load_state_dict(state, strict=True)
    extra = {k: v for k, v in (ckpt.get("mtl_breast") or {}).items() if v is not None and k != "model"}
    out_dir = Path(out_dir)
    save_pretrained(model, out_dir, extra_config=extra)
    return out_dir


def model_spec(model: torch.nn.Module, lora: dict[str, float] | None = None) -> dict[str, Any]:
    """What rebuilds `model` (a registry model) exactly: {"arch", "model_args", "lora": {"rank", "alpha"} or None}.
    The training tasks store it in every checkpoint under ``checkpoint["mtl_breast"]["model"]``."""
    return {"arch": model.arch, "model_args": dict(model.model_args), "lora": dict(lora) if lora else None}


def checkpoint_model_spec(ckpt: dict, path: Path | str = "checkpoint") -> dict[str, Any]:
    """The `model_spec` of a training checkpoint: stored with it, or for checkpoints written before it was
    stored, rebuilt from the task's hyper-parameters (arch, model_args, img_size, lora_rank with alpha 2 x rank,
    which is what those versions trained with)."""
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise WeightsError(f"{path}: no state_dict; not a Lightning checkpoint of mtl-breast")
    stored = (ckpt.get("mtl_breast") or {}).get("model")
    if stored:
        return stored
    hp = ckpt.get("hyper_parameters") or {}
    if "arch" not in hp:
        raise WeightsError(f"{path}: no model description or 'arch' hyper-parameter; not an mtl-breast checkpoint")
    size = hp.get("img_size", 64)
    size = list(to_3tuple(size, name="img_size"))
    rank = hp.get("lora_rank")
    return {"arch": hp["arch"], "model_args": {**(hp.get("model_args") or {}), "img_size": size},
            "lora": {"rank": int(rank), "alpha": 2.0 * int(rank)} if rank else None}
