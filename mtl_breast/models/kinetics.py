"""Contrast kinetics of the tumour: the enhancement curve under a (soft) tumour mask, summarised in a few numbers.

Breast DCE-MRI reads response from how the tumour takes up and releases contrast: how strongly it enhances in
the first post-contrast phase (wash-in), whether its signal keeps rising, plateaus or falls afterwards
(washout), and how large it is. The pCR head gets one of the feature sets below as an explicit pathway next
to the pooled encoder tokens (`models.heads.PCRHead`, ``kinetic_features``), and the baselines
(`mtl_breast.baselines`) fit a logistic regression on the same numbers from the expert mask.

Feature sets (`FEATURE_SETS`: one name per set, used by the head's ``kinetic_features``, the baselines, the model
card and the benchmarks):

- "size" and "kinetic": the baselines a reader tries first, tumour log volume alone and with the classic wash-in
  and washout ratio (columns of `tumour_kinetics`).
- "curve" (`KINETIC_FEATURES`, `tumour_kinetics`): the classic semi-quantitative summaries (Hylton's signal
  enhancement ratio, curve type) of the tumour curve in the preprocessed intensities (all phases normalised with
  ONE mean/std, so differences between phases are enhancement in units of the case's intensity spread). They
  need nothing but the image, and they mix the enhancement with the breast's composition (the z-scoring), the
  site's flip angle and TR (the signal is not linear in contrast) and its timing.
- "concentration" (`CONCENTRATION_FEATURES`, `tumour_concentration`): the contrast-agent concentration of the
  tumour, from inverting the spoiled-gradient-echo signal equation voxel by voxel with the case's field strength,
  TR and flip angle and its intensity normalisation (`data.dataset.acquisition_vector`; values a case does not give are
  assumed, `mtl_breast.acquisition`). The head then needs each case's acquisition vector at every forward.
- "rim" (`RIM_FEATURES`, the head's default) and "rim_inner" (`INNER_RIM_FEATURES`), `tumour_rim_concentration`:
  the same concentrations with a rim index and a near-surface washout in place of the core ratio, so a
  rim-enhancing tumour's washout reads on the same scale as a homogeneous one's; "rim_inner" reads them one voxel
  layer below the surface, where a boundary off by one voxel barely moves them. `concentration_feature_sets`
  computes the three concentration sets from one inversion.

References:
    Hylton N., Vascular and contrast kinetics in breast MRI (signal enhancement ratio, curve types). 2006.
    Schabel M.C., Parker D.L., Uncertainty and bias in contrast concentration measurements using spoiled gradient
    echo pulse sequences. Phys Med Biol 53:2345-2373 (2008).
"""

from __future__ import annotations

import torch
from monai.transforms.utils_morphological_ops import erode
from torch import Tensor

from mtl_breast.acquisition import (
    ACQUISITION_FIELDS,
    DEFAULT_FIELD_T,
    DEFAULT_FLIP_DEG,
    DEFAULT_INTERVAL_S,
    DEFAULT_TR_MS,
    HIGH_FIELD_T,
    R1,
    TUMOUR_T10_S,
)

__all__ = ["CONCENTRATION_FEATURES", "FEATURE_SETS", "INNER_RIM_FEATURES", "KINETIC_FEATURES", "RIM_FEATURES",
           "concentration_feature_sets", "edge_depth", "enhancing_half", "spgr_concentration",
           "tumour_concentration", "tumour_kinetics", "tumour_rim_concentration"]

# Names of the columns returned by `tumour_kinetics`, in order.
KINETIC_FEATURES = ("log_volume", "wash_in", "peak_enhancement", "washout_ratio", "washout_per_min",
                    "contrast_to_surround")
