"""The flags of `mtl-breast fit-check`, apart from the estimator (`run.fitcheck`), which needs torch and Lightning:
the command-line parser is built from them without loading either."""

from __future__ import annotations

import argparse

__all__ = ["add_arguments"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `mtl-breast fit-check`."""
    parser.add_argument("--config", required=True, help="LightningCLI YAML (configs/pretrain|finetune/*.yaml)")
    parser.add_argument("--budget-gib", type=float, default=24.0, help="GPU memory available (default 24)")
    parser.add_argument("--phases", type=int, help="phases per sample (default 4 to pretrain, 3 to fine-tune)")
    parser.add_argument("--batch-size", type=int, help="override data.batch_size")
    parser.add_argument("--crop-size", type=int, help="override data.crop_size (a cube)")
    parser.add_argument("--precision", help="override trainer.precision (bf16-mixed, 16-mixed, 32-true, ...)")
    parser.add_argument("--no-checkpointing", action="store_true", help="gradient checkpointing off")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
