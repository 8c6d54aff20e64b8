"""Map-style dataset over cached cases, and the collate function that pads phases into one batch.

Batch contract (DESIGN.md 3):
    image       float [B, T, D, H, W]   T = most phases of any case in the batch
    phase_mask  bool  [B, T]            False where a case has fewer phases (padding) or a phase was dropped
    phase_time  float [B, T]            seconds after pre-contrast; NaN unknown or padded
    acquisition float [B, 5]            normalisation offset/scale, field strength, TR, flip angle; NaN unknown
    label       uint8 [B, 1, D, H, W]   only when every sample has one
    pcr         float [B]               NaN when unknown
    tumour_window bool [B]              the crop is centred on the tumour (fine-tuning crops; else all False)
    meta        list of B dicts         patient_id, dataset, site, age, menopause, density ...
    patient_id  list of B str
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from mtl_breast.acquisition import ACQUISITION_FIELDS, given_value
from mtl_breast.data.cache import CaseCache
from mtl_breast.data.sampling import SampleKey


def acquisition_vector(normalization: dict | None, meta: dict | None) -> Tensor:
    """``[5]`` float32 in `ACQUISITION_FIELDS` order from a preprocessed case's ``info["normalization"]`` (the
    mean/std every phase was normalised with) and ``info["meta"]`` (field_strength T, repetition_time ms,
    flip_angle deg). Missing values are NaN."""
    norm, meta = normalization or {}, meta or {}

    def number(value) -> float:
        # `acquisition.given_value` decides what counts as given, so `acquisition.assumed_values` reports exactly
        # the values that take a default here.
        out = given_value(value)
        return float("nan") if out is None else out

    return torch.tensor([number(norm.get("mean")), number(norm.get("std")), number(meta.get("field_strength")),
                         number(meta.get("repetition_time")), number(meta.get("flip_angle"))], dtype=torch.float32)


class CachedCaseDataset(Dataset):
    """Reads preprocessed cases from a `CaseCache`; no NIfTI decoding at training time.

    Args:
        cache: the cache holding the cases (one safetensors file per case).
        patient_ids: which cases, in order.
        transform: MONAI dict transform applied to each sample (see `transforms.py`), or None.
        with_label: load the expert mask (fine-tuning); a case without one then raises.
        repeats: each case appears this many times per epoch (more random crops per pass on small data).
    """

    def __init__(
        self,
        cache: CaseCache,
        patient_ids: Sequence[str],
        transform: Callable[[dict], dict] | None = None,
        with_label: bool = False,
        repeats: int = 1,
    ):
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        self.cache, self.patient_ids = cache, list(patient_ids)
        self.transform, self.with_label, self.repeats = transform, with_label, repeats

    def __len__(self) -> int:
        return len(self.patient_ids) * self.repeats

    def __getitem__(self, key: int | SampleKey) -> dict[str, Any]:
        """One sample; `key` is an index, or ``(index, seed)`` from `EpochSampler`: the random transforms are then
        seeded from `seed`, so the sample is the same whichever worker reads it and whenever."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        pid = self.patient_ids[index % len(self.patient_ids)]
        case = self.cache.read(pid)
        info = case["info"]
        image = torch.as_tensor(case["image"], dtype=torch.float32)  # [T, D, H, W]
        sample: dict[str, Any] = {
            "image": image,
            "phase_mask": torch.ones(image.shape[0], dtype=torch.bool),
            "phase_time": torch.as_tensor(case["phase_time"], dtype=torch.float32),
            "acquisition": acquisition_vector(info.get("normalization"), info.get("meta")),
            "pcr": math.nan if info.get("pcr") is None else float(info["pcr"]),
            "meta": {"patient_id": pid, **(info.get("meta") or {})},
            "patient_id": pid,
        }
        if self.with_label:
            if case.get("label") is None:
                raise ValueError(f"case {pid} ({self.cache.path(pid)}): no expert mask in the cache")
            sample["label"] = torch.as_tensor(case["label"]).unsqueeze(0)  # [1, D, H, W]
        if self.transform is not None:
            if seed is not None and hasattr(self.transform, "set_random_state"):
                self.transform.set_random_state(seed=seed)
            sample = self.transform(sample)
            if isinstance(sample, list):  # MONAI's multi-sample croppers return a list (num_samples=1)
                sample = sample[0]
        return sample


def _plain(x: Any) -> torch.Tensor:
    # MONAI transforms return MetaTensors; batches carry plain tensors.
    x = torch.as_tensor(x)
    return x.as_tensor() if hasattr(x, "as_tensor") else x


def collate_cases(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples of equal spatial size, padding the phase axis to the largest T in the batch."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    shapes = {tuple(s["image"].shape[1:]) for s in samples}
    if len(shapes) > 1:
        ids = [s["patient_id"] for s in samples]
        raise ValueError(f"cases {ids} have different spatial sizes {sorted(shapes)}; crop or use batch size 1")
    t_max = max(s["image"].shape[0] for s in samples)
    spatial = samples[0]["image"].shape[1:]
    b = len(samples)
    image = torch.zeros((b, t_max, *spatial), dtype=torch.float32)
    phase_mask = torch.zeros((b, t_max), dtype=torch.bool)
    phase_time = torch.full((b, t_max), math.nan, dtype=torch.float32)
    for i, s in enumerate(samples):
        t = s["image"].shape[0]
        image[i, :t] = _plain(s["image"])
        phase_mask[i, :t] = _plain(s["phase_mask"])
        phase_time[i, :t] = _plain(s["phase_time"])
    batch: dict[str, Any] = {
        "image": image,
        "phase_mask": phase_mask,
        "phase_time": phase_time,
        "acquisition": torch.stack([_plain(s["acquisition"]).float() if "acquisition" in s
                                    else torch.full((len(ACQUISITION_FIELDS),), math.nan) for s in samples]),
        "pcr": torch.tensor([float(s["pcr"]) for s in samples], dtype=torch.float32),
        "tumour_window": torch.tensor([bool(s.get("tumour_window", False)) for s in samples], dtype=torch.bool),
        "meta": [s["meta"] for s in samples],
        "patient_id": [s["patient_id"] for s in samples],
    }
    if all("label" in s for s in samples):
        batch["label"] = torch.stack([_plain(s["label"]).to(torch.uint8) for s in samples])
    return batch