# Names of the columns returned by `tumour_concentration`, in order.
CONCENTRATION_FEATURES = ("log_volume", "ln_conc_first", "ln_conc_last", "conc_log_slope", "core_ratio")
# Names of the columns returned by `tumour_rim_concentration`, in order.
RIM_FEATURES = ("log_volume", "ln_conc_first", "ln_conc_last", "conc_log_slope", "rim_index", "shell_log_slope")
# ... and by `tumour_rim_concentration(..., surface_layers=1)`, which reads them one voxel layer below the surface.
INNER_RIM_FEATURES = ("log_volume", "ln_conc_first", "ln_conc_last", "conc_log_slope", "inner_rim_index",
                      "inner_shell_log_slope")
# Every named feature set: its columns, in order (see the module docstring).
FEATURE_SETS: dict[str, tuple[str, ...]] = {
    "size": ("log_volume",),
    "kinetic": ("log_volume", "wash_in", "washout_ratio"),
    "curve": KINETIC_FEATURES,
    "concentration": CONCENTRATION_FEATURES,
    "rim": RIM_FEATURES,
    "rim_inner": INNER_RIM_FEATURES,
}
# The values assumed where a case does not give them (field strength, TR, flip angle, phase spacing) and those
# assumed for every case (tumour T10, relaxivity by field strength) are defined once, in `mtl_breast.acquisition`,
# which also tells preprocess / predict / the model card which of them held for each case.
_EPS = 1e-6
# A tumour voxel whose pre-contrast signal is below this fraction of the tumour's median pre-contrast signal has no
# measurable concentration: S/S0 there is a ratio of noise to noise (air, or a region outside the pre-contrast
# phase's field of view that resampling filled with 0), and 16-bit rounding alone can move it from 0 to a
# saturated 100+ mM that swamps the tumour's mean.
_MIN_BASELINE_FRACTION = 0.1
_MAX_DEPTH = 8  # voxels; deeper voxels of a large tumour share one depth for `rim_index`


def _check_inputs(image: Tensor, tumour_prob: Tensor) -> None:
    if image.ndim != 5 or tumour_prob.ndim != 5 or tumour_prob.shape[1] != 1:
        raise ValueError(f"need image [B, T, D, H, W] and tumour_prob [B, 1, D, H, W], got {tuple(image.shape)} "
                         f"and {tuple(tumour_prob.shape)}")
    if image.shape[1] < 2:
        raise ValueError(f"kinetics need a pre-contrast and a post-contrast phase, got T = {image.shape[1]}")


