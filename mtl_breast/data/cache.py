"""On-disk cache of preprocessed cases: one safetensors file per case, keyed by the preprocessing config.

```
<cache_root>/<config.key()>/config.json                 the PreprocessConfig fields, written once
<cache_root>/<config.key()>/<patient_id>.safetensors    image float16 (or float32: config.cache_dtype) [T, D, H, W],
                                                        label uint8 [D, H, W]
                                                        (absent without a mask), phase_time float32 [T];
                                                        metadata {"info": JSON, "config": JSON}
<cache_root>/<config.key()>/report.json                 written by `preprocess_dataset`
```
safetensors files are memory-mappable, so `read_cached_crop` reads only the bytes of a crop and training
never decodes NIfTI.gz; reads return float32 whatever the stored type. Files are written by `files.atomic_path`
(an interrupted run leaves the old file or the new one, never half of one) with a canonical header, so the same
case and config give byte-identical files. `info["source"]["fingerprint"]` records the sources a file was made
from; `CaseCache.has(pid, fingerprint)` misses when they changed. `info["assumed"]` records the acquisition values
the kinetic features assume for the case (`CaseCache.assumed` works them out for files written before it was).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mtl_breast.acquisition import assumed_values
from mtl_breast.data.preprocess import CACHE_DTYPES, PreprocessConfig, PreprocessedCase
from mtl_breast.files import write_safetensors, write_text

SUFFIX = ".safetensors"
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header size


class CacheError(ValueError):
    """A cache file that cannot be used; the message names the file and says how to recover."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        super().__init__(f"cache file {path}: {reason} (delete it and run `mtl-breast preprocess` again)")


def read_header(path: Path | str) -> dict[str, Any]:
    """Parse and check a cache file's safetensors header without reading any voxel.

    Checks that the header parses, that the file is as long as the tensor offsets say (a truncated
    copy fails here) and that the cache tensors and metadata are present.

    Raises:
        CacheError: naming the file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= min(size - 8, _MAX_HEADER):
                raise CacheError(path, "truncated or not a safetensors file")
            header = json.loads(f.read(n))
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max(int(v["data_offsets"][1]) for v in tensors.values())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        if isinstance(err, CacheError):
            raise
        raise CacheError(path, f"unreadable header ({type(err).__name__}: {err})") from err
    if 8 + n + end != size:
        raise CacheError(path, f"truncated: header promises {8 + n + end} bytes, file has {size}")
    metadata = header.get("__metadata__") or {}
    if "image" not in tensors or "phase_time" not in tensors or "info" not in metadata:
        raise CacheError(path, "not a case file (needs tensors image, phase_time and metadata info)")
    return header


class CaseCache:
    """The cache folder of one preprocessing config.

    Args:
        root: cache root; files go to `root / config.key()`.
        config: the preprocessing config the files were (or will be) made with.
    """

    def __init__(self, root: Path | str, config: PreprocessConfig):
        self.root = Path(root)
        self.config = config
        self.dir = self.root / config.key()

    def path(self, patient_id: str) -> Path:
        """`<dir>/<patient_id>.safetensors` (the id must be usable as a file name)."""
        if not patient_id or patient_id.startswith(".") or "/" in patient_id or "\\" in patient_id:
            raise ValueError(f"patient id {patient_id!r} cannot be a cache file name")
        return self.dir / f"{patient_id}{SUFFIX}"

    def has(self, patient_id: str, fingerprint: str | None = None) -> bool:
        """True when a complete, readable file exists for the case (a corrupt one is not a hit).

        Args:
            fingerprint: `data.case.source_fingerprint` of the case's sources; when given, a file made from other
                sources (or before fingerprints were stored) is not a hit either.
        """
        path = self.path(patient_id)
        if not path.is_file():
            return False
        try:
            header = read_header(path)
        except CacheError:
            return False
        if fingerprint is None:
            return True
        try:
            info = json.loads(header["__metadata__"]["info"])
        except ValueError:
            return False
        return isinstance(info, dict) and (info.get("source") or {}).get("fingerprint") == fingerprint

    def write(self, case: PreprocessedCase) -> Path:
        """Store one preprocessed case atomically; returns the file's path."""
        patient_id = case.info["patient_id"]
        path = self.path(patient_id)
        image = np.ascontiguousarray(case.image, dtype=np.float32)
        dtype = CACHE_DTYPES[self.config.cache_dtype]
        if dtype is not np.float32:
            peak = max(float(image.max()), -float(image.min())) if image.size else 0.0  # no |image| copy
            if not peak <= float(np.finfo(dtype).max):  # NaN or beyond float16's range: refuse, do not store inf
                raise ValueError(f"case {patient_id}: normalised intensities reach {peak:.6g}, beyond "
                                 f"{self.config.cache_dtype}'s range; preprocess with cache_dtype float32")
            image = image.astype(dtype)
        phase_time = np.ascontiguousarray(case.phase_time, dtype=np.float32)
        if image.ndim != 4 or phase_time.shape != image.shape[:1]:
            raise ValueError(f"case {patient_id}: image must be [T, D, H, W] and phase_time [T], "
                             f"got {image.shape} and {phase_time.shape}")
        tensors = {"image": image, "phase_time": phase_time}
        if case.label is not None:
            if case.label.shape != image.shape[1:]:
                raise ValueError(f"case {patient_id}: label {case.label.shape} does not match image {image.shape}")
            tensors["label"] = np.ascontiguousarray(case.label, dtype=np.uint8)
        self.dir.mkdir(parents=True, exist_ok=True)
        config_path = self.dir / "config.json"
        if not config_path.is_file():
            write_text(config_path, json.dumps({**asdict(self.config), "key": self.config.key()}, indent=2))
        metadata = {"info": json.dumps(case.info, default=str), "config": json.dumps(asdict(self.config))}
        return write_safetensors(path, tensors, metadata)

    def read(self, patient_id: str) -> dict[str, Any]:
        """Load a whole case: {"image": float32 [T, D, H, W], "label": uint8 [D, H, W] or None, "phase_time": [T],
        "info"}.

        Raises:
            FileNotFoundError: the case is not in the cache.
            CacheError: the file is truncated or corrupt.
        """
        path = self.path(patient_id)
        if not path.is_file():
            raise FileNotFoundError(f"case {patient_id} is not in cache {self.dir} ({path.name} missing)")
        header = read_header(path)
        try:
            tensors = load_file(path)
        except Exception as err:  # safetensors raises its own error types for corrupt payloads
            raise CacheError(path, f"cannot load tensors ({type(err).__name__}: {err})") from err
        return {"image": tensors["image"].float(), "label": tensors.get("label"), "phase_time": tensors["phase_time"],
                "info": json.loads(header["__metadata__"]["info"])}

    def read_info(self, patient_id: str) -> dict[str, Any]:
        """The case's `info` dict, read from the header alone."""
        return json.loads(read_header(self.path(patient_id))["__metadata__"]["info"])

    def assumed(self, patient_id: str, info: dict[str, Any] | None = None) -> dict[str, float]:
        """The acquisition values the kinetic features assume for a cached case (`acquisition.assumed_values`).

        Args:
            info: the case's `info`, when already read (saves reading the header again).

        Files written before ``info["assumed"]`` was recorded get it worked out from their metadata and stored
        acquisition times (the same inputs `preprocess_case` uses), so they need not be preprocessed again.
        """
        info = self.read_info(patient_id) if info is None else info
        if isinstance(info.get("assumed"), dict):
            return info["assumed"]
        path = self.path(patient_id)
        try:
            with safe_open(str(path), framework="numpy") as f:
                times = f.get_tensor("phase_time")
        except Exception as err:  # safetensors raises its own error types for corrupt payloads
            raise CacheError(path, f"cannot read phase_time ({type(err).__name__}: {err})") from err
        # preprocess_case stores all NaN when the times are unknown, all finite when they are known.
        return assumed_values(info.get("meta"), phase_times_known=bool(np.isfinite(times).all()))

    def patient_ids(self) -> list[str]:
        """Cached case ids, sorted (temporary files of interrupted writes are hidden and ignored)."""
        if not self.dir.is_dir():
            return []
        return sorted(p.name[: -len(SUFFIX)] for p in self.dir.glob(f"*{SUFFIX}") if not p.name.startswith("."))


