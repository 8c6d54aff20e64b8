"""Rendering of one synthetic DCE-MRI case: anatomy, contrast kinetics, signal, acquisition.

The phantom lives in physical space (mm, LPS: +x left, +y posterior, +z superior). Anatomy and tissue
parameters are drawn on an isotropic "canonical" grid, the dynamic signal is computed there (kinetics and signal
equation from `tracer`, the case's physics from `population.CasePhysics`), every phase but the first
post-contrast one is moved rigidly by the case's motion, and each phase is then sampled onto the site's
acquisition grid (its spacing, orientation and origin), where the receive-coil sensitivity is already applied
and Rician noise is added. The expert mask is the tumour sampled on the first post-contrast grid, so it shares
that grid's geometry exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from mtl_breast.phantoms.population import (
    AIR,
    FAT,
    FGT,
    MUSCLE,
    R1_FIXED,
    SKIN,
    T10_FIXED,
    THORAX,
    TUMOUR,
    CasePhysics,
)
from mtl_breast.phantoms.tracer import (
    ArterialInput,
    ExponentialTable,
    etofts_concentration,
    parker_blood,
    renkin_crone_ktrans,
    spgr_signal,
    twocxm_concentration,
)

__all__ = ["AIR", "FAT", "FGT", "MUSCLE", "R1_RELAXIVITY", "SKIN", "THORAX", "TUMOUR", "Grid", "Phantom",
           "PhantomSpec", "SiteProtocol", "parker_aif", "render_phantom", "spgr_signal", "tofts_concentration"]

HAEMATOCRIT = 0.42
R1_RELAXIVITY = R1_FIXED  # the fixed-physics relaxivity (/mM/s) by field strength
# M0 relative to fibroglandular tissue with fat suppression (fat keeps a little signal); background kinetics
# (Ktrans /min, ve, vp) per tissue class; FGT and tumour are set per case.
_M0 = np.array([0.0, 0.08, 1.0, 0.8, 0.7, 0.35, 0.95], np.float32)
_KTRANS = np.array([0.0, 0.01, np.nan, 0.05, 0.06, 0.03, np.nan], np.float32)
_VE = np.array([1.0, 0.08, 0.30, 0.30, 0.12, 0.20, np.nan], np.float32)
_VP = np.array([0.0, 0.005, 0.01, 0.03, 0.03, 0.02, np.nan], np.float32)
_NECROTIC_PERFUSION = 0.03  # flow and permeability of a necrotic core relative to the viable tumour
_NECROTIC_T10 = 1.25  # a necrotic core's T10 relative to the viable tumour's


def parker_aif(t_min: np.ndarray) -> np.ndarray:
    """Plasma concentration (mM) of the Parker population AIF at `t_min` minutes after arrival (0 before)."""
    return parker_blood(t_min) / (1 - HAEMATOCRIT)


def tofts_concentration(ktrans: np.ndarray, ve: np.ndarray, vp: np.ndarray, times_s: list[float],
                        arrival_s: float) -> np.ndarray:
    """Extended Tofts concentration (mM, [T, *S], float32) driven by the Parker AIF arriving at `arrival_s`."""
    table = ExponentialTable(ArterialInput("parker", arrival_s=arrival_s, haematocrit=HAEMATOCRIT), times_s)
    ktrans, ve, vp = (np.asarray(v, dtype=np.float64) for v in (ktrans, ve, vp))
    return etofts_concentration(table, ktrans, ve, vp).astype(np.float32)


@dataclass(frozen=True)
class SiteProtocol:
    """What one acquisition site does the same way for every case.

    Attributes:
        name: dataset name (upper case), also the PID prefix.
        orientation: "axial" (index i,j,k -> x,y,z) or "sagittal" (i,j,k -> y,-z,-x).
        flip_j: mirror index axis j (a flipped axis in the affine).
        bilateral: both breasts in the field of view.
        tr_ms, flip_deg, te_ms: the nominal sequence (randomised physics varies TR a little per case).
        scale: stored intensity of fibroglandular tissue before contrast.
        dtype: "int16" or "float32", the stored voxel type.
        snr: fibroglandular signal / noise sigma.
        agents: contrast agents the site uses (`population.RELAXIVITY` keys).
    """

    name: str
    orientation: str
    flip_j: bool
    bilateral: bool
    tr_ms: float
    flip_deg: float
    te_ms: float
    scale: float
    dtype: str
    snr: float
    agents: tuple[str, ...] = ("gadopentetate",)


@dataclass
class PhantomSpec:
    """Everything drawn about one case before rendering (all that the pCR model and the images depend on).

    Tumour kinetics are physiological (plasma flow Fp and permeability-surface product PS in /min, ve, vp); the
    case's `physics.family` says which model turns them into concentration (extended Tofts through the
    Renkin-Crone Ktrans, or the two-compartment exchange model).
    """

    site: SiteProtocol
    pixel_spacing: float  # mm, in-plane
    slice_thickness: float  # mm
    times_s: list[float]  # effective acquisition time of each phase after the pre-contrast one; times_s[0] == 0
    fgt_fraction: float  # fibroglandular share of the breast (sets density a-d)
    bpe_ktrans: float  # background parenchymal enhancement (/min)
    fp: float  # tumour plasma flow (/min), mean over the viable tumour
    ps: float  # tumour permeability-surface product (/min)
    ve: float
    vp: float
    radius_mm: float  # radius of the volume-equivalent sphere of the tumour
    physics: CasePhysics = field(default_factory=lambda: _fixed_physics(1.5))
    necrotic_fraction: float = 0.0  # share of the tumour volume in a non-enhancing core
    heterogeneity: float = 0.08  # sd of ln(perfusion) across the viable tumour
    noise_factor: float = 1.0  # multiplies the site's noise sigma
    phase0_shift: bool = False  # phase 0 sampled on a grid shifted by half a voxel along index axis i

    @property
    def field_strength(self) -> float:
        return self.physics.field_strength

    @property
    def ktrans(self) -> float:
        """The tumour's Tofts Ktrans (/min) from its flow and permeability (Renkin-Crone)."""
        return float(renkin_crone_ktrans(np.float64(self.fp), np.float64(self.ps)))


