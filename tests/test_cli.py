"""The `mtl-breast` command line: training runs, config printing, evaluate, extract, and bad input."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, demo_config, run_cli

from mtl_breast.cli import main

# The training configs (configs/evaluation holds the evaluation sets, read by bench/robustness.py).
CONFIGS = sorted(p for task in ("pretrain", "finetune") for p in (ROOT / "configs" / task).glob("*.yaml"))


# ---------------------------------------------------------------------------------------------- training runs
def test_pretrain_fit_writes_last_checkpoint_and_resolved_config(pretrain_run, phantoms):
    ckpt_path = pretrain_run / "checkpoints" / "last.ckpt"
    assert ckpt_path.is_file()
    # Checkpoints resume with weights_only=True: nothing in them may need unpickling of arbitrary objects.
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4
    assert ckpt["hyper_parameters"]["arch"] == "mae_vit_test"
    assert ckpt["hyper_parameters"]["img_size"] == 32  # linked from data.crop_size
    assert tuple(ckpt["mtl_breast"]["preprocess"]["spacing"]) == (1.0, 1.0, 1.0)
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"]

    # The resolved config (the link target model.img_size is derived, so not written).
    config = yaml.safe_load((pretrain_run / "config.yaml").read_text())
    assert config["model"]["arch"] == "mae_vit_test"
    assert config["data"]["crop_size"] == 32
    assert Path(config["data"]["root"]) == phantoms
    assert Path(config["trainer"]["default_root_dir"]) == pretrain_run  # checkpoints/ is derived from it
    assert config["trainer"]["max_steps"] == 4
    assert config["seed_everything"] == 0
    # A reconstruction image per validation epoch, next to the checkpoints when there is no logger.
    assert sorted(p.name for p in (pretrain_run / "reconstructions").glob("*.png")) == \
        ["epoch_0000.png", "epoch_0001.png"]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_print_config_of_every_shipped_config(config, capsys):
    task = "finetune" if "finetune" in config.name or config.parent.name == "finetune" else "pretrain"
    with pytest.raises(SystemExit) as stop:
        main([task, "fit", "--config", str(config), "--print_config"])
    assert stop.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = yaml.safe_load(config.read_text())
    assert printed["model"]["arch"] == expected["model"]["arch"]
    assert printed["model"]["arch"].startswith("mtl_" if task == "finetune" else "mae_")
    assert printed["data"]["crop_size"] == expected["data"]["crop_size"]
    assert "checkpoint" in printed  # the ModelCheckpoint options the CLI adds


def test_print_config_reflects_command_line_overrides(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "fit", "--config", str(demo_config("finetune")),
              "--data.crop_size", "48", "--trainer.default_root_dir", "somewhere", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["crop_size"] == 48
    assert printed["trainer"]["default_root_dir"] == "somewhere"


# ---------------------------------------------------------------------------------------------- evaluate
SEG_KEYS = {"dsc", "norm_hd", "performance", "fairness", "ranking", "per_case", "by_variable"}
CLS_KEYS = {"balanced_accuracy", "fairness", "ranking", "auc", "by_variable"}


def test_evaluate_writes_scores_and_report(predictions, phantoms, tmp_path, capsys):
    out = tmp_path / "evaluation"
    assert run_cli(["evaluate", "--pred", predictions, "--data", phantoms, "--out", out]) == 0
    scores = json.loads((out / "scores.json").read_text())
    assert SEG_KEYS <= set(scores["segmentation"])
    assert CLS_KEYS <= set(scores["classification"])
    predicted = {row["patient_id"] for row in csv.DictReader(open(predictions / "predictions.csv"))}
    assert set(scores["segmentation"]["per_case"]) == predicted
    assert set(scores["segmentation"]["by_variable"]) == {"age", "menopausal_status", "breast_density"}
    for name in ("dsc", "performance", "fairness", "ranking"):
        assert 0.0 <= scores["segmentation"][name] <= 1.0
    for name in ("balanced_accuracy", "fairness", "ranking"):
        assert 0.0 <= scores["classification"][name] <= 1.0
    assert (out / "report.md").read_text().strip()
    # The headline printed on stdout is the summary numbers only.
    printed = capsys.readouterr().out
    headline = json.loads(printed[printed.index("{"):printed.index("\nscores:")])
    assert set(headline) >= {"segmentation", "classification"}
    assert "per_case" not in headline["segmentation"]


@pytest.mark.parametrize("keep", ["predictions.csv", "pred_segmentations"])
def test_evaluate_scores_only_the_part_that_was_predicted(predictions, phantoms, tmp_path, keep):
    partial = tmp_path / "partial"
    partial.mkdir()
    source = predictions / keep
    (shutil.copytree if source.is_dir() else shutil.copy)(source, partial / keep)
    out = tmp_path / "evaluation"
    assert run_cli(["evaluate", "--pred", partial, "--data", phantoms, "--out", out]) == 0
    scores = json.loads((out / "scores.json").read_text())
    present, absent = ("classification", "segmentation") if keep == "predictions.csv" else \
        ("segmentation", "classification")
    assert present in scores and absent not in scores
    assert any(absent in note for note in scores.get("notes", []))
    assert (out / "report.md").is_file()


def test_evaluate_scores_a_case_that_failed_in_predict_as_a_failure(predictions, phantoms, tmp_path, capsys):
    # Drop one test case's outputs, as when predict skipped it: it must be scored 0, not vanish from the score.
    partial = tmp_path / "partial"
    shutil.copytree(predictions, partial)
    rows = list(csv.DictReader(open(partial / "predictions.csv")))
    failed = rows[0]["patient_id"]
    with open(partial / "predictions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[1:])
    (partial / "pred_segmentations" / f"{failed}.nii.gz").unlink()
    out = tmp_path / "evaluation"
    assert run_cli(["evaluate", "--pred", partial, "--data", phantoms, "--out", out]) == 0
    err = capsys.readouterr().err
    assert f"mtl-breast evaluate: warning: 1 of {len(rows)} case(s) have no prediction" in err
    scores = json.loads((out / "scores.json").read_text())
    assert scores["missing_predictions"] == [failed] and scores["classification"]["n"] == len(rows)
    assert scores["segmentation"]["per_case"][failed] == {"dsc": 0.0, "hd95": None, "norm_hd": 1.0}
    assert failed in (out / "report.md").read_text().split("## Segmentation")[0]
    # A bad predictions.csv ends in one line and exit code 2.
    (partial / "predictions.csv").write_text(f"patient_id,pcr,score\n{rows[1]['patient_id']},maybe,0.5\n")
    assert run_cli(["evaluate", "--pred", partial, "--data", phantoms, "--out", out]) == 2
    err = capsys.readouterr().err
    assert "'maybe'" in err and rows[1]["patient_id"] in err and "predictions.csv" in err
    _no_traceback(err)


# ---------------------------------------------------------------------------------------------- extract
def test_extract_writes_one_file_per_case_and_a_table(mae_weights, phantoms, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "features"
    assert run_cli(["extract", "--weights", mae_weights, "--data", phantoms, "--out", out, "--device", "cpu"]) == 0
    case_dirs = sorted(p.name for p in (phantoms / "images").iterdir() if p.is_dir())
    files = sorted(p.name.removesuffix(".safetensors") for p in (out / "features").glob("*.safetensors"))
    assert [f.lower() for f in files] == [c.lower() for c in case_dirs]
    with open(out / "features.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["patient_id"] for r in rows) == files
    width = json.loads((mae_weights / "config.json").read_text())["model_args"]["embed_dim"]
    for row in rows:
        feats = load_file(str(out / "features" / f"{row['patient_id']}.safetensors"))
        phases = len(list((phantoms / "images").glob(f"{row['patient_id']}/*.nii.gz")))
        assert int(row["num_phases"]) == phases
        assert feats["pooled"].shape == (width,)
        assert feats["per_phase"].shape == (phases, width)
        assert feats["tokens"].shape[0] == phases and feats["tokens"].shape[2] == width
        assert sum(k.startswith("f") for k in row) == width
        assert float(row["f0"]) == pytest.approx(float(feats["pooled"][0]), rel=1e-4, abs=1e-6)
    assert not list(out.rglob(".*tmp*"))  # atomic writes leave no temp files


# ---------------------------------------------------------------------------------------------- bad input
def _no_traceback(err: str) -> None:
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) <= 3, err


def test_predict_with_a_folder_without_weights_says_so(tmp_path, phantoms, capsys):
    empty = tmp_path / "not_weights"
    empty.mkdir()
    code = main(["predict", "--weights", str(empty), "--data", str(phantoms), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert str(empty) in err and "config.json" in err and "mtl-breast export" in err
    _no_traceback(err)
    code = main(["predict", "--weights", str(tmp_path / "missing"), "--data", str(phantoms), "--out",
                 str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err
    _no_traceback(err)


def test_predict_with_mae_weights_asks_for_a_joint_model(mae_weights, phantoms, tmp_path, capsys):
    code = main(["predict", "--weights", str(mae_weights), "--data", str(phantoms), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "mae_vit_test" in err and "joint" in err
    _no_traceback(err)


def test_predict_with_a_missing_data_folder_says_so(mtl_weights, tmp_path, capsys):
    code = main(["predict", "--weights", str(mtl_weights), "--data", str(tmp_path / "nowhere"), "--out",
                 str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "nowhere" in err
    _no_traceback(err)


def test_extract_and_evaluate_with_missing_folders_say_so(tmp_path, phantoms, capsys):
    code = main(["extract", "--weights", str(tmp_path / "none"), "--data", str(phantoms), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "none" in err
    _no_traceback(err)
    code = main(["evaluate", "--pred", str(tmp_path / "no_predictions"), "--data", str(phantoms), "--out",
                 str(tmp_path / "ev")])
    err = capsys.readouterr().err
    assert code == 2 and "no_predictions" in err
    _no_traceback(err)


@pytest.mark.parametrize("task", ["pretrain", "finetune"])
def test_training_with_a_missing_data_root_says_so(task, tmp_path, capsys):
    missing = tmp_path / "no_such_dataset"
    code = main([task, "fit", "--config", str(demo_config(task)),
                 "--data.root", str(missing), "--trainer.default_root_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert str(missing) in err and "does not exist" in err
    _no_traceback(err)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_export_of_a_missing_or_foreign_checkpoint_says_so(tmp_path, capsys):
    code = main(["export", "--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert code == 2 and "missing.ckpt" in err and "does not exist" in err
    _no_traceback(err)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    code = main(["export", "--ckpt", str(foreign), "--out", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert code == 2 and "not an mtl-breast checkpoint" in err
    _no_traceback(err)
    assert not (tmp_path / "w").exists()
