"""Who the phantom patients are and how their scans were acquired: randomised physics and the pCR law.

`draw_latents` draws the case-level biology of many cases at once (vectorised) and their true pCR probability;
`draw_physics` draws one case's acquisition physics. Nothing drawn here is written where a reader looks
(`collection` writes it to the truth files only), except what a real record gives: the subtype in the clinical
table, and field strength, TR and TE when the site's records carry them (never the flip angle).

Physics, randomised per case (`physics="randomised"`, the default; `"fixed"` keeps one value per field strength
for the unit tests that need exact values):

- Native T1 (T10, s) per tissue, log-normal around the median by field strength, spread across cases in brackets:
  fat 0.296 / 0.367 (8%) and fibroglandular tissue 1.266 / 1.445 (10%) at 1.5 / 3 T (Rakow-Penner 2006);
  muscle 1.008 / 1.412 (6%) and blood (the thorax) 1.441 / 1.932 (6%) (Stanisz 2005); skin 0.9 / 1.0 (10%,
  assumed); tumour 1.35 / 1.60 (18%), spanning the 1.0-2.0 s usually quoted for breast carcinoma (no single
  source: the spread is deliberately wider than any package default can absorb). A necrotic core has a 25%
  longer T10.
- Relaxivity r1 (/mM/s, plasma, 37 C; Rohrer 2005) by agent and field: gadopentetate 4.1 / 3.7, gadobutrol
  5.2 / 5.0, gadoterate 3.6 / 3.5, gadobenate 6.3 / 5.5; each site uses one or two agents.
- Arterial input (`tracer.ArterialInput`): the Parker or the Weinmann form (half each), dose 0.8-1.2 of
  0.1 mmol/kg, cardiac output factor log-normal (20%), time stretch 0.85-1.2, dispersion 0-8 s, arrival
  8-30 s, haematocrit 0.35-0.45, injection 8-20 s.
- Tumour kinetics from one of two families (half each): extended Tofts, with Ktrans from flow and permeability
  by Renkin-Crone, or the two-compartment exchange model with the same flow, permeability, ve and vp.
- Transmit field B1: a case-wide scale 0.9-1.1 times a left-right gradient of up to +-10% (1.5 T) or +-25% (3 T)
  (bilateral breast B1 at 3 T: Azlan 2010) and a smooth 5% field. Receive coil: 4-8 Gaussian coil elements
  around the anterior chest, not one polynomial. Rician noise.
- Rigid motion between phases: every phase but the first post-contrast one (the expert mask's grid) is
  rotated (up to 0.5 deg an axis) and shifted (up to `motion` voxels an axis); `motion` is 0 for a third of
  the cases, else up to 1.2 voxels. Receiver gain drifts by 1% (sd) between phases.
- Timing: the recorded acquisition times are rounded and miss the effective (k-space centre) time by up to 6 s.

pCR law (p = sigmoid(logit), the probability lives only in the truth files):

    logit = b[subtype] + (1.1 g + 1.1 i - 1.0 w[subtype] zR - 1.6 n) / (1 + shift * hard)
    b = (-1.9, -1.5, -0.6, -0.7), w = (1.2, 1.0, 0.7, 0.7) for luminal A, luminal B, HER2-enriched, triple negative

with g a hidden grade (mean -0.5, 0, 0.3, 0.5 by subtype, sd 1), i a hidden immune infiltration (mean -0.3, 0,
0.3, 0.4, sd 1) that no image or table shows, zR = (r - 0.13) / 0.029 the tumour radius (fraction of the field of
view) and n the necrotic fraction of the tumour (0 for most; more likely in large high-grade tumours). The images
show the grade only in part, through the kinetics it shifts: ln Fp = ln 1.0 + 0.25 g + 0.3 e1, ln PS = ln 0.5 +
0.35 g + 0.35 e2, ve = 0.12 + 0.35 sigmoid(-0.9 g + 0.8 e3) (faster wash-in and washout with grade), vp uniform
0.02-0.10. Over 10,000 cases (`pcr_population_stats(num_samples=10_000)`, seed 0, shift 0): pCR rate 0.36,
ceiling AUC (the true probability) 0.87, size-only AUC 0.65, and 0.82 for the probability given everything but
the immune factor (`without_immune_auc`; an image shows the grade only through noisy kinetics, so a reader of
images and tables stays below it).

References:
    Rakow-Penner R et al., J Magn Reson Imaging 23:87-91 (2006). Stanisz GJ et al., Magn Reson Med 54:507-512
    (2005). Rohrer M et al., Invest Radiol 40:715-724 (2005). Azlan CA et al., J Magn Reson Imaging 31:234-239
    (2010).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mtl_breast.phantoms.tracer import KINETIC_FAMILIES, ArterialInput, renkin_crone_ktrans

PHYSICS_MODES = ("randomised", "fixed")
# Tissue classes of the label map.
AIR, FAT, FGT, SKIN, MUSCLE, THORAX, TUMOUR = range(7)
# Median native T1 (s) by field strength and its spread (sd of ln T10) between cases, per tissue class.
T10_MEDIAN = {1.5: np.array([1.0, 0.296, 1.266, 0.90, 1.008, 1.441, 1.35]),
              3.0: np.array([1.0, 0.367, 1.445, 1.00, 1.412, 1.932, 1.60])}
T10_SPREAD = np.array([0.0, 0.08, 0.10, 0.10, 0.06, 0.06, 0.18])
# The fixed-physics values (one per field): also the package's historic tumour T10 and relaxivity.
T10_FIXED = {1.5: np.array([1.0, 0.296, 1.266, 0.90, 1.00, 1.40, 1.10]),
             3.0: np.array([1.0, 0.367, 1.445, 1.00, 1.40, 1.60, 1.30])}
R1_FIXED = {1.5: 4.5, 3.0: 4.0}
RELAXIVITY = {"gadopentetate": {1.5: 4.1, 3.0: 3.7}, "gadobutrol": {1.5: 5.2, 3.0: 5.0},
              "gadoterate": {1.5: 3.6, 3.0: 3.5}, "gadobenate": {1.5: 6.3, 3.0: 5.5}}
SUBTYPES = ("luminal_a", "luminal_b", "her2_enriched", "triple_negative")
_SUBTYPE_P = np.array([0.25, 0.25, 0.20, 0.30])
_SUBTYPE_LOGIT = np.array([-1.9, -1.5, -0.6, -0.7])
_SUBTYPE_SIZE_WEIGHT = np.array([1.2, 1.0, 0.7, 0.7])
_SUBTYPE_GRADE = np.array([-0.5, 0.0, 0.3, 0.5])
_SUBTYPE_IMMUNE = np.array([-0.3, 0.0, 0.3, 0.4])
DENSITIES = ("a", "b", "c", "d")
_DENSITY_P = np.array([[0.05, 0.25, 0.45, 0.25], [0.08, 0.32, 0.42, 0.18], [0.12, 0.40, 0.36, 0.12],
                       [0.18, 0.45, 0.30, 0.07], [0.22, 0.48, 0.25, 0.05]])  # rows: age bins below
_FGT_RANGE = np.array([[0.06, 0.22], [0.27, 0.48], [0.52, 0.72], [0.76, 0.90]])
AGE_BINS = ((28, 40), (41, 50), (51, 60), (61, 70), (71, 80))  # inclusive; the scoring bins (0,40] ... (70,100]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def draw_latents(rng: np.random.Generator, age: np.ndarray, shift: float) -> dict[str, np.ndarray]:
    """Case-level biology and the true pCR probability for cases of the given ages (vectorised over cases)."""
    n = len(age)
    age_bin = np.searchsorted([40, 50, 60, 70], age, side="left")
    density = (rng.random(n)[:, None] > np.cumsum(_DENSITY_P[age_bin], axis=1)).sum(1).clip(0, 3)
    lo, hi = _FGT_RANGE[density].T
    menopause = np.where(age <= 42, "pre", np.where(age >= 55, "post", ""))
    mid = menopause == ""  # perimenopausal ages: drawn, more often "post" with age
    u = rng.random(n)
    late = (age - 42) / 13.0
    menopause = np.where(mid, np.where(u < 0.6 * (1 - late), "pre", np.where(u < 1 - 0.6 * late, "peri", "post")),
                         menopause)
    subtype = rng.choice(4, n, p=_SUBTYPE_P)
    grade = _SUBTYPE_GRADE[subtype] + rng.standard_normal(n)
    immune = _SUBTYPE_IMMUNE[subtype] + rng.standard_normal(n)
    radius = rng.uniform(0.08, 0.18, n)
    necrotic = rng.random(n) < _sigmoid(-1.6 + 0.8 * grade + 12.0 * (radius - 0.13))
    necrotic_fraction = np.where(necrotic, rng.uniform(0.15, 0.5, n), 0.0)
    fp = np.exp(np.log(1.0) + 0.25 * grade + 0.3 * rng.standard_normal(n))
    ps = np.exp(np.log(0.5) + 0.35 * grade + 0.35 * rng.standard_normal(n))
    ve = 0.12 + 0.35 * _sigmoid(-0.9 * grade + 0.8 * rng.standard_normal(n))
    hard = (density >= 2).astype(np.float64)
    z_r = (radius - 0.13) / 0.029
    visible = 1.1 * grade - 1.0 * _SUBTYPE_SIZE_WEIGHT[subtype] * z_r - 1.6 * necrotic_fraction
    logit = _SUBTYPE_LOGIT[subtype] + (visible + 1.1 * immune) / (1 + shift * hard)
    bpe = rng.uniform(0.004, 0.02, n) * np.where(menopause == "post", 1.0, 1.4) * (1 + 4.0 * shift * hard)
    return dict(density=density, fgt_fraction=rng.uniform(lo, hi), menopause=menopause, subtype=subtype,
                grade=grade, immune=immune, fp=fp, ps=ps, ve=ve, vp=rng.uniform(0.02, 0.10, n),
                ktrans=renkin_crone_ktrans(fp, ps), radius_frac=radius, necrotic_fraction=necrotic_fraction,
                heterogeneity=rng.uniform(0.05, 0.5, n), bpe_ktrans=bpe, noise_factor=1 + shift * hard,
                shrink=np.maximum(0.5, 1 - 0.25 * shift * hard), pcr_probability=_sigmoid(logit),
                immune_scale=1.1 / (1 + shift * hard), logit_without_immune=logit - 1.1 * immune / (1 + shift * hard))


def expected_auc(score: np.ndarray, p: np.ndarray) -> float:
    """AUC of `score` expected when each case is positive with probability `p` (a weighted Mann-Whitney statistic,
    ties counted half): the AUC of a score over infinitely many label draws of the same cases."""
    values, group = np.unique(score, return_inverse=True)
    w_pos, w_neg = p.astype(np.float64), 1 - p.astype(np.float64)
    neg_per_value = np.bincount(group, weights=w_neg, minlength=len(values))
    neg_below = np.concatenate([[0.0], np.cumsum(neg_per_value)[:-1]])
    # each positive weight meets the negatives below it, and half of those tied with it (itself excluded)
    total = (w_pos * (neg_below[group] + 0.5 * (neg_per_value[group] - w_neg))).sum()
    pairs = w_pos.sum() * w_neg.sum() - (w_pos * w_neg).sum()
    return float(total / pairs)


def population_ages(rng: np.random.Generator, n: int) -> np.ndarray:
    """Ages spread evenly over the age bins, as in the datasets."""
    bins = rng.integers(0, len(AGE_BINS), n)
    lo, hi = np.array(AGE_BINS)[bins].T
    return lo + (rng.random(n) * (hi - lo + 1)).astype(int)


def without_immune_auc(latents: dict[str, np.ndarray]) -> float:
    """Expected AUC of the pCR probability given everything but the hidden immune factor (integrated over it):
    an upper bound for any reader of images and tables (they show the grade only in part)."""
    spread = latents["immune_scale"]  # the immune term is spread * (subtype mean + a standard normal)
    z = np.linspace(-4, 4, 41)
    weight = np.exp(-z**2 / 2)
    weight /= weight.sum()
    base = latents["logit_without_immune"] + spread * _SUBTYPE_IMMUNE[latents["subtype"]]
    p_observed = (_sigmoid(base[:, None] + spread[:, None] * z[None]) * weight).sum(1)
    return expected_auc(p_observed, latents["pcr_probability"])


@dataclass(frozen=True)
class CasePhysics:
    """One case's acquisition physics (all hidden from the readers except what the record states).

    Attributes:
        field_strength: T.
        tr_ms, te_ms, flip_deg: the sequence as run (the record may omit TR and never gives the flip angle).
        agent, r1: contrast agent and its plasma relaxivity (/mM/s) at this field.
        t10: native T1 (s) per tissue class (AIR ... TUMOUR).
        aif: the arterial input.
        family: tumour kinetic model, one of `tracer.KINETIC_FAMILIES`.
        b1_scale, b1_gradient, b1_smooth: transmit field = scale * (1 + gradient * x + smooth * field), x in [-1, 1]
            left to right.
        coil_elements: receive coil elements (0 = the uniform coil of fixed physics).
        motion_voxels: largest rigid shift of a phase along an axis, in voxels (0 = still).
        gain_drift: sd of the receiver gain between phases.
        time_error_s: largest difference between a recorded and the effective acquisition time.
    """

    field_strength: float
    tr_ms: float
    te_ms: float
    flip_deg: float
    agent: str
    r1: float
    t10: tuple[float, ...]
    aif: ArterialInput
    family: str = "etofts"
    b1_scale: float = 1.0
    b1_gradient: float = 0.0
    b1_smooth: float = 0.0
    coil_elements: int = 0
    motion_voxels: float = 0.0
    gain_drift: float = 0.0
    time_error_s: float = 0.0


def draw_physics(rng: np.random.Generator, mode: str, *, field_strength: float, tr_ms: float, te_ms: float,
                 flip_deg: float, agents: tuple[str, ...]) -> CasePhysics:
    """One case's physics: randomised as the module docstring says, or the fixed values of the unit tests."""
    if mode not in PHYSICS_MODES:
        raise ValueError(f"unknown physics {mode!r}; expected one of {PHYSICS_MODES}")
    if mode == "fixed":
        return CasePhysics(field_strength, tr_ms, te_ms, flip_deg, "fixed", R1_FIXED[field_strength],
                           tuple(float(v) for v in T10_FIXED[field_strength]),
                           ArterialInput("parker", arrival_s=float(rng.uniform(10, 25))))
    t10 = T10_MEDIAN[field_strength] * np.exp(T10_SPREAD * rng.standard_normal(len(T10_SPREAD)))
    agent = str(rng.choice(agents))
    aif = ArterialInput(form=str(rng.choice(["parker", "weinmann"])), arrival_s=float(rng.uniform(8, 30)),
                        dose_factor=float(rng.uniform(0.8, 1.2)),
                        cardiac_output_factor=float(np.exp(0.2 * rng.standard_normal())),
                        time_stretch=float(rng.uniform(0.85, 1.2)), dispersion_s=float(rng.uniform(0, 8)),
                        haematocrit=float(rng.uniform(0.35, 0.45)), injection_s=float(rng.uniform(8, 20)))
    still = rng.random() < 1 / 3
    return CasePhysics(
        field_strength=field_strength, tr_ms=float(tr_ms * rng.uniform(0.95, 1.05)), te_ms=te_ms,
        flip_deg=flip_deg, agent=agent, r1=RELAXIVITY[agent][field_strength], t10=tuple(float(v) for v in t10),
        aif=aif, family=str(rng.choice(KINETIC_FAMILIES)), b1_scale=float(rng.uniform(0.9, 1.1)),
        b1_gradient=float(rng.uniform(-1, 1) * (0.25 if field_strength >= 3 else 0.10)), b1_smooth=0.05,
        coil_elements=int(rng.integers(4, 9)), motion_voxels=0.0 if still else float(rng.uniform(0.1, 1.2)),
        gain_drift=0.01, time_error_s=6.0)