def read_cached_crop(path: Path | str, start: tuple[int, int, int], size: tuple[int, int, int],
                     pad_value: float | None = None) -> dict[str, Any]:
    """Read a [D, H, W] window of a cache file; only the window's bytes are read.

    Args:
        path: a case's `.safetensors` file.
        start: first voxel of the window (may be negative).
        size: window size; parts outside the volume are padded.
        pad_value: image padding; default is the case's normalised background (the volume minimum),
            i.e. what air looks like after normalisation. Labels pad with 0.

    Returns:
        {"image": float32 [T, *size], "label": uint8 [*size] or None, "phase_time": [T], "info": dict}.
    """
    path = Path(path)
    header = read_header(path)
    info = json.loads(header["__metadata__"]["info"])
    num_phases, *spatial = header["image"]["shape"]
    if len(start) != 3 or len(size) != 3 or min(size) < 1:
        raise ValueError(f"crop start {start} / size {size} must be 3 ints with size >= 1")
    src = tuple(slice(max(0, s), min(dim, s + n)) for s, n, dim in zip(start, size, spatial, strict=True))
    dst = tuple(slice(a.start - s, a.stop - s) for a, s in zip(src, start, strict=True))
    inside = all(a.start < a.stop for a in src)
    if pad_value is None:
        pad_value = float(info.get("normalization", {}).get("background", 0.0))
    # numpy, not torch, assembles the window: torch's multi-threaded fill of a small tensor costs more than the read.
    try:
        with safe_open(str(path), framework="numpy") as f:
            image = np.full((num_phases, *size), pad_value, dtype=np.float32)
            if inside:
                image[(slice(None), *dst)] = f.get_slice("image")[(slice(None), *src)]
            label = None
            if "label" in header:
                label = np.zeros(tuple(size), dtype=np.uint8)
                if inside:
                    label[dst] = f.get_slice("label")[src]
            phase_time = f.get_tensor("phase_time")
    except Exception as err:  # safetensors raises its own error types for corrupt payloads
        raise CacheError(path, f"cannot read crop ({type(err).__name__}: {err})") from err
    image, phase_time = torch.from_numpy(image), torch.from_numpy(phase_time)
    label = None if label is None else torch.from_numpy(label)
    return {"image": image, "label": label, "phase_time": phase_time, "info": info}
