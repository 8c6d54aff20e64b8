"""The randomised phantom physics: checked against an independent implementation (dcmri), against what the
population docstring documents, for what reaches the readers, and for invariants of the tracer kinetics.

dcmri (Apache-2.0, the `dev` extra) works in seconds, molar units and mL/sec/mL; the phantoms in minutes, mM and
/min. Its tests skip where dcmri is not installed.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from scipy import ndimage
from scipy.signal import fftconvolve

from mtl_breast.data.mamamia import read_mamamia
from mtl_breast.metrics.classification import roc_auc
from mtl_breast.phantoms import population, tracer
from mtl_breast.phantoms.collection import SITES, generate_dataset, read_truth
from mtl_breast.phantoms.physics import PhantomSpec, render_phantom
from mtl_breast.phantoms.population import (
    FAT,
    FGT,
    MUSCLE,
    R1_FIXED,
    RELAXIVITY,
    SKIN,
    T10_FIXED,
    THORAX,
    TUMOUR,
    draw_latents,
    draw_physics,
    expected_auc,
    pcr_population_stats,
    population_ages,
)

FIELDS = (1.5, 3.0)
DCMRI_AGENT = {"gadobenate": "gadobenade"}  # dcmri's spelling


@pytest.fixture(scope="module")
def dc():
    return pytest.importorskip("dcmri")


def _sampled_input(aif: tracer.ArterialInput, end_s: float, every_s: float = 5.0):
    """The table of `aif` at acquisition times on its own 0.5 s grid, that grid, the plasma on it (mM) and the
    grid indices of the acquisition times: the same piecewise-linear input for both implementations."""
    times = np.arange(0.0, end_s + 1e-9, every_s)
    grid = np.arange(0.0, end_s + 2 * tracer.STEP_S, tracer.STEP_S)  # ExponentialTable's grid
    return tracer.ExponentialTable(aif, list(times)), grid, aif.plasma(grid), np.rint(times / tracer.STEP_S).astype(int)


# ----------------------------------------------------------------------------------------------------------------
# 1. dcmri cross-check


def test_parker_blood_matches_dcmri(dc):
    t_s = np.arange(0.5, 600.0, 0.5)  # after arrival: parker_blood is 0 before it, dcmri's formula is not
    ours = tracer.parker_blood(t_s / 60.0)
    theirs = 1000.0 * dc.aif_parker(t_s)  # M -> mM
    # dcmri writes the Gaussian prefactors A/(sigma sqrt(2 pi)) rounded to 6 digits (5.73258, 0.997356); the
    # exponents use the same constants. Measured: 3e-7 relative.
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    assert 0.15 < t_s[np.argmax(ours)] / 60 < 0.2  # and the first-pass peak sits where Parker has it (~10 s)


# Tissue parameter sets (/min, fractions): slow and fast exchange, low and high flow.
ETOFTS_SETS = [(0.05, 0.30, 0.02), (0.5, 0.30, 0.05), (2.0, 0.15, 0.10), (0.2, 0.60, 0.0)]  # Ktrans, ve, vp
TWOCXM_SETS = [(0.2, 0.05, 0.30, 0.05), (3.0, 0.05, 0.30, 0.05), (0.2, 2.0, 0.30, 0.05), (3.0, 2.0, 0.15, 0.02),
               (1.0, 0.5, 0.30, 0.06)]  # Fp, PS, ve, vp
# Both sides convolve the same piecewise-linear input with exponentials exactly (dcmri: Flouri 2016's recursion);
# the phantoms' table then interpolates linearly in ln k between 320 rates (step 0.05 in ln k), an error of at most
# 0.05^2 / 8 = 3e-4 of the value. Measured: at most 2.2e-4 of the curve's peak.
CONC_TOLERANCE = 1e-3


@pytest.mark.parametrize("form", tracer.AIF_FORMS)
def test_tissue_concentrations_match_dcmri(dc, form):
    aif = tracer.ArterialInput(form, arrival_s=15.0, dispersion_s=3.0, injection_s=12.0)
    table, grid, cp, at = _sampled_input(aif, 360.0)
    # dcmri takes a blood input; haematocrit 0 makes it the plasma input (vb = vp, Fb = Fp).
    for ktrans, ve, vp in ETOFTS_SETS:  # extended Tofts = dcmri's 'HF' (no plasma transit), PS = Ktrans
        ours = tracer.etofts_concentration(table, np.array(ktrans), np.array(ve), np.array(vp))
        theirs = dc.conc_tissue(cp, t=grid, kinetics="HF", H=0.0, vb=vp, vi=ve, PS=ktrans / 60)[at]
        assert np.abs(ours - theirs).max() < CONC_TOLERANCE * theirs.max(), (ktrans, ve, vp)
    for fp, ps, ve, vp in TWOCXM_SETS:
        ours = tracer.twocxm_concentration(table, np.array(fp), np.array(ps), np.array(ve), np.array(vp))
        theirs = dc.conc_tissue(cp, t=grid, kinetics="2CX", H=0.0, vb=vp, vi=ve, Fb=fp / 60, PS=ps / 60)[at]
        assert np.abs(ours - theirs).max() < CONC_TOLERANCE * theirs.max(), (fp, ps, ve, vp)


def test_spgr_signal_matches_dcmri(dc):
    t10, conc, r1 = np.array([0.3, 1.0, 1.6]), np.array([0.0, 0.5, 3.0]), 4.5
    for flip, tr_ms in itertools.product((5.0, 12.0, 30.0), (3.0, 8.0)):
        ours = tracer.spgr_signal(2.0, t10, conc, tr_ms=tr_ms, flip_deg=flip, r1=r1)
        theirs = dc.signal_ss(2.0, 1 / t10 + r1 * conc, tr_ms / 1000, flip)  # R1 /s, TR s, FA degrees
        np.testing.assert_allclose(ours, theirs, rtol=1e-12)  # the same closed form; measured 2e-16


def test_relaxivity_matches_dcmri(dc):
    for agent, by_field in RELAXIVITY.items():
        for field_t in FIELDS:  # dcmri: Hz/M, the same Rohrer 2005 table
            assert by_field[field_t] == dc.relaxivity(field_t, "plasma", DCMRI_AGENT.get(agent, agent)) / 1000


# ----------------------------------------------------------------------------------------------------------------
# 2. Each randomised factor varies as the population docstring documents

# The docstring's numbers, typed in again: median T10 (s) at 1.5 / 3 T and the spread (sd of ln T10) across cases.
DOCUMENTED_T10 = {FAT: (0.296, 0.367, 0.08), FGT: (1.266, 1.445, 0.10), SKIN: (0.9, 1.0, 0.10),
                  MUSCLE: (1.008, 1.412, 0.06), THORAX: (1.441, 1.932, 0.06), TUMOUR: (1.35, 1.60, 0.18)}
DOCUMENTED_R1 = {"gadopentetate": (4.1, 3.7), "gadobutrol": (5.2, 5.0), "gadoterate": (3.6, 3.5),
                 "gadobenate": (6.3, 5.5)}
DOCUMENTED_AIF = {"dose_factor": (0.8, 1.2), "time_stretch": (0.85, 1.2), "dispersion_s": (0.0, 8.0),
                  "arrival_s": (8.0, 30.0), "haematocrit": (0.35, 0.45), "injection_s": (8.0, 20.0)}
NUM_DRAWS = 400  # per field strength


@pytest.fixture(scope="module")
def drawn() -> dict[float, list[population.CasePhysics]]:
    rng = np.random.default_rng(11)
    return {f: [draw_physics(rng, "randomised", field_strength=f, tr_ms=4.5, te_ms=2.0, flip_deg=10.0,
                             agents=tuple(RELAXIVITY)) for _ in range(NUM_DRAWS)] for f in FIELDS}


def _spans(values, low: float, high: float) -> None:
    """Within [low, high] and reaching into both ends (the outer tenth): a narrower range fails too."""
    values = np.asarray(values)
    margin = 0.1 * (high - low)
    assert low <= values.min() < low + margin and high - margin < values.max() <= high, (values.min(), values.max())


def test_native_t1_by_tissue_and_field(drawn):
    for f, cases in drawn.items():
        log_t10 = np.log([c.t10 for c in cases])
        for tissue, (median_15, median_3, spread) in DOCUMENTED_T10.items():
            median = median_15 if f == 1.5 else median_3
            # standard errors over 400 cases: 0.063 spread (median of ln T10), 0.035 spread (its sd)
            assert abs(np.median(log_t10[:, tissue]) - np.log(median)) < 0.3 * spread, (f, tissue)
            assert abs(log_t10[:, tissue].std() - spread) < 0.2 * spread, (f, tissue)
    tumour_15, tumour_3 = (np.array([c.t10[TUMOUR] for c in drawn[f]]) for f in FIELDS)
    assert np.quantile(tumour_15, 0.05) < 1.1 and np.quantile(tumour_3, 0.95) > 2.0  # wider than 1.0-2.0 s


def test_relaxivity_follows_agent_and_field(drawn):
    assert {a: (v[1.5], v[3.0]) for a, v in RELAXIVITY.items()} == DOCUMENTED_R1
    for f, cases in drawn.items():
        assert {c.agent for c in cases} == set(RELAXIVITY)
        assert all(c.r1 == RELAXIVITY[c.agent][f] for c in cases)
    one_agent = draw_physics(np.random.default_rng(0), "randomised", field_strength=3.0, tr_ms=4.2, te_ms=1.8,
                             flip_deg=12.0, agents=("gadoterate",))
    assert one_agent.agent == "gadoterate" and one_agent.r1 == 3.5


def test_arterial_input_and_kinetic_family(drawn):
    cases = drawn[1.5] + drawn[3.0]
    for form in tracer.AIF_FORMS:
        assert abs(np.mean([c.aif.form == form for c in cases]) - 0.5) < 0.07, form  # sd 0.018
    for family in tracer.KINETIC_FAMILIES:
        assert abs(np.mean([c.family == family for c in cases]) - 0.5) < 0.07, family
    for name, (low, high) in DOCUMENTED_AIF.items():
        _spans([getattr(c.aif, name) for c in cases], low, high)
    log_output = np.log([c.aif.cardiac_output_factor for c in cases])
    assert abs(log_output.std() - 0.2) < 0.03 and abs(np.median(log_output)) < 0.04  # log-normal, 20%
    _spans([c.tr_ms / 4.5 for c in cases], 0.95, 1.05)
    assert all(c.flip_deg == 10.0 and c.te_ms == 2.0 and 4 <= c.coil_elements <= 8 for c in cases)


def test_transmit_field_and_motion(drawn):
    for f, bound in ((1.5, 0.10), (3.0, 0.25)):
        gradient = np.abs([c.b1_gradient for c in drawn[f]])
        assert gradient.max() <= bound and gradient.max() > 0.9 * bound, f
        _spans([c.b1_scale for c in drawn[f]], 0.9, 1.1)
        assert all(c.b1_smooth == 0.05 for c in drawn[f])
    assert np.mean(np.abs([c.b1_gradient for c in drawn[3.0]]) > 0.10) > 0.4  # beyond 1.5 T's bound for most
    motion = np.array([c.motion_voxels for c in drawn[1.5] + drawn[3.0]])
    assert abs(np.mean(motion == 0) - 1 / 3) < 0.06  # sd 0.017
    _spans(motion[motion > 0], 0.1, 1.2)


def test_fixed_physics_is_one_value_per_field():
    rng = np.random.default_rng(5)
    for f in FIELDS:
        cases = [draw_physics(rng, "fixed", field_strength=f, tr_ms=4.5, te_ms=2.0, flip_deg=10.0,
                              agents=("gadobutrol",)) for _ in range(20)]
        for c in cases:
            assert c.t10 == tuple(T10_FIXED[f]) and c.r1 == R1_FIXED[f] and c.tr_ms == 4.5 and c.flip_deg == 10.0
            assert c.motion_voxels == 0 and c.coil_elements == 0 and c.gain_drift == 0 and c.time_error_s == 0
            assert (c.b1_scale, c.b1_gradient, c.b1_smooth) == (1.0, 0.0, 0.0)  # B1 = 1 everywhere
            assert c.family == "etofts" and c.aif.form == "parker" and c.aif.dose_factor == 1.0
        assert len({(c.t10, c.r1) for c in cases}) == 1
    with pytest.raises(ValueError, match="unknown physics"):
        draw_physics(rng, "exact", field_strength=1.5, tr_ms=4.5, te_ms=2.0, flip_deg=10.0, agents=("gadobutrol",))


# The documented pCR law, typed in again: subtype intercept b, size weight w, grade and immune means.
LAW_B, LAW_W = np.array([-1.9, -1.5, -0.6, -0.7]), np.array([1.2, 1.0, 0.7, 0.7])
GRADE_MEAN, IMMUNE_MEAN = np.array([-0.5, 0.0, 0.3, 0.5]), np.array([-0.3, 0.0, 0.3, 0.4])


@pytest.mark.parametrize("shift", [0.0, 1.0])
def test_latents_follow_the_documented_biology_and_pcr_law(shift):
    rng = np.random.default_rng(3)
    n = 6000
    lat = draw_latents(rng, population_ages(rng, n), shift)
    s, g, i = lat["subtype"], lat["grade"], lat["immune"]
    for k in range(4):
        assert abs(g[s == k].mean() - GRADE_MEAN[k]) < 0.12 and abs(g[s == k].std() - 1) < 0.08, k
        assert abs(i[s == k].mean() - IMMUNE_MEAN[k]) < 0.12 and abs(i[s == k].std() - 1) < 0.08, k
    for name, intercept, slope, noise in (("fp", 1.0, 0.25, 0.3), ("ps", 0.5, 0.35, 0.35)):
        fit_slope, fit_intercept = np.polyfit(g, np.log(lat[name]), 1)
        residual = np.log(lat[name]) - (fit_intercept + fit_slope * g)
        assert abs(fit_slope - slope) < 0.03 and abs(fit_intercept - np.log(intercept)) < 0.03, name
        assert abs(residual.std() - noise) < 0.02, name
    assert 0.12 < lat["ve"].min() and lat["ve"].max() < 0.47 and np.corrcoef(g, lat["ve"])[0, 1] < -0.3
    _spans(lat["vp"], 0.02, 0.10)
    _spans(lat["radius_frac"], 0.08, 0.18)
    np.testing.assert_allclose(lat["ktrans"], lat["fp"] * (1 - np.exp(-lat["ps"] / lat["fp"])), rtol=1e-12)
    necrotic = lat["necrotic_fraction"] > 0
    assert necrotic.mean() < 0.5 and lat["necrotic_fraction"][necrotic].min() >= 0.15
    assert lat["necrotic_fraction"].max() <= 0.5
    large_high = (g > 0.5) & (lat["radius_frac"] > 0.15)
    small_low = (g < -0.5) & (lat["radius_frac"] < 0.11)
    assert necrotic[large_high].mean() > 2 * necrotic[small_low].mean()
    hard = (lat["density"] >= 2).astype(float)
    z_r = (lat["radius_frac"] - 0.13) / 0.029
    logit = LAW_B[s] + (1.1 * g + 1.1 * i - LAW_W[s] * z_r - 1.6 * lat["necrotic_fraction"]) / (1 + shift * hard)
    np.testing.assert_allclose(lat["pcr_probability"], 1 / (1 + np.exp(-logit)), rtol=1e-10)


# ----------------------------------------------------------------------------------------------------------------
# 3. The pCR law's reference numbers


def test_documented_population_numbers():
    doc = " ".join(population.__doc__.split())
    found = re.search(r"seed 0, shift 0\): pCR rate ([\d.]+), ceiling AUC \(the true probability\) ([\d.]+), "
                      r"size-only AUC ([\d.]+), and ([\d.]+) for the probability given everything but the immune",
                      doc)
    assert found, "the population docstring no longer states its reference numbers in the expected words"
    stats = pcr_population_stats(0.0, seed=0, num_samples=10_000)
    for key, documented in zip(("pcr_rate", "ceiling_auc", "size_only_auc", "without_immune_auc"), found.groups(),
                               strict=True):
        assert abs(stats[key] - float(documented)) <= 0.005, (key, stats[key], documented)  # its 2-digit rounding


def test_expected_auc_is_the_auc_over_label_draws():
    """Over every labelling of a small case set (exact enumeration instead of sampling): expected_auc is the AUC of
    all draws pooled (the Mann-Whitney count over the positive-negative pairs of each draw, summed over the draws,
    over those pairs), which is what "over infinitely many label draws" means; the mean of the per-draw AUCs is
    close but not the same (it weights draws with few pairs as much as the others)."""
    rng = np.random.default_rng(2)
    n = 10
    p = rng.uniform(0.05, 0.9, n)
    score = np.round(p + rng.normal(0, 0.2, n), 1)  # coarse: ties, which count one half
    assert len(np.unique(score)) < n
    wins = pairs = mean = both = 0.0
    for bits in itertools.product((0, 1), repeat=n):
        y = np.array(bits, dtype=float)
        positives = y.sum()
        if 0 < positives < n:
            weight = np.prod(np.where(y == 1, p, 1 - p))
            auc = roc_auc(y, score)
            wins += weight * auc * positives * (n - positives)
            pairs += weight * positives * (n - positives)
            mean, both = mean + weight * auc, both + weight
    assert expected_auc(score, p) == pytest.approx(wins / pairs, abs=1e-12)
    assert expected_auc(score, p) == pytest.approx(mean / both, abs=0.01)  # measured: 0.74897 and 0.74848


# ----------------------------------------------------------------------------------------------------------------
# 4. Nothing hidden reaches the readers

NUM_CASES, SIZE = 6, 16
# What a real record gives (field strength and TR not always): the only truth keys a reader may carry.
GIVEN_BY_RECORDS = {"pcr", "subtype", "field_strength", "repetition_time"}
HIDDEN_FRAGMENTS = ("t10", "ktrans", "kep", "aif", "grade", "immune", "relaxiv", "probability", "motion", "b1",
                    "kinetic", "necrotic", "truth", "agent", "flip")


@pytest.fixture(scope="module")
def randomised(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("randomised") / "data"
    return root, generate_dataset(root, num_cases=NUM_CASES, seed=3, size=SIZE)


def _leaves(obj, path: tuple = ()):
    """(path of keys, value) of every leaf of nested dicts, lists, tuples and dataclasses."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _leaves(value, (*path, str(key)))
    elif isinstance(obj, list | tuple):
        for value in obj:
            yield from _leaves(value, path)
    else:
        yield path, obj


