"""Curves of a finished (or running) training run as PNG files, for clusters without a browser (`mtl-breast plot`).

A run folder (``trainer.default_root_dir``) holds one ``lightning_logs/version_N`` folder per start of the run;
each has ``metrics.csv`` and TensorBoard events with the same scalars. The versions are joined by step (a
resumed run continues the step count), the CSV is read where present and the events otherwise, and three
figures are written: losses (train and validation), learning rates, and the other validation metrics.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import pandas as pd

from mtl_breast.figures import curves_figure, save_png

__all__ = ["read_scalars", "plot_run"]

Series = dict[str, list[tuple[int, float]]]  # tag -> [(step, value)], sorted by step


def _version_folders(run_dir: Path) -> list[Path]:
    # The run folder itself, a lightning_logs folder or one version folder; versions in start order.
    if re.fullmatch(r"version_\d+", run_dir.name):
        return [run_dir]
    base = run_dir if run_dir.name == "lightning_logs" else run_dir / "lightning_logs"
    found = [p for p in base.glob("version_*") if p.is_dir() and re.fullmatch(r"version_\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def _csv_scalars(path: Path) -> Series:
    table = pd.read_csv(path)
    if "step" not in table.columns:
        raise ValueError(f"{path}: no 'step' column; not a Lightning metrics.csv")
    series: Series = {}
    for column in table.columns:
        if column in ("step", "epoch"):
            continue
        rows = table[["step", column]].dropna()
        series[column] = [(int(s), float(v)) for s, v in zip(rows["step"], rows[column], strict=True)]
    return series


def _event_scalars(folder: Path) -> Series:
    # imported here: 0.5 s, needed only for a run whose metrics.csv is missing
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0 = keep every point
    events.Reload()
    return {tag: [(int(e.step), float(e.value)) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def read_scalars(run_dir: str | Path) -> Series:
    """Every logged scalar of a run, all versions joined; a later version wins where steps repeat.

    Raises:
        FileNotFoundError: no ``metrics.csv`` or TensorBoard events under ``run_dir``.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    merged: dict[str, dict[int, float]] = defaultdict(dict)
    read_any = False
    for folder in _version_folders(run_dir):
        csv = folder / "metrics.csv"
        if csv.is_file():
            series = _csv_scalars(csv)
        elif any(folder.glob("events.out.tfevents.*")):
            series = _event_scalars(folder)
        else:
            continue
        read_any = True
        for tag, points in series.items():
            merged[tag].update(points)
    if not read_any:
        raise FileNotFoundError(f"no training logs under {run_dir} (expected lightning_logs/version_*/metrics.csv "
                                "or TensorBoard events; pass the run's --trainer.default_root_dir)")
    return {tag: sorted(points.items()) for tag, points in sorted(merged.items()) if points}


def _groups(series: Series) -> dict[str, list[str]]:
    """Figure name -> tags: losses, learning rates, other validation metrics (other scalars join the losses)."""
    groups: dict[str, list[str]] = {"losses": [], "learning_rate": [], "validation": []}
    for tag in series:
        if tag.startswith("lr-"):
            groups["learning_rate"].append(tag)
        elif tag.startswith("val/") and "loss" not in tag:
            groups["validation"].append(tag)
        else:
            groups["losses"].append(tag)
    return {name: tags for name, tags in groups.items() if tags}


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write ``losses.png``, ``learning_rate.png`` and ``validation.png`` (those with data) for a run.

    Args:
        run_dir: the run folder (``--trainer.default_root_dir``), its ``lightning_logs`` or one version folder.
        out_dir: where the PNGs go; default ``run_dir/plots``.

    Returns:
        The written files.
    """
    series = read_scalars(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    return [save_png(curves_figure(name, tags, series), out / f"{name}.png", dpi=90)
            for name, tags in _groups(series).items()]
