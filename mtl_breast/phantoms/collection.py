"""Synthetic DCE-MRI datasets in the MAMA-MIA layout, with a known pCR model (`mtl-breast synth`).

A dataset is drawn in two stages. First the case-level latents of all cases (site, age, menopause,
density, tumour subtype, kinetics, size) and the pCR label from a logistic model of them; then each case
is rendered by `phantom.render_phantom` from its own child generator and written as NIfTI + JSON, and the
dataset gets its spreadsheet and a site-stratified train/test split.

pCR model (true probability p = sigmoid(logit)):

    logit = -1.0 + b[subtype] + (0.8 zK + 1.6 zkep - 2.6 zR) / (1 + shift * hard)
    zK = (ln Ktrans - ln 0.55) / 0.42, zkep = (ln kep - ln 1.7) / 0.45, zR = (r - 0.13) / 0.029
    b = {luminal_a: -0.6, luminal_b: -0.3, her2_enriched: +0.42, triple_negative: +0.36}

with r the tumour radius as a fraction of the field of view and hard = 1 for dense breasts (c, d). Ktrans,
kep = Ktrans / ve and size are visible in the images (enhancement, washout, extent); subtype is only
partly visible (it shifts Ktrans and the rim pattern). The reported `bayes_balanced_accuracy` is the
expected balanced accuracy of the Bayes-optimal rule FOR BALANCED ACCURACY, "predict pCR when p > pi" with
pi the population pCR rate, which maximises TPR + TNR pointwise (thresholding at 0.5 is optimal for plain
accuracy only). It is computed from the probabilities of 100,000 draws from the same population, so it
does not depend on the number of cases; `bayes_balanced_accuracy_cases` is the same rule scored against
the drawn labels of the written cases.

`difficulty_shift` (>= 0) makes dense breasts (density c/d, more common in young women) harder: stronger
background parenchymal enhancement (x(1 + 4 shift)), smaller rendered tumours (x max(0.5, 1 - 0.25
shift), applied after the label is drawn), more noise (x(1 + shift)) and a flatter pCR logit.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk

from mtl_breast.files import atomic_path, write_text
from mtl_breast.phantoms.physics import Grid, Phantom, PhantomSpec, SiteProtocol, render_phantom
from mtl_breast.phantoms.population import (
    AGE_BINS,
    DENSITIES,
    PHYSICS_MODES,
    SUBTYPES,
    draw_latents,
    draw_physics,
    pcr_population_stats,
    rule_balanced_accuracy,
)

SITES: dict[str, SiteProtocol] = {
    "DUKE": SiteProtocol("DUKE", "axial", flip_j=False, bilateral=True, tr_ms=4.5, flip_deg=10.0, te_ms=2.0,
                         scale=600.0, dtype="int16", snr=30.0, agents=("gadopentetate", "gadobenate")),
    "ISPY1": SiteProtocol("ISPY1", "sagittal", flip_j=False, bilateral=False, tr_ms=8.0, flip_deg=20.0, te_ms=4.2,
                          scale=200.0, dtype="float32", snr=22.0, agents=("gadopentetate",)),
    "ISPY2": SiteProtocol("ISPY2", "axial", flip_j=True, bilateral=False, tr_ms=4.2, flip_deg=12.0, te_ms=1.8,
                          scale=90.0, dtype="float32", snr=35.0, agents=("gadobutrol", "gadoterate")),
    "NACT": SiteProtocol("NACT", "sagittal", flip_j=False, bilateral=False, tr_ms=7.0, flip_deg=20.0, te_ms=4.0,
                         scale=1200.0, dtype="int16", snr=18.0, agents=("gadoterate",)),
}
# Per-case acquisition choices of each site: in-plane spacing and slice thickness (mm), number of phases,
# first post-contrast time and interval (s), scanners (field strength T, manufacturer, model), the share of
# cases whose pre-contrast phase sits on a grid shifted by half a voxel, and the share of records that omit the
# repetition time and the field strength (randomised physics; the flip angle is never recorded).
_ACQUISITION: dict[str, dict[str, Any]] = {
    "DUKE": dict(pixel=(0.66, 0.70, 0.74), slice=(1.0, 1.1), phases=(3, 4, 5), first=100, interval=100,
                 scanners=((1.5, "GE", "SIGNA HDxt"), (3.0, "SIEMENS", "Skyra")), shift=0.15,
                 no_tr=0.1, no_field=0.05),
    "ISPY1": dict(pixel=(0.78, 0.86), slice=(1.5, 1.8, 2.0), phases=(3, 4), first=150, interval=300,
                  scanners=((1.5, "GE", "SIGNA EXCITE"),), shift=0.15, no_tr=0.5, no_field=0.15),
    "ISPY2": dict(pixel=(0.8, 0.85, 0.9), slice=(1.2, 1.5), phases=(4, 5, 6), first=90, interval=90,
                  scanners=((3.0, "SIEMENS", "Prisma"), (3.0, "PHILIPS", "Achieva"), (1.5, "GE", "SIGNA HDxt")),
                  shift=0.1, no_tr=0.15, no_field=0.05),
    "NACT": dict(pixel=(0.9, 1.0), slice=(2.0,), phases=(3, 4), first=150, interval=150,
                 scanners=((1.5, "GE", "SIGNA"),), shift=1.0, no_tr=0.3, no_field=0.1),
}
MANIFEST = "synthetic.json"  # summary + patient ids of the last run, so a re-run can remove stale cases
TRUTH_DIR = "phantom_truth"  # <root>/phantom_truth/<pid>.json: the simulation's hidden values, never read by a reader


def read_truth(root: Path | str, patient_id: str) -> dict:
    """The hidden values of one phantom (pCR probability, kinetics, physics, what its record withheld): for
    scoring and analysis only."""
    return json.loads((Path(root) / TRUTH_DIR / f"{patient_id.lower()}.json").read_text())


def _write_nifti(path: Path, array: np.ndarray, grid: Grid) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetOrigin(grid.origin)
    image.SetSpacing(grid.spacing)
    image.SetDirection(grid.direction)
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), True)


def _pid(site: str, number: int) -> str:
    """Patient ids in the style of the real collections (DUKE_001, ISPY1_1001, ISPY2_100001, NACT_01)."""
    return {"DUKE": f"DUKE_{number:03d}", "ISPY1": f"ISPY1_{1000 + number}", "ISPY2": f"ISPY2_{100000 + number}",
            "NACT": f"NACT_{number:02d}"}[site]


def _pick(rng: np.random.Generator, n: int, share: float) -> set[int]:
    """A few case indices (at least one once there are 5 cases) that lose a field, like the real records."""
    k = int(round(share * n)) if n < 5 else max(1, int(round(share * n)))
    return set(rng.choice(n, k, replace=False).tolist())


def _split(rng: np.random.Generator, pids: list[str], sites: list[str], test_fraction: float):
    """Site-stratified split: the test share of each site by largest remainder, at least one test case."""
    n_test = int(round(test_fraction * len(pids)))
    if test_fraction > 0 and len(pids) > 1:
        n_test = min(max(n_test, 1), len(pids) - 1)
    by_site = {s: [p for p, q in zip(pids, sites, strict=True) if q == s] for s in dict.fromkeys(sites)}
    quota = {s: test_fraction * len(v) for s, v in by_site.items()}
    take = {s: int(math.floor(q)) for s, q in quota.items()}
    for s in sorted(quota, key=lambda s: take[s] - quota[s])[: n_test - sum(take.values())]:
        take[s] += 1
    test = set()
    for s, members in by_site.items():
        test |= set(rng.permutation(members)[: take[s]].tolist())
    return [p for p in pids if p not in test], [p for p in pids if p in test]


def generate_dataset(out: Path | str, num_cases: int = 40, seed: int = 0, size: int = 48,
                     difficulty_shift: float = 0.0, test_fraction: float = 0.25, physics: str = "randomised") -> dict:
    """Write a synthetic DCE-MRI dataset in the MAMA-MIA layout.

    Args:
        out: dataset root; created if needed, files of the same names are replaced.
        num_cases: number of cases, spread evenly over the sites and the age bins.
        seed: the same seed gives the same arrays, labels and metadata.
        size: voxels per side of one breast's field of view (in-plane; slices follow the slice thickness).
        difficulty_shift: >= 0; how much harder dense breasts are (see the module docstring).
        test_fraction: share of cases in the test split, stratified by site.
        physics: "randomised" (per-case T1, relaxivity, AIF, kinetic model, B1, coil, motion, timing, withheld
            acquisition values; `population`) or "fixed" (one value per field strength, every acquisition value
            recorded: for tests that need exact values).

    Returns:
        JSON-serialisable summary: out, num_cases, physics, sites (cases per site), pcr_rate (over known labels),
        pcr_missing, bayes_balanced_accuracy (population, see the module docstring), bayes_balanced_accuracy_cases,
        bayes_balanced_accuracy_by_density, bayes_rule, ceiling_auc and size_only_auc (population), splits
        (train/test counts), phases (cases per phase count), withheld (records without TR / field strength /
        flip angle). The same summary plus the patient ids is written to `<out>/synthetic.json`; each case's
        hidden values go to `<out>/phantom_truth/<pid>.json` (`read_truth`).
    """
    if num_cases < 1 or size < 16:
        raise ValueError(f"need num_cases >= 1 and size >= 16, got num_cases={num_cases}, size={size}")
    if difficulty_shift < 0 or not 0 <= test_fraction < 1:
        raise ValueError(f"need difficulty_shift >= 0 and 0 <= test_fraction < 1, got {difficulty_shift}, "
                         f"{test_fraction}")
    if physics not in PHYSICS_MODES:
        raise ValueError(f"unknown physics {physics!r}; expected one of {PHYSICS_MODES}")
    out = Path(out)
    for sub in ("images", "segmentations/expert", "patient_info_files", TRUTH_DIR):
        (out / sub).mkdir(parents=True, exist_ok=True)
    root = np.random.default_rng(seed)
    site_names = list(SITES)
    sites = [site_names[i] for i in root.permutation(np.arange(num_cases) % len(site_names))]
    bins = root.permutation(np.arange(num_cases) % len(AGE_BINS))
    ages = np.array([root.integers(AGE_BINS[b][0], AGE_BINS[b][1] + 1) for b in bins])
    latents = draw_latents(root, ages, difficulty_shift)
    pcr = (root.random(num_cases) < latents["pcr_probability"]).astype(int)
    no_pcr, no_density, no_menopause = (_pick(root, num_cases, s) for s in (0.08, 0.08, 0.10))
    case_rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(num_cases)]

    pids = [_pid(site, sites[: c + 1].count(site)) for c, site in enumerate(sites)]
    _remove_stale(out, set(pids))

    rows, withheld = [], Counter()
    for c, (site, pid) in enumerate(zip(sites, pids, strict=True)):
        rng, acq, protocol = case_rngs[c], _ACQUISITION[site], SITES[site]
        field, manufacturer, model = acq["scanners"][rng.integers(len(acq["scanners"]))]
        n_phases = int(rng.choice(acq["phases"]))
        times = [0.0] + [acq["first"] * rng.uniform(0.9, 1.1) + k * acq["interval"] * rng.uniform(0.93, 1.07)
                         for k in range(n_phases - 1)]
        case_physics = draw_physics(rng, physics, field_strength=field, tr_ms=protocol.tr_ms, te_ms=protocol.te_ms,
                                    flip_deg=protocol.flip_deg, agents=protocol.agents)
        if physics == "fixed":
            recorded = [float(round(t)) for t in times]
            times = recorded
        else:  # the record misses the effective (k-space centre) time by a few seconds, then rounds it
            error = case_physics.time_error_s
            recorded = [0.0] + [float(round(t + rng.uniform(-error, error))) for t in times[1:]]
        h, slice_mm = float(rng.choice(acq["pixel"])), float(rng.choice(acq["slice"]))
        lat = {k: v[c] for k, v in latents.items()}
        radius = max(lat["radius_frac"] * size * h * lat["shrink"], 1.5 * slice_mm, 2.5 * h)
        spec = PhantomSpec(site=protocol, pixel_spacing=h, slice_thickness=slice_mm, times_s=times,
                           fgt_fraction=float(lat["fgt_fraction"]), bpe_ktrans=float(lat["bpe_ktrans"]),
                           fp=float(lat["fp"]), ps=float(lat["ps"]), ve=float(lat["ve"]), vp=float(lat["vp"]),
                           radius_mm=float(radius), physics=case_physics,
                           necrotic_fraction=float(lat["necrotic_fraction"]),
                           heterogeneity=float(lat["heterogeneity"]) if physics == "randomised" else 0.08,
                           noise_factor=float(lat["noise_factor"]), phase0_shift=bool(rng.random() < acq["shift"]))
        phantom = render_phantom(spec, size=size, rng=rng)
        # What the record gives: randomised physics never the flip angle, and for some cases no TR or field.
        fixed = physics == "fixed"
        given = {"flip_angle": fixed, "repetition_time": fixed or rng.random() >= acq["no_tr"],
                 "field_strength": fixed or rng.random() >= acq["no_field"]}
        withheld.update(k for k, v in given.items() if not v)

        density = None if c in no_density else DENSITIES[lat["density"]]
        menopause = None if c in no_menopause else str(lat["menopause"])
        label = None if c in no_pcr else int(pcr[c])
        info = dict(age=int(ages[c]), menopause=menopause, density=density, pcr=label, manufacturer=manufacturer,
                    subtype=SUBTYPES[lat["subtype"]], model=model, drop_key=(c % 2 == 0), given=given,
                    recorded_times=recorded)
        truth = _truth(spec, phantom, lat, given, recorded, label, physics)
        _write_case(out, pid, phantom, spec, info, truth)
        rows.append(dict(patient_id=pid, dataset=site, site=site, pcr=np.nan if label is None else float(label),
                         age=int(ages[c]), menopause=menopause, tumor_subtype=SUBTYPES[lat["subtype"]],
                         num_phases=n_phases, acquisition_times=str([int(t) for t in recorded]),
                         field_strength=field if given["field_strength"] else np.nan,
                         manufacturer=manufacturer, pixel_spacing=h, slice_thickness=slice_mm,
                         breast_density=density, bilateral=protocol.bilateral))

    table = pd.DataFrame(rows)
    with atomic_path(out / "clinical_and_imaging_info.xlsx") as tmp:
        table.to_excel(tmp, sheet_name="dataset_info", index=False, engine="openpyxl")
    train, test = _split(root, pids, sites, test_fraction)
    width = max(len(train), len(test))
    splits = pd.DataFrame({"train_split": train + [None] * (width - len(train)),
                           "test_split": test + [None] * (width - len(test))})
    write_text(out / "train_test_splits.csv", splits.to_csv(index=False))

    population = pcr_population_stats(difficulty_shift, seed=seed, num_samples=20_000)
    known = table["pcr"].notna().to_numpy()
    summary = {
        "out": str(out),
        "num_cases": num_cases,
        "physics": physics,
        "sites": {s: sites.count(s) for s in site_names if s in sites},
        "pcr_rate": float(table["pcr"][known].mean()) if known.any() else None,
        "pcr_missing": int((~known).sum()),
        "bayes_balanced_accuracy": round(population["bayes_balanced_accuracy"], 4),
        "bayes_balanced_accuracy_cases": round(rule_balanced_accuracy(
            latents["pcr_probability"][known], population["bayes_threshold"], pcr[known]), 4) if known.any() else None,
        "bayes_balanced_accuracy_by_density": population["bayes_balanced_accuracy_by_density"],
        "bayes_rule": f"predict pCR when the true probability > {population['bayes_threshold']:.3f} (population rate)",
        "ceiling_auc": round(population["ceiling_auc"], 4),
        "size_only_auc": round(population["size_only_auc"], 4),
        "splits": {"train": len(train), "test": len(test)},
        "phases": {str(k): v for k, v in sorted(Counter(r["num_phases"] for r in rows).items())},
        "withheld": {k: withheld.get(k, 0) for k in ("flip_angle", "repetition_time", "field_strength")},
    }
    text = json.dumps({**summary, "seed": seed, "size": size, "difficulty_shift": difficulty_shift,
                       "patient_ids": pids}, indent=2)
    write_text(out / MANIFEST, text)
    return summary


def _truth(spec: PhantomSpec, phantom: Phantom, lat: dict, given: dict, recorded: list[float], label: int | None,
           physics: str) -> dict:
    """The hidden values of one case, as written to its truth file."""
    phys = spec.physics
    pattern = "rim" if spec.necrotic_fraction > 0 else ("heterogeneous" if spec.heterogeneity > 0.25 else "homogeneous")
    return {
        "physics": physics, "pcr": label, "pcr_probability": float(lat["pcr_probability"]),
        "grade": float(lat["grade"]), "immune": float(lat["immune"]), "subtype": SUBTYPES[lat["subtype"]],
        "fp": spec.fp, "ps": spec.ps, "ktrans": spec.ktrans, "ve": spec.ve, "vp": spec.vp,
        "kep": spec.ktrans / spec.ve, "radius_mm": spec.radius_mm, "radius_fraction": float(lat["radius_frac"]),
        "necrotic_fraction": spec.necrotic_fraction, "heterogeneity": spec.heterogeneity,
        "enhancement_pattern": pattern, "bpe_ktrans": spec.bpe_ktrans, "fgt_fraction": spec.fgt_fraction,
        "kinetic_family": phys.family, "aif": asdict(phys.aif), "agent": phys.agent, "relaxivity": phys.r1,
        "field_strength": phys.field_strength, "repetition_time": phys.tr_ms, "flip_angle": phys.flip_deg,
        "t10_tumour_s": phys.t10[-1], "t10_s": list(phys.t10), "b1_scale": phys.b1_scale,
        "b1_gradient": phys.b1_gradient, "coil_elements": phys.coil_elements, "motion_voxels": phys.motion_voxels,
        "effective_times_s": [round(t, 2) for t in spec.times_s], "recorded_times_s": recorded,
        "given": given, "phase0_shifted": spec.phase0_shift, **phantom.truth,
    }


def _remove_stale(out: Path, keep: set[str]) -> None:
    """Delete the files of cases that an earlier run into `out` wrote (listed in its manifest) and this one won't."""
    try:
        previous = json.loads((out / MANIFEST).read_text())["patient_ids"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    for pid in set(previous) - keep:
        low = str(pid).lower()
        owned = [out / "segmentations" / "expert" / f"{low}.nii.gz", out / "patient_info_files" / f"{low}.json",
                 out / TRUTH_DIR / f"{low}.json"]
        for path in [*(out / "images" / pid).glob(f"{low}_*.nii.gz"), *owned]:
            path.unlink(missing_ok=True)
        if (out / "images" / pid).is_dir() and not any((out / "images" / pid).iterdir()):
            (out / "images" / pid).rmdir()


def _write_case(out: Path, pid: str, phantom: Phantom, spec: PhantomSpec, info: dict[str, Any],
                truth: dict[str, Any]) -> None:
    """Phase images, expert mask, the patient_info JSON (what a real record gives) and the truth file of one case
    (folder upper-case, files lower-case)."""
    low = pid.lower()
    folder = out / "images" / pid
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"{low}_*.nii.gz"):  # phases beyond this run's count would read as extra phases
        index = old.name[len(low) + 1:-len(".nii.gz")]
        if index.isdigit() and int(index) >= len(phantom.phases):
            old.unlink()
    for t, (array, grid) in enumerate(zip(phantom.phases, phantom.grids, strict=True)):
        _write_nifti(folder / f"{low}_{t:04d}.nii.gz", array, grid)
    _write_nifti(out / "segmentations" / "expert" / f"{low}.nii.gz", phantom.mask, phantom.grids[1])

    box = dict(zip(("x_min", "x_max", "y_min", "y_max", "z_min", "z_max"), phantom.breast_box, strict=True))
    lesion: dict[str, Any] = {"breast_coordinates": box, "tumor_subtype": info["subtype"]}
    clinical: dict[str, Any] = {"age": info["age"], "menopausal_status": info["menopause"]}
    # Missing values appear both ways seen in real records: the key absent, or null.
    if info["pcr"] is not None or not info["drop_key"]:
        lesion["pcr"] = info["pcr"]
    if info["density"] is not None or not info["drop_key"]:
        clinical["breast_density"] = info["density"]
    phys, given = spec.physics, info["given"]
    imaging: dict[str, Any] = {
        "bilateral": spec.site.bilateral, "dataset": spec.site.name, "site": spec.site.name,
        "scanner_manufacturer": info["manufacturer"], "scanner_model": info["model"], "echo_time": phys.te_ms,
        "num_phases": len(spec.times_s), "acquisition_times": [int(t) for t in info["recorded_times"]],
        "pixel_spacing": [spec.pixel_spacing, spec.pixel_spacing], "slice_thickness": spec.slice_thickness,
        "image_orientation": spec.site.orientation,
    }
    for key, value in (("field_strength", phys.field_strength), ("repetition_time", round(phys.tr_ms, 2)),
                       ("flip_angle", phys.flip_deg)):
        if given[key]:
            imaging[key] = value
    record = {"patient_id": pid, "clinical_data": clinical, "primary_lesion": lesion, "imaging_data": imaging}
    write_text(out / "patient_info_files" / f"{low}.json", json.dumps(record, indent=2))
    write_text(out / TRUTH_DIR / f"{low}.json", json.dumps(truth, indent=2))
