"""How the package writes a file: atomically, with the user's permissions, in reproducible bytes.

Every file mtl-breast writes (cache entries, masks, predictions.csv, scores, reports, figures, weights,
checkpoints, features, phantoms) goes through `atomic_path`:

1. leftovers of earlier writes of the same file by processes that are gone are removed;
2. the data goes to a hidden temporary file in the target's folder, ``.<name>.<host>-<pid>-<token>.tmp<ext>``
   (same file system, so the rename is atomic; the extension is kept for writers that choose the format by it);
3. the temporary file is created with mode 0666 minus the umask, as ``open`` would create the file itself
   (``tempfile.mkstemp`` makes 0600, which locks a cluster group out of a shared cache or weights folder);
4. the file is fsynced, renamed over the target and the folder entry fsynced.

A reader therefore sees the previous file or the new one, never part of one; a write that fails or is
interrupted removes its temporary file, and one killed outright (SIGKILL, power loss) leaves a hidden file that
the next write of the same target removes. A write that fails for want of room (ENOSPC, EDQUOT, EFBIG) raises
`DiskFullError` naming the target.

`safetensors_bytes` serialises tensors with the header's keys sorted: safetensors keeps metadata in a hash map
whose order changes from process to process, so the same tensors would otherwise give different file bytes.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# A full disk, an exhausted quota, a file-size limit: the write failed for want of room, not for a bug.
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class DiskFullError(OSError):
    """A write that failed for want of room; the message names the file. Nothing was written."""


_HOST = socket.gethostname().replace("-", "_").replace(".", "_") or "host"


def _extension(name: str) -> str:
    """`.nii.gz` of `case_0000.nii.gz`, `.png` of `curves.png`: the suffix a format-sniffing writer needs."""
    suffixes = Path(name).suffixes
    return "".join(suffixes[-2:]) if suffixes[-1:] == [".gz"] else "".join(suffixes[-1:])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_leftovers(path: Path | str) -> list[Path]:
    """Delete the temporary files of writes of `path` whose process is gone; returns what was removed.

    Only files written on this host are judged (another node's writer may be alive); a temporary file of a live
    process is an ongoing write and is left alone.
    """
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    prefix = f".{path.name}."
    for entry in os.scandir(path.parent):
        name = entry.name
        if not name.startswith(prefix) or ".tmp" not in name[len(prefix):]:
            continue
        owner = name[len(prefix):].split(".tmp", 1)[0].rsplit("-", 2)  # host, pid, token
        if len(owner) != 3 or owner[0] != _HOST or not owner[1].isdigit() or _alive(int(owner[1])):
            continue
        try:
            os.unlink(entry.path)
            removed.append(Path(entry.path))
        except FileNotFoundError:
            pass
    return removed


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems do not open folders; the rename itself is still atomic
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s content to; on a clean exit it replaces `path`.

    The folder is created. The yielded file exists (empty, umask permissions) so that writers which open it
    for writing keep those permissions. On an exception the temporary file is removed and `path` is untouched.

    Example:
        >>> with atomic_path(out / "mask.nii.gz") as tmp:
        ...     sitk.WriteImage(image, str(tmp), True)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    tmp = path.with_name(f".{path.name}.{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.tmp{_extension(path.name)}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # 0666 & ~umask, like open()
    try:
        yield tmp
        with open(tmp, "rb+") as handle:  # on disk before the rename makes it visible
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in DISK_FULL:
            raise DiskFullError(err.errno, f"cannot write {path}: {os.strerror(err.errno)} (nothing was written; "
                                           "free space or raise the quota and run again)") from err
        raise
    _fsync_dir(path.parent)


def write_bytes(path: Path | str, data: bytes) -> Path:
    """Write `data` to `path` atomically (`atomic_path`); returns `path`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: Path | str, text: str) -> Path:
    """Write UTF-8 `text` to `path` atomically (`atomic_path`); returns `path`."""
    return write_bytes(path, text.encode("utf-8"))


def _safetensors_parts(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None) -> tuple[bytes, memoryview]:
    """(8-byte length + canonical header, data section) of a safetensors file."""
    values = list(tensors.values())
    if values and all(type(v).__module__.startswith("torch") for v in values):
        from safetensors.torch import save  # torch is only imported by callers that hold torch tensors
    else:
        from safetensors.numpy import save
    raw = save(dict(tensors), metadata=dict(metadata) if metadata else None)
    n = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # safetensors pads the header to 8 bytes so the data stay aligned
    return len(header).to_bytes(8, "little") + header, memoryview(raw)[8 + n:]


def safetensors_bytes(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> bytes:
    """A safetensors file's bytes with a canonical header (keys sorted): equal inputs give equal bytes.

    `tensors` are all numpy arrays or all torch tensors (torch for dtypes numpy lacks, such as bfloat16).
    """
    head, data = _safetensors_parts(tensors, metadata)
    return head + bytes(data)


def write_safetensors(path: Path | str, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None
                      ) -> Path:
    """`safetensors_bytes` written atomically to `path` (without a second copy of the data); returns `path`."""
    head, data = _safetensors_parts(tensors, metadata)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(head)
        handle.write(data)
    return Path(path)
