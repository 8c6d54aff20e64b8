"""Fault injection: `preprocess` and `predict` killed with SIGKILL at random points and run again end with the
same outputs as an uninterrupted run, and never leave a partial file under a real name.

Real processes (`python -m mtl_breast.cli`), kill times drawn from a seeded generator within the time an
uninterrupted run takes, a bounded number of kills. Slow (a few process starts each): `make test-slow`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mtl_breast.data.cache import CaseCache
from mtl_breast.data.preprocess import PreprocessConfig

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
KILLS = 3


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "mtl_breast.cli", *map(str, args)]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def _timed_run(cmd: list[str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return time.perf_counter() - started


def _kill_at(cmd: list[str], seconds: float) -> None:
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        proc.wait(timeout=seconds)  # finished before the kill: fine, the next run has nothing left to do
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the job and any worker it started
        proc.wait(timeout=60)


def _kill_and_rerun(cmd: list[str], full_seconds: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(KILLS):
        _kill_at(cmd, float(rng.uniform(0.3, 1.0)) * full_seconds)
    _timed_run(cmd)


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def _hidden(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob(".*") if p.is_file())


def test_preprocess_killed_and_rerun_gives_the_uninterrupted_cache(phantoms, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    full = _timed_run(_cli("preprocess", "--data", phantoms, "--cache", straight))
    _kill_and_rerun(_cli("preprocess", "--data", phantoms, "--cache", killed), full, seed=0)
    config = PreprocessConfig()
    a, b = CaseCache(straight, config), CaseCache(killed, config)
    assert a.patient_ids() == b.patient_ids() and len(a.patient_ids()) == 10
    for pid in a.patient_ids():
        assert a.path(pid).read_bytes() == b.path(pid).read_bytes(), pid  # byte for byte, and each reads whole
        b.read(pid)
    assert [p.name for p in _visible(straight) if p.suffix == ".safetensors"] == \
        [p.name for p in _visible(killed) if p.suffix == ".safetensors"]
    assert _hidden(killed) == [], "temporary files of the killed runs were left behind"


def test_predict_killed_and_rerun_gives_the_uninterrupted_outputs(phantoms, mtl_weights, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(phantoms, data)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = ("--weights", mtl_weights, "--data", data, "--device", "cpu", "--split", "all")
    full = _timed_run(_cli("predict", *args, "--out", straight))
    _kill_and_rerun(_cli("predict", *args, "--out", killed), full, seed=1)
    assert [p.relative_to(straight) for p in _visible(straight)] == [p.relative_to(killed) for p in _visible(killed)]
    assert (straight / "predictions.csv").read_text() == (killed / "predictions.csv").read_text()
    for mask in (straight / "pred_segmentations").glob("*.nii.gz"):
        assert mask.read_bytes() == (killed / "pred_segmentations" / mask.name).read_bytes(), mask.name
    assert _hidden(killed) == [], "temporary files of the killed runs were left behind"


def test_training_killed_and_resumed_ends_with_the_uninterrupted_weights(phantoms, tmp_path):
    """MAE pretraining (9 steps over 3 epochs, last.ckpt after every step) SIGKILLed at seeded random points and
    restarted each time with `--ckpt_path last` (from scratch when no last.ckpt was written yet) ends with the
    uninterrupted run's weights and optimizer state, bit for bit."""
    from conftest import COMMON_FLAGS, demo_config

    cache = tmp_path / "cache"
    assert _timed_run(_cli("preprocess", "--data", phantoms, "--cache", cache)) > 0  # as a user would, once

    def fit(run: Path) -> list[str]:
        return _cli("pretrain", "fit", "--config", demo_config("pretrain"), "--data.root", phantoms,
                    "--data.cache_dir", cache, "--trainer.default_root_dir", run, *COMMON_FLAGS,
                    "--trainer.max_epochs", "10", "--trainer.max_steps", "9", "--trainer.limit_train_batches", "3",
                    "--trainer.limit_val_batches", "1", "--trainer.logger", "false", "--data.batch_size", "2",
                    "--last_checkpoint.every_n_steps", "1", "--ckpt_path", "last")

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    full = _timed_run(fit(straight))
    _kill_and_rerun(fit(killed), full, seed=2)
    a = torch.load(straight / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(killed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == 9
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for key, state in a["optimizer_states"][0]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer_states"][0]["state"][key][name]))
    assert _hidden(killed) == []
