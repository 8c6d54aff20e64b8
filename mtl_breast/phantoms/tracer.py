"""Contrast agent in blood and tissue: arterial input functions, two tissue kinetic models, the SPGR signal.

Everything here is a plain function of its arguments (no random draws): `population` draws the values per case,
`physics` renders them into images.

Arterial input (plasma concentration, mM), two published population forms:

- "parker": Parker et al. 2006, two Gaussians (first and second pass) plus an exponential with a sigmoid
  rise, fitted to blood curves of 23 patients at 0.1 mmol/kg; plasma = blood / (1 - haematocrit).
- "weinmann": the bi-exponential plasma decay of Weinmann et al. 1984 as used by Tofts & Kermode 1991,
  Cp(t) = D (3.99 e^{-0.144 t} + 4.78 e^{-0.0111 t}) mM (D in mmol/kg, t in min), entered through a box of
  the injection's duration (it has no first pass of its own).

Both are scaled by dose / cardiac output (a larger output dilutes the bolus), stretched in time by the
circulation's speed and dispersed by an exponential kernel (bolus spreading between the measured artery and the
tumour; Calamante 2000 uses the same kernel).

Tissue (mM), both driven by the plasma input Cp:

- extended Tofts (Tofts et al. 1999): C = vp Cp + Ktrans Cp * exp(-kep t), kep = Ktrans / ve;
- two-compartment exchange, 2CXM (Sourbron & Buckley 2011, 2013): C = Fp Cp * h with the bi-exponential
  impulse response h = [(T s+ - 1) s- exp(-s- t) + (1 - T s-) s+ exp(-s+ t)] / (s+ - s-),
  T = (vp + ve) / Fp, Tc = vp / Fp, Te = ve / PS, s+- = (T + Te +- sqrt((T + Te)^2 - 4 Tc Te)) / (2 Tc Te).

Both need convolutions of Cp with exp(-k t) only, so `ExponentialTable` computes them once per case for a log grid
of rates k (exactly for a piecewise-linear Cp) and interpolates per voxel: vectorised over any voxel shape.

Signal: spoiled gradient echo steady state, S = M0 sin(a) (1 - E1) / (1 - cos(a) E1), E1 = exp(-TR R1),
R1 = 1/T10 + r1 C, with the flip angle a scaled voxel-wise by the transmit field (B1).

References:
    Parker GJM et al., Magn Reson Med 56:993-1000 (2006).
    Weinmann HJ et al., Physiol Chem Phys Med NMR 16:167-172 (1984); Tofts PS, Kermode AG, Magn Reson Med
    17:357-367 (1991).
    Tofts PS et al., J Magn Reson Imaging 10:223-232 (1999).
    Sourbron SP, Buckley DL, Phys Med Biol 57:R1-R33 (2012) (2CXM and its impulse response); Magn Reson Med
    66:735-745 (2011).
    Calamante F et al., Magn Reson Med 44:466-473 (2000) (exponential dispersion kernel).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

AIF_FORMS = ("parker", "weinmann")
KINETIC_FAMILIES = ("etofts", "2cxm")
_PARKER = dict(A1=0.809, A2=0.330, T1=0.17046, T2=0.365, sigma1=0.0563, sigma2=0.132,
               alpha=1.050, beta=0.1685, s=38.078, tau=0.483)
_WEINMANN = dict(a1=3.99, a2=4.78, m1=0.144, m2=0.0111)  # kg/l, kg/l, /min, /min
STANDARD_DOSE = 0.1  # mmol/kg, the dose both population forms were measured at
STEP_S = 0.5  # time step of the tabulated input (s): resolves the ~3 s wide first-pass peak


def parker_blood(t_min: np.ndarray) -> np.ndarray:
    """Blood concentration (mM) of the Parker AIF at `t_min` minutes after arrival (0 before)."""
    p = _PARKER
    t = np.asarray(t_min, dtype=np.float64)
    cb = p["alpha"] * np.exp(-p["beta"] * t) / (1 + np.exp(-p["s"] * (t - p["tau"])))  # washout + recirculation
    for n in (1, 2):  # first and second pass: Gaussians
        width = p[f"sigma{n}"]
        cb = cb + p[f"A{n}"] / (width * np.sqrt(2 * np.pi)) * np.exp(-((t - p[f"T{n}"]) ** 2) / (2 * width**2))
    return np.where(t > 0, cb, 0.0)


def weinmann_plasma(t_min: np.ndarray, dose: float = STANDARD_DOSE) -> np.ndarray:
    """Plasma concentration (mM) of the Weinmann bi-exponential after an instantaneous injection at t = 0."""
    w = _WEINMANN
    t = np.asarray(t_min, dtype=np.float64)
    return np.where(t >= 0, dose * (w["a1"] * np.exp(-w["m1"] * t) + w["a2"] * np.exp(-w["m2"] * t)), 0.0)


@dataclass(frozen=True)
class ArterialInput:
    """One case's arterial plasma input.

    Attributes:
        form: one of `AIF_FORMS`.
        arrival_s: bolus arrival after the pre-contrast acquisition (s).
        dose_factor: dose relative to the standard 0.1 mmol/kg.
        cardiac_output_factor: cardiac output relative to the population's; divides the concentration.
        time_stretch: > 1 slows the whole curve (a slower circulation).
        dispersion_s: time constant of the exponential dispersion kernel (0 = none).
        haematocrit: blood -> plasma for the "parker" form.
        injection_s: injection duration (the "weinmann" form's rise).
    """

    form: str = "parker"
    arrival_s: float = 15.0
    dose_factor: float = 1.0
    cardiac_output_factor: float = 1.0
    time_stretch: float = 1.0
    dispersion_s: float = 0.0
    haematocrit: float = 0.42
    injection_s: float = 0.0

    def __post_init__(self):
        if self.form not in AIF_FORMS:
            raise ValueError(f"unknown AIF form {self.form!r}; expected one of {AIF_FORMS}")

    def plasma(self, t_s: np.ndarray) -> np.ndarray:
        """Plasma concentration (mM) on a uniform grid `t_s` (s after the pre-contrast acquisition, step STEP_S
        or finer, starting at or before the arrival)."""
        t_s = np.asarray(t_s, dtype=np.float64)
        dt = float(t_s[1] - t_s[0]) if len(t_s) > 1 else STEP_S
        local_min = (t_s - self.arrival_s) / 60.0 / self.time_stretch
        if self.form == "parker":
            cp = parker_blood(local_min) / (1 - self.haematocrit)
        else:
            cp = weinmann_plasma(local_min)
            width = max(int(round(self.injection_s / dt)), 1)
            cp = np.convolve(cp, np.full(width, 1.0 / width))[: len(cp)]  # constant-rate injection
        if self.dispersion_s > 0:
            kernel_t = np.arange(0.0, 8 * self.dispersion_s + dt, dt)
            kernel = np.exp(-kernel_t / self.dispersion_s)
            cp = np.convolve(cp, kernel / kernel.sum())[: len(cp)]  # unit area: dispersion keeps the dose
        return cp * self.dose_factor / self.cardiac_output_factor


class ExponentialTable:
    """E(k, t) = int_0^t Cp(u) exp(-k (t - u)) du for a log grid of rates k (/min), at the acquisition times.

    Exact for Cp linear between the grid points (the usual recursive exponential convolution), so it stays accurate
    for rates far above 1 / step. Look-ups interpolate linearly in ln k.
    """

    def __init__(self, aif: ArterialInput, times_s: list[float], k_min: float = 1e-3, k_max: float = 1e4,
                 num_rates: int = 320):
        times = np.asarray(times_s, dtype=np.float64)
        grid = np.arange(0.0, max(float(times.max()), 0.0) + 2 * STEP_S, STEP_S)
        cp = aif.plasma(grid)
        self.log_k = np.linspace(np.log(k_min), np.log(k_max), num_rates)
        k = np.exp(self.log_k)
        h = STEP_S / 60.0  # min
        decay = np.exp(-k * h)
        w0 = -np.expm1(-k * h) / k  # int_0^h exp(-k (h - s)) ds
        w1 = h / k - w0 / k  # int_0^h s exp(-k (h - s)) ds
        table = np.zeros((len(grid), num_rates))
        for n in range(len(grid) - 1):
            slope = (cp[n + 1] - cp[n]) / h
            table[n + 1] = decay * table[n] + cp[n] * w0 + slope * w1
        pos = np.clip(times, 0, None) / STEP_S  # acquisition times between grid points: linear in time
        lo = np.minimum(np.floor(pos).astype(int), len(grid) - 2)
        w = (pos - lo)[:, None]
        self.values = (1 - w) * table[lo] + w * table[lo + 1]  # [T, K]
        self.plasma_at = np.interp(np.clip(times, 0, None), grid, cp)  # [T]

    def __call__(self, rate: np.ndarray) -> np.ndarray:
        """E at every acquisition time for per-voxel rates (/min), shape [T, *rate.shape]."""
        x = np.log(np.clip(rate, np.exp(self.log_k[0]), np.exp(self.log_k[-1])))
        pos = (x - self.log_k[0]) / (self.log_k[1] - self.log_k[0])
        lo = np.clip(np.floor(pos).astype(int), 0, len(self.log_k) - 2)
        w = (pos - lo)[None]
        return (1 - w) * self.values[:, lo] + w * self.values[:, lo + 1]


def etofts_concentration(table: ExponentialTable, ktrans: np.ndarray, ve: np.ndarray, vp: np.ndarray) -> np.ndarray:
    """Extended Tofts concentration (mM), [T, *S]; ktrans in /min, ve and vp as volume fractions."""
    kep = ktrans / np.maximum(ve, 1e-3)
    return vp[None] * table.plasma_at.reshape(-1, *([1] * np.ndim(vp))) + ktrans[None] * table(kep)


def twocxm_rates(fp: np.ndarray, ps: np.ndarray, ve: np.ndarray, vp: np.ndarray):
    """Rates s-, s+ (/min) and amplitudes A-, A+ of the 2CXM impulse response h = A- e^{-s- t} + A+ e^{-s+ t}."""
    fp, ps = np.maximum(fp, 1e-4), np.maximum(ps, 1e-6)
    vp, ve = np.maximum(vp, 1e-4), np.maximum(ve, 1e-3)
    t_all, tc, te = (vp + ve) / fp, vp / fp, ve / ps
    root = np.sqrt(np.maximum((t_all + te) ** 2 - 4 * tc * te, 0.0))
    s_plus, s_minus = (t_all + te + root) / (2 * tc * te), (t_all + te - root) / (2 * tc * te)
    gap = np.maximum(s_plus - s_minus, 1e-9)
    return s_minus, s_plus, (t_all * s_plus - 1) * s_minus / gap, (1 - t_all * s_minus) * s_plus / gap


def twocxm_concentration(table: ExponentialTable, fp: np.ndarray, ps: np.ndarray, ve: np.ndarray,
                         vp: np.ndarray) -> np.ndarray:
    """Two-compartment exchange concentration (mM), [T, *S]; Fp and PS in /min (ml/min/ml), ve and vp fractions."""
    s_minus, s_plus, a_minus, a_plus = twocxm_rates(fp, ps, ve, vp)
    return fp[None] * (a_minus[None] * table(s_minus) + a_plus[None] * table(s_plus))


def renkin_crone_ktrans(fp: np.ndarray, ps: np.ndarray) -> np.ndarray:
    """Ktrans = E Fp with the extraction fraction E = 1 - exp(-PS / Fp) (Renkin 1959, Crone 1963): the Tofts
    transfer constant of a tissue described by its plasma flow and permeability-surface product."""
    return fp * -np.expm1(-ps / np.maximum(fp, 1e-6))


def spgr_signal(m0: np.ndarray, t10: np.ndarray, conc: np.ndarray, *, tr_ms: float, flip_deg, r1: float) -> np.ndarray:
    """Spoiled gradient echo steady-state signal for tissue with native T10 (s) and concentration (mM); `flip_deg`
    may be an array (the nominal angle times the local transmit field)."""
    a = np.deg2rad(flip_deg)
    e1 = np.exp(-(tr_ms / 1000.0) * (1.0 / t10 + r1 * conc))
    return m0 * np.sin(a) * (1 - e1) / (1 - np.cos(a) * e1)