def _assert_hides(obj, truth: dict, where: str, allowed_keys: frozenset = frozenset()) -> None:
    """No hidden truth key (nor a key that names a hidden quantity), full-precision value or word in `obj`."""
    hidden_keys = {k for path, _ in _leaves(truth) for k in path} - GIVEN_BY_RECORDS  # ("given" names them too)
    # Values drawn at full precision cannot match a legitimate record value by chance; values with two decimals
    # or fewer (field strength, rounded times, T10 of air) can, and are checked by the tests below instead.
    hidden_values = [v for _, v in _leaves(truth) if isinstance(v, float) and abs(v * 100 - round(v * 100)) > 1e-6]
    hidden_words = {v.lower() for _, v in _leaves(truth) if isinstance(v, str)} - {truth["subtype"]}
    for path, value in _leaves(obj):
        keys = {k.lower() for k in path} - allowed_keys
        assert not keys & hidden_keys, (where, path)
        assert not [k for k in keys if any(f in k for f in HIDDEN_FRAGMENTS)], (where, path)
        if isinstance(value, Path):
            value = str(value)
        if isinstance(value, str):
            assert not set(re.split(r"[^a-z0-9]+", value.lower())) & hidden_words, (where, path, value)
        elif isinstance(value, int | float | np.number) and not isinstance(value, bool):
            assert not any(math.isclose(value, h, rel_tol=1e-6) for h in hidden_values), (where, path, value)


