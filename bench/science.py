"""The evidence suite: does the joint model learn pCR from contrast kinetics, and does MAE pretraining help?

Every experiment runs on CPU on synthetic phantoms, on its own, and writes JSON; `report` renders
docs/RESULTS.md from those files. Held-out phantoms are drawn with seeds used nowhere else (10_000 + k) and
never enter pretraining, fine-tuning, threshold choice or checkpoint selection.

    # three demo runs (seeds 0, 1, 2), each: own pool -> MAE -> fine-tune; then the held-out comparison
    python bench/science.py demo-runs --seeds 0 1 2 --out runs/science
    python bench/science.py heldout --runs runs/science/seed0 runs/science/seed1 runs/science/seed2 \
        --cases 160 --out runs/science/heldout.json
    # the same runs, each on the held-out split its demo scored (other cases per run), washout removed too
    python bench/science.py own-heldout --runs runs/science/seed0 runs/science/seed1 runs/science/seed2 \
        --out runs/science/own_heldout.json
    # label efficiency: fine-tune 16/32/64 labelled cases from the MAE weights of each run and from scratch
    python bench/science.py label-efficiency --runs runs/science/seed0 --labelled 16 32 64 \
        --out runs/science/label_efficiency.json
    # ablations: no kinetic pathway, the rim-aware one, segmentation-only / pCR-only losses, joint attention,
    # whole-phase masking, phases stacked as input channels of a plain spatial ViT
    python bench/science.py ablations --runs runs/science/seed0 --out runs/science/ablations.json
    python bench/science.py report runs/science/*.json --out docs/RESULTS.md

A "run" folder is what `mtl-breast demo --workdir RUN` leaves: data/ (labelled + held-out), cache/data,
weights/mae, weights/mtl.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml
from bench_common import run_meta

from mtl_breast.baselines import (
    LogisticBaseline,
    bootstrap_interval,
    case_acquisition,
    case_features,
    labelled_features,
)
from mtl_breast.data.build import preprocess_dataset
from mtl_breast.data.cache import CaseCache
from mtl_breast.data.folder import read_dataset
from mtl_breast.data.mamamia import read_splits
from mtl_breast.files import write_text
from mtl_breast.metrics.classification import balanced_accuracy, roc_auc
from mtl_breast.metrics.intervals import mean_interval, percentile_interval, resample_indices
from mtl_breast.metrics.segmentation import dice as dice_score
from mtl_breast.models.kinetics import FEATURE_SETS
from mtl_breast.phantoms.collection import generate_dataset, read_truth
from mtl_breast.predictor import InferenceSettings, load_joint_model, predict_volume, read_weights_config

HELD_OUT_SEED = 10_000
ROOT = Path(__file__).resolve().parents[1]
FINETUNE_CONFIG = ROOT / "configs" / "finetune" / "demo.yaml"  # the demo's fine-tuning, which every variant starts from


# ------------------------------------------------------------------------------------------------ inputs
def flatten_washout(image: torch.Tensor) -> torch.Tensor:
    """Every post-contrast phase replaced by the first one: no washout, no late enhancement. ``[T, D, H, W]``."""
    out = image.clone()
    out[2:] = image[1]
    return out


def reverse_post_contrast(image: torch.Tensor) -> torch.Tensor:
    """Post-contrast phases in reverse order (phase 0 stays first). ``[T, D, H, W]``."""
    out = image.clone()
    out[1:] = image[1:].flip(0)
    return out


VARIANTS = {"as acquired": lambda x: x, "washout removed (post-contrast flattened)": flatten_washout,
            "post-contrast phases reversed": reverse_post_contrast}


def held_out_set(out: Path, cases: int, size: int, settings: InferenceSettings,
                 seed: int = HELD_OUT_SEED) -> tuple[Path, CaseCache]:
    """Fresh phantoms (seed `seed`, default `HELD_OUT_SEED`), preprocessed the way the weights expect."""
    data, cache_dir = out / "data", out / "cache"
    if not (data / "synthetic.json").exists():
        generate_dataset(data, num_cases=cases, seed=seed, size=size, test_fraction=0.0)
    drawn = json.loads((data / "synthetic.json").read_text()).get("seed")
    if drawn is not None and drawn != seed:
        raise SystemExit(f"{data} holds phantoms of seed {drawn}, not {seed}: use another --heldout-dir")
    preprocess_dataset(data, cache_dir, settings.preprocess, progress=False)
    return data, CaseCache(cache_dir, settings.preprocess)


# ------------------------------------------------------------------------------------------------ experiments
def score_run(run: Path, weights: Path, data: Path, cache: CaseCache,
              variants: tuple[str, ...] = tuple(VARIANTS), ids: list[str] | None = None,
              features: bool = False) -> dict:
    """Per held-out case: the model's pCR probability for each input variant, baselines' probabilities, truth.

    Args:
        run: folder whose data/ and cache/data hold the training split the baselines are fitted on.
        weights: the joint model to score.
        data, cache: the held-out phantoms and their preprocessed cache.
        variants: which input variants of `VARIANTS` to predict ("as acquired" always).
        ids: the cases of `cache` to score (default: all of them).
        features: also return the baselines' feature rows under ``"features"`` (``train_ids``, ``train_rows``,
            ``y_train``; ``expert_rows`` and ``predicted_rows`` of the scored cases), for fitting them otherwise
            (bench/robustness.py fits them leaving one site out).
    """
    model, config = load_joint_model(weights, "cpu")
    settings = InferenceSettings.from_config(config)
    roi = settings.roi_size
    train_ids = read_splits(run / "data")["train"]
    # The baselines' training cases, preprocessed as these weights expect (a run made under other preprocessing
    # defaults has them under another cache key).
    wanted = set(train_ids)
    train_cases = [case for case in read_dataset(run / "data") if case.patient_id in wanted]
    preprocess_dataset(run / "data", run / "cache" / "data", settings.preprocess, cases=train_cases, progress=False)
    train_cache = CaseCache(run / "cache" / "data", settings.preprocess)
    train_kept, train_rows, y_train = labelled_features(train_cache, train_ids, roi)
    ids, expert_rows, y = labelled_features(cache, cache.patient_ids() if ids is None else ids, roi)
    variants = ("as acquired", *(v for v in variants if v != "as acquired"))
    scores: dict[str, list[float]] = {name: [] for name in variants}
    predicted_rows, dice = [], []
    for pid in ids:
        case = cache.read(pid)
        for name in variants:
            prob, logit = predict_volume(model, VARIANTS[name](case["image"]), case["phase_time"], settings,
                                         acquisition=case_acquisition(case["info"]))
            scores[name].append(float(1.0 / (1.0 + np.exp(-logit))))
            if name == "as acquired":
                predicted_rows.append(case_features(case["image"], prob, case["phase_time"], roi,
                                                    case_acquisition(case["info"])))
                dice.append(dice_score(prob >= settings.seg_threshold, case["label"].numpy().astype(bool)))
    result = {f"joint model, {k}": v for k, v in scores.items()}
    prevalence = float(np.mean(y_train))
    for name, features in FEATURE_SETS.items():
        baseline = LogisticBaseline(features).fit(train_rows, y_train)
        result[f"{name} baseline, expert mask"] = baseline.predict_proba(expert_rows).tolist()
        result[f"{name} baseline, predicted mask"] = baseline.predict_proba(predicted_rows).tolist()
    truth = [read_truth(data, pid)["pcr_probability"] for pid in ids]
    result["generating model (ceiling)"] = truth
    thresholds = {k: (settings.pcr_threshold if k.startswith("joint") else prevalence) for k in result}
    thresholds["generating model (ceiling)"] = float(np.mean(y))  # Bayes rule for balanced accuracy
    out = {"ids": ids, "y": y, "scores": result, "thresholds": thresholds, "dice": dice}
    if features:
        out["features"] = {"train_ids": train_kept, "train_rows": train_rows, "y_train": y_train,
                           "expert_rows": expert_rows, "predicted_rows": predicted_rows}
    return out


def summarise(runs: list[dict], seed: int = 0) -> dict:
    """Seed-averaged AUC and BA per predictor with 95% bootstrap intervals over the held-out cases (the same
    resampled cases for every seed), plus paired differences that the claims rest on."""
    y = np.array(runs[0]["y"])
    names = list(runs[0]["scores"])

    def auc(name: str, idx: np.ndarray) -> float:
        if len(np.unique(y[idx])) < 2:
            return float("nan")
        return float(np.mean([roc_auc(y[idx], np.array(r["scores"][name])[idx]) for r in runs]))

    def ba(name: str, idx: np.ndarray) -> float:
        return float(np.mean([balanced_accuracy(y[idx], (np.array(r["scores"][name])[idx] >= r["thresholds"][name])
                                                .astype(int)) for r in runs]))

    everything = np.arange(len(y))
    table = {}
    for name in names:
        def auc_of(i: np.ndarray, name: str = name) -> float:
            return auc(name, i)

        def ba_of(i: np.ndarray, name: str = name) -> float:
            return ba(name, i)

        table[name] = {"auc": auc(name, everything), "auc_ci": bootstrap_interval(auc_of, len(y), seed=seed,
                                                                                samples=1000),
                       "ba": ba(name, everything), "ba_ci": bootstrap_interval(ba_of, len(y), seed=seed,
                                                                              samples=1000),
                       "auc_per_seed": [roc_auc(y, r["scores"][name]) for r in runs]}
    model = "joint model, as acquired"
    pairs = {"model - size baseline (expert mask)": (model, "size baseline, expert mask"),
             "model - size baseline (predicted mask)": (model, "size baseline, predicted mask"),
             "model - kinetic baseline (expert mask)": (model, "kinetic baseline, expert mask"),
             "model - kinetic baseline (predicted mask)": (model, "kinetic baseline, predicted mask"),
             "model - concentration baseline (expert mask)": (model, "concentration baseline, expert mask"),
             "model - rim baseline (expert mask)": (model, "rim baseline, expert mask"),
             "model - rim baseline (predicted mask)": (model, "rim baseline, predicted mask"),
             "model - model with washout removed": (model, "joint model, washout removed (post-contrast flattened)"),
             "model - model with phases reversed": (model, "joint model, post-contrast phases reversed")}
    differences = {}
    for label, (a, b) in pairs.items():
        if b not in names:  # a variant this scoring did not run (the ablations score no reversed phases)
            continue
        def diff(i: np.ndarray, a: str = a, b: str = b) -> float:
            return auc(a, i) - auc(b, i)
        differences[label] = {"auc_difference": diff(everything),
                              "ci": bootstrap_interval(diff, len(y), seed=seed, samples=1000),
                              "per_seed": [x - z for x, z in zip(table[a]["auc_per_seed"], table[b]["auc_per_seed"],
                                                                 strict=True)]}
    dice = np.array([r["dice"] for r in runs])  # [seeds, cases]
    return {"cases": len(y), "positives": int(y.sum()), "seeds": len(runs), "table": table,
            "differences": differences, "dice": float(dice.mean()),
            "dice_ci": bootstrap_interval(lambda i: float(dice[:, i].mean()), len(y), seed=seed, samples=1000)}


OWN_SPLIT = "own"  # the held-out set of `own-heldout`: each run's own test split


def _heldout_name(heldout: int | str | None) -> str:
    return "its own held-out split" if heldout == OWN_SPLIT else f"held-out seed {heldout}"


def _kept_scores(run: Path, scores_dir: str | None, heldout: int | str, score: Callable[[], dict]) -> dict:
    """``score()`` (`score_run`'s result for `run` on the held-out set `heldout`: a seed, or `OWN_SPLIT`); with
    `scores_dir`, kept there as ``<run name>.json`` and read back by a later call, so runs scored by separate
    processes (or before an interruption) join one summary. A kept file of another run folder or held-out set is
    an error, not silently reused."""
    if scores_dir is None:
        return score()
    path = Path(scores_dir) / f"{run.name}.json"
    key = {"run": str(run.resolve()), "heldout_seed": heldout}
    if path.exists():
        kept = json.loads(path.read_text())
        if {k: kept.get(k) for k in key} != key:
            held = _heldout_name(kept.get("heldout_seed"))
            raise SystemExit(f"{path} holds the scores of {kept.get('run')} on {held}, not of {key['run']} on "
                             f"{_heldout_name(heldout)}: use another --scores-dir")
        return kept["scored"]
    scored = score()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps({**key, "scored": scored}) + "\n")
    return scored


def _scored_run(run: Path, data: Path, cache: CaseCache, heldout_seed: int, scores_dir: str | None) -> dict:
    """`score_run` of a run's joint model on the held-out set, kept in `scores_dir` (`_kept_scores`)."""
    return _kept_scores(run, scores_dir, heldout_seed, lambda: score_run(run, run / "weights" / "mtl", data, cache))


def cmd_heldout(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    runs = [Path(r) for r in args.runs]
    settings = InferenceSettings.from_config(read_weights_config(runs[0] / "weights" / "mtl"))
    data, cache = held_out_set(Path(args.heldout_dir), args.cases, args.size, settings, args.heldout_seed)
    scored = [_scored_run(run, data, cache, args.heldout_seed, args.scores_dir) for run in runs]
    return {"experiment": "heldout", **summarise(scored), "runs": [str(r) for r in runs],
            "heldout_seed": args.heldout_seed,
            **run_meta(sys.argv, started)}


# The paired differences `own-heldout` reports: (label, minuend, subtrahend) of `score_run`'s score names.
OWN_PAIRS = (("model - size baseline (expert mask)", "joint model, as acquired", "size baseline, expert mask"),
             ("model - kinetic baseline (expert mask)", "joint model, as acquired", "kinetic baseline, expert mask"),
             ("model - concentration baseline (expert mask)", "joint model, as acquired",
              "concentration baseline, expert mask"),
             ("model - rim baseline (expert mask)", "joint model, as acquired", "rim baseline, expert mask"),
             ("model - inner-rim baseline (expert mask)", "joint model, as acquired",
              "rim_inner baseline, expert mask"),
             ("model - model with washout removed", "joint model, as acquired",
              "joint model, washout removed (post-contrast flattened)"))


# Columns of the own-heldout table: header -> the score it shows.
OWN_COLUMNS = (("model", "joint model, as acquired"),
               ("washout removed", "joint model, washout removed (post-contrast flattened)"),
               ("size", "size baseline, expert mask"), ("kinetic", "kinetic baseline, expert mask"),
               ("concentration", "concentration baseline, expert mask"), ("rim", "rim baseline, expert mask"),
               ("inner rim", "rim_inner baseline, expert mask"))


def pooled_differences(scored: list[dict], samples: int = 1000, seed: int = 0,
                       pairs: tuple[tuple[str, str, str], ...] = OWN_PAIRS) -> dict:
    """Mean over runs of each AUC difference of `pairs` (label, score, other score) whose scores every run has, each
    run on its OWN held-out cases, with a 95% bootstrap interval that resamples every run's cases independently (the
    runs share no case; a resample where a run's cases hold one pCR class has no AUC and is left out, as in
    `bootstrap_interval`)."""
    ys = [np.array(r["y"]) for r in scored]
    for r, y in zip(scored, ys, strict=True):
        if len(np.unique(y)) < 2:
            raise SystemExit(f"{r.get('run', 'a run')}: its held-out cases hold one pCR class only, no AUC")
    # [samples, n_run] case indices per run, each run from its own seed
    resamples = [resample_indices(len(y), samples, seed + k) for k, y in enumerate(ys)]
    out = {}
    for label, a, b in pairs:
        if not all(a in r["scores"] and b in r["scores"] for r in scored):
            continue  # a baseline this file's runs were not scored with
        arrays = [(np.array(r["scores"][a]), np.array(r["scores"][b])) for r in scored]

        def difference(k: int, i: np.ndarray, arrays: list = arrays) -> float:
            y, (sa, sb) = ys[k][i], arrays[k]
            return roc_auc(y, sa[i]) - roc_auc(y, sb[i]) if len(np.unique(y)) == 2 else float("nan")

        per_run = [difference(k, np.arange(len(y))) for k, y in enumerate(ys)]
        draws = [np.mean([difference(k, picks[j]) for k, picks in enumerate(resamples)]) for j in range(samples)]
        low, high = percentile_interval(draws)
        out[label] = {"auc_difference": float(np.mean(per_run)), "per_run": per_run, "ci": [low, high]}
    return out


def cmd_own_heldout(args: argparse.Namespace) -> dict:
    """Each demo run on its own held-out split (the cases `mtl-breast demo` predicts and scores), with the washout
    removed too: the same comparisons as `heldout`, on as many different case sets as there are runs."""
    started = time.perf_counter()
    removed = "washout removed (post-contrast flattened)"

    def score(run: Path) -> dict:
        weights = run / "weights" / "mtl"
        settings = InferenceSettings.from_config(read_weights_config(weights))
        test_ids = read_splits(run / "data")["test"]
        wanted = set(test_ids)
        cases = [case for case in read_dataset(run / "data") if case.patient_id in wanted]
        preprocess_dataset(run / "data", run / "cache" / "data", settings.preprocess, cases=cases, progress=False)
        cache = CaseCache(run / "cache" / "data", settings.preprocess)
        return score_run(run, weights, run / "data", cache, ("as acquired", removed), ids=test_ids)

    scored = [{"run": str(run), **_kept_scores(run, args.scores_dir, OWN_SPLIT, lambda run=run: score(run))}
              for run in map(Path, args.runs)]
    return {"experiment": "own-heldout", "runs": [s["run"] for s in scored],
            "per_run": [{"run": s["run"], **summarise([s])} for s in scored],
            "pooled": pooled_differences(scored), "raw": scored, **run_meta(sys.argv, started)}


def _demo(workdir: Path, seed: int, extra: list[str]) -> None:
    cmd = [sys.executable, "-m", "mtl_breast.cli", "demo", "--workdir", str(workdir), "--seed", str(seed), *extra]
    subprocess.run(cmd, check=True, cwd=ROOT)


def cmd_demo_runs(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    out = Path(args.workdir)
    for seed in args.seeds:
        if not (out / f"seed{seed}" / "weights" / "mtl" / "model.safetensors").exists():
            _demo(out / f"seed{seed}", seed, [])
        (out / f"seed{seed}" / "seed.json").write_text(json.dumps({"seed": seed}) + "\n")
    return {"experiment": "demo-runs", "runs": [str(out / f"seed{s}") for s in args.seeds],
            **run_meta(sys.argv, started)}


# ------------------------------------------------------------------------------------------------ fine-tuning variants
def _cli(args: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "mtl_breast.cli", *map(str, args)], check=True, cwd=ROOT)


def pretrain(out: Path, pool: Path, seed: int, model_args: str | None = None) -> Path:
    """MAE-pretrain the test-size encoder on `pool` with the demo settings; returns the exported weights."""
    weights = out / "weights" / "mae"
    if not (weights / "model.safetensors").exists():
        extra = ["--model.model_args", model_args] if model_args else []
        _cli(["pretrain", "fit", "--config", ROOT / "configs/pretrain/demo.yaml", "--data.root", pool,
              "--data.cache_dir", out / "cache" / "pool", "--seed_everything", seed,
              "--trainer.default_root_dir", out / "pretrain", *extra])
        _cli(["export", "--ckpt", out / "pretrain" / "checkpoints" / "last.ckpt", "--out", weights])
    return weights


def finetune(out: Path, data: Path, seed: int, pretrained: Path | None, extra: list[str], steps: int,
             labelled: int) -> Path:
    """Fine-tune with the demo settings for about `steps` optimizer steps; returns the exported joint weights."""
    from mtl_breast.run.demo import _best_checkpoint

    weights = out / "weights" / "mtl"
    if (weights / "model.safetensors").exists():
        return weights
    config = yaml.safe_load(FINETUNE_CONFIG.read_text())
    # 80% of the labelled cases train (the datamodule's default val_fraction), each drawn `repeats` times an epoch.
    per_epoch = max(1, round(labelled * 0.8 * config["data"]["repeats"] / config["data"]["batch_size"]))
    epochs = max(1, round(steps / per_epoch))
    # Validate as often over the schedule as the demo does (it picks its checkpoint among those validations).
    val_every = max(1, round(epochs * config["trainer"]["check_val_every_n_epoch"] / config["trainer"]["max_epochs"]))
    args = ["finetune", "fit", "--config", FINETUNE_CONFIG, "--data.root", data,
            "--data.cache_dir", out / "cache" / "data", "--seed_everything", seed,
            "--trainer.default_root_dir", out / "finetune", "--trainer.max_epochs", epochs,
            "--trainer.check_val_every_n_epoch", val_every, *extra]
    if pretrained is not None:
        args += ["--model.pretrained", pretrained]
    _cli(args)
    _cli(["export", "--ckpt", _best_checkpoint(out / "finetune"), "--out", weights])
    return weights


def labelled_set(out: Path, labelled: int, seed: int, size: int) -> Path:
    """`labelled` phantoms with expert masks and pCR, all for training/validation (seed 20_000 + 100 seed + n)."""
    data = out / "data"
    if not (data / "synthetic.json").exists():
        generate_dataset(data, num_cases=labelled, seed=20_000 + 100 * seed + labelled, size=size, test_fraction=0.0)
    return data


def _score_variant(name: str, out: Path, weights: Path, data: Path, cache: CaseCache, flat: bool = True) -> dict:
    """Held-out pCR AUC (as acquired and, with `flat`, with the washout removed) and Dice of one fine-tuned model."""
    removed = "washout removed (post-contrast flattened)"
    scored = score_run(out, weights, data, cache, ("as acquired", removed) if flat else ("as acquired",))
    y = np.array(scored["y"])
    auc_flat = roc_auc(y, scored["scores"][f"joint model, {removed}"]) if flat else float("nan")
    return {"variant": name, "auc": roc_auc(y, scored["scores"]["joint model, as acquired"]),
            "auc_washout_removed": auc_flat, "dice": float(np.mean(scored["dice"])), "raw": scored}


def _run_seed(run: Path) -> int:
    return int(json.loads((run / "seed.json").read_text())["seed"]) if (run / "seed.json").exists() else 0


def _held_out_for(run: Path, args: argparse.Namespace) -> tuple[Path, CaseCache]:
    settings = InferenceSettings.from_config(read_weights_config(run / "weights" / "mtl"))
    return held_out_set(Path(args.heldout_dir), args.cases, args.size, settings, args.heldout_seed)


def cmd_label_efficiency(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    work = Path(args.workdir)
    results = []
    for run in map(Path, args.runs):
        seed, (data_h, cache_h) = _run_seed(run), _held_out_for(run, args)
        for n in args.labelled:
            data = labelled_set(work / f"{run.name}_n{n}", n, seed, args.size)
            for init, pretrained in (("MAE", run / "weights" / "mae"), ("scratch", None)):
                out = work / f"{run.name}_n{n}_{init}"
                out.mkdir(parents=True, exist_ok=True)
                (out / "data").exists() or (out / "data").symlink_to(data.resolve())
                weights = finetune(out, data, seed, pretrained, [], args.steps, n)
                row = _score_variant(f"{n} labelled, {init}", out, weights, data_h, cache_h, flat=False)
                results.append({"run": str(run), "labelled": n, "init": init, **row})
    return {"experiment": "label-efficiency", "held_out_cases": args.cases, "heldout_seed": args.heldout_seed,
            "steps": args.steps,
            "results": results, **run_meta(sys.argv, started)}


def _finetune_model_args(model_args: dict) -> list[str]:
    """``--model.model_args`` of a fine-tuning variant: `model_args` with the demo config's pCR head settings under
    it (a dict given on the command line replaces the config's whole ``model_args``, so a variant that changes the
    encoder would otherwise also drop the demo's choice of kinetic features)."""
    demo = yaml.safe_load(FINETUNE_CONFIG.read_text())["model"].get("model_args", {})
    head = {**demo.get("pcr_head", {}), **model_args.get("pcr_head", {})}
    return ["--model.model_args", json.dumps({**model_args, **({"pcr_head": head} if head else {})})]


# name -> (MAE model_args for its own pretraining, or "run" = the run's MAE weights, or None = scratch;
#          fine-tuning arguments)
_DROP = {"phase_time_drop": 0.2}  # the demo config's encoder setting, spelled out where a variant changes model_args
ABLATIONS: dict[str, tuple[str | None, list[str]]] = {
    "joint model (reference)": ("run", []),
    "no kinetic pathway": ("run", _finetune_model_args({"encoder": _DROP, "pcr_head": {"kinetic": False}})),
    "concentration kinetic pathway": ("run", _finetune_model_args(
        {"encoder": _DROP, "pcr_head": {"kinetic_features": "concentration"}})),
    "rim-aware kinetic pathway": ("run", _finetune_model_args(
        {"encoder": _DROP, "pcr_head": {"kinetic_features": "rim"}})),
    "inner-rim kinetic pathway": ("run", _finetune_model_args(
        {"encoder": _DROP, "pcr_head": {"kinetic_features": "rim_inner"}})),
    "pCR token path with dropout 0.5": ("run", _finetune_model_args({"encoder": _DROP, "pcr_head": {"dropout": 0.5}})),
    "segmentation loss only": ("run", ["--model.task_weights", '{"seg": 1.0, "pcr": 0.0}']),
    "pCR loss only": ("run", ["--model.task_weights", '{"seg": 0.0, "pcr": 1.0}']),
    "joint space-time attention": (
        '{"attn_mode": "joint", "phase_time_drop": 0.2}',
        _finetune_model_args({"encoder": {**_DROP, "attn_mode": "joint"}})),
    "MAE with whole-phase masking (0.5)": ('{"phase_mask_ratio": 0.5, "phase_time_drop": 0.2}', []),
    # The MONAI-style baseline: one spatial ViT over the phases stacked as channels, pretrained by the same MAE.
    "phases as input channels (plain spatial ViT)": (
        '{"phase_layout": "channels"}', _finetune_model_args({"encoder": {"phase_layout": "channels"}})),
}


def cmd_ablations(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    work = Path(args.workdir)
    results = []
    for run in map(Path, args.runs):
        seed, (data_h, cache_h) = _run_seed(run), _held_out_for(run, args)
        for name, (mae, extra) in ABLATIONS.items():
            if args.only and name not in args.only:
                continue
            out = work / f"{run.name}_{name.split(' (')[0].replace(' ', '_')}"
            out.mkdir(parents=True, exist_ok=True)
            (out / "data").exists() or (out / "data").symlink_to((run / "data").resolve())
            if name == "joint model (reference)":
                out, weights = run, run / "weights" / "mtl"
            else:
                pretrained = run / "weights" / "mae" if mae == "run" else pretrain(out, run / "pool", seed, mae)
                labelled = args.labelled or len(read_splits(run / "data")["train"])
                weights = finetune(out, run / "data", seed, pretrained, extra, args.steps, labelled)
            results.append({"run": str(run), **_score_variant(name, out, weights, data_h, cache_h)})
    return {"experiment": "ablations", "held_out_cases": args.cases, "heldout_seed": args.heldout_seed,
            "results": results,
            **run_meta(sys.argv, started)}


# ------------------------------------------------------------------------------------------------ report
def _ci(low_high) -> str:
    low, high = low_high
    return f"[{low:.3f}, {high:.3f}]"


def _heldout_md(r: dict) -> list[str]:
    lines = [f"{r['cases']} fresh phantoms with known pCR ({r['positives']} pCR), seed "
             f"{r.get('heldout_seed', HELD_OUT_SEED)}, "
             f"{r['seeds']} training seed(s); mean over seeds, 95% bootstrap interval over cases. Baselines are "
             "logistic regressions fitted on each run's training split (expert masks); their features on the "
             "held-out cases come from the expert mask or from the joint model's predicted mask. BA: the model "
             "at its validation-chosen threshold, the baselines at the training pCR rate. "
             f"Segmentation Dice of the model on these cases: {r['dice']:.3f} {_ci(r['dice_ci'])}.", "",
             "| predictor | AUC | 95% CI | BA | 95% CI | AUC per seed |", "|---|---|---|---|---|---|"]
    for name, row in r["table"].items():
        seeds = ", ".join(f"{v:.3f}" for v in row["auc_per_seed"])
        lines.append(f"| {name} | {row['auc']:.3f} | {_ci(row['auc_ci'])} | {row['ba']:.3f} | "
                     f"{_ci(row['ba_ci'])} | {seeds} |")
    lines += ["", "| paired AUC difference | value | 95% CI | per seed |", "|---|---|---|---|"]
    for name, row in r["differences"].items():
        # four decimals: the issue's bars are differences of 0.03-0.05, which three decimals round across
        seeds = ", ".join(f"{v:+.3f}" for v in row.get("per_seed", []))  # older files have none
        lines.append(f"| {name} | {row['auc_difference']:+.4f} | {_ci(row['ci'])} | {seeds} |")
    return lines


def _own_heldout_md(r: dict) -> list[str]:
    """Per run: AUCs on its own held-out split; then the mean over runs of each paired difference."""
    # Columns every run was scored with (files written before a baseline existed lack it).
    shown = {header: name for header, name in OWN_COLUMNS if all(name in run["table"] for run in r["per_run"])}
    lines = ["Each run scored on its own held-out split (the cases its demo predicted; no two runs share a case); "
             "baselines fitted on the run's training split, features from the expert mask.", "",
             f"| run | cases (pCR) | {' | '.join(shown)} | Dice |", "|" + "---|" * (len(shown) + 3)]
    for run in r["per_run"]:
        aucs = " | ".join(f"{run['table'][name]['auc']:.3f}" for name in shown.values())
        lines.append(f"| {Path(run['run']).name} | {run['cases']} ({run['positives']}) | {aucs} | {run['dice']:.3f} |")
    lines += ["", "Mean over runs of each run's paired AUC difference; 95% bootstrap interval resampling each run's "
              "cases independently:", "", "| paired AUC difference | mean | 95% CI | per run |", "|---|---|---|---|"]
    # Pairs added after a file was written are computed from its per-case scores.
    missing = tuple(pair for pair in OWN_PAIRS if pair[0] not in r["pooled"])
    pooled = {**r["pooled"], **(pooled_differences(r["raw"], pairs=missing) if missing else {})}
    for label, row in ((label, pooled[label]) for label, _, _ in OWN_PAIRS if label in pooled):
        per_run = ", ".join(f"{d:+.3f}" for d in row["per_run"])
        lines.append(f"| {label} | {row['auc_difference']:+.4f} | {_ci(row['ci'])} | {per_run} |")
    return lines


REFERENCE = "joint model (reference)"


def _heldout_seed(r: dict) -> int:
    """The held-out seed of a result file (older files name it only in their command)."""
    if "heldout_seed" in r:
        return int(r["heldout_seed"])
    words = shlex.split(r.get("command", ""))
    return int(words[words.index("--heldout-seed") + 1]) if "--heldout-seed" in words else HELD_OUT_SEED


def _as_acquired(row: dict) -> np.ndarray:
    return np.array(row["raw"]["scores"]["joint model, as acquired"])


def _check_same_cases(first: dict, *others: dict) -> None:
    """Rows are paired case by case: refuse any row scored on other held-out cases than `first`."""
    for other in others:
        if first["raw"]["ids"] != other["raw"]["ids"]:
            raise SystemExit(f"{first['variant']} and {other['variant']} were scored on different held-out cases")


def _intervals(a: dict, b: dict | None, samples: int = 1000) -> dict:
    """95% bootstrap intervals over the held-out cases of run `a`'s AUC and Dice and, given a run `b` scored on the
    same cases, the paired differences `a - b`."""
    y = np.array(a["raw"]["y"])
    pa, da = _as_acquired(a), np.array(a["raw"]["dice"])
    out = {"auc_ci": bootstrap_interval(lambda i: roc_auc(y[i], pa[i]), len(y), samples=samples),
           "dice_ci": mean_interval(da, samples=samples)}
    if b is None:
        return out
    _check_same_cases(a, b)
    pb, db = _as_acquired(b), np.array(b["raw"]["dice"])
    return {**out, "auc_diff": roc_auc(y, pa) - roc_auc(y, pb),
            "auc_diff_ci": bootstrap_interval(lambda i: roc_auc(y[i], pa[i]) - roc_auc(y[i], pb[i]), len(y),
                                              samples=samples),
            "dice_diff": float((da - db).mean()), "dice_diff_ci": mean_interval(da - db, samples=samples)}


def _comparison(row: dict, rows: list[dict], experiment: str) -> dict | None:
    """The row `row` is compared with (same run): ablations, the run's reference joint model; label efficiency,
    scratch with the same labelled cases. None where that is `row` itself or was not run."""
    if experiment == "ablations":
        base = next((r for r in rows if r["run"] == row["run"] and r["variant"] == REFERENCE), None)
    else:
        base = next((r for r in rows if r["run"] == row["run"] and r["labelled"] == row.get("labelled")
                     and r["init"] == "scratch"), None)
    return None if base is row else base


def _mean_auc_interval(y: np.ndarray, scores: list[np.ndarray], against: list[np.ndarray] | None,
                       samples: int) -> tuple[float, float]:
    """Bootstrap interval over cases of the mean over runs of each run's AUC, or of its paired AUC difference to
    `against` (one score array per run)."""
    def statistic(i: np.ndarray) -> float:
        aucs = [roc_auc(y[i], s[i]) for s in scores]
        if against is not None:
            aucs = [a - roc_auc(y[i], b[i]) for a, b in zip(aucs, against, strict=True)]
        return float(np.mean(aucs))

    return bootstrap_interval(statistic, len(y), samples=samples)


def _over_seeds_md(rows: list[dict], experiment: str, samples: int = 1000) -> list[str]:
    """Variants run from more than one training run (seed): the mean over runs, with 95% bootstrap intervals over
    the held-out cases, resampled jointly for every run (as the held-out comparison does), and the mean paired
    difference to each run's own comparison row (`_comparison`)."""
    by_variant: dict[str, list[dict]] = {}
    for row in rows:
        by_variant.setdefault(row["variant"], []).append(row)
    repeated = {name: group for name, group in by_variant.items() if len({r["run"] for r in group}) > 1}
    if not repeated:
        return []
    lines = ["Mean over training runs (seeds), 95% bootstrap intervals over the held-out cases; per-run values in "
             "run order.", "",
             "| variant | runs | pCR AUC | per run | Dice | AUC difference | per run | Dice difference |",
             "|---|---|---|---|---|---|---|---|"]
    for name, group in repeated.items():
        _check_same_cases(*group)
        y = np.array(group[0]["raw"]["y"])
        scores = [_as_acquired(r) for r in group]
        dice = np.stack([np.array(r["raw"]["dice"]) for r in group])  # [runs, cases]
        aucs = [roc_auc(y, s) for s in scores]
        auc_ci = _mean_auc_interval(y, scores, None, samples)
        cells = [name, str(len(group)), f"{np.mean(aucs):.3f} {_ci(auc_ci)}", ", ".join(f"{a:.3f}" for a in aucs),
                 f"{dice.mean():.3f} {_ci(mean_interval(dice.mean(axis=0), samples=samples))}"]
        bases = [_comparison(r, rows, experiment) for r in group]
        if all(b is not None for b in bases):
            for r, b in zip(group, bases, strict=True):
                _check_same_cases(r, b)
            pairs = [(s, _as_acquired(b)) for s, b in zip(scores, bases, strict=True)]
            diffs = [roc_auc(y, a) - roc_auc(y, b) for a, b in pairs]
            diff_ci = _mean_auc_interval(y, scores, [b for _, b in pairs], samples)
            dice_diff = (dice - np.stack([np.array(b["raw"]["dice"]) for b in bases])).mean(axis=0)  # [cases]
            cells += [f"{np.mean(diffs):+.3f} {_ci(diff_ci)}", ", ".join(f"{d:+.3f}" for d in diffs),
                      f"{dice_diff.mean():+.3f} {_ci(mean_interval(dice_diff, samples=samples))}"]
        else:
            cells += ["", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _variants_md(rows: list[dict], experiment: str, cases: int, seed: int) -> list[str]:
    """One table for the rows of ablation or label-efficiency files: each run's AUC and Dice with intervals, and
    its paired difference to the comparison a reader wants (ablations: the run's reference joint model;
    label efficiency: MAE weights minus scratch at the same number of labelled cases)."""
    known = len(rows[0]["raw"]["y"]) if rows else 0
    against = "the reference joint model" if experiment == "ablations" else "scratch with the same labelled cases"
    lines = [f"{cases} held-out phantoms (seed {seed}), {known} with known pCR for the AUC; one row per run; 95% "
             f"bootstrap intervals over the held-out cases; differences are paired, against {against}.", "",
             "| run | variant | pCR AUC | AUC, washout removed | Dice | AUC difference | Dice difference |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        stats = _intervals(row, _comparison(row, rows, experiment))
        diff = f"{stats['auc_diff']:+.3f} {_ci(stats['auc_diff_ci'])}" if "auc_diff" in stats else ""
        ddiff = f"{stats['dice_diff']:+.3f} {_ci(stats['dice_diff_ci'])}" if "dice_diff" in stats else ""
        flat = row["auc_washout_removed"]
        lines.append(f"| {Path(row['run']).name} | {row['variant']} | {row['auc']:.3f} {_ci(stats['auc_ci'])} | "
                     f"{'' if np.isnan(flat) else f'{flat:.3f}'} | {row['dice']:.3f} {_ci(stats['dice_ci'])} | "
                     f"{diff} | {ddiff} |")
    return lines


def cmd_report(args: argparse.Namespace) -> dict:
    """Markdown tables of the given result files, to paste into docs/RESULTS.md. Ablation and label-efficiency
    files of the same held-out set are joined into one table each (a reference run may sit in another file)."""
    lines: list[str] = []
    joined: dict[tuple[str, int], dict] = {}
    for path in args.results:
        r = json.loads(Path(path).read_text())
        if r["experiment"] in ("heldout", "own-heldout"):
            render = _heldout_md if r["experiment"] == "heldout" else _own_heldout_md
            lines += [f"### {r['experiment']}", "", f"`{r['command']}` ({r['seconds']:.0f} s, {r['device']})", ""]
            lines += render(r) + [""]
        elif r["experiment"] in ("label-efficiency", "ablations"):
            group = joined.setdefault((r["experiment"], _heldout_seed(r)),
                                      {"rows": [], "commands": [], "cases": r["held_out_cases"]})
            group["rows"] += r["results"]
            group["commands"].append(f"`{r['command']}` ({r['seconds']:.0f} s, {r['device']})")
    for (experiment, seed), group in joined.items():
        lines += [f"### {experiment}", "", *group["commands"], ""]
        lines += _variants_md(group["rows"], experiment, group["cases"], seed) + [""]
        references = [r for r in group["rows"] if r["variant"] == REFERENCE]
        if references:  # scored with the baselines and the washout removed, as the held-out comparison is
            _check_same_cases(*references)
            lines += ["The reference joint models next to the baselines on the same cases:", "",
                      *_heldout_md({**summarise([r["raw"] for r in references]), "heldout_seed": seed}), ""]
        over_seeds = _over_seeds_md(group["rows"], experiment)
        lines += [*over_seeds, ""] if over_seeds else []
    Path(args.out).write_text("\n".join(lines) + "\n")
    return {"experiment": "report", "files": args.results}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    runs = sub.add_parser("demo-runs", help="one `mtl-breast demo` per seed")
    runs.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    runs.add_argument("--workdir", default="runs/science")
    held = sub.add_parser("heldout", help="model vs baselines vs kinetics-removed inputs on fresh phantoms")
    held.add_argument("--runs", nargs="+", required=True)
    held.add_argument("--scores-dir", help="keep each run's per-case scores here and reuse them (runs scored by "
                                           "separate processes join one summary)")
    own = sub.add_parser("own-heldout", help="each demo run on its own held-out split, with the washout removed too")
    own.add_argument("--runs", nargs="+", required=True)
    own.add_argument("--scores-dir", help="keep each run's per-case scores here and reuse them (as `heldout`'s)")
    eff = sub.add_parser("label-efficiency", help="fine-tune n labelled cases from MAE weights and from scratch")
    eff.add_argument("--runs", nargs="+", required=True)
    eff.add_argument("--labelled", type=int, nargs="+", default=[16, 32, 64])
    eff.add_argument("--steps", type=int, default=870, help="fine-tuning steps (the demo's count; 770 before it "
                                                            "fine-tuned on 288 labelled cases)")
    eff.add_argument("--workdir", default="runs/science/label_efficiency")
    abl = sub.add_parser("ablations", help="one change at a time against the joint model")
    abl.add_argument("--runs", nargs="+", required=True)
    abl.add_argument("--only", nargs="*", help="ablation names to run (default: all)")
    abl.add_argument("--steps", type=int, default=870, help="fine-tuning steps (the demo's count; 770 before)")
    abl.add_argument("--labelled", type=int, help="labelled cases in the run's data, for the steps per epoch "
                                                  "(default: its training split's size)")
    abl.add_argument("--workdir", default="runs/science/ablations")
    for parser in (held, eff, abl):
        parser.add_argument("--cases", type=int, default=160, help="held-out phantoms")
        parser.add_argument("--heldout-dir", default="runs/science/heldout_data", help="where they are written")
        parser.add_argument("--heldout-seed", type=int, default=HELD_OUT_SEED,
                            help="seed of the held-out phantoms (one used nowhere else; a new one per new model)")
        parser.add_argument("--size", type=int, default=48)
    for parser in (runs, held, own, eff, abl):
        parser.add_argument("--out", required=True, help="JSON file to write")
    rep = sub.add_parser("report", help="markdown tables of result files")
    rep.add_argument("results", nargs="+")
    rep.add_argument("--out", required=True, help="markdown file to write")
    args = p.parse_args(argv)
    commands = {"demo-runs": cmd_demo_runs, "heldout": cmd_heldout, "own-heldout": cmd_own_heldout,
                "label-efficiency": cmd_label_efficiency,
                "ablations": cmd_ablations}
    if args.command == "report":
        print(json.dumps(cmd_report(args)))
        return 0
    result = commands[args.command](args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("table", "results", "raw", "per_run")},
                     indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
