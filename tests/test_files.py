"""The one writer of every file (mtl_breast.files): atomic, umask permissions, leftovers removed, equal bytes."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import mtl_breast.files as files
from mtl_breast.files import atomic_path, remove_leftovers, safetensors_bytes, write_safetensors, write_text


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _gone_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture
def umask():
    """Set a umask for one test and restore the previous one."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield lambda value: os.umask(value)
    os.umask(previous)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_get_the_users_umask(tmp_path, umask, mask, expected):
    umask(mask)
    text = write_text(tmp_path / "a" / "scores.json", "{}\n")
    tensors = write_safetensors(tmp_path / "w.safetensors", {"x": np.zeros(3, np.float32)})
    with atomic_path(tmp_path / "mask.nii.gz") as tmp:
        assert tmp.name.endswith(".nii.gz") and tmp.parent == tmp_path  # the writer can sniff the format
        tmp.write_bytes(_nifti(tmp_path / "source.nii.gz"))  # a complete file: atomic_path checks it
    assert [_mode(p) for p in (text, tensors, tmp_path / "mask.nii.gz")] == [expected] * 3


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    target = write_text(tmp_path / "predictions.csv", "old\n")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("the writer failed")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.csv"]


def test_leftovers_of_gone_processes_are_removed_live_ones_kept(tmp_path):
    target = tmp_path / "last.ckpt"
    host = files._HOST
    dead = tmp_path / f".last.ckpt.{host}-{_gone_pid()}-0a0a0a0a.tmp.ckpt"
    live = tmp_path / f".last.ckpt.{host}-{os.getpid()}-0b0b0b0b.tmp.ckpt"  # a write in progress
    remote = tmp_path / f".last.ckpt.otherhost-{_gone_pid()}-0c0c0c0c.tmp.ckpt"  # another node's: not judged
    unrelated = tmp_path / ".last.ckpt.notes"
    for p in (dead, live, remote, unrelated):
        p.write_bytes(b"x")
    assert remove_leftovers(target) == [dead]
    write_text(target, "state")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (target, live, remote, unrelated))


_KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from mtl_breast.files import atomic_path
    with atomic_path(Path(sys.argv[1])) as tmp, open(tmp, "wb") as handle:
        handle.write(b"n" * (1 << 20))  # half of the new file is written
        handle.flush()
        print("half", flush=True)
        time.sleep(60)
        handle.write(b"n" * (1 << 20))
""")


@pytest.mark.parametrize("existing", [True, False])
def test_writer_killed_half_way_leaves_old_file_or_none(tmp_path, existing):
    target = tmp_path / "case.safetensors"
    if existing:
        target.write_bytes(b"old")
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "half"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert (target.read_bytes() == b"old") if existing else not target.exists()
    assert len(list(tmp_path.glob(".case.safetensors.*.tmp*"))) == 1  # what a SIGKILL leaves behind...
    write_text(target, "new")
    assert target.read_text() == "new"
    assert not list(tmp_path.glob(".*"))  # ...is removed by the next write of the same file


def test_safetensors_bytes_are_canonical_and_readable(tmp_path):
    tensors = {"image": np.arange(12, dtype=np.float16).reshape(3, 4), "label": np.ones(5, np.uint8)}
    metadata = {"info": '{"patient_id": "P1"}', "config": "{}", "a": "1", "z": "2"}
    data = safetensors_bytes(tensors, metadata)
    assert safetensors_bytes(dict(reversed(tensors.items())), dict(reversed(metadata.items()))) == data
    n = int.from_bytes(data[:8], "little")
    assert n % 8 == 0 and data[8:8 + n].decode().index('"__metadata__"') == 1  # sorted: dunder first
    path = write_safetensors(tmp_path / "x.safetensors", tensors, metadata)
    assert path.read_bytes() == data
    with safe_open(str(path), framework="numpy") as f:
        assert f.metadata() == metadata
        assert np.array_equal(f.get_tensor("image"), tensors["image"]) and f.get_tensor("image").dtype == np.float16
    bf16 = {"w": torch.randn(4, 3).to(torch.bfloat16)}
    with safe_open(str(write_safetensors(tmp_path / "t.safetensors", bf16)), framework="pt") as f:
        assert torch.equal(f.get_tensor("w"), bf16["w"])


def test_same_tensors_give_same_bytes_every_time():
    # safetensors seeds the hash map holding the metadata anew for every file: its own bytes vary call to call
    tensors = {"b": np.arange(7, dtype=np.float32), "a": np.ones((2, 2), np.uint8)}
    metadata = {k: k * 3 for k in ("info", "config", "format", "arch", "patient_id", "grid")}
    assert len({safetensors_bytes(tensors, metadata) for _ in range(20)}) == 1


def _nifti(path: Path) -> bytes:
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.arange(4096, dtype=np.int16).reshape(16, 16, 16)), str(path), True)
    return path.read_bytes()


@pytest.mark.parametrize(("name", "cut", "match"), [
    ("mask.nii.gz", lambda b: b[: len(b) - 100], "gzip stream is incomplete"),
    ("mask.nii.gz", lambda b: b"", "the file is empty"),
    ("mask.nii", lambda b: b[: len(b) - 100], r"NIfTI data end after [\d,]+ bytes, its header announces"),
    ("plot.png", lambda b: b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "does not end with its IEND chunk"),
])
def test_a_writer_that_silently_wrote_part_of_a_file_leaves_the_old_one(tmp_path, name, cut, match):
    """SimpleITK reports no failed write (a full disk gives a short file and success): the file is checked."""
    target = tmp_path / name
    target.write_bytes(b"previous")
    whole = _nifti(tmp_path / ("whole" + name[len("mask"):])) if "nii" in name else b""
    with pytest.raises(files.IncompleteWriteError, match=f"cannot write {target}: .*{match}.*disk is probably full"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(cut(whole))
    assert target.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir() if p.name[0] == ".") == []
    if "nii" in name:  # the complete file passes
        with atomic_path(target) as tmp:
            tmp.write_bytes(whole)
        assert target.read_bytes() == whole
