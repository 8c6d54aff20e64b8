"""The end-to-end demo on synthetic phantoms (`make demo` / `mtl-breast demo`).

synthesise (an unlabeled pool, labelled cases and held-out cases, all disjoint) -> MAE-pretrain on the
pool -> export encoder -> fine-tune jointly from it -> export -> predict the held-out split -> evaluate
with the challenge formulas -> print the headline scores, the pCR AUC next to the size-only and kinetic
baselines on the same cases, and the report path. Every step is the same public command a user runs on
real data; the YAML files in configs/pretrain/demo.yaml and configs/finetune/demo.yaml hold the settings.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mtl_breast.baselines import LogisticBaseline, labelled_features
from mtl_breast.data.cache import CaseCache
from mtl_breast.data.mamamia import read_splits
from mtl_breast.files import write_text
from mtl_breast.metrics.classification import auc_with_interval, paired_auc_difference
from mtl_breast.models.kinetics import FEATURE_SETS
from mtl_breast.phantoms.collection import generate_dataset
from mtl_breast.predictor import InferenceSettings, read_weights_config
from mtl_breast.run.evaluate import evaluate, headline
from mtl_breast.run.plot import plot_run
from mtl_breast.run.predict import TERM_COLUMNS, predict_dataset
from mtl_breast.run.train import lightning_cli
from mtl_breast.tasks.export import export_checkpoint

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def _config(name: str) -> Path:
    path = CONFIG_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the demo runs from a source checkout (pip install -e .)")
    return path


def _step(title: str) -> float:
    print(f"\n=== {title}", flush=True)
    return time.perf_counter()


def _best_checkpoint(run_dir: Path) -> Path:
    """The checkpoint ModelCheckpoint kept as best in this run (recorded in last.ckpt), else last.ckpt.

    Not the newest `best-*.ckpt` by name: a work folder used before can still hold one from an earlier run.
    """
    last = run_dir / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)
    for name, callback in (state.get("callbacks") or {}).items():
        best = callback.get("best_model_path") if name.startswith("ModelCheckpoint") else None
        if best and Path(best).is_file():
            return Path(best)
    return last


def _held_out_pcr(data: Path, cache_dir: Path, weights: Path, predictions: Path) -> dict:
    """pCR AUC of the model on the held-out split next to the size and kinetic baselines on the same cases, and the
    paired difference of the model to each (``model_minus``).

    The baselines are logistic regressions fitted on the training split (expert masks, `baselines.py`) and scored
    on the held-out cases with features from their expert masks, which favours them over the model (it only
    sees its own predicted mask).
    """

    settings = InferenceSettings.from_config(read_weights_config(weights))
    cache, roi = CaseCache(cache_dir, settings.preprocess), settings.roi_size
    splits = read_splits(data)

    _, train_rows, y_train = labelled_features(cache, splits["train"], roi)
    test_ids, test_rows, y_test = labelled_features(cache, splits["test"], roi)
    predicted = pd.read_csv(predictions / "predictions.csv", dtype={"patient_id": str}).set_index("patient_id")
    scores = {"joint model": np.array([predicted["score"].get(pid, np.nan) for pid in test_ids], dtype=np.float64)}
    # Each pathway's term of the model's logit on its own (columns the model has: `run.predict.TERM_COLUMNS`).
    terms = {name: np.array([predicted[column].get(pid, np.nan) for pid in test_ids], dtype=np.float64)
             for name, column in TERM_COLUMNS.items() if column in predicted and predicted[column].notna().any()}
    for name, term in terms.items():
        scores[f"joint model, {name} term alone"] = term
    for name, features in FEATURE_SETS.items():
        scores[f"{name} baseline"] = LogisticBaseline(features).fit(train_rows, y_train).predict_proba(test_rows)
    table = {name: auc_with_interval(y_test, s) for name, s in scores.items()}
    # Paired on the same cases: the interval says whether the model is above a baseline, which two overlapping
    # AUC intervals cannot.
    model_minus = {name: paired_auc_difference(y_test, scores["joint model"], s)
                   for name, s in scores.items() if not name.startswith("joint model")}
    logit = sum(terms.values()) if terms else None
    # Share of the logit's variance each term carries, cov(term, logit) / var(logit): the shares add up to 1.
    shares = {name: float(np.cov(term, logit)[0, 1] / logit.var(ddof=1))
              for name, term in terms.items()} if logit is not None and logit.var() > 0 else {}
    return {"cases": len(test_ids), "positives": int(sum(y_test)), "auc": table, "model_minus": model_minus,
            "logit_variance_share": shares}


def run_demo(workdir: Path | str = "runs/demo", labelled: int = 288, held_out: int = 150, pool: int = 200,
             size: int = 48, seed: int = 0, pretrain_epochs: int | None = None,
             finetune_epochs: int | None = None, physics: str = "randomised") -> dict:
    """Run the whole pipeline in `workdir`; returns the scores dict. Epoch overrides shorten it for tests.

    Three disjoint sets of phantoms, as a foundation model is used: an unlabeled pool for MAE pretraining
    (`pool` cases, its own seed), `labelled` cases for fine-tuning (training + validation), and `held_out` cases
    that only prediction and scoring see. `physics` is the phantoms' (`phantoms.collection.generate_dataset`):
    randomised by default, "fixed" for quick checks that the pipeline learns.
    """
    if min(labelled, held_out, pool) < 1:
        raise ValueError(f"need labelled, held_out and pool >= 1, got {labelled}, {held_out}, {pool}")
    work = Path(workdir)
    data, pool_dir = work / "data", work / "pool"
    timings = {}

    t0 = _step(f"1/6 synthesise {pool} unlabeled phantoms -> {pool_dir}, {labelled} labelled + {held_out} "
               f"held-out -> {data}")
    # Seeds 2s and 2s + 1: the pool never shares a phantom with the labelled or held-out cases.
    generate_dataset(pool_dir, num_cases=pool, seed=2 * seed + 1, size=size, test_fraction=0.0, physics=physics)
    summary = generate_dataset(data, num_cases=labelled + held_out, seed=2 * seed, size=size, physics=physics,
                               test_fraction=held_out / (labelled + held_out))
    timings["synth"] = time.perf_counter() - t0

    t0 = _step("2/6 MAE pretraining on the unlabeled pool")
    args = ["fit", "--config", str(_config("pretrain/demo.yaml")), "--data.root", str(pool_dir),
            "--data.cache_dir", str(work / "cache" / "pool"), "--seed_everything", str(seed),
            "--trainer.default_root_dir", str(work / "pretrain")]
    if pretrain_epochs is not None:
        args += ["--trainer.max_epochs", str(pretrain_epochs)]
    lightning_cli("pretrain", args)
    encoder_weights = export_checkpoint(work / "pretrain" / "checkpoints" / "last.ckpt", work / "weights" / "mae")
    timings["pretrain"] = time.perf_counter() - t0

    t0 = _step("3/6 joint fine-tuning from the pretrained encoder")
    args = ["fit", "--config", str(_config("finetune/demo.yaml")), "--data.root", str(data),
            "--data.cache_dir", str(work / "cache" / "data"), "--seed_everything", str(seed),
            "--trainer.default_root_dir", str(work / "finetune"), "--model.pretrained", str(encoder_weights)]
    if finetune_epochs is not None:
        args += ["--trainer.max_epochs", str(finetune_epochs)]
    lightning_cli("finetune", args)
    weights = export_checkpoint(_best_checkpoint(work / "finetune"), work / "weights" / "mtl")
    timings["finetune"] = time.perf_counter() - t0

    t0 = _step("4/6 predict the held-out split")
    report = predict_dataset(weights, data, work / "predictions", split="test")
    timings["predict"] = time.perf_counter() - t0

    t0 = _step("5/6 evaluate with the MAMA-MIA formulas, next to the baselines")
    scores = evaluate(work / "predictions", data, work / "evaluation")
    baselines = _held_out_pcr(data, work / "cache" / "data", weights, work / "predictions")
    write_text(work / "evaluation" / "baselines.json", json.dumps(baselines, indent=2) + "\n")
    timings["evaluate"] = time.perf_counter() - t0

    _step("6/6 summary")
    curves = [str(path) for run in ("pretrain", "finetune") for path in plot_run(work / run)]
    result = {"headline": headline(scores), "bayes_balanced_accuracy": summary.get("bayes_balanced_accuracy"),
              "test_cases": len(report["done"]), "skipped": report["skipped"],
              "assumed_acquisition": report["assumed"]["line"],
              "scores": str(work / "evaluation" / "scores.json"), "report": str(work / "evaluation" / "report.md"),
              "curves": curves, "tensorboard": f"tensorboard --logdir {work}",
              "seconds": {k: round(v, 1) for k, v in timings.items()}}
    print(json.dumps(result, indent=2))
    print(f"\npCR AUC on {baselines['cases']} held-out cases with known pCR ({baselines['positives']} pCR), "
          "95% bootstrap intervals; baselines fitted on the training split with expert masks:")
    for name, row in baselines["auc"].items():
        print(f"  {name:<24} {row['auc']:.3f}  [{row['low']:.3f}, {row['high']:.3f}]")
    if baselines["logit_variance_share"]:
        shares = ", ".join(f"{name} {share:.0%}" for name, share in baselines["logit_variance_share"].items())
        print(f"share of the model's pCR logit variance by pathway: {shares}")
    print("paired AUC differences on the same cases, 95% bootstrap intervals:")
    for name, row in baselines["model_minus"].items():
        print(f"  model - {name:<24} {row['difference']:+.3f}  [{row['low']:+.3f}, {row['high']:+.3f}]")
    return scores
