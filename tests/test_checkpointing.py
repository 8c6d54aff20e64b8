"""last.ckpt is the run's latest state: written every few minutes or steps, at epoch ends and at the end of fit,
independent of validation, and never half-written."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import run_cli

from mtl_breast.tasks.checkpointing import LastCheckpoint


def _ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_last_checkpoint_is_the_final_state_when_training_stops_between_validations(pretrain_argv, tmp_path):
    # 3 steps of 2 per epoch, validation only every 10 epochs: ModelCheckpoint alone never writes last.ckpt here.
    run = tmp_path / "run"
    probe = '{"class_path": "probes.RecordLastCheckpoint", "init_args": {"path": "%s"}}' % (tmp_path / "seen.json")
    assert run_cli(pretrain_argv(run, "--trainer.max_steps", "3", "--trainer.check_val_every_n_epoch", "10",
                                 "--last_checkpoint.every_n_steps", "1", f"--trainer.callbacks+={probe}")) == 0
    assert _ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == 3
    # Before every step the file already held the previous one (written every step here).
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen == [[0, None], [1, 1], [2, 2]]
    assert not list((run / "checkpoints").glob(".*")), "temporary files left behind"


def test_default_last_checkpoint_is_written_at_epoch_ends_without_validation(pretrain_argv, tmp_path):
    run = tmp_path / "run"
    probe = '{"class_path": "probes.RecordLastCheckpoint", "init_args": {"path": "%s"}}' % (tmp_path / "seen.json")
    assert run_cli(pretrain_argv(run, "--trainer.max_steps", "4", "--trainer.check_val_every_n_epoch", "10",
                                 f"--trainer.callbacks+={probe}")) == 0
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen == [[0, None], [1, None], [2, 2], [3, 2]]  # epochs of 2 steps; the 5-minute timer never fired
    assert _ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == 4


class _Strategy:
    def broadcast(self, value, src=0):
        return value

    def barrier(self, name=None):
        pass


def _trainer(root, step, save):
    return SimpleNamespace(default_root_dir=str(root), global_step=step, is_global_zero=True, strategy=_Strategy(),
                           save_checkpoint=save)


def test_a_failed_write_leaves_the_previous_last_checkpoint(tmp_path):
    callback = LastCheckpoint(every_n_minutes=None, every_n_steps=1)
    path = callback.save(_trainer(tmp_path, 1, lambda p, weights_only: torch.save({"global_step": 1}, p)))
    before = path.read_bytes()

    def killed_half_way(p, weights_only):
        assert weights_only is False  # last.ckpt holds the whole run (optimizer, loops, callbacks)
        with open(p, "wb") as f:
            f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        callback.save(_trainer(tmp_path, 2, killed_half_way))
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_last_checkpoint_settings_are_checked():
    with pytest.raises(ValueError, match="every_n_minutes"):
        LastCheckpoint(every_n_minutes=0)
    with pytest.raises(ValueError, match="every_n_steps"):
        LastCheckpoint(every_n_steps=0)


def test_each_ddp_rank_resumes_its_own_generators():
    from mtl_breast.tasks.rng import restore_rng_on_train_start, rng_state

    torch.manual_seed(1)
    state_0 = rng_state()
    torch.manual_seed(2)
    state_1 = rng_state()

    def resumed(rank, world, saved):
        module = SimpleNamespace(_trainer=SimpleNamespace(global_rank=rank, world_size=world), _resume_rng=saved)
        restore_rng_on_train_start(module)
        assert module._resume_rng is None  # once
        return torch.rand(3)

    saved = {"ranks": [state_0, state_1]}
    torch.set_rng_state(state_1["torch"])
    expected = torch.rand(3)
    assert torch.equal(resumed(1, 2, saved), expected)  # rank 1 continues rank 1's sequence
    # Another world size: rank 0's states, made different per rank, the same on every restart.
    a, b, a_again = resumed(0, 4, saved), resumed(1, 4, saved), resumed(0, 4, saved)
    assert not torch.equal(a, b) and torch.equal(a, a_again)


def test_fairness_weights_are_in_the_checkpoint_and_come_back():
    from mtl_breast.tasks.finetune import MTLFinetuneModule

    module = MTLFinetuneModule(arch="mtl_vit_test", img_size=16, fairness=True)
    module.reweighter.update({"age": {"(0,40]": 0.5, "(40,50]": 0.9}})
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    resumed = MTLFinetuneModule(arch="mtl_vit_test", img_size=16, fairness=True)
    assert resumed.reweighter.state_dict() != module.reweighter.state_dict()  # a fresh run starts at 1
    resumed.on_load_checkpoint(checkpoint)
    assert resumed.reweighter.state_dict() == module.reweighter.state_dict()


def _steps(path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


@pytest.mark.slow
def test_sigterm_saves_last_checkpoint_at_the_step_and_exits_non_zero(finetune_argv, mae_weights, tmp_path, capsys):
    """SIGTERM (a scheduler's pre-emption) during step 3 of fine-tuning: last.ckpt holds step 3, the exit code is
    143 (not 0, so `fit && export` stops), and `--ckpt_path last` ends where the uninterrupted run ends. A warning
    signal named in --last_checkpoint.signals does the same."""
    extra = ("--model.pretrained", str(mae_weights), "--trainer.max_epochs", "3", "--last_checkpoint.every_n_minutes",
             "null")
    run, straight = tmp_path / "preempted", tmp_path / "straight"
    probe = json.dumps({"class_path": "probes.SignalAtStep", "init_args": {"step": 3, "signal": "SIGTERM"}})
    with pytest.raises(SystemExit) as stopped:
        run_cli(finetune_argv(run, *extra, f"--trainer.callbacks+={probe}"))
    assert stopped.value.code == 143
    assert _steps(run / "checkpoints" / "last.ckpt") == 3
    assert "SIGTERM received: " in capsys.readouterr().err
    assert run_cli(finetune_argv(run, *extra, "--ckpt_path", "last")) == 0
    assert run_cli(finetune_argv(straight, *extra)) == 0
    resumed, whole = (torch.load(r / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
                      for r in (run, straight))
    assert resumed["global_step"] == whole["global_step"] == 6
    assert all(torch.equal(resumed["state_dict"][k], v) for k, v in whole["state_dict"].items())

    warned = tmp_path / "warned"
    probe = json.dumps({"class_path": "probes.SignalAtStep", "init_args": {"step": 1, "signal": "SIGUSR2"}})
    with pytest.raises(SystemExit) as stopped:
        run_cli(finetune_argv(warned, *extra, "--last_checkpoint.signals", "[SIGUSR2]",
                              f"--trainer.callbacks+={probe}"))
    assert stopped.value.code == 128 + 12 and _steps(warned / "checkpoints" / "last.ckpt") == 1


def test_a_truncated_last_checkpoint_is_one_line_before_training(pretrain_run, pretrain_argv, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    whole = (pretrain_run / "checkpoints" / "last.ckpt").read_bytes()
    (run / "checkpoints" / "last.ckpt").write_bytes(whole[: len(whole) // 2])
    capsys.readouterr()
    assert run_cli(pretrain_argv(run, "--ckpt_path", "last")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"mtl-breast pretrain: error: {run / 'checkpoints' / 'last.ckpt'}: not a readable "
                             "checkpoint, cannot resume from it (")
