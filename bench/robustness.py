"""Robustness of the pCR model and the baselines on the randomised phantoms: AUC per slice of the hidden physics,
and leave-one-site-out. Prints and writes JSON (and the table as markdown).

The evaluation sets are those of configs/evaluation/sets.yaml: the development set (designs are chosen on it and on
validation splits) and the SEALED set (scored once per design that becomes a default, never to choose anything;
every use is appended to bench/sealed_uses.json and a second use of a design name is refused).

    # both sets, generated once into SETS/development/data and SETS/sealed/data (phantoms + truth files)
    python bench/robustness.py sets --out /work/runs/eval_sets
    # per-case scores of a run's model and of every baseline on a set, with each case's hidden attributes;
    # kept in --out and reused (only missing leave-one-site-out runs are scored on a second call)
    python bench/robustness.py score --run RUN --set development --sets /work/runs/eval_sets \\
        --out /work/runs/robustness/RUN_dev.json [--loso-run DUKE=RUN_NO_DUKE ...]
    python bench/robustness.py score --run RUN --set sealed --design NAME ...   # once per design
    # the table: AUC with 95% bootstrap intervals overall and per slice, paired differences, leave-one-site-out
    python bench/robustness.py table /work/runs/robustness/RUN_dev.json --out /work/runs/robustness/dev.md
    # another design against the reference run on the same set: AUCs and paired differences
    python bench/robustness.py compare /work/runs/robustness/RUN_dev.json /work/runs/robustness/OTHER_dev.json

Slices (from each case's truth file, `phantoms.collection.read_truth`):

- tumour T10 far from the assumed value: |ln(T10 true / T10 assumed)| > 0.25, the assumed value being the one
  `acquisition.field_values` gives for the case's field strength, or for `acquisition.DEFAULT_FIELD_T` when its
  record omits the field;
- flip angle / TR / field strength not given by the case's record (randomised phantoms never give the flip angle:
  that slice is every case);
- motion above half a voxel (the largest of `motion_voxels_per_phase`);
- each arterial-input form, each kinetic family, each site (the patient id's prefix).

A slice with fewer than `MIN_CLASS_CASES` cases with pCR or without pCR gets its n and "too few", no AUC.

Leave-one-site-out: each baseline is refitted on the run's training cases of the other three sites and scores the
left-out site's cases of the set (expert and predicted masks; the predicted mask is the run's model's). The model's
needs a fine-tune per left-out site: give those runs with ``--loso-run SITE=RUN`` (their training split must hold
no case of SITE); a site without one is reported as "not run".
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import yaml
from bench_common import run_meta

from mtl_breast.acquisition import DEFAULT_FIELD_T, field_values
from mtl_breast.baselines import LogisticBaseline
from mtl_breast.files import write_text
from mtl_breast.metrics.classification import auc_with_interval, paired_auc_difference, roc_auc
from mtl_breast.metrics.intervals import RESAMPLES, bootstrap_interval
from mtl_breast.models.kinetics import FEATURE_SETS
from mtl_breast.phantoms.collection import MANIFEST, generate_dataset, read_truth

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's experiments/ (a script sees only bench/)
from experiments.common import INPUTS, held_out_set, score_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SETS_CONFIG = ROOT / "configs" / "evaluation" / "sets.yaml"
SEALED_USES = ROOT / "bench" / "sealed_uses.json"
SITES = ("DUKE", "ISPY1", "ISPY2", "NACT")
AIF_FORMS = ("parker", "weinmann")
KINETIC_FAMILIES = ("etofts", "2cxm")
T10_FAR = 0.25  # |ln(T10 true / T10 assumed)| above it: the tumour's T10 is far from what a reader assumes
MOTION_HALF_VOXEL = 0.5
MIN_CLASS_CASES = 10  # a slice with fewer cases with pCR or without pCR gets no AUC

MODEL = "joint model, as acquired"
WASHOUT = "joint model, washout removed (post-contrast flattened)"
CEILING = "generating model (ceiling)"
SCORED_VARIANTS = ("as acquired", "washout removed (post-contrast flattened)")
# Columns of the markdown table: header -> score name of `score_run`.
COLUMNS = {"model": MODEL, **{f"{name}, {mask}": f"{name} baseline, {mask} mask"
                              for name in ("size", "kinetic", "concentration", "rim")
                              for mask in ("expert", "predicted")}}
BASELINE_NAMES = tuple(f"{name} baseline, {mask} mask" for name in FEATURE_SETS for mask in ("expert", "predicted"))
# Paired AUC differences over all cases: label -> (score, other score).
DIFFERENCES = {"model - size (expert mask)": (MODEL, "size baseline, expert mask"),
               "model - size (predicted mask)": (MODEL, "size baseline, predicted mask"),
               "washout-removed drop (model - model with washout removed)": (MODEL, WASHOUT)}
for _variant in SCORED_VARIANTS:
    assert _variant in INPUTS, _variant


# ------------------------------------------------------------------------------------------------ pure logic
def site_of(pid: str) -> str:
    """The site of a phantom case: its patient id's prefix (DUKE_001 -> DUKE)."""
    return pid.split("_")[0].upper()


