"""A full disk gives a clear error naming the file, leaves nothing partial, and a later run finishes the work.

Real processes with a file-size limit (RLIMIT_FSIZE): every write past the limit fails, as a write to a full disk
or an exhausted quota does (EFBIG here, ENOSPC/EDQUOT there; the package treats the three alike).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

from mtl_breast.data.cache import CaseCache
from mtl_breast.data.preprocess import PreprocessConfig

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="uses RLIMIT_FSIZE")

_LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from mtl_breast.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _run(*args, limit: int | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1")
    if limit is None:
        cmd = [sys.executable, "-m", "mtl_breast.cli", *map(str, args)]
    else:
        cmd = [sys.executable, "-c", _LIMITED, str(limit), *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _partial_or_temporary(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob(".*") if p.is_file())


def test_preprocess_on_a_full_disk_names_each_case_and_a_later_run_completes(phantoms, tmp_path):
    cache = tmp_path / "cache"
    full = _run("preprocess", "--data", phantoms, "--cache", cache, limit=20_000)  # config.json fits, cases do not
    assert full.returncode == 1, full.stderr[-2000:]
    store = CaseCache(cache, PreprocessConfig())
    assert store.patient_ids() == [] and _partial_or_temporary(cache) == []
    lines = [line for line in (full.stdout + full.stderr).splitlines() if "File too large" in line]
    assert len(lines) == 10 and all(".safetensors" in line for line in lines), full.stdout[-2000:]

    again = _run("preprocess", "--data", phantoms, "--cache", cache)
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(store.patient_ids()) == 10


def test_export_on_a_full_disk_keeps_the_previous_weights(mtl_weights, finetune_run, tmp_path):
    out = tmp_path / "weights"
    ckpt = finetune_run / "checkpoints" / "last.ckpt"
    assert _run("export", "--ckpt", ckpt, "--out", out).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    size = (out / "model.safetensors").stat().st_size
    full = _run("export", "--ckpt", ckpt, "--out", out, limit=size // 2)
    assert full.returncode != 0
    last = full.stderr.strip().splitlines()[-1]
    assert "model.safetensors" in last and "File too large" in last, full.stderr[-2000:]
    assert "Traceback" not in full.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier export is untouched


def _gzip_complete(path: Path) -> bool:
    import gzip

    try:
        gzip.decompress(path.read_bytes())
    except (EOFError, OSError):
        return False
    return True


def _check_full_predict(run: subprocess.CompletedProcess, out: Path, before: dict[str, bytes]) -> None:
    """`predict` on a full disk: one line naming a mask, exit 2, the earlier masks and predictions.csv unchanged."""
    assert run.returncode == 2, (run.returncode, run.stderr[-2000:])
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("mtl-breast predict: error: ") and "pred_segmentations" in last and ".nii.gz" in last, \
        run.stderr[-2000:]
    assert "disk is probably full" in last or "No space left" in last or "File too large" in last, last
    assert "Traceback" not in run.stderr
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert _partial_or_temporary(out) == []


def test_predict_under_a_file_size_limit_writes_no_truncated_mask(mtl_weights, phantoms, tmp_path):
    """SimpleITK reports success for a mask cut short by the limit: the check after writing refuses it."""
    out = tmp_path / "out"
    argv = ("predict", "--weights", mtl_weights, "--data", phantoms, "--out", out, "--device", "cpu")
    assert run_cli(argv) == 0
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    smallest = min(p.stat().st_size for p in (out / "pred_segmentations").iterdir())
    _check_full_predict(_run(*argv, "--tta", limit=smallest - 100), out, before)


def test_synth_under_a_file_size_limit_writes_no_corrupt_phantom(tmp_path):
    out = tmp_path / "synth"
    run = _run("synth", "--out", out, "--cases", "2", "--size", "32", limit=20_000)
    assert run.returncode == 2, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("mtl-breast synth: error: ") and ".nii.gz" in last and "Traceback" not in run.stderr
    phantoms = list(out.rglob("*.nii.gz"))
    assert all(_gzip_complete(p) for p in phantoms) and _partial_or_temporary(out) == []


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 1 MiB tmpfs (mounting needs root and a kernel that allows it; skipped otherwise)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"cannot mount a tmpfs here: {err}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount permission): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


def _fill(folder: Path) -> None:
    """Write to `folder` until its file system has no room left."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError as err:
        assert err.errno == errno.ENOSPC, err
    finally:
        os.close(fd)


def test_predict_on_a_real_full_file_system_writes_no_empty_mask(mtl_weights, phantoms, small_tmpfs):
    out = small_tmpfs / "out"
    argv = ("predict", "--weights", mtl_weights, "--data", phantoms, "--out", out, "--device", "cpu")
    assert run_cli(argv) == 0
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    _fill(small_tmpfs)
    _check_full_predict(_run(*argv, "--tta"), out, before)