def tumour_kinetics(image: Tensor, tumour_prob: Tensor, phase_mask: Tensor | None = None,
                    phase_time: Tensor | None = None) -> Tensor:
    """Kinetic features of the tumour in each volume.

    Args:
        image: ``[B, T, D, H, W]`` preprocessed phases, phase 0 pre-contrast, phase 1 the first post-contrast.
        tumour_prob: ``[B, 1, D, H, W]`` tumour probability or mask (weights of the tumour curve).
        phase_mask: bool ``[B, T]``, False = padded/missing phase; None = all real.
        phase_time: ``[B, T]`` seconds after pre-contrast, NaN unknown; None = unknown.

    Returns:
        ``[B, 6]`` float32, columns `KINETIC_FEATURES`:
        log_volume: ``log(1 + sum p) - 6`` (voxels of the preprocessed grid; 6 centres a ~1 cm tumour near 0);
        wash_in: ``S_1 - S_0`` of the tumour curve;
        peak_enhancement: ``max_t S_t - S_0`` over real post-contrast phases;
        washout_ratio: ``(S_last - S_1) / (|S_1 - S_0| + 0.1)``, clipped to [-2, 2] (negative = washout);
        washout_per_min: the same ratio per minute between phase 1 and the last real phase, clipped to [-2, 2];
        contrast_to_surround: wash-in of the tumour minus wash-in of the rest of the volume.
        With fewer than 3 real phases the washout columns are 0; with no tumour probability all are finite.
    """
    _check_inputs(image, tumour_prob)
    b, t = image.shape[:2]
    x = image.float().flatten(2)  # [B, T, V]
    p = tumour_prob.float().flatten(1)  # [B, V]
    real = torch.ones(b, t, dtype=torch.bool, device=image.device) if phase_mask is None else phase_mask.bool()
    x = torch.where(real[:, :, None], x, 0.0)  # padded phases may hold anything

    mass = p.sum(dim=1)  # [B]
    curve = torch.einsum("btv,bv->bt", x, p) / (mass[:, None] + _EPS)  # tumour curve [B, T]
    rest = 1.0 - p
    surround = torch.einsum("btv,bv->bt", x, rest) / (rest.sum(dim=1)[:, None] + _EPS)

    enhancement = curve - curve[:, :1]  # [B, T], 0 at phase 0
    wash_in = enhancement[:, 1]
    post = real.clone()
    post[:, 0] = False
    peak = torch.where(post, enhancement, torch.finfo(enhancement.dtype).min).amax(dim=1)
    peak = torch.where(post.any(dim=1), peak, 0.0)
    # The last real phase (phase dropout may hide a middle one, padding hides the tail).
    index = torch.arange(t, device=image.device)
    last = torch.where(real, index, 0).amax(dim=1)  # [B]
    s_last = curve.gather(1, last[:, None])[:, 0]
    has_washout = last >= 2
    ratio = (s_last - curve[:, 1]) / (wash_in.abs() + 0.1)
    ratio = torch.where(has_washout, ratio.clamp(-2.0, 2.0), 0.0)
    if phase_time is None:
        phase_time = torch.full((b, t), float("nan"), device=image.device)
    dt = phase_time.float().gather(1, last[:, None])[:, 0] - phase_time.float()[:, 1]
    fallback = (last - 1).clamp_min(1).float() * DEFAULT_INTERVAL_S
    dt = torch.where(torch.isfinite(dt) & (dt > 0), dt, fallback)
    per_min = torch.where(has_washout, (ratio / (dt / 60.0)).clamp(-2.0, 2.0), 0.0)
    contrast = wash_in - (surround[:, 1] - surround[:, 0])
    log_volume = torch.log1p(mass) - 6.0
    return torch.stack([log_volume, wash_in, peak, ratio, per_min, contrast], dim=1)


def spgr_concentration(signal: Tensor, baseline: Tensor, field_t: Tensor, tr_ms: Tensor, flip_deg: Tensor) -> Tensor:
    """Contrast concentration (mM) from spoiled-gradient-echo signal and its pre-contrast baseline.

    S = M0 sin(a) (1 - E) / (1 - cos(a) E) with E = exp(-TR R1) and R1 = 1/T10 + r1 C: the ratio S / S0 fixes E
    given the pre-contrast E0 = exp(-TR / T10), hence R1 and C. Ratios beyond the signal's saturation are clipped
    to it; a non-positive baseline (background) gives C = 0 there.

    Args:
        signal: ``[B, T, V]`` signal in scanner units (all phases of a case in the same units).
        baseline: ``[B, 1, V]`` pre-contrast signal, same units.
        field_t, tr_ms, flip_deg: ``[B]`` field strength (T), repetition time (ms) and flip angle (degrees).

    Returns:
        ``[B, T, V]`` float32 concentration.
    """
    high = field_t >= HIGH_FIELD_T  # 1.5 T or 3 T tables
    t10 = torch.where(high, TUMOUR_T10_S[3.0], TUMOUR_T10_S[1.5])[:, None, None]
    r1 = torch.where(high, R1[3.0], R1[1.5])[:, None, None]
    tr = (tr_ms / 1000.0)[:, None, None]
    cos_a = torch.cos(torch.deg2rad(flip_deg))[:, None, None]
    e0 = torch.exp(-tr / t10)
    ratio = torch.where(baseline > 0, signal / baseline.clamp_min(_EPS), 1.0)
    y = (ratio * (1 - e0) / (1 - cos_a * e0)).clamp(0.0, 0.999)  # (1 - E) / (1 - cos(a) E)
    e = ((1 - y) / (1 - y * cos_a)).clamp(1e-6, 1 - 1e-9)
    return (-torch.log(e) / tr - 1.0 / t10) / r1


