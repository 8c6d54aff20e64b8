"""Physics of one synthetic DCE-MRI case: anatomy, contrast kinetics, signal, acquisition.

The phantom lives in physical space (mm, LPS: +x left, +y posterior, +z superior). Anatomy and tissue
parameters are drawn on an isotropic "canonical" grid, the dynamic signal is computed there, and every
phase is then sampled onto the site's acquisition grid (its spacing, orientation and origin), where
the bias field is already applied and Rician noise is added. The expert mask is the tumour sampled on
the first post-contrast grid, so it shares that grid's geometry exactly.

Kinetics: extended Tofts model, Ct(t) = vp Cp(t) + Ktrans * int_0^t Cp(u) exp(-kep (t - u)) du with
kep = Ktrans / ve, driven by the Parker population arterial input function. Signal: spoiled gradient
echo steady state, S = M0 sin(a) (1 - E1) / (1 - cos(a) E1), E1 = exp(-TR R1), R1 = 1/T10 + r1 Ct.

References:
    Parker GJM et al., Experimentally-derived functional form for a population-averaged high-temporal-
    resolution arterial input function for DCE-MRI. Magn Reson Med 56:993-1000 (2006).
    Tofts PS et al., Estimating kinetic parameters from DCE T1-weighted MRI of a diffusable tracer:
    standardized quantities and symbols. J Magn Reson Imaging 10:223-232 (1999).
    Rakow-Penner R et al., Relaxation times of breast tissue at 1.5T and 3T measured using IDEAL.
    J Magn Reson Imaging 23:87-91 (2006) (T10 of fat and fibroglandular tissue).
    Rohrer M et al., Comparison of magnetic properties of MRI contrast media solutions at different
    magnetic field strengths. Invest Radiol 40:715-724 (2005) (r1 of Gd-DTPA in plasma).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# Parker AIF (blood concentration, mM; t in minutes). Plasma = blood / (1 - haematocrit).
_PARKER = dict(A1=0.809, A2=0.330, T1=0.17046, T2=0.365, sigma1=0.0563, sigma2=0.132,
               alpha=1.050, beta=0.1685, s=38.078, tau=0.483)
HAEMATOCRIT = 0.42

# Tissue classes of the label map and their properties. T10 in s (1.5 T, 3 T); M0 relative to
# fibroglandular tissue with fat suppression (fat keeps a little signal); kinetics (Ktrans /min, ve, vp).
AIR, FAT, FGT, SKIN, MUSCLE, THORAX, TUMOUR = range(7)
_T10 = {1.5: np.array([1.0, 0.296, 1.266, 0.90, 1.00, 1.40, 1.10], np.float32),
        3.0: np.array([1.0, 0.367, 1.445, 1.00, 1.40, 1.60, 1.30], np.float32)}
_M0 = np.array([0.0, 0.08, 1.0, 0.8, 0.7, 0.35, 0.95], np.float32)
_KTRANS = np.array([0.0, 0.01, np.nan, 0.05, 0.06, 0.03, np.nan], np.float32)  # FGT/tumour set per case
_VE = np.array([1.0, 0.08, 0.30, 0.30, 0.12, 0.20, np.nan], np.float32)
_VP = np.array([0.0, 0.005, 0.01, 0.03, 0.03, 0.02, np.nan], np.float32)
R1_RELAXIVITY = {1.5: 4.5, 3.0: 4.0}  # /mM/s


def parker_aif(t_min: np.ndarray) -> np.ndarray:
    """Plasma concentration (mM) of the Parker population AIF at `t_min` minutes after arrival (0 before)."""
    p = _PARKER
    t = np.asarray(t_min, dtype=np.float64)
    cb = p["alpha"] * np.exp(-p["beta"] * t) / (1 + np.exp(-p["s"] * (t - p["tau"])))  # washout + recirculation
    for n in (1, 2):  # first and second pass: Gaussians
        width = p[f"sigma{n}"]
        cb = cb + p[f"A{n}"] / (width * np.sqrt(2 * np.pi)) * np.exp(-((t - p[f"T{n}"]) ** 2) / (2 * width**2))
    return np.where(t > 0, cb / (1 - HAEMATOCRIT), 0.0)


def tofts_concentration(ktrans: np.ndarray, ve: np.ndarray, vp: np.ndarray, times_s: list[float],
                        arrival_s: float) -> np.ndarray:
    """Extended Tofts tissue concentration at each acquisition time.

    The convolution integral depends on a voxel only through kep, so it is tabulated once on a log grid of
    kep and interpolated per voxel: exact up to the table spacing, and vectorised over any voxel shape.

    Args:
        ktrans: transfer constant (/min), any shape S.
        ve: extravascular extracellular fraction (0, 1], shape S.
        vp: plasma fraction, shape S.
        times_s: acquisition times in seconds after the pre-contrast acquisition, length T.
        arrival_s: bolus arrival time in seconds after the pre-contrast acquisition.

    Returns:
        Concentration in mM, shape [T, *S], float32.
    """
    dt = 1.0 / 120.0  # min; 0.5 s steps resolve the 3.4 s wide first-pass peak
    log_kep = np.linspace(np.log(1e-3), np.log(50.0), 256)
    kep_table = np.exp(log_kep)
    log_kep_voxel = np.log(np.clip(ktrans / np.maximum(ve, 1e-3), 1e-3, 50.0))
    out = np.empty((len(times_s), *np.shape(ktrans)), np.float32)
    for i, t_s in enumerate(times_s):
        t = (t_s - arrival_s) / 60.0
        if t <= 0:
            out[i] = 0.0
            continue
        u = np.arange(0.0, t, dt)
        cp_u = parker_aif(u)
        integral = np.exp(-kep_table[:, None] * (t - u)[None, :]) @ cp_u * dt  # [K]
        conv = np.interp(log_kep_voxel, log_kep, integral)
        out[i] = vp * parker_aif(t) + ktrans * conv
    return out


def spgr_signal(m0: np.ndarray, t10: np.ndarray, conc: np.ndarray, *, tr_ms: float, flip_deg: float,
                r1: float) -> np.ndarray:
    """Spoiled gradient echo steady-state signal for tissue with native T10 (s) and concentration (mM)."""
    a = np.deg2rad(flip_deg)
    e1 = np.exp(-(tr_ms / 1000.0) * (1.0 / t10 + r1 * conc))
    return m0 * np.sin(a) * (1 - e1) / (1 - np.cos(a) * e1)


@dataclass(frozen=True)
class SiteProtocol:
    """What one acquisition site does the same way for every case.

    Attributes:
        name: dataset name (upper case), also the PID prefix.
        orientation: "axial" (index i,j,k -> x,y,z) or "sagittal" (i,j,k -> y,-z,-x).
        flip_j: mirror index axis j (a flipped axis in the affine).
        bilateral: both breasts in the field of view.
        tr_ms, flip_deg, te_ms: sequence parameters.
        scale: stored intensity of fibroglandular tissue before contrast.
        dtype: "int16" or "float32", the stored voxel type.
        snr: fibroglandular signal / noise sigma.
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


