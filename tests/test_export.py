"""`mtl-breast export` rebuilds the model a checkpoint describes (arch, model_args, LoRA) instead of guessing it."""

from __future__ import annotations

import json

import torch
from conftest import run_cli
from safetensors.torch import load_file


def _ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_checkpoint_describes_its_model_and_old_checkpoints_export_the_same(finetune_run, tmp_path):
    ckpt_path = finetune_run / "checkpoints" / "last.ckpt"
    ckpt = _ckpt(ckpt_path)
    spec = ckpt["mtl_breast"]["model"]
    assert spec["arch"] == ckpt["hyper_parameters"]["arch"] and spec["lora"] is None
    size = ckpt["hyper_parameters"]["img_size"]
    assert spec["model_args"]["encoder"]["img_size"] == ([size] * 3 if isinstance(size, int) else list(size))
    # A checkpoint written before the description was stored: rebuilt from the hyper-parameters, same weights.
    del ckpt["mtl_breast"]["model"]
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    assert run_cli(["export", "--ckpt", ckpt_path, "--out", tmp_path / "new_w"]) == 0
    assert run_cli(["export", "--ckpt", old, "--out", tmp_path / "old_w"]) == 0
    new_w, old_w = (tmp_path / name / "model.safetensors" for name in ("new_w", "old_w"))
    assert new_w.read_bytes() == old_w.read_bytes()
    assert "model" not in json.loads((tmp_path / "new_w" / "config.json").read_text())  # arch/model_args say it


def test_lora_trains_only_adapters_in_the_encoder_and_exports_them_merged(finetune_argv, mae_weights, tmp_path):
    run = tmp_path / "lora"
    assert run_cli(finetune_argv(run, "--model.pretrained", mae_weights, "--model.lora_rank", "2",
                                 "--model.lora_alpha", "3", "--trainer.max_steps", "1")) == 0
    ckpt = _ckpt(run / "checkpoints" / "last.ckpt")
    assert ckpt["mtl_breast"]["model"]["lora"] == {"rank": 2, "alpha": 3.0}
    state = ckpt["state_dict"]
    pretrained = {k.removeprefix("encoder."): v for k, v in load_file(mae_weights / "model.safetensors").items()}
    # The encoder's own weights stay as pretrained (frozen); the adapters moved; the decoder trained.
    base = {k.removeprefix("model.encoder.").replace(".base.", "."): v for k, v in state.items()
            if k.startswith("model.encoder.") and "lora_" not in k}
    assert base and all(torch.equal(v, pretrained[k]) for k, v in base.items() if k in pretrained)
    assert sum(k in pretrained for k in base) > 0.9 * len(base)
    lora_b = {k: v for k, v in state.items() if k.endswith("lora_b")}
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b.values())  # zero at the start, trained by one step

    out = tmp_path / "weights"
    assert run_cli(["export", "--ckpt", run / "checkpoints" / "last.ckpt", "--out", out]) == 0
    exported = load_file(out / "model.safetensors")
    for key_b, b in lora_b.items():
        prefix = key_b.removesuffix("lora_b")  # model.encoder.blocks.0.attn.qkv.
        a = state[prefix + "lora_a"]
        weight = state[prefix + "base.weight"] + (3.0 / 2) * b @ a
        assert torch.allclose(exported[prefix.removeprefix("model.") + "weight"], weight, atol=1e-6)