def _origin(path: Path) -> tuple[float, ...]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader.GetOrigin()


def test_truth_files_hold_what_the_records_do_not(randomised):
    root, summary = randomised
    cases = read_mamamia(root)
    table = pd.read_excel(root / "clinical_and_imaging_info.xlsx", sheet_name="dataset_info")
    assert len(cases) == NUM_CASES == len(table)
    truths = {}
    for case in cases:
        truth = truths[case.patient_id] = read_truth(root, case.patient_id)
        # the truth file holds the hidden values, consistently
        for key in ("flip_angle", "pcr_probability", "grade", "immune", "ktrans", "kep", "fp", "ps", "ve", "vp",
                    "t10_s", "kinetic_family", "aif", "agent", "relaxivity", "b1_gradient", "motion_voxels"):
            assert key in truth, key
        assert truth["kep"] == pytest.approx(truth["ktrans"] / truth["ve"])
        assert truth["relaxivity"] == RELAXIVITY[truth["agent"]][truth["field_strength"]]
        assert truth["flip_angle"] == SITES[case.meta["dataset"]].flip_deg
        # the reader, the patient JSON and the spreadsheet row hold none of them
        record = json.loads(case.info_path.read_text())
        row = table[table["patient_id"] == case.patient_id].iloc[0].to_dict()
        relative = dataclasses.replace(case, image_paths=[p.relative_to(root) for p in case.image_paths],
                                       mask_path=case.mask_path.relative_to(root),
                                       info_path=case.info_path.relative_to(root))
        _assert_hides(relative, truth, "reader", allowed_keys=frozenset({"flip_angle"}))
        _assert_hides(record, truth, "patient JSON")
        _assert_hides(row, truth, "spreadsheet")
        assert case.meta["flip_angle"] is None and "flip_angle" not in record["imaging_data"]
        # what the truth says was given is what the record gives, and the reader reads
        imaging, given = record["imaging_data"], truth["given"]
        assert given["flip_angle"] is False
        for key, value in (("field_strength", truth["field_strength"]),
                           ("repetition_time", round(truth["repetition_time"], 2))):
            assert (key in imaging) == given[key], key
            assert case.meta[key] == (value if given[key] else None), key
            if key in row:  # the spreadsheet has a field strength column, no TR
                assert row[key] == value if given[key] else math.isnan(row[key]), key
        # the truth matches the images: phases, recorded (not effective) times, phase-0 grid, label
        assert len(case.image_paths) == imaging["num_phases"] == len(truth["effective_times_s"])
        assert len(truth["motion_voxels_per_phase"]) == case.num_phases
        assert case.acquisition_times == truth["recorded_times_s"] == imaging["acquisition_times"]
        assert case.acquisition_times != truth["effective_times_s"]
        assert truth["phase0_shifted"] == (_origin(case.image_paths[0]) != _origin(case.image_paths[1]))
        assert (math.isnan(case.pcr) and truth["pcr"] is None) or case.pcr == truth["pcr"]
        assert truth["b1_at_tumour"] != 1.0 and truth["coil_elements"] >= 4
    assert summary["withheld"]["flip_angle"] == NUM_CASES
    assert summary["withheld"]["repetition_time"] == sum(not t["given"]["repetition_time"] for t in truths.values())
    assert {t["physics"] for t in truths.values()} == {"randomised"}
    assert summary["withheld"]["repetition_time"] + summary["withheld"]["field_strength"] >= 1  # seed 3 withholds