def case_attributes(truth: Mapping) -> dict:
    """What the slices read from one case's truth file (`read_truth`)."""
    given = truth.get("given", {})
    field = float(truth["field_strength"])
    field_given = bool(given.get("field_strength", True))
    t10_assumed = field_values(field if field_given else DEFAULT_FIELD_T)[0]
    per_phase = truth.get("motion_voxels_per_phase") or [truth.get("motion_voxels", 0.0)]
    return {"field_strength": field, "field_given": field_given,
            "tr_given": bool(given.get("repetition_time", True)), "flip_given": bool(given.get("flip_angle", True)),
            "t10_true": float(truth["t10_tumour_s"]), "t10_assumed": t10_assumed,
            "t10_log_ratio": math.log(float(truth["t10_tumour_s"]) / t10_assumed),
            "motion_max": float(max(per_phase)), "aif_form": truth["aif"]["form"],
            "kinetic_family": truth["kinetic_family"], "enhancement_pattern": truth.get("enhancement_pattern"),
            "necrotic_fraction": float(truth.get("necrotic_fraction", 0.0)),
            "pcr_probability": float(truth["pcr_probability"])}


# Slices: name -> whether a case (its `case_attributes` plus "site") belongs to it. "all cases" first.
SLICES: dict[str, Callable[[Mapping], bool]] = {
    "all cases": lambda a: True,
    f"tumour T10 far from assumed (|ln ratio| > {T10_FAR})": lambda a: abs(a["t10_log_ratio"]) > T10_FAR,
    f"tumour T10 near assumed (|ln ratio| <= {T10_FAR})": lambda a: abs(a["t10_log_ratio"]) <= T10_FAR,
    "flip angle not given": lambda a: not a["flip_given"],
    "TR not given": lambda a: not a["tr_given"],
    "TR given": lambda a: a["tr_given"],
    "field strength not given": lambda a: not a["field_given"],
    f"motion > {MOTION_HALF_VOXEL} voxel": lambda a: a["motion_max"] > MOTION_HALF_VOXEL,
    f"motion <= {MOTION_HALF_VOXEL} voxel": lambda a: a["motion_max"] <= MOTION_HALF_VOXEL,
    **{f"AIF {form}": (lambda a, form=form: a["aif_form"] == form) for form in AIF_FORMS},
    **{f"kinetics {family}": (lambda a, family=family: a["kinetic_family"] == family) for family in KINETIC_FAMILIES},
    **{f"site {site}": (lambda a, site=site: a["site"] == site) for site in SITES},
}


def slice_indices(ids: Sequence[str], attributes: Mapping[str, Mapping]) -> dict[str, np.ndarray]:
    """Case indices (into `ids`) of every slice of `SLICES`."""
    rows = [{**attributes[pid], "site": site_of(pid)} for pid in ids]
    return {name: np.array([i for i, a in enumerate(rows) if member(a)], dtype=np.int64)
            for name, member in SLICES.items()}