def enhancing_half(first: Tensor, mask: Tensor) -> Tensor:
    """``[B, V]`` float weights (0/1) of the tumour's enhancing half: the voxels of bool ``mask`` ``[B, V]`` whose
    phase-1 concentration ``first`` ``[B, V]`` is at least the tumour's median (all zero for an empty mask)."""
    # A masked median without boolean indexing: shapes stay static, so fake-tensor tracing works too.
    median = torch.where(mask, first, float("nan")).nanmedian(dim=1).values  # [B] (NaN for an empty mask)
    return (mask & (first >= median[:, None])).float()


def _concentration_curves(image: Tensor, tumour_prob: Tensor, phase_mask: Tensor | None,
                          phase_time: Tensor | None, acquisition: Tensor | None) -> dict[str, Tensor]:
    """What both concentration feature sets read: the per-voxel concentration ``conc [B, T, V]``, the tumour
    ``mask [B, V]`` (bool, seg_prob > 0.5), the ``last`` real phase ``[B]``, the ``minutes`` between phase 1 and
    it ``[B]``, whether the intensity normalisation is ``known`` ``[B]``, and the common columns ``log_volume``,
    ``c1``, ``c_last`` (mean concentration of the enhancing half, floored at 1e-3) and ``slope`` ``[B]``.
    Concentration statistics read only the ``measured`` tumour voxels ``[B, V]`` (bool): those whose pre-contrast
    signal is at least `_MIN_BASELINE_FRACTION` of the tumour's median; log_volume counts the whole mask."""
    _check_inputs(image, tumour_prob)
    b, t = image.shape[:2]
    device = image.device
    acq = torch.full((b, len(ACQUISITION_FIELDS)), float("nan"), device=device) if acquisition is None \
        else acquisition.to(device=device, dtype=torch.float32)
    offset, scale = acq[:, 0], acq[:, 1]
    field = torch.nan_to_num(acq[:, 2], nan=DEFAULT_FIELD_T)
    tr = torch.nan_to_num(acq[:, 3], nan=DEFAULT_TR_MS)
    flip = torch.nan_to_num(acq[:, 4], nan=DEFAULT_FLIP_DEG)
    known = torch.isfinite(offset) & torch.isfinite(scale)
    signal = image.float().flatten(2) * torch.nan_to_num(scale, nan=1.0)[:, None, None] \
        + torch.nan_to_num(offset, nan=0.0)[:, None, None]  # [B, T, V] scanner units
    conc = spgr_concentration(signal, signal[:, :1], field, tr, flip)  # [B, T, V]

    mask = (tumour_prob.float() > 0.5).flatten(1)  # [B, V]
    baseline = signal[:, 0]  # [B, V]
    typical = torch.where(mask, baseline, float("nan")).nanmedian(dim=1).values  # [B] (NaN for an empty mask)
    measured = mask & (baseline > _MIN_BASELINE_FRACTION * typical.clamp_min(_EPS)[:, None])  # [B, V]
    real = torch.ones(b, t, dtype=torch.bool, device=device) if phase_mask is None else phase_mask.bool()
    index = torch.arange(t, device=device)
    last = torch.where(real, index, 0).amax(dim=1)  # last real phase [B]
    if phase_time is None:
        phase_time = torch.full((b, t), float("nan"), device=device)
    minutes = (phase_time.float().gather(1, last[:, None])[:, 0] - phase_time.float()[:, 1]) / 60.0
    minutes = torch.where(torch.isfinite(minutes) & (minutes > 0), minutes,
                          (last - 1).clamp_min(1).float() * DEFAULT_INTERVAL_S / 60.0)

    first = conc[:, 1]  # [B, V]
    enhancing = enhancing_half(first, measured)  # [B, V]
    last_conc = conc.gather(1, last[:, None, None].expand(-1, 1, conc.shape[2]))[:, 0]  # [B, V]
    c1 = _masked_mean(first, enhancing).clamp_min(1e-3)
    c_last = _masked_mean(last_conc, enhancing).clamp_min(1e-3)
    slope = torch.where(last >= 2, torch.log(c_last / c1) / minutes, 0.0).clamp(-1.0, 1.0)
    return {"conc": conc, "mask": mask, "measured": measured, "last": last, "minutes": minutes, "known": known,
            "log_volume": torch.log1p(mask.float().sum(dim=1)) - 6.0, "c1": c1, "c_last": c_last, "slope": slope}


