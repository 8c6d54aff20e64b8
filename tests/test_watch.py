"""Watching a run: TensorBoard events next to the CSV, images and config in them, `mtl-breast plot` to PNG,
and the data summary that training records for the model card."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import run_cli
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mtl_breast.run.plot import plot_run, read_scalars


@pytest.fixture(scope="module")
def logged_pretrain_run(tmp_path_factory, pretrain_argv):
    """A 2-step MAE run with the default loggers (the shared pretraining fixture turns them off)."""
    run = tmp_path_factory.mktemp("pretrain_logged")
    assert run_cli(pretrain_argv(run, "--trainer.logger", "true", "--trainer.max_steps", "2",
                                 "--trainer.log_every_n_steps", "1")) == 0
    return run


def _events(run):
    (folder,) = run.glob("lightning_logs/version_*")
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return folder, acc


@pytest.mark.parametrize("run_fixture, image_tag, scalars", [
    ("logged_pretrain_run", "val/reconstruction", ("train/loss", "val/loss")),
    ("finetune_run", "val/overlay", ("train/loss", "val/dsc", "val/pcr_auc", "val/selection")),
])
def test_runs_write_tensorboard_and_csv_in_one_folder(request, run_fixture, image_tag, scalars):
    run = request.getfixturevalue(run_fixture)
    folder, acc = _events(run)
    assert (folder / "metrics.csv").is_file(), "the CSV log is kept next to TensorBoard's"
    tags = acc.Tags()
    for name in scalars:
        assert name in tags["scalars"], f"{name} missing from TensorBoard ({tags['scalars']})"
    assert any(t.startswith("lr-") for t in tags["scalars"]), "learning rate not logged"
    assert image_tag in tags["images"], f"no {image_tag} image in TensorBoard"
    # The resolved config as text: LightningCLI's config.yaml, and the same in TensorBoard.
    assert (folder / "config.yaml").is_file()
    assert any(t.startswith("config") for t in tags["tensors"]), tags["tensors"]
    # Same numbers in both logs.
    with open(folder / "metrics.csv") as f:
        csv_loss = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    tb_loss = [e.value for e in acc.Scalars("train/loss")]
    assert csv_loss == pytest.approx(tb_loss, rel=1e-5)


def test_plot_draws_curves_of_a_finished_run(finetune_run, tmp_path):
    paths = plot_run(finetune_run, tmp_path / "plots")
    assert {p.name for p in paths} == {"losses.png", "learning_rate.png", "validation.png"}
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 2000
    assert not list((tmp_path / "plots").glob(".*")), "temporary files left behind"


def test_plot_reads_tensorboard_events_when_the_csv_is_gone(finetune_run, tmp_path):
    with_csv = read_scalars(finetune_run)
    (folder,) = finetune_run.glob("lightning_logs/version_*")
    copy = tmp_path / "run" / "lightning_logs" / folder.name
    copy.mkdir(parents=True)
    for f in folder.glob("events.out.tfevents.*"):
        (copy / f.name).write_bytes(f.read_bytes())
    from_events = read_scalars(tmp_path / "run")
    assert [s for s, _ in from_events["train/loss"]] == [s for s, _ in with_csv["train/loss"]]
    assert [v for _, v in from_events["train/loss"]] == pytest.approx([v for _, v in with_csv["train/loss"]], rel=1e-5)


def test_plot_joins_the_versions_of_a_resumed_run(tmp_path):
    logs = tmp_path / "run" / "lightning_logs"
    for version, rows in ((0, [(0, 1.0), (10, 0.8)]), (1, [(10, 0.7), (20, 0.5)])):
        (logs / f"version_{version}").mkdir(parents=True)
        lines = ["epoch,step,train/loss"] + [f"0,{s},{v}" for s, v in rows]
        (logs / f"version_{version}" / "metrics.csv").write_text("\n".join(lines) + "\n")
    assert read_scalars(tmp_path / "run")["train/loss"] == [(0, 1.0), (10, 0.7), (20, 0.5)]  # later version wins


def test_plot_cli_errors_name_the_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run_cli(["plot", tmp_path / "empty"]) == 2
    assert str(tmp_path / "empty") in capsys.readouterr().err
    assert run_cli(["plot", tmp_path / "missing"]) == 2


def test_checkpoint_records_training_data_and_validation_for_the_model_card(finetune_run, pretrain_run, phantoms):
    for run, task in ((finetune_run, "finetune"), (pretrain_run, "pretrain")):
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        training = ckpt["mtl_breast"]["training"]
        assert training["task"] == task
        assert training["synthetic"] is True  # the phantoms' root holds synthetic.json
        assert sum(training["datasets"].values()) == training["train_cases"] > 0
        assert training["steps"] == ckpt["global_step"]
        assert not any("_" in name and name[-1].isdigit() for name in training["datasets"]), "ids, not dataset names"
        assert all(k.startswith("val/") for k in ckpt["mtl_breast"]["validation"])
    ckpt = torch.load(finetune_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["mtl_breast"]["training"]["base_weights"]  # started from the MAE export
    datasets = {json.loads(p.read_text())["imaging_data"]["dataset"]
                for p in (phantoms / "patient_info_files").glob("*.json")}
    assert set(ckpt["mtl_breast"]["training"]["datasets"]) <= datasets
