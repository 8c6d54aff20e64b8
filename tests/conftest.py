"""Session fixtures shared by the pipeline tests: one small phantom dataset and one
pretrain -> export -> fine-tune -> export -> predict chain through the `mtl-breast` CLI, built once.

Everything runs on CPU with the `*_test` models, 32^3 crops and a few optimizer steps. The training
commands are called in-process through `mtl_breast.cli.main`; only the DDP tests start subprocesses.
`tests/` is on sys.path (pytest's rootdir insertion), so `probes.X` callbacks resolve by class path.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import lightning.pytorch  # noqa: F401
import pytest

# Lightning gives its loggers a StreamHandler bound to the sys.stderr of the moment it is first imported. Imported
# here, at collection, that is the session's stream; imported inside a test using `capsys`, it would be that test's
# buffer, closed afterwards, and every later Lightning log line would print a "Logging error" traceback into the
# stderr another test checks.

ROOT = Path(__file__).resolve().parents[1]


def load_bench_script(name: str) -> ModuleType:
    """``bench/<name>.py`` imported as module ``name`` (the bench scripts are not a package), with bench/ on the
    import path as ``python bench/<name>.py`` has it (for `bench_common`)."""
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    spec.loader.exec_module(module)
    return module


def demo_config(task: str) -> Path:
    """The demo YAML of `task` ("pretrain" / "finetune"): configs/<task>/demo.yaml, or configs/demo/<task>.yaml."""
    for path in (ROOT / "configs" / task / "demo.yaml", ROOT / "configs" / "demo" / f"{task}.yaml"):
        if path.is_file():
            return path
    raise FileNotFoundError(f"no demo config for {task} under {ROOT / 'configs'}")


# Settings every test run shares: quiet, deterministic, a handful of steps.
COMMON_FLAGS = [
    "--seed_everything", "0",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    "--trainer.num_sanity_val_steps", "0",
    "--trainer.check_val_every_n_epoch", "1",
    "--data.num_workers", "0",
]
# MAE pretraining: 2 steps per epoch, 4 steps in all, a validation batch after every epoch (so the
# checkpoint callback saves at each epoch end).
PRETRAIN_FLAGS = [
    "--trainer.max_epochs", "10",
    "--trainer.max_steps", "4",
    "--trainer.limit_train_batches", "2",
    "--trainer.limit_val_batches", "1",
    "--trainer.logger", "false",
    "--data.batch_size", "2",
    "--data.val_fraction", "0.2",
]
# Joint fine-tuning: one epoch of 2 steps, validation on every validation case.
FINETUNE_FLAGS = [
    "--trainer.max_epochs", "1",
    "--trainer.limit_train_batches", "2",
    "--trainer.log_every_n_steps", "1",
    "--data.batch_size", "2",
]


def run_cli(argv: list[str]) -> int:
    from mtl_breast.cli import main

    return main([str(a) for a in argv])


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory) -> Path:
    """10 phantom cases (3 to 6 phases, 32 voxels a side) in the MAMA-MIA layout.

    The test split is 2 cases, one with 3 phases and one with 5 (the generator's own split when it
    already is; otherwise the split file is rewritten so).
    """
    import pandas as pd

    from mtl_breast.phantoms.collection import generate_dataset

    root = tmp_path_factory.mktemp("phantoms") / "data"
    generate_dataset(root, num_cases=10, seed=0, size=32)
    phases = {d.name: len(list(d.glob("*.nii.gz"))) for d in (root / "images").iterdir() if d.is_dir()}
    split = pd.read_csv(root / "train_test_splits.csv", dtype=str)
    test = sorted(split["test_split"].dropna())
    if len(test) != 2 or sorted(phases[p] for p in test) != [3, 5]:
        test = [min(p for p, n in phases.items() if n == 3), min(p for p, n in phases.items() if n == 5)]
        train = sorted(set(phases) - set(test))
        pd.DataFrame({"train_split": train, "test_split": test + [None] * (len(train) - 2)}).to_csv(
            root / "train_test_splits.csv", index=False)
    return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def pretrain_argv(phantoms, cache_dir) -> Callable[..., list[str]]:
    """`pretrain_argv(run_dir, *extra)`: the argv of `mtl-breast pretrain fit` with the shared settings."""

    def argv(run_dir: Path, *extra: str) -> list[str]:
        return ["pretrain", "fit", "--config", demo_config("pretrain"), "--data.root", phantoms,
                "--data.cache_dir", cache_dir, "--trainer.default_root_dir", run_dir,
                *COMMON_FLAGS, *PRETRAIN_FLAGS, *extra]

    return argv


@pytest.fixture(scope="session")
def finetune_argv(phantoms, cache_dir) -> Callable[..., list[str]]:
    """`finetune_argv(run_dir, *extra)`: the argv of `mtl-breast finetune fit` with the shared settings."""

    def argv(run_dir: Path, *extra: str) -> list[str]:
        return ["finetune", "fit", "--config", demo_config("finetune"), "--data.root", phantoms,
                "--data.cache_dir", cache_dir, "--trainer.default_root_dir", run_dir,
                *COMMON_FLAGS, *FINETUNE_FLAGS, *extra]

    return argv


@pytest.fixture(scope="session")
def pretrain_run(tmp_path_factory, pretrain_argv) -> Path:
    """Run folder of a 4-step MAE pretraining (checkpoints/last.ckpt, config.yaml)."""
    run = tmp_path_factory.mktemp("pretrain")
    assert run_cli(pretrain_argv(run)) == 0
    return run


@pytest.fixture(scope="session")
def mae_weights(tmp_path_factory, pretrain_run) -> Path:
    out = tmp_path_factory.mktemp("weights") / "mae"
    assert run_cli(["export", "--ckpt", pretrain_run / "checkpoints" / "last.ckpt", "--out", out]) == 0
    return out


@pytest.fixture(scope="session")
def finetune_run(tmp_path_factory, finetune_argv, mae_weights) -> Path:
    """Run folder of a 2-step joint fine-tuning started from the MAE export (CSV logs under lightning_logs/).

    `encoder_at_start.pt` holds the encoder weights as training started (probes.SaveEncoderAtStart).
    """
    run = tmp_path_factory.mktemp("finetune")
    probe = '{"class_path": "probes.SaveEncoderAtStart", "init_args": {"path": "%s"}}' % (run / "encoder_at_start.pt")
    assert run_cli(finetune_argv(run, "--model.pretrained", mae_weights, f"--trainer.callbacks+={probe}")) == 0
    return run


@pytest.fixture(scope="session")
def mtl_weights(tmp_path_factory, finetune_run) -> Path:
    out = tmp_path_factory.mktemp("weights") / "mtl"
    assert run_cli(["export", "--ckpt", finetune_run / "checkpoints" / "last.ckpt", "--out", out]) == 0
    return out


@pytest.fixture(scope="session")
def predictions(tmp_path_factory, mtl_weights, phantoms) -> Path:
    """`mtl-breast predict` output for the test split (pred_segmentations/, predictions.csv)."""
    out = tmp_path_factory.mktemp("predictions")
    assert run_cli(["predict", "--weights", mtl_weights, "--data", phantoms, "--out", out, "--device", "cpu"]) == 0
    return out
