"""The record every reader produces and every later stage consumes.

A `Case` names files; it holds no voxels. Readers (`mamamia.py`, `folder.py`) build them from a
dataset root, `preprocess.py` turns them into arrays on one grid, `cache.py` stores those.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtl_breast.acquisition import assumed_values


class CaseError(ValueError):
    """Bad input for one case. The message always names the case and the offending file."""

    def __init__(self, patient_id: str, path: str | Path | None, reason: str):
        self.patient_id = patient_id
        self.path = None if path is None else str(path)
        self.reason = reason
        where = f" ({self.path})" if self.path else ""
        super().__init__(f"case {patient_id}{where}: {reason}")


class DatasetError(ValueError):
    """A dataset-level file (split file, clinical spreadsheet) that cannot be used; the message names it."""


def check_times(times: Sequence[float], patient_id: str, source: str | Path | None) -> list[float]:
    """Acquisition times as floats, refused unless finite and strictly increasing (one per phase, in phase order).

    Out-of-order or repeated times mean the phases and the times were paired wrongly: the model would read the
    enhancement curve backwards, so such a case is refused rather than guessed.

    Raises:
        CaseError: naming the case and `source` (the spreadsheet, JSON or manifest the times came from).
    """
    values = [float(t) for t in times]
    shown = "[" + ", ".join(f"{t:g}" for t in values) + "]"
    if not all(math.isfinite(t) for t in values):
        raise CaseError(patient_id, source, f"acquisition_times {shown} must be finite numbers")
    for k in range(1, len(values)):
        if not values[k] > values[k - 1]:
            raise CaseError(patient_id, source,
                            f"acquisition_times {shown} must be strictly increasing, one per phase in phase order "
                            f"(phase {k} at {values[k]:g} s is not after phase {k - 1} at {values[k - 1]:g} s)")
    return values


@dataclass
class Case:
    """One patient's DCE-MRI series and whatever labels and metadata are known.

    Attributes:
        patient_id: identifier as written in the split file / spreadsheet (e.g. "DUKE_001").
        image_paths: phase files in acquisition order; index 0 is pre-contrast.
        mask_path: expert tumour mask (drawn on the first post-contrast phase), or None.
        info_path: MAMA-MIA patient_info JSON, or None.
        pcr: 1.0 / 0.0, NaN when unknown (never relabelled as 0 for training).
        acquisition_times: seconds after the pre-contrast acquisition, one per phase, or None.
        breast_box: (x_min, x_max, y_min, y_max, z_min, z_max) indexing the SimpleITK array of the
            reference phase (x = array axis 0); maxima are exclusive. None when unknown.
        meta: subgroup and acquisition metadata: dataset, site, age, menopause, density,
            tumor_subtype, field_strength, manufacturer ... Missing values are absent or None.
    """

    patient_id: str
    image_paths: list[Path]
    mask_path: Path | None = None
    info_path: Path | None = None
    pcr: float = math.nan
    acquisition_times: list[float] | None = None
    breast_box: tuple[int, int, int, int, int, int] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_phases(self) -> int:
        return len(self.image_paths)

    @property
    def has_pcr(self) -> bool:
        return not math.isnan(self.pcr)

    def assumed(self) -> dict[str, float]:
        """The acquisition values the kinetic features assume for this case, from its metadata and whether its
        acquisition times are known (`acquisition.assumed_values`)."""
        return assumed_values(self.meta, phase_times_known=self.acquisition_times is not None)


_SIGNATURE_BYTES = 1 << 16  # bytes hashed at each end of a source file


def _file_signature(path: Path | str | None) -> list | None:
    """[name, size, sha256 of the first and last 64 KiB] of a file, None for no file.

    The modification time is left out on purpose: copying a dataset (cp, rsync without -t) changes it and would
    re-preprocess every case for nothing. A .gz file ends with the CRC-32 and length of its whole content, so the
    hash of its tail is a content check; for other formats the header (start) and the last voxels are.
    """
    if path is None:
        return None
    path = Path(path)
    digest = hashlib.sha256()
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            digest.update(handle.read(_SIGNATURE_BYTES))
            if size > _SIGNATURE_BYTES:
                handle.seek(max(_SIGNATURE_BYTES, size - _SIGNATURE_BYTES))
                digest.update(handle.read(_SIGNATURE_BYTES))
    except OSError:  # unreadable now: preprocessing will report it with its reason
        return [path.name, None, None]
    return [path.name, size, digest.hexdigest()]


def source_fingerprint(case: Case) -> str:
    """A digest of everything `case` is preprocessed from: its files (size and end hashes) and its table values
    (pCR, times, breast box, metadata). The cache keys each case on it, so a regenerated or relabelled dataset
    in the same folder with the same ids is preprocessed again instead of silently reused."""
    record = {
        "images": [_file_signature(p) for p in case.image_paths],
        "mask": _file_signature(case.mask_path),
        "info": _file_signature(case.info_path),
        "pcr": None if math.isnan(case.pcr) else case.pcr,
        "times": case.acquisition_times,
        "box": case.breast_box,
        "meta": case.meta,
    }
    text = json.dumps(record, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