def test_motion_spares_the_mask_phase(randomised):
    root, _ = randomised
    truths = [read_truth(root, p.name) for p in (root / "images").iterdir()]
    moving = [t for t in truths if t["motion_voxels"] > 0]
    assert moving and len(moving) < len(truths)  # seed 3 has both
    for truth in truths:
        per_phase = truth["motion_voxels_per_phase"]
        assert per_phase[1] == 0  # the first post-contrast phase is the expert mask's grid
        if truth["motion_voxels"] == 0:
            assert not any(per_phase)
            continue
        others = per_phase[:1] + per_phase[2:]
        # largest shift of a corner, canonical voxels: the shift (<= motion an axis) plus rotations of at most
        # 0.5 deg * motion / 1.2 about each axis acting on corners at most 2 * SIZE voxels away (in sum) from the centre
        bound = truth["motion_voxels"] * (1 + 3 * np.deg2rad(0.5) / 1.2 * 2 * SIZE)
        assert all(0 < m <= bound for m in others), (per_phase, bound)
    assert max(t["motion_voxels"] for t in truths) <= 1.2


def test_fixed_datasets_record_every_acquisition_value(tmp_path):
    summary = generate_dataset(tmp_path, num_cases=4, seed=4, size=SIZE, physics="fixed")
    assert summary["withheld"] == {"flip_angle": 0, "repetition_time": 0, "field_strength": 0}
    for case in read_mamamia(tmp_path):
        site, truth = SITES[case.meta["dataset"]], read_truth(tmp_path, case.patient_id)
        imaging = json.loads(case.info_path.read_text())["imaging_data"]
        assert imaging["flip_angle"] == case.meta["flip_angle"] == site.flip_deg
        assert imaging["repetition_time"] == case.meta["repetition_time"] == site.tr_ms
        assert imaging["field_strength"] == case.meta["field_strength"] == truth["field_strength"]
        assert truth["t10_s"] == list(T10_FIXED[truth["field_strength"]])
        assert truth["relaxivity"] == R1_FIXED[truth["field_strength"]]
        assert truth["b1_at_tumour"] == 1.0 and not any(truth["motion_voxels_per_phase"])
        assert case.acquisition_times == truth["effective_times_s"]  # recorded exactly


