"""Prediction of one case: a tumour mask in the original image space and a pCR probability.

`predict_volume` runs the model over one preprocessed volume; `predict_case` takes a `Case` from its files to the
mask on its original grid and the probability: the same preprocessing as training (`preprocess_case`),
sliding-window segmentation over the whole preprocessed volume (MONAI) with optional flip test-time augmentation,
probabilities mapped back onto the original grid of the first post-contrast phase, thresholded, clipped to the
breast box when known, optionally reduced to the largest connected component. pCR is predicted on one window
centred on the largest predicted tumour component (training's pCR crops follow the same rule) and calibrated with
the temperature and threshold chosen on validation data, which travel in `config.json`. `load_joint_model` reads
exported weights for it. Writing masks and `predictions.csv` for a dataset is the job `mtl_breast.run.predict`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from scipy import ndimage

from mtl_breast.data.case import Case
from mtl_breast.data.dataset import acquisition_vector
from mtl_breast.data.preprocess import PreprocessConfig, preprocess_case, to_original_space
from mtl_breast.data.window import tumour_window
from mtl_breast.hub import WeightsError, load_pretrained, resolve_weights, weights_and_config
from mtl_breast.models.mtl import MTLModel
from mtl_breast.sizes import positive_int_triple

# Voxels of all windows of one sliding-window pass: a ViT-B window of 128^3 holds about 2 GiB of activations on the
# CPU, so one at a time keeps a real-size case under 4 GB of RSS there; small windows are batched (32^3 windows of
# the test model run about 2.7x faster per case in batches of 4 than one by one on the CPU, and no faster in 16s).
_WINDOW_VOXELS = {"cpu": 128**3, "cuda": 2 * 128**3}
_MAX_WINDOWS = 4
# The largest sliding window accepted (voxels): 512^3 already needs tens of GB of activations for a ViT-B.
MAX_WINDOW_VOXELS = 512**3


class SettingsError(ValueError):
    """An inference setting (a command-line flag or a value of the weights' config.json) that cannot be used; the
    message names the setting and the value. Raised before any output is written."""


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_device(device: str | None) -> str:
    """The torch device to run on: `device`, or CUDA when available, else the CPU.

    Raises:
        SettingsError: `device` is not a device name, or names a CUDA device this machine does not have.
    """
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise SettingsError(f"--device {device}: not a torch device ({err})") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise SettingsError(f"--device {device}: no CUDA device is available on this machine (use --device cpu)")
        if parsed.index is not None and parsed.index >= count:
            raise SettingsError(f"--device {device}: this machine has {count} CUDA device(s) (0 to {count - 1})")
    elif parsed.type not in ("cpu", "mps"):
        raise SettingsError(f"--device {device}: use cpu or cuda[:N]")
    return device


def default_sw_batch_size(roi_size: Sequence[int], device: torch.device | str) -> int:
    """Windows per forward pass for windows of `roi_size` (D, H, W) on `device`: as many as fit the device's voxel
    budget (`_WINDOW_VOXELS`), at least 1 and at most 4."""
    budget = _WINDOW_VOXELS["cuda" if torch.device(device).type == "cuda" else "cpu"]
    return max(1, min(_MAX_WINDOWS, budget // math.prod(int(s) for s in roi_size)))


@dataclass
class InferenceSettings:
    """How to run the joint model on a whole case. Defaults come from the weights' config.json.

    Attributes:
        roi_size: sliding-window size (D, H, W), the training crop size.
        overlap: sliding-window overlap fraction.
        tta_flips: average over flips of each spatial axis (4 passes instead of 1).
        sw_batch_size: windows per forward pass; None = `default_sw_batch_size` (by window volume and device).
        largest_component: keep only the largest connected tumour component.
        seg_threshold: tumour probability above which a voxel is tumour.
        pcr_threshold: probability above which pCR is predicted 1 (chosen on validation).
        pcr_temperature: logit temperature (temperature scaling fitted on validation).
        preprocess: the preprocessing the model was trained with.
    """

    roi_size: tuple[int, int, int] = (64, 64, 64)
    overlap: float = 0.5
    tta_flips: bool = False
    sw_batch_size: int | None = None
    largest_component: bool = False
    seg_threshold: float = 0.5
    pcr_threshold: float = 0.5
    pcr_temperature: float = 1.0
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)

    def __post_init__(self) -> None:
        """Refuse values that would fail on every case, or ask for absurd memory, before anything runs.

        Raises:
            SettingsError: naming the setting and its value.
        """
        roi = self.roi_size
        if not isinstance(roi, (tuple, list)) or positive_int_triple(roi) is None:
            raise SettingsError(f"roi_size must be three positive integers (D, H, W), got {roi!r}")
        if math.prod(roi) > MAX_WINDOW_VOXELS:
            raise SettingsError(f"roi_size {list(roi)} is {math.prod(roi):,} voxels per window, more than the "
                                f"{MAX_WINDOW_VOXELS:,} (512^3) accepted")
        if not (_is_number(self.overlap) and 0 <= self.overlap < 1):
            raise SettingsError(f"overlap must be a number in [0, 1) (the share of a window shared with the next), "
                                f"got {self.overlap!r}")
        if self.sw_batch_size is not None and not (isinstance(self.sw_batch_size, int) and self.sw_batch_size >= 1):
            raise SettingsError(f"sw_batch_size must be a positive integer, got {self.sw_batch_size!r}")
        for name in ("seg_threshold", "pcr_threshold"):
            value = getattr(self, name)
            if not (_is_number(value) and 0 <= value <= 1):
                raise SettingsError(f"{name} must be a probability in [0, 1], got {value!r}")
        if not (_is_number(self.pcr_temperature) and self.pcr_temperature > 0):
            raise SettingsError(f"pcr_temperature must be a positive number, got {self.pcr_temperature!r}")

    @classmethod
    def from_config(cls, config: dict, **overrides) -> InferenceSettings:
        inf = dict(config.get("inference", {}))
        pre = config.get("preprocess", {})
        if "spacing" in pre:
            pre = {**pre, "spacing": tuple(pre["spacing"])}
        if pre.get("clip_percentiles") is not None:
            pre["clip_percentiles"] = tuple(pre["clip_percentiles"])
        values = {k: v for k, v in inf.items() if k in cls.__dataclass_fields__ and k != "preprocess"}
        if isinstance(values.get("roi_size"), list):
            values["roi_size"] = tuple(values["roi_size"])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(preprocess=PreprocessConfig(**pre), **values)


def _flip_passes(tta: bool) -> list[tuple[int, ...]]:
    # Spatial dims of [B, T, D, H, W] are 2, 3, 4.
    return [(), (2,), (3,), (4,)] if tta else [()]


def predict_volume(model: torch.nn.Module, image: torch.Tensor, phase_time: torch.Tensor,
                   settings: InferenceSettings, phase_mask: torch.Tensor | None = None,
                   acquisition: torch.Tensor | None = None) -> tuple[np.ndarray, float]:
    """Segment one preprocessed case and predict its pCR logit: `predict_volume_parts` without the logit's terms."""
    prob, logit, _ = predict_volume_parts(model, image, phase_time, settings, phase_mask, acquisition)
    return prob, logit


@torch.no_grad()
def predict_volume_parts(model: torch.nn.Module, image: torch.Tensor, phase_time: torch.Tensor,
                         settings: InferenceSettings, phase_mask: torch.Tensor | None = None,
                         acquisition: torch.Tensor | None = None) -> tuple[np.ndarray, float, dict[str, float]]:
    """Segment one preprocessed case and predict its pCR logit and the logit's terms.

    Args:
        model: an `MTLModel` in eval mode.
        image: [T, D, H, W] preprocessed phases.
        phase_time: [T] seconds after pre-contrast (NaN unknown).
        settings: window size, overlap, TTA.
        phase_mask: [T] bool, default all True.
        acquisition: [5] the case's `data.dataset.acquisition_vector` (the pCR head's concentration features
            need it; None = unknown).

    Returns:
        (tumour probability [D, H, W] float32 on the preprocessed grid, calibrated pCR logit, the calibrated logit's
        terms by pathway, `PCRHead.parts`: {"tokens", "learned", "kinetic"} as the head has them; they sum to the
        logit).
    """
    device = next(model.parameters()).device
    x = image.unsqueeze(0).to(device, torch.float32)  # [1, T, D, H, W]
    t = phase_time.unsqueeze(0).to(device)
    m = (torch.ones(image.shape[0], dtype=torch.bool) if phase_mask is None else phase_mask).unsqueeze(0).to(device)

    def seg_only(window: torch.Tensor) -> torch.Tensor:
        # MONAI slides over dims 2.. and calls with [n, T, d, h, w]; phases travel as channels.
        n = window.shape[0]
        return model(window, phase_mask=m.expand(n, -1), phase_time=t.expand(n, -1))["seg_logits"].softmax(1)

    roi = settings.roi_size
    windows = settings.sw_batch_size or default_sw_batch_size(roi, device)
    prob = torch.zeros((1, 1, *x.shape[2:]), device=device)
    for dims in _flip_passes(settings.tta_flips):
        xi = x.flip(dims) if dims else x
        p = sliding_window_inference(xi, roi, sw_batch_size=windows, predictor=seg_only, overlap=settings.overlap,
                                     mode="gaussian", padding_mode="constant")
        p = p[:, 1:].sum(1, keepdim=True)
        prob += p.flip(dims) if dims else p
    prob /= len(_flip_passes(settings.tta_flips))

    # The pCR window follows the rule of training's tumour crops (`data.window.tumour_window`).
    window = tumour_window(x, prob[0, 0], roi, settings.seg_threshold)
    logits, parts = [], []
    for dims in _flip_passes(settings.tta_flips):
        w = window.flip(dims) if dims else window
        acq = None if acquisition is None else acquisition.reshape(1, -1).to(device, torch.float32)
        out = model(w, phase_mask=m, phase_time=t, acquisition=acq)
        logits.append(out["pcr_logits"].float())
        parts.append(out.get("pcr_parts", {}))
    pcr_logit = float(torch.stack(logits).mean()) / settings.pcr_temperature
    terms = {name: float(torch.stack([p[name].float() for p in parts]).mean()) / settings.pcr_temperature
             for name in parts[0]}
    return prob[0, 0].float().cpu().numpy(), pcr_logit, terms


def postprocess_mask(prob: np.ndarray, case: Case, settings: InferenceSettings) -> np.ndarray:
    """Threshold, clip to the breast box, optionally keep the largest component. prob [D, H, W] original grid."""
    mask = (prob >= settings.seg_threshold).astype(np.uint8)
    if case.breast_box is not None:
        x0, x1, y0, y1, z0, z1 = case.breast_box
        box = np.zeros_like(mask)
        box[x0:x1, y0:y1, z0:z1] = 1
        mask *= box
    if settings.largest_component and mask.any():
        labels, n = ndimage.label(mask)
        if n > 1:
            sizes = ndimage.sum(mask, labels, index=range(1, n + 1))
            mask = (labels == int(np.argmax(sizes)) + 1).astype(np.uint8)
    return mask


def predict_case(model: torch.nn.Module, case: Case, settings: InferenceSettings,
                 terms: dict[str, float] | None = None) -> tuple[np.ndarray, dict, float]:
    """Preprocess, predict and map back one case. Returns (mask on the original grid, geometry, pCR probability);
    ``terms``, when given, receives the calibrated pCR logit's terms by pathway (`predict_volume_parts`)."""
    pre = preprocess_case(case, settings.preprocess)
    acquisition = acquisition_vector(pre.info.get("normalization"), pre.info.get("meta"))
    prob, logit, parts = predict_volume_parts(model, torch.from_numpy(pre.image), torch.from_numpy(pre.phase_time),
                                              settings, acquisition=acquisition)
    if terms is not None:
        terms.update(parts)
    geometry = pre.info["geometry"]
    prob_orig = to_original_space(prob, geometry, interpolator="linear", default=0.0)
    return postprocess_mask(prob_orig, case, settings), geometry, 1.0 / (1.0 + math.exp(-logit))


def read_weights_config(weights: Path | str) -> dict:
    """`config.json` of an exported weights folder (or a Hub id in the local cache), with a message that says
    what to do when it is not one.

    Raises:
        FileNotFoundError: the folder, its config.json or its model.safetensors is missing.
        WeightsError: config.json is not a JSON object; a Hub-style id that is not in the local cache.
    """
    weights = resolve_weights(weights)
    if not weights.is_dir():
        raise FileNotFoundError(f"weights folder {weights} does not exist")
    missing = [name for name in ("config.json", "model.safetensors") if not (weights / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{weights} is not an exported weights folder: no {' or '.join(missing)} in it "
            "(make one from a training checkpoint with `mtl-breast export --ckpt RUN/checkpoints/last.ckpt --out DIR`)")
    return weights_and_config(weights)[1]


def load_joint_model(weights: Path | str, device: str | None = None) -> tuple[torch.nn.Module, dict]:
    """Load exported joint segmentation + pCR weights for inference: (model in eval mode on `device`, config).

    Raises FileNotFoundError / WeightsError naming the folder when it holds no weights, or holds weights of
    another kind of model (an MAE pretrainer or a bare encoder cannot segment).
    """
    config = read_weights_config(weights)
    model = load_pretrained(weights)
    if not isinstance(model, MTLModel):
        raise WeightsError(
            f"{weights} holds {config.get('arch')!r} weights ({type(model).__name__}), not a joint segmentation + pCR "
            "model: fine-tune one (`mtl-breast finetune fit --model.pretrained <these weights>`) and export it")
    return model.to(check_device(device)), config