def _fixed_physics(field_strength: float, tr_ms: float = 4.5, flip_deg: float = 10.0) -> CasePhysics:
    return CasePhysics(field_strength, tr_ms, 2.0, flip_deg, "fixed", R1_FIXED[field_strength],
                       tuple(float(v) for v in T10_FIXED[field_strength]), ArterialInput("parker"))


@dataclass
class Grid:
    """Geometry of one stored volume, as SimpleITK holds it (index order i, j, k)."""

    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]  # row-major 3x3, column c = physical direction of index axis c


@dataclass
class Phantom:
    """One rendered case. Arrays are in SimpleITK array order [k, j, i] (k = slice axis = box `x`)."""

    phases: list[np.ndarray]
    grids: list[Grid]
    mask: np.ndarray  # uint8, on grids[1]
    breast_box: tuple[int, int, int, int, int, int]  # x_min, x_max, y_min, y_max, z_min, z_max (exclusive max)
    truth: dict = field(default_factory=dict)  # what rendering drew (motion, core), for the truth files only


def _field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field (Gaussian-filtered white noise)."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return (f - f.mean()) / (f.std() + 1e-8)


def _anatomy(spec: PhantomSpec, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tissue label map, the affected breast and the tumour, on the canonical grid [x, y, z] (spacing = pixel
    spacing; one breast spans `size` voxels per side, a bilateral field of view twice that along x)."""
    h = spec.pixel_spacing
    nx = 2 * size if spec.site.bilateral else size
    shape = (nx, size, size)
    half = size * h / 2  # half field of view (mm) of one breast
    x, y, z = ((np.arange(n, dtype=np.float32) - (n - 1) / 2) * h for n in shape)
    x, y, z = x[:, None, None], y[None, :, None], z[None, None, :]

    # Breast: half ellipsoid in front of the chest wall (anterior = -y), with a smooth wobble of its outline.
    chest = 0.4 * half + 0.05 * half * _field(rng, (nx, 1, size), 6.0)  # a wavy chest-wall surface y(x, z)
    centres = (-half, half) if spec.site.bilateral else (0.0,)
    wobble = 0.08 * _field(rng, shape, 5.0)
    breasts = []
    for xc in centres:
        ax, ay, az = rng.uniform(0.75, 0.9), rng.uniform(0.95, 1.15), rng.uniform(0.72, 0.88)
        level = 1 - ((x - xc) / (ax * half)) ** 2 - ((y - chest) / (ay * half)) ** 2 - (z / (az * half)) ** 2
        breasts.append(((level + wobble) > 0) & (y < chest))
    breast = np.logical_or.reduce(breasts)
    side = int(rng.integers(len(breasts)))
    interior = ndimage.binary_erosion(breast)

    labels = np.full(shape, AIR, np.uint8)
    labels[breast] = SKIN
    labels[interior] = FAT
    labels[(y >= chest) & (y < chest + 0.2 * half)] = MUSCLE
    labels[y >= chest + 0.2 * half] = THORAX

    # Fibroglandular tissue: a smooth random field, biased towards the breast's core, thresholded so that
    # it fills exactly `fgt_fraction` of the interior.
    depth = ndimage.distance_transform_edt(interior, sampling=h).astype(np.float32)
    score = _field(rng, shape, 1.8 / h) + 1.5 * depth / (depth.max() + 1e-6)
    fgt = interior & (score > np.quantile(score[interior], 1 - spec.fgt_fraction))
    labels[fgt] = FGT

    # Tumour: a rotated ellipsoid with a lobulated outline, centred (preferably in FGT) deep enough in
    # the affected breast to fit.
    ratios = rng.uniform(0.8, 1.25, 3)
    axes = spec.radius_mm * ratios / np.prod(ratios) ** (1 / 3)
    side_depth = np.where(breasts[side], depth, 0.0)
    need = min(1.1 * axes.max() + h, 0.9 * side_depth.max())
    candidates = np.flatnonzero(side_depth >= need)
    weights = 1.0 + 3.0 * fgt.ravel()[candidates]
    centre_idx = np.unravel_index(rng.choice(candidates, p=weights / weights.sum()), shape)
    rot, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    offs = [c - c.ravel()[i] for c, i in zip((x, y, z), centre_idx, strict=True)]  # mm from the centre
    level = 1.0
    for a in range(3):  # rotated ellipsoid: sum over principal axes of (projection / semi-axis)^2
        proj = rot[0, a] * offs[0] + rot[1, a] * offs[1] + rot[2, a] * offs[2]
        level = level - (proj / axes[a]) ** 2
    level = level + rng.uniform(0.0, 0.35) * _field(rng, shape, max(spec.radius_mm / (2 * h), 1.0))
    tumour, _ = ndimage.label((level > 0) & interior)
    tumour = tumour == tumour[centre_idx] if tumour[centre_idx] else tumour > 0
    labels[tumour] = TUMOUR
    return labels, breasts[side], tumour


def _tumour_perfusion(spec: PhantomSpec, tumour: np.ndarray, h: float,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Perfusion multiplier inside the tumour (mean 1 over the viable part: log-normal heterogeneity) and the
    necrotic core (the deepest `necrotic_fraction` of the tumour, with an irregular border), whose flow and
    permeability fall to a few percent: a non-enhancing core inside an enhancing rim."""
    shape = tumour.shape
    mod = np.exp(spec.heterogeneity * _field(rng, shape, 1.2 / h))
    core = np.zeros(shape, bool)
    if spec.necrotic_fraction > 0:
        depth = ndimage.distance_transform_edt(tumour, sampling=h)
        depth = depth * (1 + 0.25 * _field(rng, shape, max(spec.radius_mm / (3 * h), 1.0)))
        core = tumour & (depth > np.quantile(depth[tumour], 1 - spec.necrotic_fraction))
    viable = tumour & ~core
    mod = mod / (mod[viable].mean() if viable.any() else 1.0)
    mod[core] *= _NECROTIC_PERFUSION
    return mod.astype(np.float32), core


def _coil_sensitivity(physics: CasePhysics, shape: tuple[int, int, int], h: float,
                      rng: np.random.Generator) -> np.ndarray:
    """Receive sensitivity on the canonical grid, mean ~1: the sum of Gaussian coil elements placed in front of
    the chest plus a floor (fixed physics: a smooth quadratic field, identical for every case of a seed)."""
    grid = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in shape), indexing="ij")
    if physics.coil_elements == 0:
        log_bias = sum(rng.normal(0, 0.12) * g + rng.normal(0, 0.06) * g * g for g in grid)
        return np.exp(log_bias).astype(np.float32)
    sens = np.full(shape, 0.35, np.float32)
    for _ in range(physics.coil_elements):
        centre = rng.uniform([-1.1, -1.3, -1.0], [1.1, -0.5, 1.0])  # anterior (-y) of the breasts
        width = rng.uniform(0.5, 0.9)
        d2 = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True))
        sens += rng.uniform(0.5, 1.0) * np.exp(-d2 / (2 * width**2))
    sens *= np.exp(0.05 * _field(rng, shape, 8.0 / h))
    return (sens / sens.mean()).astype(np.float32)


