"""`mtl-breast pretrain|finetune <fit|validate|test> --config X.yaml ...`: the task modules and data modules through
LightningCLI, with the run folder layout (checkpoints/, one logger version folder) and trainer defaults."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from mtl_breast.data.datamodule import FinetuneDataModule, PretrainDataModule
from mtl_breast.tasks.checkpointing import CheckpointError, LastCheckpoint
from mtl_breast.tasks.finetune import MTLFinetuneModule
from mtl_breast.tasks.loggers import LearningRates, log_text, run_loggers
from mtl_breast.tasks.pretrain import MAEPretrainModule

log = logging.getLogger(__name__)

# Preprocessing settings that were separate data-module arguments before they became one `data.preprocess`
# mapping; configs saved by earlier runs (config.yaml in their log folders) still hold them so.
LEGACY_PREPROCESS_KEYS = ("spacing", "margin_mm", "crop_to_breast", "clip_percentiles", "cache_dtype")


def upgrade_legacy_args(args: list[str]) -> list[str]:
    """``args`` with the legacy preprocessing keys moved under ``data.preprocess``.

    A flag ``--data.spacing=...`` becomes ``--data.preprocess.spacing=...``; a ``--config`` file whose ``data``
    section holds such keys is passed on as the upgraded YAML text (the file itself is left alone, and no copy is
    written). Anything else passes through unchanged.
    """
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        key, eq, value = arg.partition("=")
        if key in ("--config", "-c"):
            path = value if eq else (args[i + 1] if i + 1 < len(args) else None)
            i += 0 if eq else 1
            out += ["--config", _upgraded_config(path)] if path is not None else [arg]
        elif key.startswith("--data.") and key[len("--data."):] in LEGACY_PREPROCESS_KEYS:
            out.append(f"--data.preprocess.{key[len('--data.'):]}{eq}{value}")
        else:
            out.append(arg)
        i += 1
    return out


def _upgraded_config(path: str) -> str:
    """``path``, or, when it has legacy ``data`` keys, the YAML text of its config with them moved under
    ``data.preprocess``."""
    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return path  # not a readable YAML file (or config text given inline): the parser says what is wrong
    data = config.get("data") if isinstance(config, dict) else None
    legacy = [k for k in LEGACY_PREPROCESS_KEYS if isinstance(data, dict) and k in data]
    if not legacy:
        return path
    preprocess = dict(data.get("preprocess") or {})
    for key in legacy:
        preprocess.setdefault(key, data.pop(key))
    data["preprocess"] = preprocess
    log.warning("%s: read data.%s as data.preprocess.* (the layout of configs since 2026-12-01)", path,
                ", data.".join(legacy))
    # The upgraded config goes to the parser as YAML text (jsonargparse takes a path or the text itself), so no
    # copy is left on disk; its paths are plain strings, resolved against the working directory either way.
    return yaml.safe_dump(config, sort_keys=False)


def trainer_defaults(bf16: bool) -> dict:
    """The Trainer settings mtl-breast sets unless a config says otherwise (`fit-check` estimates with them too)."""
    # bf16 autocast on GPUs that support it; plain float32 on CPU, where bf16 is slow.
    return {"accelerator": "auto", "precision": "bf16-mixed" if bf16 else "32-true", "gradient_clip_val": 1.0,
            "log_every_n_steps": 10}


def task_classes(task: str) -> tuple[type, type]:
    """``(LightningModule, LightningDataModule)`` of ``"pretrain"`` or ``"finetune"``."""
    if task == "pretrain":
        return MAEPretrainModule, PretrainDataModule
    if task == "finetune":
        return MTLFinetuneModule, FinetuneDataModule
    raise ValueError(f"unknown task {task!r}: 'pretrain' or 'finetune'")


def check_resume_checkpoint(trainer, ckpt_path: str | None) -> None:
    """Refuse a `--ckpt_path` file that cannot be read (truncated, garbled) before training starts, in one line.

    ``last`` is the run's ``checkpoints/last.ckpt`` (when it exists; without it the run starts afresh). The file is
    opened as Lightning will open it (``weights_only``), memory-mapped so that nothing is read twice.

    Raises:
        CheckpointError: naming the file and what the reader said.
    """
    if not ckpt_path:
        return
    if ckpt_path == "last":
        last = next((c for c in trainer.callbacks if isinstance(c, LastCheckpoint)), None)
        path = last.path(trainer) if last is not None else None
    elif ckpt_path in ("best", "hpc", "registry"):
        return
    else:
        path = Path(ckpt_path)
    if path is None or not path.is_file():
        return
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 -- any reader failure means the same thing here
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{path}: not a readable checkpoint, cannot resume from it ({reason}); move it "
                              "away to start afresh, or pass an earlier checkpoint with --ckpt_path") from err


class SaveConfigToLogs(SaveConfigCallback):
    """config.yaml in the log folder (LightningCLI's default) and the same text in TensorBoard."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        text = self.parser.dump(self.config, skip_none=False)
        log_text(trainer.loggers, "config", "```yaml\n" + text + "\n```")


class TaskCLI(LightningCLI):
    """LightningCLI with the run folder layout: one logger version folder, checkpoints under the run folder."""

    def instantiate_trainer(self, **kwargs):
        # TensorBoard and CSV in one version folder, unless the config names its own logger or turns it off.
        trainer_config = self._get(self.config_init, "trainer", default={})
        if trainer_config.get("logger") in (None, True):
            kwargs.setdefault("logger", run_loggers(trainer_config.get("default_root_dir")))
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        check_resume_checkpoint(self.trainer, self._get(self.config, "ckpt_path"))

    def add_arguments_to_parser(self, parser) -> None:
        # One value, typed once: the crop the data module cuts is the size the model is built for.
        parser.link_arguments("data.crop_size", "model.img_size")
        # Checkpoints live at a fixed place under the run folder, so `--ckpt_path last` finds them
        # again after a restart (the logger's version folder changes on every start).
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": False, "checkpoint.monitor": self.model_class.monitor,
                             "checkpoint.mode": self.model_class.monitor_mode,
                             "checkpoint.filename": "best-{epoch:03d}", "checkpoint.save_top_k": 1})
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath",
                              compute_fn=lambda root: str(Path(root or ".") / "checkpoints"))
        # last.ckpt is LastCheckpoint's: every few minutes, after each validation and at the end, atomically.
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
        parser.link_arguments("trainer.default_root_dir", "last_checkpoint.dirpath",
                              compute_fn=lambda root: str(Path(root or ".") / "checkpoints"))

    def parse_arguments(self, parser, args) -> None:
        # The arguments come in `args`; sys.argv holds the same command for the DDP launcher (see
        # `lightning_cli`) and is hidden here so LightningCLI does not warn about getting both.
        # Configs saved before `data.preprocess` existed are read in today's layout here, where training and
        # `parse_training_config` both pass (and where DDP ranks, re-running the command, pass again).
        argv, sys.argv = sys.argv, sys.argv[:1]
        try:
            super().parse_arguments(parser, upgrade_legacy_args(args) if isinstance(args, list) else args)
        finally:
            sys.argv = argv


