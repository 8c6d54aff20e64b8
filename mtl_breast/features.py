"""Feature extraction with a pretrained encoder: per token, per phase and pooled.

`extract_features` is the library call; `extract_dataset` runs it over a dataset root (the
`mtl-breast extract` command) and writes one safetensors file per case plus a CSV of pooled features.
Whole preprocessed volumes are padded to a multiple of the patch size; the position embedding is
sin-cos and follows the grid, so any volume size and any number of phases (2..8) work.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

import torch
from einops import reduce
from torch import nn

from mtl_breast.data.case import CaseError
from mtl_breast.files import write_safetensors, write_text

log = logging.getLogger(__name__)


def _encoder_of(model: nn.Module) -> nn.Module:
    # An encoder, an MAE pretrainer or a joint model: all keep the encoder at `.encoder`.
    return model.encoder if hasattr(model, "encoder") else model


@torch.no_grad()
def extract_features(model: nn.Module, image: torch.Tensor, phase_mask: torch.Tensor | None = None,
                     phase_time: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Encode DCE-MRI volumes.

    Args:
        model: a `ViTEncoder3d`, or a model holding one at `.encoder` (MAE, joint model).
        image: [B, T, D, H, W], spatial size divisible by the patch size.
        phase_mask: bool [B, T], True = real phase (default all real).
        phase_time: float [B, T], seconds after pre-contrast, NaN unknown.

    Returns:
        tokens [B, T, N, E]; per_phase [B, T, E] (token mean, zero for padded phases);
        pooled [B, E] (mean over real phases).
    """
    encoder = _encoder_of(model)
    was_training = encoder.training
    encoder.eval()
    try:
        tokens = encoder.forward_features(image, phase_mask=phase_mask, phase_time=phase_time)
    finally:
        encoder.train(was_training)
    if phase_mask is None:
        phase_mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    per_phase = reduce(tokens, "b t n e -> b t e", "mean") * phase_mask[..., None]
    pooled = per_phase.sum(1) / phase_mask.sum(1, keepdim=True).clamp(min=1)
    return {"tokens": tokens, "per_phase": per_phase, "pooled": pooled}


def _pad_to_multiple(image: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """Zero-pad [T, D, H, W] at the end of each spatial axis up to a multiple of the patch size."""
    pads = [(-s) % p for s, p in zip(image.shape[1:], patch, strict=True)]
    return torch.nn.functional.pad(image, [x for d in reversed(pads) for x in (0, d)])


def extract_dataset(weights: Path | str, data: Path | str, out: Path | str, device: str | None = None) -> dict:
    """`mtl-breast extract`: features of every case of a dataset root.

    Writes `out/features/<pid>.safetensors` (tokens [T, N, E], per_phase [T, E], pooled [E]) and
    `out/features.csv` (patient_id, num_phases, f0..f{E-1}); a failing case is reported and skipped.
    """
    from mtl_breast.data.folder import read_dataset
    from mtl_breast.data.preprocess import PreprocessConfig, preprocess_case
    from mtl_breast.hub import load_pretrained
    from mtl_breast.inference import read_weights_config

    weights, data, out = Path(weights), Path(data), Path(out)
    config = read_weights_config(weights)
    if not data.is_dir():
        raise FileNotFoundError(f"data folder {data} does not exist")
    pre_cfg = config.get("preprocess") or {}
    pre_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in pre_cfg.items()}
    preprocess = PreprocessConfig(**pre_cfg)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_pretrained(weights).to(device)
    patch = tuple(_encoder_of(model).patch_size)
    rows: list[list] = []
    skipped: list[dict[str, str]] = []
    cases = read_dataset(data, skipped=skipped)  # cases that cannot be listed are reported, not fatal
    (out / "features").mkdir(parents=True, exist_ok=True)
    for case in cases:
        try:
            pre = preprocess_case(case, preprocess)
        except CaseError as err:
            log.error("skipped %s", err)
            skipped.append({"patient_id": case.patient_id, "reason": str(err)})
            continue
        image = _pad_to_multiple(torch.from_numpy(pre.image), patch).unsqueeze(0).to(device)
        feats = extract_features(model, image, phase_time=torch.from_numpy(pre.phase_time)[None].to(device))
        tensors = {k: v[0].float().cpu().contiguous() for k, v in feats.items()}
        path = out / "features" / f"{case.patient_id}.safetensors"
        write_safetensors(path, tensors, {"patient_id": case.patient_id, "grid": json.dumps(
            [s // p for s, p in zip(image.shape[2:], patch, strict=True)])})
        rows.append([case.patient_id, int(image.shape[1]), *[f"{x:.6g}" for x in tensors["pooled"].tolist()]])
    table = out / "features.csv"
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    width = len(rows[0]) - 2 if rows else 0
    writer.writerow(["patient_id", "num_phases", *[f"f{i}" for i in range(width)]])
    writer.writerows(rows)
    write_text(table, text.getvalue())
    return {"done": [r[0] for r in rows], "skipped": skipped, "table": str(table)}
