"""What a training run records: TensorBoard events and a CSV of the same scalars for people to watch, and a
summary of its data and last validation scores for the exported weights' model card.

Both loggers write into one folder, ``<run>/lightning_logs/version_N/``: ``events.out.tfevents.*`` for
``tensorboard --logdir <run>`` (losses, learning rates, validation metrics, images, the resolved config) and
``metrics.csv`` for scripts and for ``mtl-breast plot`` on a cluster without a browser. A restarted run gets
the next version folder, as Lightning's default logger does; ``plot`` joins the versions of a run by step.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

from mtl_breast.acquisition import summarise_assumed
from mtl_breast.phantoms.collection import MANIFEST as SYNTHETIC_MANIFEST

if TYPE_CHECKING:
    import lightning as L
    from matplotlib.figure import Figure

LOG_FOLDER = "lightning_logs"


def next_version(root: str | Path) -> int:
    """The first unused ``version_N`` under ``root/lightning_logs`` (0 for a new run)."""
    folder = Path(root) / LOG_FOLDER
    used = [int(m.group(1)) for p in folder.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))]
    return max(used, default=-1) + 1


def run_loggers(root: str | Path | None) -> list[Logger]:
    """TensorBoard first (``trainer.log_dir`` is its folder) and CSV, both in ``root/lightning_logs/version_N``."""
    root = Path(root or ".")
    version = next_version(root)  # one number for both, so they share the folder
    csv = CSVLogger(root, name=LOG_FOLDER, version=version)
    _ = csv.experiment  # creates the folder now: later, TensorBoard's files would make it warn about deleting logs
    return [TensorBoardLogger(root, name=LOG_FOLDER, version=version, default_hp_metric=False), csv]


class LearningRates(LearningRateMonitor):
    """Learning rate of every parameter group at each logged step; silent when the run has no logger
    (``--trainer.logger false``), where Lightning's monitor would stop the run."""

    def on_train_start(self, trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)


def training_summary(module: L.LightningModule, task: str) -> dict[str, Any] | None:
    """Data and schedule of the run for the model card: dataset names with training-case counts, never ids, and for
    fine-tuning the acquisition values the kinetic features assumed for the training cases (``"assumed"``:
    `acquisition.summarise_assumed` of their cache infos, plus ``"unread"``, cases whose header could not be read).

    Returns None when the module is not attached to a trainer with a data module that has been set up.
    """
    trainer = module._trainer
    dm = trainer.datamodule if trainer is not None else None
    if dm is None or not hasattr(dm, "train_ids"):
        return None
    ids = tuple(dm.train_ids)
    memo = getattr(module, "_dataset_counts", None)  # headers are read once per run, not at every checkpoint
    if memo is None or memo[0] != ids:
        datasets: Counter[str] = Counter()
        assumed, unread = [], 0
        for pid in ids:
            try:
                info = dm.cache.read_info(pid)
                datasets[str(info.get("meta", {}).get("dataset") or "unknown")] += 1
                assumed.append(dm.cache.assumed(pid, info))
            except (OSError, ValueError, KeyError):  # an unreadable header is counted, not fatal to a checkpoint
                datasets["unknown"] += 1
                unread += 1
        # Only fine-tuning computes the pCR kinetic features, the one place acquisition values are assumed.
        summary = {**summarise_assumed(assumed), "unread": unread} if task == "finetune" else None
        memo = module._dataset_counts = (ids, dict(sorted(datasets.items())), summary)
    base = getattr(module.hparams, "pretrained", None)
    out = {"task": task, "datasets": memo[1], "train_cases": len(ids),
           "val_cases": len(getattr(dm, "val_ids", [])), "epochs": int(trainer.current_epoch),
           "steps": int(trainer.global_step), "base_weights": str(base) if base else None,
           "synthetic": any((Path(root) / SYNTHETIC_MANIFEST).is_file() for root in getattr(dm, "roots", []))}
    corpus = getattr(dm, "corpus", None)
    if isinstance(corpus, dict) and isinstance(corpus.get("summary"), dict):
        out["corpus"] = corpus["summary"]  # counts only: collections, cases, what was left out and why
    if memo[2] is not None:
        out["assumed"] = memo[2]  # `acquisition.summarise_assumed` of the training cases, for the model card
    return out


def validation_metrics(module: L.LightningModule) -> dict[str, float] | None:
    """The last logged ``val/*`` scalars (None before the first validation)."""
    trainer = module._trainer
    if trainer is None:
        return None
    values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/") and v.numel() == 1}
    return dict(sorted(values.items())) or None


def log_figure(module: L.LightningModule, tag: str, figure: Figure) -> None:
    """Add a matplotlib figure to every TensorBoard logger of the run (rank 0 only; others have no writer)."""
    for logger in module.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_figure(tag, figure, global_step=module.global_step, close=False)


def log_text(module_or_loggers, tag: str, text: str) -> None:
    """Add a text entry (markdown) to every TensorBoard logger."""
    loggers = getattr(module_or_loggers, "loggers", module_or_loggers)
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(tag, text, global_step=0)
