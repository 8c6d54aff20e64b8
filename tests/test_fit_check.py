"""Fit check: fake-tensor memory estimates against real CPU runs of the test-size models."""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from mtl_breast import memtrace
from mtl_breast.memtrace import CudaAutocastPolicy, block_bytes
from mtl_breast.run import fitcheck
from mtl_breast.run.fitcheck import FitCheckError, estimate_training_memory
from mtl_breast.tasks.finetune import MTLFinetuneModule

ROOT = Path(__file__).resolve().parents[1]


def config(arch: str = "mtl_vit_test", crop: int = 16, batch: int = 1, ckpt: bool = False,
           precision: str = "32-true", **model) -> dict:
    return {"model": {"arch": arch, "grad_checkpointing": ckpt, **model},
            "data": {"crop_size": crop, "batch_size": batch}, "trainer": {"precision": precision}}


@pytest.fixture(scope="module")
def base() -> dict:
    return estimate_training_memory(config(), phases=3)


def test_fake_trace_equals_real_cpu_trace(base):
    real = estimate_training_memory(config(), phases=3, real_cpu=True)
    assert real["peak_bytes"] == base["peak_bytes"]
    assert real["bytes"] == base["bytes"]
    assert real["peak_breakdown"] == base["peak_breakdown"]
    assert base["fits"] and base["peak_bytes"] > sum(base["bytes"][k] for k in ("parameters", "optimizer_state"))


def test_saved_activations_match_an_independent_count(base):
    # A real fp32 training step of the same module; saved tensors counted by data pointer, parameters and batch
    # excluded, sizes rounded to the allocator's 512-byte blocks as the estimate counts them.
    torch.manual_seed(0)
    module = MTLFinetuneModule(arch="mtl_vit_test", img_size=16).train()
    module.log = module.log_dict = lambda *a, **k: None
    label = torch.zeros(1, 1, 16, 16, 16, dtype=torch.uint8)
    label[..., :8, :8, :8] = 1
    batch = {"image": torch.randn(1, 3, 16, 16, 16), "phase_mask": torch.ones(1, 3, dtype=torch.bool),
             "phase_time": torch.tensor([[0.0, 90.0, 180.0]]), "label": label, "pcr": torch.tensor([1.0]),
             "meta": [{}], "patient_id": ["a"]}
    exclude = {p.untyped_storage().data_ptr() for p in module.parameters()}
    exclude |= {v.untyped_storage().data_ptr() for v in batch.values() if torch.is_tensor(v)}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = block_bytes(storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = module.training_step(batch, 0)
    loss.backward()
    assert base["bytes"]["saved_tensors"] == pytest.approx(sum(seen.values()), rel=0.01)
    assert base["bytes"]["activations"] >= base["bytes"]["saved_tensors"]


def test_parameters_gradients_and_adamw_state_counted_exactly(base):
    module = MTLFinetuneModule(arch="mtl_vit_test", img_size=16)
    n = sum(p.numel() for p in module.parameters())
    assert base["params"] == {"total": n, "trainable": n}
    assert base["bytes"]["parameters"] == base["bytes"]["gradients"] == 4 * n
    assert base["bytes"]["optimizer_state"] == 8 * n
    # Live at the peak: both AdamW moments of every parameter plus its (fused, on-device) step counter.
    assert base["peak_breakdown"]["optimizer_state"] == sum(
        2 * block_bytes(4 * p.numel()) + block_bytes(4) for p in module.parameters())
    assert base["peak_breakdown"]["parameters"] == sum(block_bytes(4 * p.numel()) for p in module.parameters())


def test_checkpointing_more_phases_and_larger_batches(base):
    ckpt = estimate_training_memory(config(ckpt=True), phases=3)
    assert ckpt["grad_checkpointing"] and not base["grad_checkpointing"]
    assert ckpt["bytes"]["activations"] < base["bytes"]["activations"]
    assert ckpt["peak_bytes"] < base["peak_bytes"]
    more_phases = estimate_training_memory(config(), phases=4)
    assert more_phases["peak_bytes"] > base["peak_bytes"]
    assert more_phases["bytes"]["activations"] > base["bytes"]["activations"]
    bigger_batch = estimate_training_memory(config(), phases=3, batch_size=2)
    assert bigger_batch["batch_size"] == 2 and bigger_batch["peak_bytes"] > base["peak_bytes"]


def test_bf16_fake_trace_equals_real_cpu_autocast(monkeypatch):
    # With the CUDA policy switched off, the fake bf16 + checkpointing trace is the real CPU autocast trace
    # (recomputation included); with it on, the estimate may only differ by what the policy changes.
    monkeypatch.setattr(memtrace.CudaAutocastPolicy, "__torch_function__",
                        lambda self, func, types, args=(), kwargs=None: func(*args, **(kwargs or {})))
    cfg = config(ckpt=True, precision="bf16-mixed")
    fake = estimate_training_memory(cfg, phases=3)
    real = estimate_training_memory(cfg, phases=3, real_cpu=True)
    assert fake["peak_bytes"] == real["peak_bytes"]
    assert fake["bytes"]["activations"] == real["bytes"]["activations"]


def test_cuda_autocast_policy_dtypes():
    x = torch.randn(2, 8, 16)
    norm, lin = torch.nn.LayerNorm(16), torch.nn.Linear(16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16), CudaAutocastPolicy():
        h = lin(x)
        assert h.dtype == torch.bfloat16  # linear in low precision, as on both devices
        assert norm(h).dtype == torch.float32  # CUDA runs layer_norm in float32
        assert h.sum(dim=1).dtype == torch.float32  # a half sum gives float32 on CUDA
        assert h.softmax(-1).dtype == torch.float32
        assert F.instance_norm(h.unsqueeze(0)).dtype == torch.bfloat16  # not on CUDA's lists
        assert torch.einsum("bnd,bmd->bnm", x, x).dtype == torch.bfloat16
        assert F.adaptive_avg_pool3d(h.view(1, 2, 2, 4, 16), 1).dtype == torch.bfloat16  # CPU-only float32


def test_mae_fake_trace_equals_real_cpu_trace():
    cfg = config(arch="mae_vit_test", batch=2)
    fake = estimate_training_memory(cfg)
    real = estimate_training_memory(cfg, real_cpu=True)
    assert fake["task"] == "pretrain" and fake["phases"] == fitcheck.DEFAULT_PHASES["pretrain"] == 4
    assert fake["peak_bytes"] == real["peak_bytes"]
    assert fake["data_dependent_values"] == {}  # masks and index lists were computed for real


def test_cli_exit_status_and_json(tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config()))
    parser = argparse.ArgumentParser()
    fitcheck.add_arguments(parser)
    assert fitcheck.run(parser.parse_args(["--config", str(path), "--budget-gib", "0.1", "--json"])) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["fits"] is False and result["budget_gib"] == 0.1 and result["phases"] == 3
    assert fitcheck.run(parser.parse_args(["--config", str(tmp_path / "missing.yaml")])) == 2
    out = capsys.readouterr().out
    assert "config file not found" in out and "missing.yaml" in out


