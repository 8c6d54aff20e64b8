"""What the experiments share: the held-out set, the input variants, scoring a run's joint model and the baselines on
it, seed-averaged summaries with paired differences, training a model with the demo's settings, and the JSON out.

A "run" folder is what `mtl-breast demo --workdir RUN` leaves: pool/ (unlabeled phantoms), data/ (labelled cases with
its own held-out split), cache/data, weights/mae, weights/mtl. The held-out phantoms are by default the development set
of configs/evaluation/sets.yaml, where designs are chosen; they never enter pretraining, fine-tuning, threshold choice
or checkpoint selection.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml

from experiments.variants import COMPARISONS, Comparison, Variant, baseline
from mtl_breast.baselines import (
    LogisticBaseline,
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
from mtl_breast.metrics.intervals import bootstrap_interval, percentile_interval, resample_indices
from mtl_breast.metrics.segmentation import dice as dice_score
from mtl_breast.models.kinetics import FEATURE_SETS
from mtl_breast.phantoms.collection import MANIFEST, generate_dataset, read_truth
from mtl_breast.predictor import InferenceSettings, load_joint_model, predict_volume, read_weights_config

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN_CONFIG = ROOT / "configs" / "pretrain" / "demo.yaml"  # the demo's recipe, which every variant starts from
FINETUNE_CONFIG = ROOT / "configs" / "finetune" / "demo.yaml"
DEVELOPMENT = yaml.safe_load((ROOT / "configs" / "evaluation" / "sets.yaml").read_text())["development"]
CEILING = "generating model (ceiling)"


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


# What the joint model is scored on: input name -> the change to the image (score name "joint model, <input>").
INPUTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "as acquired": lambda x: x, "washout removed (post-contrast flattened)": flatten_washout,
    "post-contrast phases reversed": reverse_post_contrast}
AS_ACQUIRED, WASHOUT_REMOVED = "as acquired", "washout removed (post-contrast flattened)"


def score_names() -> list[str]:
    """Every score name `score_run` can write."""
    return [f"joint model, {name}" for name in INPUTS] + \
        [baseline(name, mask) for name in FEATURE_SETS for mask in ("expert", "predicted")] + [CEILING]


def add_heldout_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that choose the held-out phantoms (default: the development set of configs/evaluation/sets.yaml)."""
    parser.add_argument("--cases", type=int, default=DEVELOPMENT["cases"],
                        help="held-out phantoms (default: the development set's, %(default)s)")
    parser.add_argument("--heldout-dir", default="runs/science/heldout_data", help="where they are written")
    parser.add_argument("--heldout-seed", type=int, default=DEVELOPMENT["seed"],
                        help="seed of the held-out phantoms (default: the development set's, %(default)s)")
    parser.add_argument("--size", type=int, default=DEVELOPMENT["size"],
                        help="voxels per side of a phantom (default: the development set's, %(default)s)")


def held_out_set(out: Path, cases: int, size: int, settings: InferenceSettings, seed: int) -> tuple[Path, CaseCache]:
    """Phantoms of seed `seed` in ``out/data`` (drawn on first use), preprocessed the way the weights expect.

    Raises:
        SystemExit: ``out/data`` holds phantoms of another seed, count or size.
    """
    data, cache_dir = out / "data", out / "cache"
    if not (data / MANIFEST).exists():
        generate_dataset(data, num_cases=cases, seed=seed, size=size, test_fraction=0.0)
    held = json.loads((data / MANIFEST).read_text())
    want = {"seed": seed, "num_cases": cases, "size": size}
    got = {k: held.get(k) for k in want}
    if any(got[k] is not None and got[k] != want[k] for k in want):  # older manifests may lack a key
        raise SystemExit(f"{data} holds phantoms of {got}, not {want}: use another --heldout-dir")
    preprocess_dataset(data, cache_dir, settings.preprocess, progress=False)
    return data, CaseCache(cache_dir, settings.preprocess)


def held_out_for(run: Path, args: argparse.Namespace) -> tuple[Path, CaseCache]:
    """The held-out set of `args` (`add_heldout_arguments`), preprocessed as `run`'s joint model expects."""
    settings = InferenceSettings.from_config(read_weights_config(run / "weights" / "mtl"))
    return held_out_set(Path(args.heldout_dir), args.cases, args.size, settings, args.heldout_seed)


