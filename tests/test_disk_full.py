"""A full disk gives a clear error naming the file, leaves nothing partial, and a later run finishes the work.

Real processes with a file-size limit (RLIMIT_FSIZE): every write past the limit fails, as a write to a full disk
or an exhausted quota does (EFBIG here, ENOSPC/EDQUOT there; the package treats the three alike).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