def _transmit_field(physics: CasePhysics, shape: tuple[int, int, int], h: float,
                    rng: np.random.Generator) -> np.ndarray:
    """Relative flip angle (B1) on the canonical grid: case scale, left-right gradient, smooth variation."""
    x = np.linspace(-1, 1, shape[0], dtype=np.float32)[:, None, None]
    smooth = _field(rng, shape, 10.0 / h) if physics.b1_smooth else np.zeros(shape, np.float32)
    return (physics.b1_scale * (1 + physics.b1_gradient * x + physics.b1_smooth * smooth)).astype(np.float32)


def _rigid_motion(volume: np.ndarray, physics: CasePhysics, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """The volume moved by a small rigid transform (about its centre); returns it and the largest voxel shift."""
    if physics.motion_voxels <= 0:
        return volume, 0.0
    scale = physics.motion_voxels
    rotation = Rotation.from_euler("xyz", rng.uniform(-0.5, 0.5, 3) * scale / 1.2, degrees=True).as_matrix()
    shift = rng.uniform(-1, 1, 3) * scale  # canonical voxels
    centre = (np.array(volume.shape) - 1) / 2
    offset = centre - rotation @ centre - shift
    moved = ndimage.affine_transform(volume, rotation, offset=offset, order=1, mode="nearest")
    corners = np.array(np.meshgrid(*([0, n - 1] for n in volume.shape), indexing="ij")).reshape(3, -1).T
    displacement = np.abs((corners - centre) @ rotation.T + centre - shift - corners).max()
    return moved.astype(np.float32), float(displacement)


def _target_grid(spec: PhantomSpec, canon_shape: tuple[int, int, int], centre: np.ndarray):
    """Acquisition grid: direction (columns = index axes), spacing, size (i, j, k) and origin."""
    nx, ny, nz = canon_shape
    h, s = spec.pixel_spacing, spec.slice_thickness
    if spec.site.orientation == "axial":
        direction = np.eye(3)
        extent = (nx * h, ny * h, nz * h)  # mm covered along i, j, k
    else:  # sagittal: i anterior->posterior, j superior->inferior, slices k left->right (a proper rotation)
        direction = np.array([[0.0, 0, -1], [1, 0, 0], [0, -1, 0]])
        extent = (ny * h, nz * h, nx * h)
    if spec.site.flip_j:
        direction[:, 1] *= -1
    spacing = np.array([h, h, s])
    size = np.array([max(int(round(e / sp)), 1) for e, sp in zip(extent, spacing, strict=True)])
    origin = centre - direction @ (spacing * (size - 1) / 2)
    return direction, spacing, size, origin


def _lerp(a: np.ndarray, axis: int, pos: np.ndarray) -> np.ndarray:
    """Linear interpolation of `a` at fractional indices `pos` along `axis` (clamped at the edges)."""
    pos = np.clip(pos, 0, a.shape[axis] - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, a.shape[axis] - 1)
    w = (pos - lo).astype(np.float32).reshape([-1 if d == axis else 1 for d in range(a.ndim)])
    below = np.take(a, lo, axis=axis)
    return below + (np.take(a, hi, axis=axis) - below) * w


def _resample(volume: np.ndarray, direction: np.ndarray, num_slices: int, slice_ratio: float,
              half_shift: bool = False) -> np.ndarray:
    """Trilinear sample of a canonical volume [x, y, z] on the acquisition grid, in array order [k, j, i].

    `_target_grid` centres the acquisition grid on the phantom, aligns its index axes with +-x/y/z and keeps the
    in-plane spacing of the canonical grid, so sampling reduces to an axis permutation and flips plus linear
    interpolation along the slice axis (slice_ratio = slice thickness / canonical spacing) and, for the
    pre-contrast grid shifted by half a voxel, along i. Same values as scipy's map_coordinates(order=1,
    mode="nearest") at the physical voxel centres, about ten times faster.
    """
    index_axes = (2, 1, 0)  # array axes k, j, i hold index axes 2, 1, 0
    physical = [int(np.argmax(np.abs(direction[:, c]))) for c in index_axes]
    arr = volume.transpose(physical)
    for axis, (c, a) in enumerate(zip(index_axes, physical, strict=True)):
        if direction[a, c] < 0:
            arr = np.flip(arr, axis)
    n = arr.shape[0]
    arr = _lerp(arr, 0, (np.arange(num_slices) - (num_slices - 1) / 2) * slice_ratio + (n - 1) / 2)
    if half_shift:
        arr = _lerp(arr, 2, np.arange(arr.shape[2]) + 0.5)
    return np.ascontiguousarray(arr)


def render_phantom(spec: PhantomSpec, *, size: int, rng: np.random.Generator) -> Phantom:
    """Draw the anatomy of one case and acquire all its phases.

    Args:
        spec: the case's drawn parameters.
        size: voxels per side of the canonical grid of one breast (pixel spacing apart); the stored volume has
            about `size` voxels in-plane (twice along x when bilateral) and size * pixel_spacing / slice_thickness
            slices.
        rng: the case's generator; the same spec and generator state give the same bytes.

    Returns:
        The phases (stored dtype), their grids, the expert mask, the breast box of the affected breast and what
        rendering drew (`Phantom.truth`: largest motion per phase, necrotic core size).
    """
    labels, breast, tumour = _anatomy(spec, size, rng)
    h, phys = spec.pixel_spacing, spec.physics
    randomised = phys.coil_elements > 0

    # Per-voxel tissue properties from the label map; FGT and tumour kinetics vary smoothly in space.
    m0 = _M0[labels] * (1 + 0.05 * _field(rng, labels.shape, 1.0 / h))
    t10 = np.asarray(phys.t10, np.float32)[labels]
    if randomised:  # T1 varies within a tissue too
        t10 = t10 * np.exp(0.03 * _field(rng, labels.shape, 1.5 / h))
    ktrans, ve, vp = _KTRANS[labels], _VE[labels], _VP[labels]
    is_fgt = labels == FGT
    ktrans[is_fgt] = spec.bpe_ktrans * np.exp(0.3 * _field(rng, labels.shape, 2.0 / h))[is_fgt]
    perfusion, core = _tumour_perfusion(spec, tumour, h, rng)
    fp, ps = spec.fp * perfusion[tumour], spec.ps * perfusion[tumour]
    ktrans[tumour] = renkin_crone_ktrans(fp, ps)
    ve[tumour], vp[tumour] = spec.ve, spec.vp * np.where(core[tumour], _NECROTIC_PERFUSION, 1.0)
    t10[core] *= _NECROTIC_T10

    table = ExponentialTable(phys.aif, spec.times_s)
    conc = etofts_concentration(table, ktrans.astype(np.float64), ve.astype(np.float64), vp.astype(np.float64))
    if phys.family == "2cxm":
        conc[:, tumour] = twocxm_concentration(table, fp, ps, np.full_like(fp, spec.ve), vp[tumour])
    conc = conc.astype(np.float32)
    b1 = _transmit_field(phys, labels.shape, h, rng)
    kw = dict(tr_ms=phys.tr_ms, r1=phys.r1)
    # Stored intensities are scaled so that fibroglandular tissue before contrast reads about `site.scale`.
    reference = spgr_signal(1.0, T10_FIXED[phys.field_strength][FGT], 0.0, flip_deg=phys.flip_deg, **kw)
    coil = _coil_sensitivity(phys, labels.shape, h, rng)

    centre = rng.uniform(-60.0, 60.0, 3)  # physical position of the phantom centre (scanner origins vary)
    direction, spacing, n_ijk, origin = _target_grid(spec, labels.shape, centre)

    def sample(volume: np.ndarray, half_shift: bool = False) -> np.ndarray:
        return _resample(volume, direction, int(n_ijk[2]), spacing[2] / h, half_shift)

    sigma = spec.site.scale / spec.site.snr * spec.noise_factor
    phases, grids, motion = [], [], []
    for t in range(len(spec.times_s)):
        shifted = t == 0 and spec.phase0_shift
        shift = direction[:, 0] * spacing[0] / 2 if shifted else np.zeros(3)
        clean = spgr_signal(m0, t10, conc[t], flip_deg=phys.flip_deg * b1, **kw) / reference * coil
        clean = (clean * spec.site.scale).astype(np.float32)
        moved = 0.0
        if t != 1:  # the first post-contrast phase is the expert mask's reference
            clean, moved = _rigid_motion(clean, phys, rng)
        gain = float(np.exp(rng.normal(0, phys.gain_drift))) if phys.gain_drift and t > 0 else 1.0
        img = sample(clean * gain, shifted)
        noisy = np.hypot(img + rng.normal(0, sigma, img.shape), rng.normal(0, sigma, img.shape))  # Rician
        if spec.site.dtype == "int16":
            phases.append(np.clip(np.rint(noisy), 0, 32767).astype(np.int16))
        else:
            phases.append(noisy.astype(np.float32))
        grids.append(Grid(tuple(float(v) for v in origin + shift), tuple(float(v) for v in spacing),
                          tuple(float(v) for v in direction.ravel())))
        motion.append(round(moved, 3))

    fraction = sample(tumour.astype(np.float32))  # tumour partial volume on the first post-contrast grid
    mask = (fraction >= 0.5).astype(np.uint8)
    if not mask.any():  # a tumour thinner than a slice still gets its central voxel
        mask.flat[np.argmax(fraction)] = 1
    inside = sample(breast.astype(np.float32)) >= 0.5
    box = []
    for axis in range(3):
        hit = np.flatnonzero((inside | mask.astype(bool)).any(axis=tuple(a for a in range(3) if a != axis)))
        box += [max(int(hit[0]) - 1, 0), min(int(hit[-1]) + 2, mask.shape[axis])]
    truth = {"motion_voxels_per_phase": motion, "necrotic_voxels": int(core.sum()), "tumour_voxels": int(tumour.sum()),
             "b1_at_tumour": round(float(b1[tumour].mean()), 4)}
    return Phantom(phases=phases, grids=grids, mask=mask, breast_box=tuple(box), truth=truth)
