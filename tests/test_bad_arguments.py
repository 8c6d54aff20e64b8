"""Bad command-line arguments and settings are refused before any output is touched.

A flag that would fail on every case (an impossible overlap, a device the machine does not have) ends in one line
naming the flag, exit code 2, and leaves the masks and `predictions.csv` of an earlier run in the same folder as they
were.
"""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli

from mtl_breast.predictor import InferenceSettings, SettingsError


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def earlier_run(mtl_weights, phantoms, tmp_path):
    """(argv without the flag under test, output folder holding an earlier run's predictions)."""
    out = tmp_path / "out"
    argv = ["predict", "--weights", mtl_weights, "--data", phantoms, "--out", out]
    assert run_cli([*argv, "--device", "cpu"]) == 0
    assert len(list((out / "pred_segmentations").iterdir())) == 2
    return argv, out


@pytest.mark.parametrize("overlap", ["1.0", "nan", "-0.5", "inf"])
def test_bad_overlap_is_refused_before_earlier_predictions_are_touched(earlier_run, capsys, overlap):
    argv, out = earlier_run
    before = _snapshot(out)
    capsys.readouterr()
    assert run_cli([*argv, "--device", "cpu", "--overlap", overlap]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtl-breast predict: error: overlap must be a number in [0, 1)"), err
    assert overlap in err and len(err.strip().splitlines()) == 1
    assert _snapshot(out) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_a_cuda_device_on_a_machine_without_one_is_one_line(earlier_run, capsys):
    argv, out = earlier_run
    before = _snapshot(out)
    capsys.readouterr()
    assert run_cli([*argv, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("mtl-breast predict: error: --device cuda: no CUDA device is available on this machine "
                           "(use --device cpu)")
    assert run_cli([*argv, "--device", "gpu0"]) == 2
    assert "--device gpu0: not a torch device" in capsys.readouterr().err
    assert _snapshot(out) == before


@pytest.mark.parametrize(("values", "match"), [
    ({"roi_size": (100_000, 100_000, 100_000)}, r"roi_size \[100000, 100000, 100000\] is .* voxels per window"),
    ({"roi_size": (0, 32, 32)}, "roi_size must be three positive integers"),
    ({"pcr_threshold": float("nan")}, "pcr_threshold must be a probability"),
    ({"pcr_temperature": 0.0}, "pcr_temperature must be a positive number"),
    ({"sw_batch_size": 0}, "sw_batch_size must be a positive integer"),
])
def test_settings_from_a_config_are_checked(values, match):
    with pytest.raises(SettingsError, match=match):
        InferenceSettings.from_config({"inference": {"roi_size": [32, 32, 32]}}, **values)
    assert InferenceSettings.from_config({"inference": {"roi_size": [32, 32, 32]}}).roi_size == (32, 32, 32)


@pytest.fixture
def read_only_folder(tmp_path):
    """A real read-only file system (a tmpfs remounted read-only: root ignores permission bits; skipped where
    mounting is not permitted)."""
    import subprocess

    mount = tmp_path / "ro"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount permission): {done.stderr.strip()}")
    try:
        (mount / "out").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True, capture_output=True)
        yield mount / "out"
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_read_only_output_folder_is_one_line_for_every_command(read_only_folder, mtl_weights, finetune_run,
                                                                  phantoms, predictions, capsys):
    ro = read_only_folder
    commands = {
        "predict": ["--weights", mtl_weights, "--data", phantoms, "--out", ro, "--device", "cpu"],
        "preprocess": ["--data", phantoms, "--cache", ro / "cache"],
        "evaluate": ["--pred", predictions, "--data", phantoms, "--out", ro / "scores"],
        "export": ["--ckpt", finetune_run / "checkpoints" / "last.ckpt", "--out", ro / "weights"],
        "synth": ["--out", ro / "synth", "--cases", "1", "--size", "32"],
    }
    for name, args in commands.items():
        capsys.readouterr()
        assert run_cli([name, *args]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"mtl-breast {name}: error: "), (name, err)
        assert "Read-only file system" in err[0] and str(ro) in err[0], (name, err)