def test_bad_configs_raise_clear_errors(tmp_path):
    with pytest.raises(FitCheckError, match="not found.*nope.yaml"):
        estimate_training_memory(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("trainer: {max_epochs: 1}\n")
    with pytest.raises(FitCheckError, match="model: {arch"):
        estimate_training_memory(tmp_path / "bad.yaml")
    with pytest.raises(FitCheckError, match="vit_test"):
        estimate_training_memory(config(arch="vit_test"))
    with pytest.raises(FitCheckError, match="precision"):
        estimate_training_memory(config(precision="64-true"))
    with pytest.raises(FitCheckError, match="max_phases"):
        estimate_training_memory(config(), phases=9)


def test_config_goes_through_the_training_parser():
    from mtl_breast.data.datamodule import FinetuneDataModule
    from mtl_breast.run.train import parse_training_config

    # A key `mtl-breast finetune fit` would refuse is refused here too, and unset values are the training defaults.
    with pytest.raises(FitCheckError, match="does not accept option 'crop_sise'"):
        estimate_training_memory({**config(), "data": {"crop_sise": 16}})
    cfg = parse_training_config("finetune", ["--config", str(ROOT / "configs" / "finetune" / "demo.yaml"),
                                             "--data.root=unused"])
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.gradient_clip_val == 1.0
    assert cfg.model.img_size == cfg.data.crop_size == 32  # linked as in training
    assert cfg.data.val_fraction == inspect.signature(FinetuneDataModule).parameters["val_fraction"].default


def test_configs_saved_before_the_preprocess_mapping_still_parse(tmp_path, caplog, monkeypatch):
    import tempfile

    from mtl_breast.data.preprocess import PreprocessConfig
    from mtl_breast.run.train import parse_training_config, upgrade_legacy_args

    # A config.yaml as earlier runs saved it: the preprocessing fields directly under data.
    old = tmp_path / "config.yaml"
    text = ("model:\n  arch: mtl_vit_test\ndata:\n  root: unused\n  crop_size: 32\n  spacing: [1.0, 1.0, 2.0]\n"
            "  margin_mm: 5.0\n  crop_to_breast: true\n  clip_percentiles: null\n  cache_dtype: float32\n")
    old.write_text(text)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    cfg = parse_training_config("finetune", ["--config", str(old), "--data.crop_to_breast=false"])
    assert not any(scratch.iterdir())  # the upgraded config is not left behind as a file
    assert PreprocessConfig(**cfg.data.preprocess.as_dict()) == PreprocessConfig(
        spacing=(1.0, 1.0, 2.0), margin_mm=5.0, crop_to_breast=False, cache_dtype="float32")
    assert old.read_text() == text and "read data.spacing" in caplog.text  # the user's file is left alone
    # Configs in today's layout and other flags pass through untouched.
    new = ROOT / "configs" / "finetune" / "demo.yaml"
    assert upgrade_legacy_args(["--config", str(new), "--data.batch_size=2"]) == ["--config", str(new),
                                                                                  "--data.batch_size=2"]
    assert upgrade_legacy_args(["--data.spacing", "[1, 1, 1]"]) == ["--data.preprocess.spacing", "[1, 1, 1]"]


def test_vit_b_finetune_config_on_fake_tensors_in_seconds():
    result = estimate_training_memory(ROOT / "configs" / "finetune" / "vit_b.yaml", phases=3, batch_size=2)
    assert result["arch"] == "mtl_vit_base" and result["crop_size"] == [128, 128, 128]
    assert result["precision"] == "bf16-mixed" and result["grad_checkpointing"]
    n = result["params"]["total"]
    assert 110e6 < n < 135e6 and result["bytes"]["parameters"] == 4 * n
    assert 2 * 2**30 < result["peak_bytes"] < 24 * 2**30 and result["fits"]


def test_cli_subcommand_exit_codes(capsys):
    from mtl_breast.cli import main

    config = str(Path(__file__).resolve().parents[1] / "configs" / "finetune" / "demo.yaml")
    assert main(["fit-check", "--config", config, "--phases", "3"]) == 0
    assert "fits in 24" in capsys.readouterr().out
    assert main(["fit-check", "--config", config, "--phases", "3", "--budget-gib", "0.001"]) == 1
    assert main(["fit-check", "--config", "no/such/config.yaml"]) == 2
