"""One preprocessing function for training and inference, and its inverse (the dataset driver is `data.build`).

`preprocess_case` turns a `Case` into arrays on one grid:

1. read the phases as float32 (`data.volumes.read_volume`: geometry by SimpleITK, NIfTI voxels by nibabel); the
   reference grid is phase 1, the first post-contrast, where the expert mask is drawn (phase 0 when
   there is only one); a volume that is not 3-D, or whose header spacing/orientation is invalid, is
   refused, and so is a phase covering less than half of the region taken from the reference (step 2);
2. crop the reference grid to the breast box plus a margin (box in reference array indices, x = array
   axis 0, exclusive maxima; clipped to the image);
3. reorient the cropped grid with the axis permutation/flips of `sitk.DICOMOrient` and give it the
   target spacing; its physical extent is kept (first and last voxel edges stay put);
4. resample every phase straight from its file onto that output grid (linear) -- one interpolation,
   so phases on a slightly different grid are aligned to phase 1 on the way -- and the mask (nearest),
   which must hold labels 0 and 1 only;
5. optionally clip intensities to percentiles, then z-score ALL phases with ONE mean/std computed over
   every voxel of every phase (air included: it is a stable reference, and a per-phase or
   foreground-only statistic would change with enhancement), so relative enhancement survives.

`info["geometry"]` records the reference grid, the crop and the output grid; `to_original_space`
maps predictions back onto the reference grid so masks are written with the original affine.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from mtl_breast.data.case import Case, CaseError, check_times, source_fingerprint
from mtl_breast.data.volumes import read_volume

FORMAT_VERSION = 1  # bump when the output of preprocess_case changes for the same config
_INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline}
_AXIS_PAIRS = ("RL", "AP", "SI")
# Phases a case may have: a pre-contrast and at least one post-contrast phase (kinetics need both), and at most the
# phase-index table of the registry's encoders (`max_phases` = 8). A case outside is refused here, naming it, rather
# than cached and then failing in the middle of training.
MIN_PHASES, MAX_PHASES = 2, 8
_CLIP_SAMPLES = 2_000_000  # percentiles are estimated on at most this many evenly strided voxels
# PreprocessConfig.cache_dtype -> the type `data.cache.CaseCache` stores the normalised phases in.
CACHE_DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass(frozen=True)
class PreprocessConfig:
    """Preprocessing parameters; `key()` names the cache folder they produce.

    Attributes:
        spacing: target spacing in mm along the output image axes (x, y, z in SimpleITK order).
        orientation: `sitk.DICOMOrient` code: each letter names where an increasing image axis points
            (DICOM/nibabel convention, so ITK's identity direction is "LPS"; "RAS" = nibabel's RAS+).
        crop_to_breast: crop to `Case.breast_box` when the case has one.
        margin_mm: margin added around the breast box on every side.
        clip_percentiles: (low, high) percentiles clipped before normalisation, over all phases; None = off.
        cache_dtype: how the training cache stores the normalised phases, "float16" (half the bytes; rounding
            error at most 2^-11 of a value, docs/PERFORMANCE.md) or "float32". Arrays in memory are float32.
    """

    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    orientation: str = "RAS"
    crop_to_breast: bool = True
    margin_mm: float = 10.0
    clip_percentiles: tuple[float, float] | None = None
    cache_dtype: str = "float16"

    def __post_init__(self):
        spacing = tuple(float(s) for s in self.spacing)
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ValueError(f"spacing must be 3 positive numbers, got {self.spacing}")
        code = str(self.orientation).upper()
        if sorted(next((i for i, pair in enumerate(_AXIS_PAIRS) if c in pair), -1) for c in code) != [0, 1, 2]:
            raise ValueError(f"orientation must take one letter from each of R/L, A/P, S/I, got {self.orientation!r}")
        if self.margin_mm < 0:
            raise ValueError(f"margin_mm must be >= 0, got {self.margin_mm}")
        clip = self.clip_percentiles
        if clip is not None:
            clip = tuple(float(c) for c in clip)
            if len(clip) != 2 or not 0.0 <= clip[0] < clip[1] <= 100.0:
                raise ValueError(f"clip_percentiles must be (low, high) with 0 <= low < high <= 100, got {clip}")
        if self.cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"cache_dtype must be one of {sorted(CACHE_DTYPES)}, got {self.cache_dtype!r}")
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "orientation", code)
        object.__setattr__(self, "margin_mm", float(self.margin_mm))
        object.__setattr__(self, "crop_to_breast", bool(self.crop_to_breast))
        object.__setattr__(self, "clip_percentiles", clip)

    def key(self) -> str:
        """Short stable hash of the fields and `FORMAT_VERSION` (12 hex digits)."""
        text = json.dumps({**asdict(self), "format_version": FORMAT_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class PreprocessedCase:
    """A case on its output grid.

    Attributes:
        image: float32 [T, D, H, W] normalised phases (D H W = SimpleITK array axes of the output grid).
        label: uint8 [D, H, W] expert mask, or None.
        phase_time: float32 [T] seconds after the pre-contrast acquisition, NaN when unknown.
        info: JSON-serialisable: patient_id, pcr (None if unknown), meta, num_phases, has_label,
            source, geometry, normalization, assumed (`acquisition.assumed_values`: the acquisition values the
            kinetic features assume for the case, e.g. {"flip_angle": 12.0, "tumour_t10_s": 1.1, ...}).
    """

    image: np.ndarray
    label: np.ndarray | None
    phase_time: np.ndarray
    info: dict[str, Any]


# ---------------------------------------------------------------------------------------------- grids
def _grid(image: sitk.Image) -> dict[str, list]:
    return {"size": list(image.GetSize()), "spacing": list(image.GetSpacing()), "origin": list(image.GetOrigin()),
            "direction": list(image.GetDirection())}


def _resample(image: sitk.Image, grid: dict, interpolator: int, default: float = 0.0,
              pixel: int = sitk.sitkUnknown) -> sitk.Image:
    """Resample `image` onto `grid` (physical space, identity transform) without allocating a reference image."""
    f = sitk.ResampleImageFilter()
    f.SetSize([int(s) for s in grid["size"]])
    f.SetOutputSpacing(grid["spacing"])
    f.SetOutputOrigin(grid["origin"])
    f.SetOutputDirection(grid["direction"])
    f.SetInterpolator(interpolator)
    f.SetDefaultPixelValue(float(default))
    f.SetOutputPixelType(pixel)
    return f.Execute(image)


def _coverage(moving: dict, target: dict, points: int = 12) -> float:
    """Fraction of `target`'s volume that lies inside `moving`'s field of view.

    Measured on a lattice of up to `points`^3 voxel centres of `target` mapped into `moving`'s continuous
    index space, so rotated and oblique grids count what they really cover (bounding boxes would not).
    """
    axes = [np.linspace(0, s - 1, min(int(s), points)) for s in target["size"]]
    idx = np.stack(np.meshgrid(*axes, indexing="ij")).reshape(3, -1)
    physical = np.asarray(target["origin"])[:, None] + \
        np.reshape(target["direction"], (3, 3)) @ (np.asarray(target["spacing"])[:, None] * idx)
    to_physical = np.reshape(moving["direction"], (3, 3)) * np.asarray(moving["spacing"])[None, :]
    inside_index = np.linalg.solve(to_physical, physical - np.asarray(moving["origin"])[:, None])
    size = np.asarray(moving["size"], dtype=float)[:, None]
    return float(((inside_index >= -0.5) & (inside_index <= size - 0.5)).all(0).mean())


def _crop(reference: dict, box: tuple[int, ...], margin_mm: float) -> tuple[list[int], list[int]]:
    """(index, size) of the breast box + margin in reference image index order (x, y, z), clipped."""
    index, size = [], []
    for axis in range(3):  # image axis i is array axis 2 - i; the box is in array order
        lo, hi = box[2 * (2 - axis)], box[2 * (2 - axis) + 1]
        margin = int(round(margin_mm / reference["spacing"][axis]))
        lo, hi = max(0, lo - margin), min(reference["size"][axis], hi + margin)
        index.append(lo)
        size.append(hi - lo)
    return index, size


def _oriented(grid: dict, code: str) -> dict:
    """The grid as `sitk.DICOMOrient(image, code)` would return it: axes permuted and flipped, voxels unmoved."""
    d = np.reshape(grid["direction"], (3, 3))
    current = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(grid["direction"])
    size, spacing, cols, far = [], [], [], np.zeros(3)
    for letter in code:
        pair = next(p for p in _AXIS_PAIRS if letter in p)
        axis = next(i for i, c in enumerate(current) if c in pair)
        flip = current[axis] != letter
        size.append(grid["size"][axis])
        spacing.append(grid["spacing"][axis])
        cols.append(-d[:, axis] if flip else d[:, axis])
        far[axis] = grid["size"][axis] - 1 if flip else 0
    origin = np.asarray(grid["origin"]) + d @ (np.asarray(grid["spacing"]) * far)
    direction = np.stack(cols, axis=1).ravel().tolist()  # columns are the new axes
    return {"size": size, "spacing": spacing, "origin": origin.tolist(), "direction": direction}


def _respaced(grid: dict, spacing: tuple[float, float, float]) -> dict:
    """Same physical extent, new spacing: the outer voxel edges stay where they were."""
    old = np.asarray(grid["spacing"])
    new = np.asarray(spacing)
    size = [max(1, int(round(n))) for n in np.asarray(grid["size"]) * old / new]
    origin = np.asarray(grid["origin"]) + np.reshape(grid["direction"], (3, 3)) @ ((new - old) / 2)
    return {"size": size, "spacing": new.tolist(), "origin": origin.tolist(), "direction": list(grid["direction"])}


# ---------------------------------------------------------------------------------------------- one case
def _read_phase(path: Path, patient_id: str) -> sitk.Image:
    image = read_volume(path, patient_id)
    array = sitk.GetArrayViewFromImage(image)
    if array.min() == array.max():
        raise CaseError(patient_id, path, f"image is empty (every voxel is {array.min()})")
    return image


def _read_mask(path: Path, reference: sitk.Image, patient_id: str) -> sitk.Image:
    mask = read_volume(path, patient_id, what="mask")
    if mask.GetSize() != reference.GetSize():
        raise CaseError(patient_id, path, f"mask size {mask.GetSize()} differs from the reference phase "
                                          f"{reference.GetSize()}")
    spacing = np.asarray(reference.GetSpacing())
    # Same voxels under float noise of the header: spacing and direction to 1e-3, origin within half a voxel.
    if (np.abs(np.subtract(mask.GetSpacing(), spacing)) > 1e-3 * spacing).any() \
            or np.abs(np.subtract(mask.GetDirection(), reference.GetDirection())).max() > 1e-3 \
            or np.abs(np.subtract(mask.GetOrigin(), reference.GetOrigin())).max() > 0.5 * spacing.min():
        raise CaseError(patient_id, path, "mask geometry (spacing/origin/direction) differs from the reference phase")
    array = sitk.GetArrayViewFromImage(mask)
    rounded = np.rint(array)
    # Labels 0 (background) and 1 (tumour) only, within float noise: a multi-label mask would reach the loss's
    # one-hot encoding and fail there, far from the file.
    if ((rounded != 0) & (rounded != 1)).any() or (np.abs(array - rounded) > 1e-3).any():
        found = np.unique(array)
        shown = ", ".join(f"{v:g}" for v in found[:8]) + (f", ... ({len(found)} values)" if len(found) > 8 else "")
        raise CaseError(patient_id, path, f"mask labels must be 0 (background) and 1 (tumour), found {{{shown}}}")
    labels = sitk.GetImageFromArray(rounded.astype(np.uint8))
    labels.CopyInformation(reference)
    return labels


def preprocess_case(case: Case, config: PreprocessConfig) -> PreprocessedCase:
    """Read, align, crop, reorient, resample and normalise one case (module docstring, steps 1-5).

    Raises:
        CaseError: naming the case and file, for unreadable/non-3-D/NaN/empty images, invalid header spacing or
            direction, phases that do not cover the reference phase's region, a mask that does not match its
            image or holds labels other than 0/1, a box outside the image, acquisition times that are not
            one per phase and strictly increasing, or fewer than `MIN_PHASES` or more than `MAX_PHASES` phases.
    """
    pid, paths = case.patient_id, [Path(p) for p in case.image_paths]
    if not paths:
        raise CaseError(pid, None, "no phase images")
    if not MIN_PHASES <= len(paths) <= MAX_PHASES:
        raise CaseError(pid, paths[0].parent, f"{len(paths)} phase file(s) ({', '.join(p.name for p in paths)}); a "
                                              f"DCE-MRI case needs a pre-contrast and at least one post-contrast "
                                              f"phase, {MIN_PHASES} to {MAX_PHASES} phases")
    times = case.acquisition_times
    if times is not None:
        if len(times) != len(paths):
            raise CaseError(pid, case.info_path, f"{len(times)} acquisition times for {len(paths)} phases")
        times = check_times(times, pid, case.info_path)
    ref_index = 1 if len(paths) > 1 else 0
    reference, ref_path = _read_phase(paths[ref_index], pid), paths[ref_index]
    ref_grid = _grid(reference)
    crop_index, crop_size = [0, 0, 0], list(ref_grid["size"])
    if config.crop_to_breast and case.breast_box is not None:
        crop_index, crop_size = _crop(ref_grid, case.breast_box, config.margin_mm)
        if min(crop_size) <= 0:
            raise CaseError(pid, case.info_path, f"breast box {case.breast_box} lies outside the image "
                                                 f"(array shape {ref_grid['size'][::-1]})")
    cropped = {**ref_grid, "size": crop_size, "origin": list(reference.TransformIndexToPhysicalPoint(crop_index))}
    out_grid = _respaced(_oriented(cropped, config.orientation), config.spacing)

    # One phase in memory at a time: read, check it covers the region taken from phase 1, resample straight onto
    # the output grid. A phase elsewhere in space (wrong origin, orientation or extent) would enter as zeros.
    image = np.empty((len(paths), *reversed(out_grid["size"])), dtype=np.float32)
    for k, path in enumerate(paths):
        phase = reference if k == ref_index else _read_phase(path, pid)
        covered = 1.0 if k == ref_index else _coverage(_grid(phase), out_grid)
        if covered < 0.5:
            raise CaseError(pid, path, f"covers {covered:.0%} of the reference phase's field of view ({ref_path}, "
                                       f"the region preprocessing keeps); cannot resample it onto phase {ref_index}: "
                                       "check its origin, spacing and direction")
        resampled = _resample(phase, out_grid, sitk.sitkLinear, pixel=sitk.sitkFloat32)
        image[k] = sitk.GetArrayViewFromImage(resampled)  # a view does not keep its image alive: hold `resampled`
    label = None
    if case.mask_path is not None:
        mask = _read_mask(Path(case.mask_path), reference, pid)
        label = sitk.GetArrayFromImage(_resample(mask, out_grid, sitk.sitkNearestNeighbor, pixel=sitk.sitkUInt8))

    clip = None
    if config.clip_percentiles is not None:
        sample = image.ravel()[:: max(1, image.size // _CLIP_SAMPLES)]
        clip = [float(v) for v in np.percentile(sample, config.clip_percentiles)]
        np.clip(image, clip[0], clip[1], out=image)
    mean, std = float(image.mean(dtype=np.float64)), float(image.std(dtype=np.float64))
    if not std > 0:
        raise CaseError(pid, ref_path, "image is constant inside the cropped region")
    image -= mean
    image /= std

    phase_time = np.array(times if times is not None else [math.nan] * len(case.image_paths), dtype=np.float32)
    info = {
        "patient_id": pid,
        "pcr": None if math.isnan(case.pcr) else float(case.pcr),
        "meta": dict(case.meta),
        "num_phases": len(case.image_paths),
        "has_label": label is not None,
        "source": {"images": [str(p) for p in case.image_paths],
                   "mask": None if case.mask_path is None else str(case.mask_path),
                   "fingerprint": source_fingerprint(case)},
        "geometry": {"reference": ref_grid, "reference_phase": ref_index, "crop_index": crop_index,
                     "crop_size": crop_size, "orientation": config.orientation, "output": out_grid},
        "normalization": {"mean": mean, "std": std, "clip": clip, "background": float(image.min())},
        # The acquisition values the kinetic features will assume for this case (none of them is in the image).
        "assumed": case.assumed(),
    }
    return PreprocessedCase(image=image, label=label, phase_time=phase_time, info=info)


# ---------------------------------------------------------------------------------------------- inverse
def original_image_reference(geometry: dict) -> sitk.Image:
    """An empty uint8 image on the original (reference phase) grid, to copy the affine from when writing."""
    ref = geometry["reference"]
    image = sitk.Image([int(s) for s in ref["size"]], sitk.sitkUInt8)
    image.SetSpacing(ref["spacing"])
    image.SetOrigin(ref["origin"])
    image.SetDirection(ref["direction"])
    return image


def to_original_space(volume: np.ndarray, geometry: dict, interpolator: str = "linear",
                      default: float = 0.0) -> np.ndarray:
    """Map an array on the cache grid back onto the original reference grid.

    Args:
        volume: [D, H, W] or [K, D, H, W] on the output grid of `geometry` (e.g. a label map or K
            class probabilities).
        geometry: `info["geometry"]` of the case.
        interpolator: "linear" (probabilities, images), "nearest" (label maps) or "bspline".
        default: value outside the cropped region.

    Returns:
        Array [D0, H0, W0] or [K, D0, H0, W0] in SimpleITK array order of the original reference
        phase, same dtype as `volume` (bool included).
    """
    if interpolator not in _INTERPOLATORS:
        raise ValueError(f"interpolator must be one of {sorted(_INTERPOLATORS)}, got {interpolator!r}")
    array = np.asarray(volume)
    expected = tuple(reversed(geometry["output"]["size"]))
    if array.ndim not in (3, 4) or array.shape[-3:] != expected:
        raise ValueError(f"volume shape {array.shape} does not end with the cache grid shape {expected}")
    dtype = array.dtype
    # SimpleITK has no bool or float16 pixels.
    work = array.astype(np.uint8) if dtype == np.bool_ else array.astype(np.float32) if dtype == np.float16 else array
    out = []
    for channel in work.reshape(-1, *expected):
        image = sitk.GetImageFromArray(np.ascontiguousarray(channel))
        image.SetSpacing(geometry["output"]["spacing"])
        image.SetOrigin(geometry["output"]["origin"])
        image.SetDirection(geometry["output"]["direction"])
        out.append(sitk.GetArrayFromImage(_resample(image, geometry["reference"], _INTERPOLATORS[interpolator],
                                                    default)))
    result = np.stack(out).astype(dtype, copy=False)
    return result[0] if array.ndim == 3 else result