def _masked_mean(values: Tensor, weights: Tensor) -> Tensor:
    """``[B]`` mean of ``values [B, V]`` weighted by 0/1 ``weights [B, V]`` (0 where every weight is 0). No boolean
    indexing: shapes stay static, so fake-tensor tracing works too."""
    return (values * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def _finish(parts: dict[str, Tensor], values: list[Tensor]) -> Tensor:
    """``[B, 1 + len(values)]``: log volume, then the ``[B]`` columns `values`, zero without a tumour and NaN
    where the intensity normalisation is unknown."""
    out = torch.stack(values, dim=1)
    out = torch.where(parts["mask"].any(dim=1)[:, None], out, 0.0)
    out = torch.where(parts["known"][:, None], out, float("nan"))
    return torch.cat([parts["log_volume"][:, None], out], dim=1)


def tumour_concentration(image: Tensor, tumour_prob: Tensor, phase_mask: Tensor | None = None,
                         phase_time: Tensor | None = None, acquisition: Tensor | None = None) -> Tensor:
    """Concentration features of the tumour in each volume.

    The enhancing half of the tumour (voxels whose phase-1 concentration is at least the tumour's median) gives
    the curve, as a reader places the region of interest on the most enhancing part of a lesion: a rim-enhancing
    tumour's necrotic core would otherwise mix a second, slow curve into it.

    Args:
        image: ``[B, T, D, H, W]`` preprocessed phases (normalised with the case's offset and scale).
        tumour_prob: ``[B, 1, D, H, W]`` tumour mask (voxels with weight > 0.5 are the tumour).
        phase_mask: bool ``[B, T]``, False = padded/missing phase; None = all real.
        phase_time: ``[B, T]`` seconds after pre-contrast, NaN unknown; None = unknown.
        acquisition: ``[B, 5]`` in `ACQUISITION_FIELDS` order; None or NaN offset/scale = unknown.

    Returns:
        ``[B, 5]`` float32, columns `CONCENTRATION_FEATURES`:
        log_volume: as in `tumour_kinetics`;
        ln_conc_first, ln_conc_last: ln of the mean concentration (mM, floored at 1e-3) of the enhancing half at
            phase 1 and at the last real phase;
        conc_log_slope: ``ln(C_last / C_1)`` per minute between them (0 with fewer than 3 real phases), clipped to
            [-1, 1];
        core_ratio: ln of the phase-1 concentration of the tumour's core (the mask eroded by 2 voxels) over that of
            the whole tumour (0 when the core is empty): negative for rim enhancement.
        Columns 1-4 are NaN where the intensity offset/scale is unknown; a missing field strength, TR or flip angle
        takes the default of a typical protocol (`mtl_breast.acquisition`, which reports it). They leave out tumour
        voxels whose pre-contrast signal is below a tenth of the tumour's median (air, or a region the pre-contrast
        phase did not cover, filled with 0 when resampled): S/S0 has no meaning there. log_volume counts them.
    """
    parts = _concentration_curves(image, tumour_prob, phase_mask, phase_time, acquisition)
    return _finish(parts, _curve_columns(parts) + [_core_ratio(parts, tumour_prob)])


def _curve_columns(parts: dict[str, Tensor]) -> list[Tensor]:
    """ln_conc_first, ln_conc_last and conc_log_slope (``[B]`` each) from `_concentration_curves`' ``parts``."""
    return [torch.log(parts["c1"]), torch.log(parts["c_last"]), parts["slope"]]


def _core_ratio(parts: dict[str, Tensor], tumour_prob: Tensor) -> Tensor:
    """`tumour_concentration`'s core_ratio ``[B]`` from `_concentration_curves`' ``parts``."""
    measured, first = parts["measured"], parts["conc"][:, 1]  # [B, V]
    # Core: erosion by 2 voxels (a 5^3 minimum filter of the mask).
    core = (erode((tumour_prob.float() > 0.5).float(), filter_size=5).flatten(1) > 0.5) & measured
    core_first = _masked_mean(first, core.float()).clamp_min(1e-3)
    whole_first = _masked_mean(first, measured.float()).clamp_min(1e-3)
    return torch.where(core.any(dim=1), torch.log(core_first / whole_first), 0.0)


def edge_depth(mask: Tensor, max_depth: int = _MAX_DEPTH) -> Tensor:
    """``[B, 1, D, H, W]`` float depth of each voxel of the bool ``mask [B, 1, D, H, W]`` below its surface: 1 on
    the outermost layer (a voxel with a 26-neighbour outside the mask), 2 on the next, ..., capped at `max_depth`
    (chessboard distance by repeated 3^3 erosions); 0 outside. The volume's border does not count as outside, so a
    tumour cut by its window keeps its depth there."""
    current = mask.float()
    depth = torch.zeros_like(current)
    for _ in range(max_depth):
        depth = depth + current
        current = erode(current, filter_size=3)  # by one voxel
    return depth


def tumour_rim_concentration(image: Tensor, tumour_prob: Tensor, phase_mask: Tensor | None = None,
                             phase_time: Tensor | None = None, acquisition: Tensor | None = None,
                             surface_layers: int = 0) -> Tensor:
    """Rim-aware concentration features of the tumour in each volume.

    A rim-enhancing tumour (a fast-exchanging rim around a slow, necrotic core) mixes its core's slow curve into
    every region one can draw at the acquired resolution, which biases its washout towards a plateau; small ones
    have no core to detect with an erosion (`tumour_concentration`'s core_ratio is 0 for them). Two columns
    replace core_ratio: how strongly the tumour enhances at its surface rather than its centre (rim_index), and
    the washout of one voxel layer near its surface in the signal itself, where partial volume with non-enhancing
    tissue scales every phase's enhancement alike and so leaves the ratio of enhancements unchanged
    (shell_log_slope). The regression on these columns can then read a rim tumour's washout on the same scale as a
    homogeneous one's.

    Read on the outermost layer (``surface_layers=0``, `RIM_FEATURES`), both columns move with the mask's boundary:
    a mask one voxel too large puts non-enhancing tissue into the rim index and the shell. With
    ``surface_layers=1`` (`INNER_RIM_FEATURES`) the rim index leaves out the outermost layer and the shell is the
    second one, which one voxel of mask growth leaves almost unchanged but which carries more of a necrotic core's
    slow curve.

    Args: as `tumour_concentration`, and
        surface_layers: voxel layers below the tumour's surface that the two rim columns leave out (0 or more).

    Returns:
        ``[B, 6]`` float32, columns `RIM_FEATURES` (`INNER_RIM_FEATURES` with ``surface_layers=1``): log_volume,
        ln_conc_first, ln_conc_last, conc_log_slope as in `tumour_concentration`, and
        rim_index: the correlation over the tumour's voxels deeper than ``surface_layers`` between phase-1
            concentration and `edge_depth`, signed so that rim enhancement is positive (about -0.4 for homogeneous
            tumours on the phantoms, +0.4 for rim ones); 0 with fewer than two depths or no enhancement spread;
        shell_log_slope: ``ln(sum(S_last - S_0) / sum(S_1 - S_0))`` over layer ``surface_layers + 1``, per minute
            (the ratio clipped to [0.05, 20], 0 without post-contrast enhancement there or with fewer than 3 real
            phases), clipped to [-1, 1].
        Columns 1-5 are NaN where the intensity offset/scale is unknown; like `tumour_concentration`'s, they leave
        out tumour voxels without a measurable pre-contrast signal.
    """
    parts = _concentration_curves(image, tumour_prob, phase_mask, phase_time, acquisition)
    depth = edge_depth(tumour_prob.float() > 0.5).flatten(1)  # [B, V]
    return _finish(parts, _curve_columns(parts) + _rim_columns(parts, image, depth, surface_layers))


def _rim_columns(parts: dict[str, Tensor], image: Tensor, depth: Tensor, surface_layers: int) -> list[Tensor]:
    """`tumour_rim_concentration`'s rim_index and shell_log_slope (``[B]`` each) from `_concentration_curves`'
    ``parts`` and the tumour's flattened `edge_depth` ``[B, V]``."""
    if surface_layers < 0 or surface_layers >= _MAX_DEPTH - 1:
        raise ValueError(f"surface_layers must be in [0, {_MAX_DEPTH - 2}], got {surface_layers}")
    first, last, measured = parts["conc"][:, 1], parts["last"], parts["measured"]
    weights = ((depth > surface_layers) & measured).float()
    mean_first, mean_depth = _masked_mean(first, weights), _masked_mean(depth, weights)
    dc, dd = (first - mean_first[:, None]) * weights, (depth - mean_depth[:, None]) * weights
    spread = torch.sqrt((dc * dc).sum(dim=1) * (dd * dd).sum(dim=1))
    rim_index = torch.where(spread > _EPS, -(dc * dd).sum(dim=1) / spread.clamp_min(_EPS), 0.0)

    x = image.float().flatten(2)  # [B, T, V]; ratios of enhancements do not depend on the normalisation
    shell = ((depth == surface_layers + 1) & measured).float()
    wash_in = ((x[:, 1] - x[:, 0]) * shell).sum(dim=1)
    last_x = x.gather(1, last[:, None, None].expand(-1, 1, x.shape[2]))[:, 0]
    late = ((last_x - x[:, 0]) * shell).sum(dim=1)
    ratio = (late / wash_in.clamp_min(_EPS)).clamp(0.05, 20.0)
    shell_slope = torch.log(ratio) / parts["minutes"]
    shell_slope = torch.where((last >= 2) & (wash_in > 0), shell_slope, 0.0).clamp(-1.0, 1.0)
    return [rim_index, shell_slope]


def concentration_feature_sets(image: Tensor, tumour_prob: Tensor, phase_mask: Tensor | None = None,
                               phase_time: Tensor | None = None,
                               acquisition: Tensor | None = None) -> dict[tuple[str, ...], Tensor]:
    """`tumour_concentration` and `tumour_rim_concentration` at 0 and 1 surface layers from one inversion of the
    signal equation: ``{CONCENTRATION_FEATURES: [B, 5], RIM_FEATURES: [B, 6], INNER_RIM_FEATURES: [B, 6]}``, the
    same numbers as the three calls (arguments as `tumour_concentration`)."""
    parts = _concentration_curves(image, tumour_prob, phase_mask, phase_time, acquisition)
    curve = _curve_columns(parts)
    depth = edge_depth(tumour_prob.float() > 0.5).flatten(1)  # [B, V], shared by both rim sets
    return {CONCENTRATION_FEATURES: _finish(parts, curve + [_core_ratio(parts, tumour_prob)]),
            RIM_FEATURES: _finish(parts, curve + _rim_columns(parts, image, depth, 0)),
            INNER_RIM_FEATURES: _finish(parts, curve + _rim_columns(parts, image, depth, 1))}