# ----------------------------------------------------------------------------------------------------------------
# 5. Tracer invariants

RATE_CASES = [(0.2, 0.05, 0.3, 0.05), (3.0, 2.0, 0.15, 0.02), (1.0, 0.5, 0.47, 0.10), (20.0, 0.01, 0.12, 0.03)]


def test_twocxm_impulse_response():
    fp, ps, ve, vp = (np.array(v) for v in zip(*RATE_CASES, strict=True))
    s_minus, s_plus, a_minus, a_plus = tracer.twocxm_rates(fp, ps, ve, vp)
    assert np.all(0 < s_minus) and np.all(s_minus < s_plus)
    np.testing.assert_allclose(a_minus + a_plus, 1.0, rtol=1e-9)  # h(0) = 1: all of a bolus starts in the plasma
    # int_0^inf Fp h = Fp (A-/s- + A+/s+): the distribution volume vp + ve (the central volume principle)
    np.testing.assert_allclose(fp * (a_minus / s_minus + a_plus / s_plus), vp + ve, rtol=1e-9)


def test_twocxm_tends_to_extended_tofts_at_high_flow():
    table, *_ = _sampled_input(tracer.ArterialInput("parker", arrival_s=15.0), 300.0)
    ps, ve, vp = np.array(0.3), np.array(0.3), np.array(0.05)
    tofts = tracer.etofts_concentration(table, ps, ve, vp)  # Ktrans = PS

    def gap(fp: float) -> float:
        return float(np.abs(tracer.twocxm_concentration(table, np.array(fp), ps, ve, vp) - tofts).max() / tofts.max())

    # The deviation falls like 1 / Fp (measured: 0.65, 0.012, 7.5e-4 at 0.5, 50, 500 /min); s+ ~ (Fp + PS) / vp
    # must stay below the table's largest rate (1e4 /min), beyond which look-ups are clipped.
    gaps = [gap(fp) for fp in (0.5, 50.0, 500.0)]
    assert gaps[0] > 0.3 and gaps[1] < 0.03 and gaps[2] < 2e-3 and gaps[2] < gaps[1] / 5