def too_few(y: Sequence[float]) -> bool:
    """Whether cases of pCR labels `y` are too few for an AUC: fewer than `MIN_CLASS_CASES` of either class."""
    y = np.asarray(y, dtype=np.float64)
    return int((y == 1).sum()) < MIN_CLASS_CASES or int((y == 0).sum()) < MIN_CLASS_CASES


def auc_cell(y: np.ndarray, runs: Sequence[np.ndarray], idx: np.ndarray, other: Sequence[np.ndarray] | None = None,
             samples: int = RESAMPLES) -> dict:
    """AUC of the cases `idx` (mean over runs, each run one score array over all cases), or with `other` the paired
    difference AUC(runs) - AUC(other), with a 95% bootstrap interval resampling the cases once for every run and
    both scores; n, positives, negatives, and ``too_few`` (then no AUC)."""
    yi = y[idx]
    cell = {"n": len(idx), "positives": int((yi == 1).sum()), "negatives": int((yi == 0).sum()),
            "too_few": too_few(yi)}
    if cell["too_few"]:
        return cell
    scores = [np.asarray(s, dtype=np.float64)[idx] for s in runs]
    against = None if other is None else [np.asarray(s, dtype=np.float64)[idx] for s in other]

    def statistic(i: np.ndarray) -> float:
        if len(np.unique(yi[i])) < 2:
            return float("nan")
        values = [roc_auc(yi[i], s[i]) for s in scores]
        if against is not None:
            values = [v - roc_auc(yi[i], b[i]) for v, b in zip(values, against, strict=True)]
        return float(np.mean(values))

    per_run = [roc_auc(yi, s) for s in scores]
    if against is not None:
        per_run = [v - roc_auc(yi, b) for v, b in zip(per_run, against, strict=True)]
    return {**cell, "value": float(np.mean(per_run)), "per_run": per_run,
            "ci": list(bootstrap_interval(statistic, len(idx), samples=samples))}


def loso_baseline_scores(train_ids: Sequence[str], train_rows: Sequence[Mapping], y_train: Sequence[float],
                         ids: Sequence[str], expert_rows: Sequence[Mapping], predicted_rows: Sequence[Mapping],
                         feature_sets: Mapping[str, tuple[str, ...]] = FEATURE_SETS,
                         baseline: type = LogisticBaseline) -> dict:
    """Leave-one-site-out baselines: for each site of `ids`, each feature set fitted on the training cases of the
    OTHER sites only, scoring that site's cases (expert- and predicted-mask feature rows).

    Returns:
        ``{"scores": {"<set> baseline, <mask> mask": [one score per case of ids]}, "fitted_on": {site: number of
        training cases}}``; each case's score comes from the fit that left its site out.
    """
    train_sites = np.array([site_of(p) for p in train_ids])
    sites = np.array([site_of(p) for p in ids])
    y_train = np.asarray(y_train, dtype=np.float64)
    scores = {f"{name} baseline, {mask} mask": np.full(len(ids), np.nan)
              for name in feature_sets for mask in ("expert", "predicted")}
    fitted_on = {}
    for site in dict.fromkeys(sites.tolist()):
        keep = np.flatnonzero(train_sites != site)
        held = np.flatnonzero(sites == site)
        fitted_on[site] = len(keep)
        for name, features in feature_sets.items():
            model = baseline(features).fit([train_rows[i] for i in keep], y_train[keep])
            for mask, rows in (("expert", expert_rows), ("predicted", predicted_rows)):
                scores[f"{name} baseline, {mask} mask"][held] = model.predict_proba([rows[i] for i in held])
    return {"scores": {k: v.tolist() for k, v in scores.items()}, "fitted_on": fitted_on}