def _cli_kwargs(task: str, bf16: bool) -> dict:
    """What `TaskCLI` is built with for ``task``: the classes, the parser's program name and trainer defaults."""
    model_cls, data_cls = task_classes(task)
    return {"model_class": model_cls, "datamodule_class": data_cls, "subclass_mode_model": False,
            "subclass_mode_data": False, "parser_kwargs": {"prog": f"mtl-breast {task}"},
            "save_config_callback": SaveConfigToLogs, "save_config_kwargs": {"overwrite": True},
            "trainer_defaults": {**trainer_defaults(bf16=bf16), "callbacks": [LearningRates(logging_interval="step")]}}


def lightning_cli(task: str, args: list[str]) -> int:
    """`mtl-breast pretrain|finetune <fit|validate|test> --config X.yaml ...` through LightningCLI."""
    # LightningCLI parses `args`; sys.argv is set to the same command because Lightning's DDP launcher
    # starts the other ranks by re-running `sys.executable sys.argv` (`-m <module>` when run as one):
    # anything else there would start the wrong program on ranks 1..N-1.
    argv, sys.argv = sys.argv, [sys.argv[0] if sys.argv else "mtl-breast", task, *args]
    try:
        TaskCLI(args=args, **_cli_kwargs(task, bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported()))
    finally:
        sys.argv = argv
    return 0


class _Parsed(Exception):
    """Carries the parsed config out of ``LightningCLI.__init__``, which would go on to seed and instantiate."""

    def __init__(self, config: Namespace) -> None:
        super().__init__("parsed")
        self.config = config


class _ParseOnlyCLI(TaskCLI):
    """Stops right after parsing: no seeding, nothing instantiated (no Trainer, data module or model)."""

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        raise _Parsed(self.config)


def parse_training_config(task: str, args: list[str], *, bf16: bool = True) -> Namespace:
    """The values ``mtl-breast <task> fit <args>`` would train with, from the same LightningCLI parser.

    The parser is the one `lightning_cli` builds (same classes, links and trainer defaults), without the
    subcommand level: the result has ``model``, ``data``, ``trainer``, ``checkpoint``, ... at the top. Nothing is
    instantiated, so a config naming a GPU or a data folder this machine lacks still parses (``data.root`` must
    still be given).

    Args:
        task: ``"pretrain"`` or ``"finetune"``.
        args: command-line arguments (``["--config", "X.yaml", "--data.batch_size=2"]``).
        bf16: the trainer's default precision is ``bf16-mixed`` (a GPU that supports it) instead of ``32-true``.

    Raises:
        argparse.ArgumentError: the arguments do not parse (the message names the key).
    """
    kwargs = _cli_kwargs(task, bf16)
    kwargs["parser_kwargs"] = {**kwargs["parser_kwargs"], "exit_on_error": False}
    try:
        _ParseOnlyCLI(args=args, run=False, **kwargs)
    except _Parsed as parsed:
        return parsed.config
    raise AssertionError("unreachable: _ParseOnlyCLI always stops after parsing")
