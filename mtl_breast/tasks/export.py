"""Turn a Lightning training checkpoint into released weights (model.safetensors + config.json).

Checkpoints are for resuming; weights are for everyone else. The checkpoint is read with
`torch.load(weights_only=True)`, so a tampered file cannot execute code. LoRA adapters are merged
into plain linear layers first, so released weights have the plain module keys of the registry model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mtl_breast.models.registry import create_model


def export_checkpoint(ckpt_path: Path | str, out_dir: Path | str) -> Path:
    """Rebuild the model of a pretraining or fine-tuning checkpoint and save it with `save_pretrained`.

    Returns the output folder. Raises FileNotFoundError when there is no such file, and WeightsError (a
    ValueError) naming the file when it is not a checkpoint of this package.
    """
    from mtl_breast.hub import WeightsError, save_pretrained

    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt_path} does not exist (runs keep theirs in RUN/checkpoints/)")
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for bad files
        raise WeightsError(f"{ckpt_path}: not a loadable Lightning checkpoint ({type(err).__name__}: {err})") from err
    hp = (ckpt.get("hyper_parameters") or {}) if isinstance(ckpt, dict) else {}
    if "arch" not in hp or "state_dict" not in ckpt:
        raise WeightsError(f"{ckpt_path}: no 'arch' hyper-parameter or state_dict; not an mtl-breast checkpoint")
    size = hp.get("img_size", 64)
    size = (size,) * 3 if isinstance(size, int) else tuple(int(s) for s in size)
    model = create_model(hp["arch"], img_size=size, **(hp.get("model_args") or {}))
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    if hp.get("lora_rank"):
        from mtl_breast.models.lora import apply_lora, merge_lora

        apply_lora(model.encoder, rank=hp["lora_rank"], alpha=2 * hp["lora_rank"])
        model.load_state_dict(state, strict=True)
        merge_lora(model.encoder)
    else:
        model.load_state_dict(state, strict=True)
    extra = dict(ckpt.get("mtl_breast") or {})
    extra = {k: v for k, v in extra.items() if v is not None}
    out_dir = Path(out_dir)
    save_pretrained(model, out_dir, extra_config=extra)
    return out_dir
