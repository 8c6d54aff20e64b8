"""`mtl-breast extract`: encoder features of every case of a dataset root, one safetensors file per case
(tokens [T, N, E], per_phase [T, E], pooled [E]) and a CSV of the pooled features (`features.extract_features`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

import torch

from mtl_breast.data.case import CaseError
from mtl_breast.data.folder import read_dataset
from mtl_breast.data.preprocess import PreprocessConfig, preprocess_case
from mtl_breast.features import encoder_of, extract_features, pad_to_patch_multiple
from mtl_breast.files import write_safetensors, write_text
from mtl_breast.hub import load_pretrained
from mtl_breast.predictor import check_device, read_weights_config

log = logging.getLogger(__name__)


def extract_dataset(weights: Path | str, data: Path | str, out: Path | str, device: str | None = None) -> dict:
    """`mtl-breast extract`: features of every case of a dataset root.

    Writes `out/features/<pid>.safetensors` (tokens [T, N, E], per_phase [T, E], pooled [E]) and
    `out/features.csv` (patient_id, num_phases, f0..f{E-1}); a failing case is reported and skipped.
    """
    weights, data, out = Path(weights), Path(data), Path(out)
    config = read_weights_config(weights)
    if not data.is_dir():
        raise FileNotFoundError(f"data folder {data} does not exist")
    pre_cfg = config.get("preprocess") or {}
    pre_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in pre_cfg.items()}
    preprocess = PreprocessConfig(**pre_cfg)
    device = check_device(device)
    model = load_pretrained(weights).to(device)
    patch = tuple(encoder_of(model).patch_size)
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
        image = pad_to_patch_multiple(torch.from_numpy(pre.image), patch).unsqueeze(0).to(device)
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
