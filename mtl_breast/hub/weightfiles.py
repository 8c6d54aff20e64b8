"""A weights location on disk: safetensors files read safely, ``config.json`` read and checked, a Hub id resolved.

A location is a weights folder (``model.safetensors`` + ``config.json``), a ``.safetensors`` file, or a Hugging Face
Hub id (``org/name[@revision]``) already in the local Hub cache; nothing is downloaded at run time (clinical machines
are often offline, and a silent download would make a run depend on whatever the Hub serves that day). Weights are
only ever read as safetensors: a pickle (e.g. a ``torch.save`` file renamed ``model.safetensors``) is refused, never
unpickled. Nothing here builds a model: that is `hub.pretrained`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import safetensors.torch
from torch import Tensor

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "WeightsError",
    "hf_cache_dir",
    "read_safetensors",
    "read_safetensors_shapes",
    "resolve_weights",
    "weights_and_config",
]

FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# "org/name" or "org/name@revision": the shape of a Hub id (the revision may be a branch, tag or commit).
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")


class WeightsError(ValueError):
    """Weights that cannot be loaded: not safetensors, corrupted, or not matching the model/config."""


def _sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_safetensors_file(path: Path) -> None:
    """Refuse what is not a safetensors file from its first bytes: a pickle, garbage, a truncated header."""
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        raise WeightsError(
            f"{path} is a pickle / torch.save file, not safetensors; it was not loaded because unpickling can run "
            "arbitrary code. Convert it where it is trusted: "
            "safetensors.torch.save_file(torch.load(f, weights_only=True), 'model.safetensors')"
        )
    header_len = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    if len(head) < 9 or head[8:9] != b"{" or header_len + 8 > size:
        raise WeightsError(f"{path} is not a safetensors file, or is truncated ({size} bytes)")


def read_safetensors(path: str | Path, *, expected_sha256: str | None = None) -> dict[str, Tensor]:
    """Read a safetensors file on CPU, refusing anything else.

    Raises:
        FileNotFoundError: no such file.
        WeightsError: a pickle/``torch.save`` file, not safetensors, corrupted/truncated, or a checksum mismatch.
    """
    path = Path(path)
    _check_safetensors_file(path)
    if expected_sha256 is not None and _sha256(path) != expected_sha256:
        raise WeightsError(f"{path} is corrupted or does not belong to its config.json: sha256 mismatch")
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises its own error types for bad headers and short files
        raise WeightsError(f"{path} is a corrupted or truncated safetensors file: {err}") from err


def read_safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes recorded in a safetensors header, read without touching the tensor data.

    safetensors checks on opening that the header's offsets cover the file's data exactly, so the shapes (and their
    total element count) are bounded by the bytes really on disk: a header claiming more is refused here.

    Raises:
        FileNotFoundError: no such file.
        WeightsError: a pickle/``torch.save`` file, not safetensors, or a corrupted/truncated header.
    """
    path = Path(path)
    _check_safetensors_file(path)
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for bad headers and short files
        raise WeightsError(f"{path} is a corrupted or truncated safetensors file: {err}") from err


def hf_cache_dir() -> Path:
    """The Hugging Face Hub cache folder, read from the environment now rather than at import.

    ``huggingface_hub.constants`` freezes ``HF_HUB_CACHE`` when first imported; reading the variables here
    (with the same precedence: ``HF_HUB_CACHE``, ``HUGGINGFACE_HUB_CACHE``, ``HF_HOME/hub``,
    ``XDG_CACHE_HOME/huggingface/hub``) lets a caller or a test point at another cache at any time.
    """
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def _from_hf_cache(repo_id: str, revision: str | None, name: str) -> Path:
    """The cached snapshot folder of a Hub model, or a WeightsError saying where it was looked for."""
    # imported here: huggingface_hub is not a declared dependency (timm brings it), and only a Hub id needs it
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    cache = hf_cache_dir()
    download = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    not_cached = (
        f"{name!r} is neither a local weights folder nor a Hugging Face model id in the local cache "
        f"(searched {cache / ('models--' + repo_id.replace('/', '--'))}, revision {revision or 'main'}). "
        f"Weights are never downloaded at run time: fetch them first where the network is allowed (`{download}`), "
        "or set HF_HUB_CACHE / HF_HOME to the cache that holds them"
    )
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True))
    except IncompleteSnapshotError as err:
        raise WeightsError(f"{not_cached}. {err}") from err
    except LocalEntryNotFoundError as err:  # its own message suggests downloading, which is what we refuse
        raise WeightsError(f"{not_cached}.") from err
    except ValueError as err:  # huggingface_hub's HFValidationError: not a valid repo id or revision
        raise WeightsError(f"{not_cached}. {err}") from err
    if not (folder / WEIGHTS_NAME).is_file():
        raise WeightsError(f"{not_cached}: the cached snapshot {folder} has no {WEIGHTS_NAME}")
    return folder


def resolve_weights(path: str | Path) -> Path:
    """A local weights path as is; an ``org/name[@revision]`` with no local file of that name from the Hub cache.

    A local path always wins, so an existing folder called ``org/name`` is never shadowed by the cache.

    Raises:
        WeightsError: a Hub-style id that is not in the local cache (it names the cache folder searched).
    """
    local = Path(path)
    match = _HUB_ID.match(str(path))
    if local.exists() or match is None or ".." in match["repo"]:
        return local
    return _from_hf_cache(match["repo"], match["revision"], str(path))


def weights_and_config(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """``(weights file, config dict or {})`` for a weights directory, a ``.safetensors`` file or a cached Hub id."""
    path = resolve_weights(path)
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    config_path = weights.parent / CONFIG_NAME
    if not config_path.is_file():
        return weights, {}
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightsError(f"{config_path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise WeightsError(f"{config_path} must hold a JSON object")
    version = config.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise WeightsError(f"{config_path}: format_version {version!r} is newer than this package ({FORMAT_VERSION})")
    return weights, config