def test_population_rates_stay_inside_the_exponential_table():
    """Look-ups clip rates outside [k_min, k_max] silently; no tumour voxel of the population may need them:
    the extremes of 20,000 cases with the strongest heterogeneity (0.5 sd of ln perfusion, 4.5 sd out) and the
    necrotic core's 3% perfusion."""
    rng = np.random.default_rng(0)
    lat = draw_latents(rng, population_ages(rng, 20_000), 0.0)
    table = tracer.ExponentialTable(tracer.ArterialInput(), [0.0, 60.0])
    k_min, k_max = np.exp(table.log_k[[0, -1]])
    for perfusion, vp_scale in ((np.exp(2.25), 1.0), (np.exp(-2.25), 1.0), (0.03, 0.03)):
        s_minus, s_plus, *_ = tracer.twocxm_rates(lat["fp"] * perfusion, lat["ps"] * perfusion, lat["ve"],
                                                  lat["vp"] * vp_scale)
        kep = tracer.renkin_crone_ktrans(lat["fp"] * perfusion, lat["ps"] * perfusion) / lat["ve"]
        assert k_min < min(s_minus.min(), kep.min()) and max(s_plus.max(), kep.max()) < k_max / 2, perfusion


def test_exponential_table_matches_brute_force_convolution():
    aif = tracer.ArterialInput("weinmann", arrival_s=12.0, dispersion_s=4.0, injection_s=10.0)
    times = [0.0, 13.0, 20.25, 47.5, 90.0, 150.0]  # 20.25 s falls between grid points
    table = tracer.ExponentialTable(aif, times)
    grid = np.arange(0.0, max(times) + 2 * tracer.STEP_S, tracer.STEP_S)
    dt = 5e-4  # s; trapezoid error (k dt)^2 / 12 < 1e-4 up to k = 1000 /min
    fine = np.arange(0.0, max(times) + dt / 2, dt)
    cp = np.interp(fine, grid, aif.plasma(grid))  # the table's input: linear between grid points
    node = float(np.exp(table.log_k[250]))  # a rate of the table itself (~290 /min): no interpolation in ln k
    for k in (1e-3, 0.05, 1.0, 30.0, node, 1000.0):
        kernel = np.exp(-k * fine / 60.0)
        brute = fftconvolve(cp, kernel)[: len(fine)] - 0.5 * (cp * kernel[0] + cp[0] * kernel)  # trapezoid
        brute = np.interp(times, fine, brute * dt / 60.0)
        # ln-k interpolation: <= 3e-4 (see CONC_TOLERANCE); measured at most 2.2e-4 of the largest value
        assert np.abs(table(np.array(k)) - brute).max() < 5e-4 * brute.max(), k


