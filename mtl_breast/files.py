"""How the package writes a file: atomically, with the user's permissions, in reproducible bytes.

Every file mtl-breast writes (cache entries, masks, predictions.csv, scores, reports, figures, weights,
checkpoints, features, phantoms) goes through `atomic_path`:

1. leftovers of earlier writes of the same file by processes that are gone are removed;
2. the data goes to a hidden temporary file in the target's folder, ``.<name>.<host>-<pid>-<token>.tmp<ext>``
   (same file system, so the rename is atomic; the extension is kept for writers that choose the format by it);
3. the temporary file is created with mode 0666 minus the umask, as ``open`` would create the file itself
   (``tempfile.mkstemp`` makes 0600, which locks a cluster group out of a shared cache or weights folder);
4. the file is fsynced and checked (`check_written`: not empty, a gzip stream complete, a NIfTI file holding the
   data its header announces, a PNG ending with its last chunk), since writers that write through their own C
   code (SimpleITK) do not report a failed write; then renamed over the target and the folder entry fsynced.

A reader therefore sees the previous file or the new one, never part of one; a write that fails or is
interrupted removes its temporary file, and one killed outright (SIGKILL, power loss) leaves a hidden file that
the next write of the same target removes. A write that fails for want of room (ENOSPC, EDQUOT, EFBIG) raises
`DiskFullError` naming the target; a file found incomplete after its writer reported success raises its subclass
`IncompleteWriteError`; a read-only folder or one without write permission raises `NotWritableError`.

`safetensors_bytes` serialises tensors with the header's keys sorted: safetensors keeps metadata in a hash map
whose order changes from process to process, so the same tensors would otherwise give different file bytes.
"""

from __future__ import annotations

import errno
import gzip
import io
import json
import os
import secrets
import socket
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors.numpy import save as save_numpy

# A full disk, an exhausted quota, a file-size limit: the write failed for want of room, not for a bug.
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class DiskFullError(OSError):
    """A write that failed for want of room; the message names the file. Nothing was written."""


# A read-only file system, a folder without write permission.
NOT_WRITABLE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


class NotWritableError(OSError):
    """A write refused because the folder is read-only or not ours to write; the message names the file."""


class IncompleteWriteError(DiskFullError):
    """A writer reported success but the file it wrote is incomplete (`check_written`). Libraries that write
    through their own C code (SimpleITK, ITK's zlib) do not report a failed write, so a full disk or a file-size
    limit shows up here; the message names the file. Nothing was written."""


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


_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # a PNG file's last chunk


def _gzip_content(path: Path, keep: int) -> tuple[int, bytes]:
    """(uncompressed length, its first `keep` bytes) of a gzip file, decompressed in chunks; raises on a truncated
    or corrupted stream (EOFError, gzip.BadGzipFile, zlib.error)."""
    length, head = 0, b""
    with gzip.open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            if len(head) < keep:
                head += chunk[: keep - len(head)]
            length += len(chunk)
    return length, head


def _nifti_data_end(head: bytes) -> int | None:
    """Bytes a NIfTI-1/2 file must hold after its header's vox_offset and data shape, or None if not a header."""
    import nibabel as nib  # imported here: 0.7 s, and only a NIfTI file's check needs it (most writes are not)

    klass = nib.Nifti2Header if head[:4] in ((540).to_bytes(4, "little"), (540).to_bytes(4, "big")) \
        else nib.Nifti1Header
    try:
        header = klass.from_fileobj(io.BytesIO(head), check=False)
        shape = header.get_data_shape()
        itemsize = header.get_data_dtype().itemsize
        offset = int(header["vox_offset"])
    except Exception:  # noqa: BLE001 -- not a NIfTI header at all: reported by the caller
        return None
    count = 1
    for n in shape:
        count *= int(n)
    return offset + count * itemsize


def check_written(path: Path | str, name: str | None = None) -> str | None:
    """What is wrong with a file a writer has just finished, or None when it looks complete.

    An empty file is never complete; by the name's format (`name`, default the file's own): a gzip stream must
    decompress to its end (its CRC and length checked), a NIfTI file must hold the data its header announces, a
    PNG must end with its IEND chunk. Other files are written by Python code, whose failed writes raise.
    """
    path = Path(path)
    lower = (name or path.name).lower()
    size = path.stat().st_size
    if size == 0:
        return "the file is empty"
    if lower.endswith(".gz"):
        try:
            length, head = _gzip_content(path, 544)
        except (EOFError, OSError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
            return f"the gzip stream is incomplete or corrupted ({err})"
    elif lower.endswith(".nii"):
        with open(path, "rb") as handle:
            length, head = size, handle.read(544)
    if lower.endswith((".nii", ".nii.gz")):
        needed = _nifti_data_end(head)
        if needed is None:
            return "the file does not start with a NIfTI header"
        if length < needed:
            return f"the NIfTI data end after {length:,} bytes, its header announces {needed:,}"
    if lower.endswith(".png"):
        with open(path, "rb") as handle:
            handle.seek(max(0, size - len(_PNG_END)))
            if handle.read() != _PNG_END:
                return "the PNG file does not end with its IEND chunk"
    return None


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
    tmp = path.with_name(f".{path.name}.{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.tmp{_extension(path.name)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(path)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # 0666 & ~umask, like open()
    except OSError as err:
        if err.errno in NOT_WRITABLE:
            raise NotWritableError(err.errno, f"cannot write {path}: {os.strerror(err.errno)} (nothing was "
                                              f"written; choose a folder you can write to)") from err
        if err.errno in DISK_FULL:
            raise DiskFullError(err.errno, f"cannot write {path}: {os.strerror(err.errno)} (nothing was written; "
                                           "free space or raise the quota and run again)") from err
        raise
    try:
        yield tmp
        with open(tmp, "rb+") as handle:  # on disk before the rename makes it visible
            os.fsync(handle.fileno())
        problem = check_written(tmp, path.name)  # some writers do not report a failed write: look at the file
        if problem is not None:
            raise IncompleteWriteError(errno.EIO, f"cannot write {path}: {problem}, although its writer reported "
                                                  "success: the disk is probably full or a file-size limit was "
                                                  "reached (nothing was written; free space or raise the limit and "
                                                  "run again)")
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
        from safetensors.torch import save  # imported here: torch only for callers that hold torch tensors
    else:
        save = save_numpy
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