def read_uses(path: Path) -> dict:
    """The sealed-set log: ``{"about": ..., "uses": [...]}`` (an absent file: no use yet)."""
    if not Path(path).exists():
        return {"about": "Each scoring of the sealed evaluation set (configs/evaluation/sets.yaml), appended by "
                         "bench/robustness.py; a second use of a design name is refused without --rescore-reason.",
                "uses": []}
    return json.loads(Path(path).read_text())


def sealed_use(path: Path, design: str | None, run: str, cases: int, seed: int, commit: str,
               rescore_reason: str | None = None, now: str | None = None) -> dict:
    """Record one use of the sealed set in `path`, refusing a second use of the same design name.

    Args:
        path: the log (bench/sealed_uses.json).
        design: the design this scoring evaluates (required).
        run, cases, seed, commit: what is scored, and the code's commit.
        rescore_reason: why a design already scored is scored again (recorded); without it a second use of
            `design` raises.
        now: the date recorded (default: now, UTC).

    Returns:
        the recorded entry.

    Raises:
        SystemExit: no design, or the design was already scored and no reason was given.
    """
    if not design:
        raise SystemExit("the sealed set is scored only for a named design: pass --design NAME")
    log = read_uses(path)
    earlier = [u for u in log["uses"] if u["design"] == design]
    if earlier and not rescore_reason:
        first = earlier[0]
        raise SystemExit(f"design {design!r} was already scored on the sealed set ({first['date']}, run "
                         f"{first['run']}, commit {first['commit']}); the sealed set is scored once per design. "
                         "Pass --rescore-reason TEXT to score it again (the reason is recorded)")
    date = now or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    entry = {"date": date, "design": design, "run": run, "commit": commit, "cases": cases, "seed": seed}
    if earlier:
        entry["rescore_reason"] = rescore_reason
    log["uses"].append(entry)
    write_text(path, json.dumps(log, indent=2) + "\n")
    return entry


def code_commit() -> str:
    """HEAD of this checkout, with ``+dirty`` when tracked code (bench/, mtl_breast/, configs/) differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "bench", "mtl_breast", "configs")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


# ------------------------------------------------------------------------------------------------ sets
def read_sets(path: Path = SETS_CONFIG) -> dict:
    return yaml.safe_load(Path(path).read_text())


def set_state(data: Path, config: Mapping) -> bool:
    """Whether `data` already holds the set of `config` (seed, cases, size); False when it holds none.

    Raises:
        SystemExit: it holds phantoms of another seed, count or size.
    """
    manifest = data / MANIFEST
    if not manifest.exists():
        return False
    held = json.loads(manifest.read_text())
    want = {"seed": config["seed"], "num_cases": config["cases"], "size": config["size"]}
    got = {k: held.get(k) for k in want}
    if got != want:
        raise SystemExit(f"{data} holds phantoms of {got}, not {want}: use another --sets folder")
    return True


def cmd_sets(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    out, made = Path(args.out), {}
    for name, config in read_sets().items():
        data = out / name / "data"
        t0 = time.perf_counter()
        if set_state(data, config):
            made[name] = {"data": str(data), "generated": False}
            continue
        summary = generate_dataset(data, num_cases=config["cases"], seed=config["seed"], size=config["size"],
                                   test_fraction=0.0)
        made[name] = {"data": str(data), "generated": True, "seconds": round(time.perf_counter() - t0, 1),
                      "sites": summary["sites"], "withheld": summary["withheld"]}
    return {"experiment": "robustness sets", "sets": made, **run_meta(sys.argv, started)}


# ------------------------------------------------------------------------------------------------ score
def _loso_runs(pairs: Sequence[str]) -> dict[str, Path]:
    runs = {}
    for pair in pairs:
        site, sep, run = pair.partition("=")
        if not sep or site.upper() not in SITES:
            raise SystemExit(f"--loso-run takes SITE=RUN with SITE one of {SITES}, got {pair!r}")
        runs[site.upper()] = Path(run)
    return runs


def _check_loso_run(site: str, run: Path) -> None:
    """A leave-one-site-out run must not have trained on its left-out site."""
    from mtl_breast.data.mamamia import read_splits

    seen = [p for p in read_splits(run / "data")["train"] if site_of(p) == site]
    if seen:
        raise SystemExit(f"{run} trained on {len(seen)} {site} cases (e.g. {seen[0]}): not a run leaving {site} out")


def _score_loso_model(site: str, run: Path, kept: dict, set_dir: Path, config: Mapping) -> dict:
    """The model of a run fine-tuned without `site`, scored on the set's cases of that site."""
    from mtl_breast.predictor import InferenceSettings, read_weights_config

    _check_loso_run(site, run)
    weights = run / "weights" / "mtl"
    settings = InferenceSettings.from_config(read_weights_config(weights))
    data, cache = held_out_set(set_dir, config["cases"], config["size"], settings, config["seed"])
    ids = [p for p in kept["scored"]["ids"] if site_of(p) == site]
    scored = score_run(run, weights, data, cache, ("as acquired",), ids=ids)
    return {"run": str(run.resolve()), "ids": scored["ids"], "y": scored["y"], "scores": scored["scores"][MODEL]}