@pytest.mark.parametrize("form", tracer.AIF_FORMS)
def test_dispersion_keeps_the_area_and_dose_scales_it(form):
    grid = np.arange(0.0, 600.0, tracer.STEP_S)
    sharp = tracer.ArterialInput(form, arrival_s=10.0, injection_s=12.0).plasma(grid)
    area = np.trapezoid(sharp, grid)
    for tau in (2.0, 8.0):
        spread = tracer.ArterialInput(form, arrival_s=10.0, injection_s=12.0, dispersion_s=tau).plasma(grid)
        assert spread.max() < sharp.max() and np.argmax(spread) >= np.argmax(sharp)
        # A unit-area exponential kernel of time constant tau delays the curve without losing any of it; up to T,
        # int_0^T c*k = int_0^T c - tau (c*k)(T) exactly (the part still on its way). Measured: 4e-4, the kernel
        # sampled at 0.5 s; a kernel of the wrong area would miss by its error (all of it, not 1e-3).
        assert np.trapezoid(spread, grid) + tau * spread[-1] == pytest.approx(area, rel=1e-3), tau
    scaled = tracer.ArterialInput(form, arrival_s=10.0, injection_s=12.0, dose_factor=1.2,
                                  cardiac_output_factor=0.8).plasma(grid)
    assert np.trapezoid(scaled, grid) == pytest.approx(area * 1.2 / 0.8, rel=1e-12)