@dataclass
class PhantomSpec:
    """Everything drawn about one case before rendering (all that the pCR model and the images depend on)."""

    site: SiteProtocol
    field_strength: float
    pixel_spacing: float  # mm, in-plane
    slice_thickness: float  # mm
    times_s: list[float]  # acquisition time of each phase after the pre-contrast one; times_s[0] == 0
    arrival_s: float  # bolus arrival after the pre-contrast acquisition
    fgt_fraction: float  # fibroglandular share of the breast (sets density a-d)
    bpe_ktrans: float  # background parenchymal enhancement (/min)
    ktrans: float  # tumour Ktrans (/min): the mean, or the rim's for rim enhancement
    ve: float
    vp: float
    radius_mm: float  # radius of the volume-equivalent sphere of the tumour
    pattern: str  # "homogeneous", "heterogeneous" or "rim"
    noise_factor: float = 1.0  # multiplies the site's noise sigma
    phase0_shift: bool = False  # phase 0 sampled on a grid shifted by half a voxel along index axis i


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


def _tumour_modulation(spec: PhantomSpec, tumour: np.ndarray, h: float, rng: np.random.Generator) -> np.ndarray:
    """Ktrans multiplier inside the tumour: homogeneous or heterogeneous (tumour mean 1), or rim (1 at the
    edge, falling to 0.05 in a necrotic core, so that the rim stays visible through the SPGR saturation)."""
    shape = tumour.shape
    if spec.pattern == "rim":
        d = ndimage.distance_transform_edt(tumour, sampling=h)
        return (0.05 + 0.95 * (1 - d / (d.max() + 1e-6)) ** 2).astype(np.float32)
    if spec.pattern == "heterogeneous":
        mod = np.exp(0.45 * _field(rng, shape, 1.2 / h))
    else:
        mod = 1 + 0.08 * _field(rng, shape, 1.0 / h)
    return mod / mod[tumour].mean()


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
        The phases (stored dtype), their grids, the expert mask and the breast box of the affected breast.
    """
    labels, breast, tumour = _anatomy(spec, size, rng)
    h, fs = spec.pixel_spacing, spec.field_strength

    # Per-voxel tissue properties from the label map; FGT and tumour kinetics vary smoothly in space.
    m0 = _M0[labels] * (1 + 0.05 * _field(rng, labels.shape, 1.0 / h))
    t10 = _T10[fs][labels]
    ktrans, ve, vp = _KTRANS[labels], _VE[labels], _VP[labels]
    is_fgt = labels == FGT
    ktrans[is_fgt] = spec.bpe_ktrans * np.exp(0.3 * _field(rng, labels.shape, 2.0 / h))[is_fgt]
    ktrans[tumour] = spec.ktrans * _tumour_modulation(spec, tumour, h, rng)[tumour]
    ve[tumour], vp[tumour] = spec.ve, spec.vp

    conc = tofts_concentration(ktrans, ve, vp, spec.times_s, spec.arrival_s)
    kw = dict(tr_ms=spec.site.tr_ms, flip_deg=spec.site.flip_deg, r1=R1_RELAXIVITY[fs])
    reference = spgr_signal(1.0, _T10[fs][FGT], 0.0, **kw)  # fibroglandular tissue before contrast

    # Coil sensitivity: a smooth multiplicative field, identical for all phases of the case.
    shape = labels.shape
    grid = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in shape), indexing="ij")
    log_bias = sum(rng.normal(0, 0.12) * g + rng.normal(0, 0.06) * g * g for g in grid)
    bias = np.exp(log_bias).astype(np.float32)

    centre = rng.uniform(-60.0, 60.0, 3)  # physical position of the phantom centre (scanner origins vary)
    direction, spacing, n_ijk, origin = _target_grid(spec, shape, centre)
    def sample(volume: np.ndarray, half_shift: bool = False) -> np.ndarray:
        return _resample(volume, direction, int(n_ijk[2]), spacing[2] / h, half_shift)

    sigma = spec.site.scale / spec.site.snr * spec.noise_factor
    phases, grids = [], []
    for t in range(len(spec.times_s)):
        shifted = t == 0 and spec.phase0_shift
        shift = direction[:, 0] * spacing[0] / 2 if shifted else np.zeros(3)
        clean = spgr_signal(m0, t10, conc[t], **kw) / reference * bias * spec.site.scale
        img = sample(clean.astype(np.float32), shifted)
        noisy = np.hypot(img + rng.normal(0, sigma, img.shape), rng.normal(0, sigma, img.shape))  # Rician
        if spec.site.dtype == "int16":
            phases.append(np.clip(np.rint(noisy), 0, 32767).astype(np.int16))
        else:
            phases.append(noisy.astype(np.float32))
        grids.append(Grid(tuple(float(v) for v in origin + shift), tuple(float(v) for v in spacing),
                          tuple(float(v) for v in direction.ravel())))

    fraction = sample(tumour.astype(np.float32))  # tumour partial volume on the first post-contrast grid
    mask = (fraction >= 0.5).astype(np.uint8)
    if not mask.any():  # a tumour thinner than a slice still gets its central voxel
        mask.flat[np.argmax(fraction)] = 1
    inside = sample(breast.astype(np.float32)) >= 0.5
    box = []
    for axis in range(3):
        hit = np.flatnonzero((inside | mask.astype(bool)).any(axis=tuple(a for a in range(3) if a != axis)))
        box += [max(int(hit[0]) - 1, 0), min(int(hit[-1]) + 2, mask.shape[axis])]
    return Phantom(phases=phases, grids=grids, mask=mask, breast_box=tuple(box))