def cmd_score(args: argparse.Namespace) -> dict:
    from mtl_breast.predictor import InferenceSettings, read_weights_config

    started = time.perf_counter()
    config = read_sets()[args.set]
    set_dir = Path(args.sets) / args.set
    if not set_state(set_dir / "data", config):
        raise SystemExit(f"{set_dir / 'data'} holds no phantoms: run `python bench/robustness.py sets --out "
                         f"{args.sets}` first")
    run, out = Path(args.run), Path(args.out)
    loso_runs = _loso_runs(args.loso_run)
    key = {"run": str(run.resolve()), "set": args.set, "seed": config["seed"]}
    kept = json.loads(out.read_text()) if out.exists() else None
    if kept is not None and {k: kept.get(k) for k in key} != key:
        raise SystemExit(f"{out} holds the scores of {kept.get('run')} on {kept.get('set')} (seed "
                         f"{kept.get('seed')}), not of {key['run']} on {args.set}: use another --out")
    if kept is not None and args.set == "sealed" and kept.get("design") != args.design:
        raise SystemExit(f"{out} holds the sealed scores of design {kept.get('design')!r}, not {args.design!r}")
    missing = {s: r for s, r in loso_runs.items()
               if kept is None or kept["loso_model"].get(s, {}).get("run") != str(r.resolve())}
    if args.set == "sealed" and (kept is None or missing):
        entry = sealed_use(Path(args.uses), args.design, key["run"], config["cases"], config["seed"], code_commit(),
                           args.rescore_reason)
        print(f"sealed set use recorded in {args.uses}: {json.dumps(entry)}", file=sys.stderr)
    timings = dict(kept.get("timings", {})) if kept else {}
    fresh = kept is None or bool(missing)
    if kept is None:
        t0 = time.perf_counter()
        weights = run / "weights" / "mtl"
        settings = InferenceSettings.from_config(read_weights_config(weights))
        data, cache = held_out_set(set_dir, config["cases"], config["size"], settings, config["seed"])
        timings["preprocess_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        scored = score_run(run, weights, data, cache, SCORED_VARIANTS, features=True)
        timings["score_run_s"] = round(time.perf_counter() - t0, 1)
        f = scored.pop("features")
        t0 = time.perf_counter()
        loso = loso_baseline_scores(f["train_ids"], f["train_rows"], f["y_train"], scored["ids"], f["expert_rows"],
                                    f["predicted_rows"])
        timings["loso_baselines_s"] = round(time.perf_counter() - t0, 1)
        attributes = {pid: case_attributes(read_truth(data, pid)) for pid in scored["ids"]}
        kept = {**key, "design": args.design, "set_cases": config["cases"], "data": str(data), "scored": scored,
                "attributes": attributes, "loso_baselines": loso, "loso_model": {}, "features": f}
    out.parent.mkdir(parents=True, exist_ok=True)
    for site, loso_run in missing.items():
        t0 = time.perf_counter()
        kept["loso_model"][site] = _score_loso_model(site, loso_run, kept, set_dir, config)
        timings[f"loso_model_{site}_s"] = round(time.perf_counter() - t0, 1)
        write_text(out, json.dumps({**kept, "timings": timings}) + "\n")  # each site kept as soon as scored
    if fresh:  # a call that scored nothing new leaves the kept file (and its command and timings) as it was
        kept = {**kept, "timings": timings, **run_meta(sys.argv, started)}
        write_text(out, json.dumps(kept) + "\n")
    y = np.array(kept["scored"]["y"])
    return {"experiment": "robustness score", "out": str(out), "run": key["run"], "set": args.set,
            "reused": not fresh, "cases": len(y), "positives": int(y.sum()), "loso_model": sorted(kept["loso_model"]),
            "timings": timings}


# ------------------------------------------------------------------------------------------------ table
def summarise(files: Sequence[Mapping], samples: int = RESAMPLES) -> dict:
    """The robustness table of score files of ONE set (several runs: AUC is the mean over runs)."""
    first = files[0]
    for other in files[1:]:
        if other["scored"]["ids"] != first["scored"]["ids"]:
            raise SystemExit(f"{first['run']} and {other['run']} were scored on different cases: one table per set")
    ids, y = first["scored"]["ids"], np.array(first["scored"]["y"], dtype=np.float64)
    slices = slice_indices(ids, first["attributes"])
    names = [n for n in first["scored"]["scores"] if all(n in f["scored"]["scores"] for f in files)]

    def runs_of(name: str) -> list[np.ndarray]:
        return [np.array(f["scored"]["scores"][name], dtype=np.float64) for f in files]

    table = {}
    for slice_name, idx in slices.items():
        table[slice_name] = {name: auc_cell(y, runs_of(name), idx, samples=samples) for name in names}
        table[slice_name]["washout-removed drop"] = auc_cell(y, runs_of(MODEL), idx, runs_of(WASHOUT), samples)
    everything = slices["all cases"]
    differences = {label: auc_cell(y, runs_of(a), everything, runs_of(b), samples)
                   for label, (a, b) in DIFFERENCES.items()}
    loso = {}
    for site in SITES:
        idx = slices[f"site {site}"]
        row = {"in-distribution": {name: auc_cell(y, runs_of(name), idx, samples=samples)
                                   for name in (MODEL, *BASELINE_NAMES)},
               "leave-site-out": {name: auc_cell(y, [np.array(f["loso_baselines"]["scores"][name]) for f in files],
                                                 idx, samples=samples) for name in BASELINE_NAMES},
               "fitted_on": [f["loso_baselines"]["fitted_on"].get(site) for f in files]}
        if all(site in f["loso_model"] for f in files):
            model_runs = []
            for f in files:
                full = np.full(len(ids), np.nan)
                position = {p: i for i, p in enumerate(ids)}
                for pid, s in zip(f["loso_model"][site]["ids"], f["loso_model"][site]["scores"], strict=True):
                    full[position[pid]] = s
                model_runs.append(full)
            row["leave-site-out"][MODEL] = auc_cell(y, model_runs, idx, samples=samples)
            row["model runs"] = [f["loso_model"][site]["run"] for f in files]
        else:
            row["leave-site-out"][MODEL] = "not run"
        loso[site] = row
    dice = np.array([f["scored"]["dice"] for f in files])
    flip_all = len(slices["flip angle not given"]) == len(ids)
    return {"set": first["set"], "seed": first["seed"], "runs": [f["run"] for f in files],
            "designs": [f.get("design") for f in files], "cases": len(ids), "positives": int(y.sum()),
            "dice": float(dice.mean()), "flip_angle_never_given": flip_all, "samples": samples,
            "t10_far": T10_FAR, "min_class_cases": MIN_CLASS_CASES, "table": table, "differences": differences,
            "loso": loso}


def _cell_md(cell, signed: bool = False) -> str:
    if isinstance(cell, str):
        return cell
    if cell["too_few"]:
        return f"too few (n={cell['n']}, {cell['positives']} pCR)"
    value = f"{cell['value']:+.3f}" if signed else f"{cell['value']:.3f}"
    return f"{value} [{cell['ci'][0]:.2f}, {cell['ci'][1]:.2f}]"


def render_md(r: Mapping) -> list[str]:
    runs = ", ".join(Path(p).name for p in r["runs"])
    lines = [f"### Robustness on the {r['set']} set (seed {r['seed']})", "",
             f"{r['cases']} phantoms with known pCR ({r['positives']} pCR), run(s) {runs}; AUC (mean over runs) with "
             f"a 95% bootstrap interval over the slice's cases ({r['samples']} resamples). Baselines: logistic "
             "regressions fitted on the run's training split with expert masks; features on these cases from the "
             "expert mask or the model's predicted mask. A slice with fewer than "
             f"{r['min_class_cases']} cases with or without pCR shows its n and \"too few\". Model Dice on these "
             f"cases: {r['dice']:.3f}.", ""]
    if r["flip_angle_never_given"]:
        lines += ["No randomised phantom's record gives its flip angle: the slice \"flip angle not given\" is "
                  "every case (the same numbers as \"all cases\").", ""]
    header = ["slice", "n (pCR)", *COLUMNS, "ceiling", "washout-removed drop"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in r["table"].items():
        any_cell = row[MODEL]
        cells = [name.replace("|", "\\|"), f"{any_cell['n']} ({any_cell['positives']})"]  # a pipe would end the cell
        if any_cell["too_few"]:
            cells += ["too few"] * (len(header) - 2)
        else:
            cells += [_cell_md(row[score]) for score in (*COLUMNS.values(), CEILING)]
            cells.append(_cell_md(row["washout-removed drop"], signed=True))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| paired AUC difference, all cases | value [95% CI] |", "|---|---|"]
    lines += [f"| {label} | {_cell_md(cell, signed=True)} |" for label, cell in r["differences"].items()]
    lines += ["", "Leave-one-site-out: baselines refitted on the training cases of the other three sites (cases "
              "fitted on in brackets), scoring the left-out site's cases; in-distribution: fitted on all sites' "
              "training cases. The model's leave-site-out column needs a fine-tune without the site "
              "(`--loso-run SITE=RUN`).", ""]
    shown = {"model": MODEL, **{k: v for k, v in COLUMNS.items() if k != "model"}}
    header = ["site (fitted on)", "n (pCR)", *[f"{k}: in / out" for k in shown]]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for site, row in r["loso"].items():
        first = row["in-distribution"][MODEL]
        cells = [f"{site} ({', '.join(str(n) for n in row['fitted_on'])})", f"{first['n']} ({first['positives']})"]
        for score in shown.values():
            out = row["leave-site-out"][score]
            cells.append("too few" if first["too_few"] else
                         f"{_cell_md(row['in-distribution'][score])} / {_cell_md(out)}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def cmd_table(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    by_set: dict[tuple[str, int], list[dict]] = {}
    for path in args.files:
        f = json.loads(Path(path).read_text())
        by_set.setdefault((f["set"], f["seed"]), []).append(f)
    results = [summarise(files, args.samples) for files in by_set.values()]
    lines = []
    for r in results:
        lines += render_md(r) + [""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"experiment": "robustness table", "files": args.files, "results": results,
              **run_meta(sys.argv, started)}
    markdown, data = (out, out.with_suffix(".json")) if out.suffix == ".md" else (out.with_suffix(".md"), out)
    write_text(markdown, "\n".join(lines))
    write_text(data, json.dumps(result, indent=2) + "\n")
    print("\n".join(lines))
    return {"experiment": "robustness table", "markdown": str(markdown), "json": str(data),
            "seconds": result["seconds"]}


def compare(reference: Mapping, other: Mapping, seed: int = 0) -> dict:
    """Another design's model against a reference run's, on the same cases of the same set: each model's AUC (as
    acquired and with the washout removed) and paired differences (one case resampling for both AUCs) of the other
    model against its own washout-removed input, the reference's model and the reference's expert-mask baselines."""
    if (reference["set"], reference["seed"]) != (other["set"], other["seed"]):
        raise SystemExit(f"{other['run']} was scored on {other['set']} (seed {other['seed']}), {reference['run']} on "
                         f"{reference['set']} (seed {reference['seed']}): compare score files of one set")
    ref, oth = reference["scored"], other["scored"]
    if ref["ids"] != oth["ids"]:
        raise SystemExit(f"{reference['run']} and {other['run']} scored different cases; rescore both with `score`")
    y = np.array(ref["y"], dtype=np.float64)  # None (pCR unknown) reads as NaN
    known = ~np.isnan(y)

    def col(scored: Mapping, name: str) -> np.ndarray:
        return np.array(scored["scores"][name], dtype=np.float64)[known]

    y, model, washout, reference_model = y[known], col(oth, MODEL), col(oth, WASHOUT), col(ref, MODEL)
    against = {"its washout-removed input": washout, "the reference model": reference_model,
               **{f"{name} baseline, expert mask": col(ref, f"{name} baseline, expert mask")
                  for name in ("size", "kinetic", "rim")}}
    return {"reference": reference["run"], "other": other["run"], "set": reference["set"], "cases": int(known.sum()),
            "positives": int(y.sum()),
            "auc": {"other model": auc_with_interval(y, model, seed=seed),
                    "other model, washout removed": auc_with_interval(y, washout, seed=seed),
                    "reference model": auc_with_interval(y, reference_model, seed=seed)},
            "other model minus": {name: paired_auc_difference(y, model, score, seed=seed)
                                  for name, score in against.items()},
            "dice": {"other model": float(np.nanmean(np.array(oth["dice"], dtype=np.float64))),
                     "reference model": float(np.nanmean(np.array(ref["dice"], dtype=np.float64)))}}


def cmd_compare(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    files = [json.loads(Path(p).read_text()) for p in (args.reference, args.other)]
    result = {"experiment": "robustness compare", **compare(*files), **run_meta(sys.argv, started)}
    if args.out:
        write_text(Path(args.out), json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    sets = sub.add_parser("sets", help="generate the development and sealed sets of configs/evaluation/sets.yaml")
    sets.add_argument("--out", required=True, help="folder of the sets (<out>/<set>/data)")
    score = sub.add_parser("score", help="per-case scores of a run's model and the baselines on a set")
    score.add_argument("--run", required=True, help="a `mtl-breast demo` folder")
    score.add_argument("--set", required=True, choices=("development", "sealed"))
    score.add_argument("--sets", required=True, help="the folder `sets` wrote")
    score.add_argument("--out", required=True, help="score file (kept and reused)")
    score.add_argument("--design", help="the design scored (required for the sealed set)")
    score.add_argument("--rescore-reason", help="why a design already scored on the sealed set is scored again")
    score.add_argument("--loso-run", action="append", default=[], metavar="SITE=RUN",
                       help="a run fine-tuned without SITE's cases, for the model's leave-one-site-out")
    score.add_argument("--uses", default=str(SEALED_USES), help=argparse.SUPPRESS)
    table = sub.add_parser("table", help="the robustness table of score files")
    table.add_argument("files", nargs="+")
    table.add_argument("--out", required=True, help="X.md (X.json written beside it) or X.json (and X.md)")
    table.add_argument("--samples", type=int, default=RESAMPLES, help="bootstrap resamples")
    comp = sub.add_parser("compare", help="another design's model against a reference run's, paired on one set")
    comp.add_argument("reference", help="score file of the reference run (e.g. the demo's design)")
    comp.add_argument("other", help="score file of the other design's run on the same set")
    comp.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    result = {"sets": cmd_sets, "score": cmd_score, "table": cmd_table, "compare": cmd_compare}[args.command](args)
    if args.command == "sets":
        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_text(Path(args.out) / "sets.json", json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