def _necrotic_phantom(necrotic_fraction: float):
    spec = PhantomSpec(site=SITES["ISPY2"], pixel_spacing=1.0, slice_thickness=1.0, times_s=[0.0, 90.0, 180.0],
                       fgt_fraction=0.3, bpe_ktrans=0.01, fp=1.0, ps=0.5, ve=0.3, vp=0.05, radius_mm=7.0,
                       necrotic_fraction=necrotic_fraction, noise_factor=0.01)
    return render_phantom(spec, size=32, rng=np.random.default_rng(0))


def test_necrotic_core_enhances_less_than_its_rim():
    ratios = {}
    for fraction in (0.4, 0.0):
        phantom = _necrotic_phantom(fraction)
        mask = phantom.mask.astype(bool)
        enhancement = phantom.phases[1].astype(np.float64) - phantom.phases[0]
        depth = ndimage.distance_transform_edt(mask)
        core, rim = depth >= np.quantile(depth[mask], 0.75), mask & (depth <= 1)
        ratios[fraction] = enhancement[core].mean() / enhancement[rim].mean()
        if fraction:
            assert phantom.truth["necrotic_voxels"] == pytest.approx(fraction * phantom.truth["tumour_voxels"], rel=0.1)
    # measured 0.19 with a necrotic core (3% perfusion there, partial volume at its border), 1.0 without
    assert ratios[0.4] < 0.4 and ratios[0.0] > 0.8, ratios
