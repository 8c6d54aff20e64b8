"""Training through the CLI: resuming, DDP on CPU (gloo), fine-tuning metrics and exports, encoder loading."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_cli
from probes import SimulatedCrash

TESTS = Path(__file__).resolve().parent


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_tensors(a: dict, b: dict, what: str, atol: float = 0.0) -> None:
    assert a.keys() == b.keys(), what
    different = [k for k in a if not (torch.equal(a[k], b[k]) if atol == 0 else
                                      torch.allclose(a[k].float(), b[k].float(), rtol=0.0, atol=atol))]
    assert not different, f"{what} differ: {different[:5]}"




def _optimizer_steps(ckpt: dict) -> set[int]:
    return {int(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()}


# ---------------------------------------------------------------------------------------------- resume
def _assert_same_run(resumed: dict, straight: dict) -> None:
    """Step, epoch, optimizer, schedule, generator state and weights of two checkpoints agree."""
    assert resumed["global_step"] == straight["global_step"]
    assert resumed["epoch"] == straight["epoch"]
    assert _optimizer_steps(resumed) == _optimizer_steps(straight) == {straight["global_step"]}
    assert resumed["lr_schedulers"] == straight["lr_schedulers"]
    opt_r, opt_s = resumed["optimizer_states"][0], straight["optimizer_states"][0]
    assert [g["lr"] for g in opt_r["param_groups"]] == [g["lr"] for g in opt_s["param_groups"]]
    for key in opt_s["state"]:
        assert int(opt_r["state"][key]["step"]) == int(opt_s["state"][key]["step"])
        _assert_same_tensors(opt_r["state"][key], opt_s["state"][key], f"optimizer state of parameter {key}")
    assert torch.equal(resumed["mtl_breast_rng"]["torch"], straight["mtl_breast_rng"]["torch"])
    _assert_same_tensors(resumed["state_dict"], straight["state_dict"], "weights")  # bit for bit


def _loader_state(ckpt: dict) -> dict:
    return ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]


def test_resume_after_interruption_continues_the_same_run(pretrain_run, pretrain_argv, tmp_path):
    """Stopped after epoch 1 of 2 and restarted with `--ckpt_path last`, the run ends exactly where the
    uninterrupted one (the session's pretrain run, same settings) does: step, optimizer, schedule, RNG, weights.
    Nothing is pinned from outside: crops and flips are seeded per sample from (seed, epoch, position)."""
    run = tmp_path / "interrupted"
    assert run_cli(pretrain_argv(run, "--trainer.callbacks+=probes.StopAfterEpoch")) == 0
    halfway = _ckpt(run / "checkpoints" / "last.ckpt")
    assert halfway["global_step"] == 2 and _optimizer_steps(halfway) == {2}
    assert "mtl_breast_rng" in halfway
    assert _loader_state(halfway)["epoch"] == 1 and _loader_state(halfway)["samples_done"] == 0

    assert run_cli(pretrain_argv(run, "--ckpt_path", "last")) == 0
    resumed = _ckpt(run / "checkpoints" / "last.ckpt")
    straight = _ckpt(pretrain_run / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == 4 and resumed["lr_schedulers"][0]["last_epoch"] == 4
    _assert_same_run(resumed, straight)


def test_resume_mid_epoch_continues_the_same_run(pretrain_run, pretrain_argv, finetune_run, finetune_argv,
                                                mae_weights, tmp_path):
    """Crashed in the middle of an epoch (after step 3 of 4 in MAE pretraining, in epoch 1; after step 1 of 2
    in fine-tuning, in epoch 0) with last.ckpt as its last periodic write left it, and restarted with
    `--ckpt_path last`: the run goes on with the next batch of that epoch and ends bit for bit where the
    uninterrupted run does (MAE masks from the restored generator, crops from the per-sample seeds)."""
    for task, argv, straight_run, stop, extra in (
            ("pretrain", pretrain_argv, pretrain_run, 3, ()),
            ("finetune", finetune_argv, finetune_run, 1, ("--model.pretrained", str(mae_weights)))):
        run = tmp_path / task
        probe = json.dumps({"class_path": "probes.CrashAtStep", "init_args": {"step": stop}})
        with pytest.raises(SimulatedCrash):
            run_cli(argv(run, *extra, "--last_checkpoint.every_n_steps", "1", f"--trainer.callbacks+={probe}"))
        halfway = _ckpt(run / "checkpoints" / "last.ckpt")
        assert halfway["global_step"] == stop, task
        assert _loader_state(halfway)["samples_done"] == 2, task  # one batch of 2 into the epoch
        assert run_cli(argv(run, *extra, "--ckpt_path", "last")) == 0
        _assert_same_run(_ckpt(run / "checkpoints" / "last.ckpt"), _ckpt(straight_run / "checkpoints" / "last.ckpt"))


def test_resume_with_more_steps_continues_the_count(pretrain_run, pretrain_argv, tmp_path):
    """A finished 4-step run restarted from its checkpoint with max_steps 6 trains steps 5 and 6 only."""
    start = _ckpt(pretrain_run / "checkpoints" / "last.ckpt")
    run = tmp_path / "longer"
    assert run_cli(pretrain_argv(run, "--trainer.max_steps", "6",
                                 "--ckpt_path", pretrain_run / "checkpoints" / "last.ckpt")) == 0
    longer = _ckpt(run / "checkpoints" / "last.ckpt")
    assert longer["global_step"] == 6
    assert _optimizer_steps(longer) == {6}  # Adam's moments carried on: a fresh optimizer would count 2
    assert longer["lr_schedulers"][0]["last_epoch"] == 6
    assert longer["lr_schedulers"][0]["base_lrs"] == start["lr_schedulers"][0]["base_lrs"]
    assert any(not torch.equal(longer["state_dict"][k], v) for k, v in start["state_dict"].items())


# ---------------------------------------------------------------------------------------------- DDP
def _run_ddp(argv: list, out: Path, cwd: Path) -> list[dict]:
    """`python -m mtl_breast.cli <argv>` on 2 CPU processes (gloo); returns what each rank recorded."""
    probe = json.dumps({"class_path": "probes.RecordSeen", "init_args": {"out_dir": str(out)}})
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(TESTS), str(ROOT), os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-m", "mtl_breast.cli", *map(str, argv), "--trainer.strategy", "ddp",
           "--trainer.devices", "2", "--trainer.accelerator", "cpu", f"--trainer.callbacks+={probe}"]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] > 0
    _assert_same_tensors(torch.load(out / "rank0.pt", weights_only=True),
                         torch.load(out / "rank1.pt", weights_only=True), "weights of rank 0 and rank 1")
    return ranks


def test_ddp_pretraining_on_two_cpu_processes(pretrain_argv, tmp_path):
    run = tmp_path / "run"
    # 6 training cases (10 less the 2 of the test split less 2 for validation), no repeats: each rank gets 3 of
    # them, in batches of 2 and 1.
    ranks = _run_ddp(pretrain_argv(run, "--data.repeats", "1", "--trainer.max_steps", "2"), tmp_path / "seen",
                     tmp_path)
    seen = [set(r["seen"]) for r in ranks]
    assert all(len(r["seen"]) == 3 for r in ranks)
    assert not seen[0] & seen[1], "both ranks trained on the same cases"
    assert len(seen[0] | seen[1]) == 6
    # seed_everything seeds both ranks alike; their MAE masks and augmentation must still differ.
    assert ranks[0]["generators"]["torch"] != ranks[1]["generators"]["torch"]
    assert ranks[0]["generators"]["transform"] != ranks[1]["generators"]["transform"]
    ckpt = _ckpt(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2
    assert len(ckpt["mtl_breast_rng"]["ranks"]) == 2  # each rank's generators, for an exact DDP resume


def test_ddp_finetuning_on_two_cpu_processes(finetune_argv, tmp_path):
    run = tmp_path / "run"
    ranks = _run_ddp(finetune_argv(run, "--data.repeats", "1", "--data.batch_size", "1",
                                   "--trainer.limit_val_batches", "1", "--trainer.logger", "false"),
                     tmp_path / "seen", tmp_path)
    assert all(len(r["seen"]) == 2 for r in ranks)
    assert not set(ranks[0]["seen"]) & set(ranks[1]["seen"]), "both ranks trained on the same cases"
    ckpt = _ckpt(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2
    # Validation rows are gathered from both ranks before the pCR threshold is chosen: the same on each.
    rank_states = [torch.load(tmp_path / "seen" / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert float(rank_states[0]["pcr_threshold"]) == float(rank_states[1]["pcr_threshold"])


# ---------------------------------------------------------------------------------------------- fine-tuning
def _metrics(run: Path) -> list[dict]:
    (path,) = run.glob("lightning_logs/version_*/metrics.csv")
    with open(path) as f:
        return list(csv.DictReader(f))


def test_finetune_logs_challenge_metrics(finetune_run):
    rows = _metrics(finetune_run)
    val = [r for r in rows if r.get("val/dsc")]
    assert val, "no validation metrics logged"
    last = val[-1]
    for name in ("val/dsc", "val/norm_hd", "val/pcr_ba", "val/pcr_auc", "val/ranking", "val/selection",
                 "val/pcr_threshold"):
        assert last.get(name) not in (None, ""), f"{name} not logged"
        assert 0.0 <= float(last[name]) <= 1.0 or name == "val/norm_hd"
    assert (finetune_run / "checkpoints" / "last.ckpt").is_file()
    assert list((finetune_run / "checkpoints").glob("best-*.ckpt"))  # selected on val/selection
    assert list(finetune_run.glob("lightning_logs/version_*/config.yaml"))


def test_finetune_export_carries_validation_threshold_and_preprocessing(finetune_run, mtl_weights):
    config = json.loads((mtl_weights / "config.json").read_text())
    assert config["arch"] == "mtl_vit_test"
    logged = float([r for r in _metrics(finetune_run) if r.get("val/pcr_threshold")][-1]["val/pcr_threshold"])
    assert config["inference"]["pcr_threshold"] == pytest.approx(logged, abs=1e-6)
    assert config["inference"]["pcr_threshold"] != 0.5  # chosen on validation, not the initial value
    assert config["inference"]["roi_size"] == [32, 32, 32]
    assert "pcr_temperature" in config["inference"]
    pre = config["preprocess"]
    assert tuple(pre["spacing"]) == (1.0, 1.0, 1.0)
    assert {"crop_to_breast", "margin_mm", "clip_percentiles"} <= set(pre)


def test_finetune_starts_from_the_mae_encoder(finetune_run, mae_weights):
    from mtl_breast import load_pretrained

    mae = load_pretrained(mae_weights)
    at_start = torch.load(finetune_run / "encoder_at_start.pt", weights_only=True)
    _assert_same_tensors(at_start, {k: v for k, v in mae.encoder.state_dict().items()}, "encoder at start vs MAE")


def test_finetune_module_loads_the_encoder_and_nothing_else(mae_weights):
    from mtl_breast import load_pretrained
    from mtl_breast.tasks.finetune import MTLFinetuneModule

    torch.manual_seed(0)
    scratch = MTLFinetuneModule(arch="mtl_vit_test", img_size=32)
    torch.manual_seed(0)
    loaded = MTLFinetuneModule(arch="mtl_vit_test", img_size=32, pretrained=str(mae_weights))
    mae_encoder = load_pretrained(mae_weights).encoder.state_dict()
    _assert_same_tensors(loaded.model.encoder.state_dict(), mae_encoder, "loaded encoder vs MAE encoder")
    # The decoder and the pCR head keep their initialisation.
    outside = {k: v for k, v in loaded.model.state_dict().items() if not k.startswith("encoder.")}
    _assert_same_tensors(outside, {k: v for k, v in scratch.model.state_dict().items() if not k.startswith("encoder.")},
                         "non-encoder weights")


def test_demo_exports_the_checkpoint_recorded_as_best(finetune_run):
    from mtl_breast.run.demo import _best_checkpoint

    best = _best_checkpoint(finetune_run)
    assert best.parent == finetune_run / "checkpoints" and best.name.startswith("best-")


# ---------------------------------------------------------------------------------------------- pCR supervision
def _step_batch(tumour_window: list[bool]) -> dict:
    b = len(tumour_window)
    label = torch.zeros(b, 1, 32, 32, 32, dtype=torch.uint8)
    label[:, :, 12:20, 12:20, 12:20] = 1
    return {"image": torch.randn(b, 3, 32, 32, 32), "phase_mask": torch.ones(b, 3, dtype=torch.bool),
            "phase_time": torch.tensor([[0.0, 90.0, 180.0]] * b), "label": label,
            "pcr": torch.tensor([1.0, 0.0][:b]), "tumour_window": torch.tensor(tumour_window),
            "meta": [{}] * b, "patient_id": [f"c{i}" for i in range(b)]}


def test_pcr_task_sits_out_batches_without_a_tumour_window(monkeypatch):
    """Uncertainty weighting: no labelled tumour window, no pCR term (its s/2 alone would drift the weights)."""
    from mtl_breast.tasks.finetune import MTLFinetuneModule

    torch.manual_seed(0)
    module = MTLFinetuneModule(arch="mtl_vit_test", img_size=32, task_weighting="uncertainty")
    logged = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.__setitem__(name, float(value)))
    monkeypatch.setattr(module, "log_dict", lambda values, **kw: logged.update(values))
    log_vars = module.task_loss.log_vars
    module.training_step(_step_batch([False, False]), 0).backward()
    assert "train/loss_pcr" not in logged
    assert float(log_vars["pcr"].grad) == 0.0 and float(log_vars["seg"].grad) != 0.0
    module.zero_grad()
    module.training_step(_step_batch([True, False]), 0).backward()
    assert "train/loss_pcr" in logged and float(log_vars["pcr"].grad) != 0.0


def test_finetune_starts_the_kinetic_pathway_from_the_training_cases(finetune_run, mtl_weights):
    """The exported head carries the standardisation and the regression fitted at the start of the fit."""
    import yaml
    from safetensors.torch import load_file

    from mtl_breast.models.kinetics import FEATURE_SETS

    demo = yaml.safe_load((ROOT / "configs" / "finetune" / "demo.yaml").read_text())["model"]["model_args"]
    features = FEATURE_SETS[demo.get("pcr_head", {}).get("kinetic_features", "rim")]
    weights = load_file(mtl_weights / "model.safetensors")
    std, mean = weights["pcr_head.kinetic_std"], weights["pcr_head.kinetic_mean"]
    assert std.shape == mean.shape == (len(features),)  # the demo config's kinetic features
    assert not torch.equal(std, torch.ones(len(features))) and (std > 0).all()
    assert torch.isfinite(mean).all()  # the cached cases carry their acquisition vectors
    assert weights["pcr_head.kinetic_fc.weight"].abs().sum() > 0


@pytest.mark.parametrize("arch, tables", [
    ("mae_vit_test", {"mask_token", "encoder.phase_embed.index_embed", "decoder_phase_embed.index_embed",
                      "encoder.pos_embed"}),
    ("mtl_vit_test", {"encoder.phase_embed.index_embed", "seg_decoder.stem.phase_embed", "encoder.pos_embed"}),
])
def test_embedding_tables_and_tokens_get_no_weight_decay(arch, tables):
    from mtl_breast.models.registry import create_model
    from mtl_breast.tasks.optim import build_optimizer

    model = create_model(arch, pos_embed_type="learnable") if arch.startswith("mae") else \
        create_model(arch, encoder={"pos_embed_type": "learnable"})
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert tables <= set(names.values()) and not tables & decayed
    assert "encoder.patch_embed.proj.weight" in decayed  # the weights of maps still decay


def test_resume_from_an_epoch_end_checkpoint_continues_the_same_run(finetune_argv, mae_weights, tmp_path):
    """Fine-tuning killed right after last.ckpt was first written, at the end of epoch 0 (no periodic writes:
    the file is the epoch-end one; no validation at that epoch end), and restarted with `--ckpt_path last`: the
    next epoch starts at its first sample and the run ends bit for bit where the uninterrupted one does, after the
    same number of epochs."""
    extra = ("--model.pretrained", str(mae_weights), "--trainer.max_epochs", "10", "--trainer.max_steps", "6",
             "--trainer.check_val_every_n_epoch", "5")
    run, straight = tmp_path / "killed", tmp_path / "straight"
    probe = json.dumps({"class_path": "probes.CrashAtStep", "init_args": {"step": 2}})
    with pytest.raises(SimulatedCrash):
        run_cli(finetune_argv(run, *extra, f"--trainer.callbacks+={probe}"))
    halfway = _ckpt(run / "checkpoints" / "last.ckpt")
    assert halfway["global_step"] == 2
    assert (_loader_state(halfway)["epoch"], _loader_state(halfway)["samples_done"]) == (1, 0)
    assert run_cli(finetune_argv(run, *extra, "--ckpt_path", "last")) == 0
    assert run_cli(finetune_argv(straight, *extra)) == 0
    resumed, whole = _ckpt(run / "checkpoints" / "last.ckpt"), _ckpt(straight / "checkpoints" / "last.ckpt")
    assert _loader_state(resumed) == _loader_state(whole)
    _assert_same_run(resumed, whole)