def pcr_population_stats(difficulty_shift: float = 0.0, *, seed: int = 0, num_samples: int = 100_000) -> dict:
    """pCR rate, Bayes-optimal balanced accuracy and the reference AUCs of the phantom population.

    Args:
        difficulty_shift: as in `collection.generate_dataset`.
        seed: seed of the Monte-Carlo draw.
        num_samples: number of virtual cases (ages uniform over the age bins, as in the datasets).

    Returns:
        {"pcr_rate": pi, "bayes_threshold": pi, "bayes_balanced_accuracy": expected BA of p > pi,
        "bayes_balanced_accuracy_by_density": {...}, "ceiling_auc": expected AUC of p, "size_only_auc": of the
        tumour radius (smaller = pCR), "without_immune_auc": of p without the hidden immune factor}.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xBA]))
    latents = draw_latents(rng, population_ages(rng, num_samples), difficulty_shift)
    p = latents["pcr_probability"]
    pi = float(p.mean())
    by_density = {d: round(rule_balanced_accuracy(p[latents["density"] == i], pi), 4)
                  for i, d in enumerate(DENSITIES)}
    return {"pcr_rate": pi, "bayes_threshold": pi, "bayes_balanced_accuracy": rule_balanced_accuracy(p, pi),
            "bayes_balanced_accuracy_by_density": by_density, "ceiling_auc": expected_auc(p, p),
            "size_only_auc": expected_auc(-latents["radius_frac"], p),
            "without_immune_auc": without_immune_auc(latents)}


def rule_balanced_accuracy(p: np.ndarray, threshold: float, labels: np.ndarray | None = None) -> float:
    """Balanced accuracy of "predict 1 when p > threshold": expected under p, or against `labels`."""
    pred = p > threshold
    truth = p if labels is None else labels.astype(np.float64)
    tpr = (truth * pred).sum() / max(truth.sum(), 1e-12)
    tnr = ((1 - truth) * ~pred).sum() / max((1 - truth).sum(), 1e-12)
    return float(0.5 * (tpr + tnr))
