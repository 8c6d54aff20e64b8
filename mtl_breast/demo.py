"""The end-to-end demo on synthetic phantoms (`make demo` / `mtl-breast demo`).

synthesise -> MAE-pretrain -> export encoder -> fine-tune jointly from it -> export -> predict the
held-out split -> evaluate with the challenge formulas -> print the headline scores and the report
path. Every step is the same public command a user runs on real data; the YAML files in
configs/pretrain/demo.yaml and configs/finetune/demo.yaml hold the settings.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


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
    import torch

    last = run_dir / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)
    for name, callback in (state.get("callbacks") or {}).items():
        best = callback.get("best_model_path") if name.startswith("ModelCheckpoint") else None
        if best and Path(best).is_file():
            return Path(best)
    return last


def run_demo(workdir: Path | str = "runs/demo", cases: int = 96, size: int = 48, seed: int = 0,
             pretrain_epochs: int | None = None, finetune_epochs: int | None = None) -> dict:
    """Run the whole pipeline in `workdir`; returns the scores dict. Epoch overrides shorten it for tests."""
    from mtl_breast.cli import _lightning_cli, headline
    from mtl_breast.data.synthetic import generate_dataset
    from mtl_breast.inference import predict_dataset
    from mtl_breast.metrics.mamamia import evaluate
    from mtl_breast.tasks.export import export_checkpoint

    work = Path(workdir)
    data = work / "data"
    timings = {}

    t0 = _step(f"1/6 synthesise {cases} phantom cases -> {data}")
    summary = generate_dataset(data, num_cases=cases, seed=seed, size=size)
    timings["synth"] = time.perf_counter() - t0

    common = ["--data.root", str(data), "--data.cache_dir", str(work / "cache"), "--seed_everything", str(seed)]
    t0 = _step("2/6 MAE pretraining")
    args = ["fit", "--config", str(_config("pretrain/demo.yaml")), *common,
            "--trainer.default_root_dir", str(work / "pretrain")]
    if pretrain_epochs is not None:
        args += ["--trainer.max_epochs", str(pretrain_epochs)]
    _lightning_cli("pretrain", args)
    encoder_weights = export_checkpoint(work / "pretrain" / "checkpoints" / "last.ckpt", work / "weights" / "mae")
    timings["pretrain"] = time.perf_counter() - t0

    t0 = _step("3/6 joint fine-tuning from the pretrained encoder")
    args = ["fit", "--config", str(_config("finetune/demo.yaml")), *common,
            "--trainer.default_root_dir", str(work / "finetune"), "--model.pretrained", str(encoder_weights)]
    if finetune_epochs is not None:
        args += ["--trainer.max_epochs", str(finetune_epochs)]
    _lightning_cli("finetune", args)
    weights = export_checkpoint(_best_checkpoint(work / "finetune"), work / "weights" / "mtl")
    timings["finetune"] = time.perf_counter() - t0

    t0 = _step("4/6 predict the held-out split")
    report = predict_dataset(weights, data, work / "predictions", split="test")
    timings["predict"] = time.perf_counter() - t0

    t0 = _step("5/6 evaluate with the MAMA-MIA formulas")
    scores = evaluate(work / "predictions", data, work / "evaluation")
    timings["evaluate"] = time.perf_counter() - t0

    _step("6/6 summary")
    result = {"headline": headline(scores), "bayes_balanced_accuracy": summary.get("bayes_balanced_accuracy"),
              "test_cases": len(report["done"]), "skipped": report["skipped"],
              "scores": str(work / "evaluation" / "scores.json"), "report": str(work / "evaluation" / "report.md"),
              "seconds": {k: round(v, 1) for k, v in timings.items()}}
    print(json.dumps(result, indent=2))
    return scores