# ------------------------------------------------------------------------------------------------ scoring
def score_run(run: Path, weights: Path, data: Path, cache: CaseCache,
              inputs: tuple[str, ...] = tuple(INPUTS), ids: list[str] | None = None,
              features: bool = False) -> dict:
    """Per held-out case: the model's pCR probability for each input variant, baselines' probabilities, truth.

    Args:
        run: folder whose data/ and cache/data hold the training split the baselines are fitted on.
        weights: the joint model to score.
        data, cache: the held-out phantoms and their preprocessed cache.
        inputs: which inputs of `INPUTS` to predict ("as acquired" always).
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
    inputs = (AS_ACQUIRED, *(name for name in inputs if name != AS_ACQUIRED))
    scores: dict[str, list[float]] = {name: [] for name in inputs}
    predicted_rows, dice = [], []
    for pid in ids:
        case = cache.read(pid)
        for name in inputs:
            prob, logit = predict_volume(model, INPUTS[name](case["image"]), case["phase_time"], settings,
                                         acquisition=case_acquisition(case["info"]))
            scores[name].append(float(1.0 / (1.0 + np.exp(-logit))))
            if name == AS_ACQUIRED:
                predicted_rows.append(case_features(case["image"], prob, case["phase_time"], roi,
                                                    case_acquisition(case["info"])))
                dice.append(dice_score(prob >= settings.seg_threshold, case["label"].numpy().astype(bool)))
    result = {f"joint model, {k}": v for k, v in scores.items()}
    prevalence = float(np.mean(y_train))
    for name, names in FEATURE_SETS.items():
        fitted = LogisticBaseline(names).fit(train_rows, y_train)
        result[baseline(name, "expert")] = fitted.predict_proba(expert_rows).tolist()
        result[baseline(name, "predicted")] = fitted.predict_proba(predicted_rows).tolist()
    result[CEILING] = [read_truth(data, pid)["pcr_probability"] for pid in ids]
    thresholds = {k: (settings.pcr_threshold if k.startswith("joint") else prevalence) for k in result}
    thresholds[CEILING] = float(np.mean(y))  # Bayes rule for balanced accuracy
    out = {"ids": ids, "y": y, "scores": result, "thresholds": thresholds, "dice": dice}
    if features:
        out["features"] = {"train_ids": train_kept, "train_rows": train_rows, "y_train": y_train,
                           "expert_rows": expert_rows, "predicted_rows": predicted_rows}
    return out


def summarise(runs: list[dict], seed: int = 0, samples: int = 1000) -> dict:
    """Seed-averaged AUC and BA per predictor with 95% bootstrap intervals over the held-out cases (the same
    resampled cases for every seed), plus the paired differences of `COMPARISONS` whose scores the runs have."""
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
        table[name] = {"auc": auc(name, everything),
                       "auc_ci": bootstrap_interval(lambda i, n=name: auc(n, i), len(y), seed=seed, samples=samples),
                       "ba": ba(name, everything),
                       "ba_ci": bootstrap_interval(lambda i, n=name: ba(n, i), len(y), seed=seed, samples=samples),
                       "auc_per_seed": [roc_auc(y, r["scores"][name]) for r in runs]}
    differences = {}
    for c in COMPARISONS:
        if c.a not in names or c.b not in names:  # a score this scoring did not run (ablations reverse no phases)
            continue
        differences[c.key] = {
            "label": c.label, "auc_difference": auc(c.a, everything) - auc(c.b, everything),
            "ci": bootstrap_interval(lambda i, c=c: auc(c.a, i) - auc(c.b, i), len(y), seed=seed, samples=samples),
            "per_seed": [x - z for x, z in zip(table[c.a]["auc_per_seed"], table[c.b]["auc_per_seed"], strict=True)]}
    dice = np.array([r["dice"] for r in runs])  # [seeds, cases]
    return {"cases": len(y), "positives": int(y.sum()), "seeds": len(runs), "table": table,
            "differences": differences, "dice": float(dice.mean()),
            "dice_ci": bootstrap_interval(lambda i: float(dice[:, i].mean()), len(y), seed=seed, samples=samples)}


def pooled_differences(scored: list[dict], samples: int = 1000, seed: int = 0,
                       comparisons: tuple[Comparison, ...] = COMPARISONS) -> dict:
    """Mean over runs of each AUC difference of `comparisons` whose scores every run has, each run on its OWN
    held-out cases, with a 95% bootstrap interval that resamples every run's cases independently (the runs share no
    case; a resample where a run's cases hold one pCR class has no AUC and is left out, as in
    `bootstrap_interval`)."""
    ys = [np.array(r["y"]) for r in scored]
    for r, y in zip(scored, ys, strict=True):
        if len(np.unique(y)) < 2:
            raise SystemExit(f"{r.get('run', 'a run')}: its held-out cases hold one pCR class only, no AUC")
    # [samples, n_run] case indices per run, each run from its own seed
    resamples = [resample_indices(len(y), samples, seed + k) for k, y in enumerate(ys)]
    out = {}
    for c in comparisons:
        if not all(c.a in r["scores"] and c.b in r["scores"] for r in scored):
            continue  # a baseline this file's runs were not scored with
        arrays = [(np.array(r["scores"][c.a]), np.array(r["scores"][c.b])) for r in scored]

        def difference(k: int, i: np.ndarray, arrays: list = arrays) -> float:
            y, (sa, sb) = ys[k][i], arrays[k]
            return roc_auc(y, sa[i]) - roc_auc(y, sb[i]) if len(np.unique(y)) == 2 else float("nan")

        per_run = [difference(k, np.arange(len(y))) for k, y in enumerate(ys)]
        draws = [np.mean([difference(k, picks[j]) for k, picks in enumerate(resamples)]) for j in range(samples)]
        low, high = percentile_interval(draws)
        out[c.key] = {"label": c.label, "auc_difference": float(np.mean(per_run)), "per_run": per_run,
                      "ci": [low, high]}
    return out


OWN_SPLIT = "own"  # the held-out set of `own-heldout`: each run's own test split


def heldout_name(heldout: int | str | None) -> str:
    return "its own held-out split" if heldout == OWN_SPLIT else f"held-out seed {heldout}"


def kept_scores(run: Path, scores_dir: str | None, heldout: int | str, score: Callable[[], dict]) -> dict:
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
            raise SystemExit(f"{path} holds the scores of {kept.get('run')} on {heldout_name(kept.get('heldout_seed'))}"
                             f", not of {key['run']} on {heldout_name(heldout)}: use another --scores-dir")
        return kept["scored"]
    scored = score()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps({**key, "scored": scored}) + "\n")
    return scored


def score_model(label: str, out: Path, weights: Path, data: Path, cache: CaseCache, flat: bool = True) -> dict:
    """Held-out pCR AUC (as acquired and, with `flat`, with the washout removed) and Dice of one fine-tuned model,
    as a result row (``variant`` = `label`) with the per-case scores under ``raw``."""
    scored = score_run(out, weights, data, cache, (AS_ACQUIRED, WASHOUT_REMOVED) if flat else (AS_ACQUIRED,))
    y = np.array(scored["y"])
    auc_flat = roc_auc(y, scored["scores"][f"joint model, {WASHOUT_REMOVED}"]) if flat else float("nan")
    return {"variant": label, "auc": roc_auc(y, scored["scores"][f"joint model, {AS_ACQUIRED}"]),
            "auc_washout_removed": auc_flat, "dice": float(np.mean(scored["dice"])), "raw": scored}


# ------------------------------------------------------------------------------------------------ training
def _cli(args: list) -> None:
    subprocess.run([sys.executable, "-m", "mtl_breast.cli", *map(str, args)], check=True, cwd=ROOT)


def configs(task: str, variant: Variant | None = None) -> list[str]:
    """``--config`` flags of `task` ("pretrain" or "finetune"): the demo's config, then the variant's overlay."""
    overlay = variant.overlay(task) if variant is not None else None
    base = PRETRAIN_CONFIG if task == "pretrain" else FINETUNE_CONFIG
    return ["--config", str(base), *(["--config", str(overlay)] if overlay is not None else [])]


def pretrain(out: Path, pool: Path, seed: int, variant: Variant | None = None) -> Path:
    """MAE-pretrain the test-size encoder on `pool` with the demo settings (and `variant`'s pretraining overlay);
    returns the exported weights."""
    weights = out / "weights" / "mae"
    if not (weights / "model.safetensors").exists():
        _cli(["pretrain", "fit", *configs("pretrain", variant), "--data.root", pool,
              "--data.cache_dir", out / "cache" / "pool", "--seed_everything", seed,
              "--trainer.default_root_dir", out / "pretrain"])
        _cli(["export", "--ckpt", out / "pretrain" / "checkpoints" / "last.ckpt", "--out", weights])
    return weights


def finetune(out: Path, data: Path, seed: int, pretrained: Path | None, steps: int, labelled: int,
             variant: Variant | None = None) -> Path:
    """Fine-tune with the demo settings (and `variant`'s fine-tuning overlay) for about `steps` optimizer steps;
    returns the exported joint weights."""
    from mtl_breast.run.demo import _best_checkpoint
    from mtl_breast.run.train import parse_training_config

    weights = out / "weights" / "mtl"
    if (weights / "model.safetensors").exists():
        return weights
    flags = configs("finetune", variant)
    config = parse_training_config("finetune", [*flags, "--data.root", str(data)])  # the values it will train with
    # 80% of the labelled cases train (the datamodule's default val_fraction), each drawn `repeats` times an epoch.
    per_epoch = max(1, round(labelled * 0.8 * config.data.repeats / config.data.batch_size))
    epochs = max(1, round(steps / per_epoch))
    # Validate as often over the schedule as the demo does (it picks its checkpoint among those validations).
    val_every = max(1, round(epochs * config.trainer.check_val_every_n_epoch / config.trainer.max_epochs))
    args = ["finetune", "fit", *flags, "--data.root", data, "--data.cache_dir", out / "cache" / "data",
            "--seed_everything", seed, "--trainer.default_root_dir", out / "finetune",
            "--trainer.max_epochs", epochs, "--trainer.check_val_every_n_epoch", val_every]
    if pretrained is not None:
        args += ["--model.pretrained", pretrained]
    _cli(args)
    _cli(["export", "--ckpt", _best_checkpoint(out / "finetune"), "--out", weights])
    return weights


def run_seed(run: Path) -> int:
    """The seed a demo run was made with (`demo-runs` records it in seed.json)."""
    return int(json.loads((run / "seed.json").read_text())["seed"]) if (run / "seed.json").exists() else 0


# ------------------------------------------------------------------------------------------------ output
def run_meta(started: float) -> dict:
    """What an experiment ran on: seconds since ``started`` (``time.perf_counter``), the CPU with torch's thread count,
    torch's version (``python -m experiments`` adds the command)."""
    return {"seconds": round(time.perf_counter() - started, 1),
            "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "torch": torch.__version__}
