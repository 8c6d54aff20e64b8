"""nnU-Net v2 (the MAMA-MIA challenge's own baseline method) as the peer of the joint model for tumour segmentation.

The peer sees what the joint model sees: the same MAMA-MIA-layout root, the same train/test split and, with
`--split ours` (the default), the same training/validation division of the training split that
`FinetuneDataModule` makes (`split_train_val`, stratified by pCR). Phases 0, 1 and 2 of each case, resampled onto
phase 1's grid (the grid of the expert mask), are nnU-Net's three input channels. Its predictions of the test split
are scored by `mtl_breast.run.evaluate` -- the job that scores our model -- so Dice, NormHD, their bootstrap
intervals and the fairness numbers are computed by the same code for both.

    # an nnU-Net raw dataset (Dataset501_MamaMiaPhantoms/imagesTr, labelsTr, imagesTs, dataset.json)
    python bench/nnunet_peer.py convert --data runs/demo_f16/data --raw runs/nnunet_peer/nnUNet_raw
    # plan + preprocess, train each budget on the CPU, predict the test split, score, compare with our scores
    python bench/nnunet_peer.py run --data runs/demo_f16/data --out runs/nnunet_peer \
        --budgets 1epoch 5epochs --threads 1 --ours runs/demo_f16/evaluation/scores.json \
        --nnunet-python /work/nnunet-venv/bin/python
    # the same trained budgets predicted again with other settings (here nnU-Net's mirroring TTA, the default;
    # --no-tta above predicts without it, as our model's evaluation does): predictions/<budget>_tta, results_tta.json
    python bench/nnunet_peer.py run ... --budgets 1epoch --tag tta
    # score predicted masks PRED_DIR/pred_segmentations/<pid>.nii.gz the way `run` does
    python bench/nnunet_peer.py score --data runs/demo_f16/data --pred PRED_DIR --out SCORE_DIR

Training uses fold 0 (`--fold`): with `--split ours` nnU-Net's splits_final.json holds one fold, our division, so
nnU-Net trains on the cases our model was fine-tuned on and runs its end-of-training validation on our validation
cases; `--fold all` trains on the whole training split and validates on those same training cases.

nnU-Net runs in a subprocess of `--nnunet-python` (default: this interpreter), so it can live in its own virtual
environment (`pip install .[peer]` pins timm below what the main environment may hold). Its command-line entry
points (`nnUNetv2_plan_and_preprocess`, `nnUNetv2_train`, `nnUNetv2_predict`) are called with their usual
arguments through a launcher that caps torch's thread count at `--threads` (their `-device cpu` path otherwise sets
it to every core of the machine). Everything prints and writes JSON naming the device.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from bench_common import run_meta

from mtl_breast.data.case import CaseError
from mtl_breast.data.datamodule import split_train_val
from mtl_breast.data.mamamia import read_mamamia, read_splits
from mtl_breast.data.volumes import read_volume
from mtl_breast.files import atomic_path, write_text
from mtl_breast.metrics.intervals import describe, mean_interval
from mtl_breast.run.evaluate import evaluate

ROOT = Path(__file__).resolve().parents[1]
PHASES = (0, 1, 2)  # input channels: pre-contrast, first and second post-contrast
REFERENCE_PHASE = 1  # the grid every channel and the label are put on (the expert mask is drawn on it)
CHANNEL_NAMES = {"0": "phase0_precontrast", "1": "phase1_postcontrast", "2": "phase2_postcontrast"}
LABELS = {"background": 0, "tumour": 1}
CONFIGURATION = "3d_fullres"
TRAINERS = {"1epoch": "nnUNetTrainer_1epoch", "5epochs": "nnUNetTrainer_5epochs",
            "10epochs": "nnUNetTrainer_10epochs", "20epochs": "nnUNetTrainer_20epochs",
            "50epochs": "nnUNetTrainer_50epochs", "100epochs": "nnUNetTrainer_100epochs",
            "full": "nnUNetTrainer"}
GRID_TOLERANCE = 1e-4  # mm (origin, spacing) and cosine units (direction) within which two grids are the same

# Runs a console-script entry point of the installed nnunetv2 with torch's thread count capped:
#   python -c LAUNCHER <threads> <entry point name> <its arguments ...>
LAUNCHER = """
import sys
from importlib.metadata import entry_points
import torch
cap, name = int(sys.argv[1]), sys.argv[2]
sys.argv = [name, *sys.argv[3:]]
_set_threads = torch.set_num_threads
torch.set_num_threads = lambda n: _set_threads(max(1, min(int(n), cap)))
torch.set_num_threads(cap)
(entry,) = entry_points(group="console_scripts", name=name)
sys.exit(entry.load()())
"""


# ------------------------------------------------------------------------------------------------ conversion
def dataset_folder_name(dataset_id: int, name: str) -> str:
    """nnU-Net's folder name of a dataset, e.g. ``Dataset501_MamaMiaPhantoms``."""
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"nnU-Net dataset ids are 1..999, got {dataset_id}")
    if not re.fullmatch(r"[A-Za-z0-9]+", name):
        raise ValueError(f"dataset name {name!r}: letters and digits only (nnU-Net splits folder names on '_')")
    return f"Dataset{dataset_id:03d}_{name}"


def same_grid(a, b, tolerance: float = GRID_TOLERANCE) -> bool:
    """Whether two SimpleITK images share size, spacing, origin and direction (within `tolerance`)."""
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=0, atol=tolerance)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=tolerance)
            and np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=tolerance))


def onto_grid(image, reference, interpolator: int):
    """`image` on `reference`'s grid: a copy carrying the reference header when the grids already agree, else
    resampled in physical space (identity transform, 0 outside the source's field of view)."""

    if same_grid(image, reference):
        out = sitk.Image(image)
        out.CopyInformation(reference)
        return out
    pixel = sitk.sitkUInt8 if interpolator == sitk.sitkNearestNeighbor else sitk.sitkFloat32
    return sitk.Resample(image, reference, sitk.Transform(), interpolator, 0.0, pixel)


def _write_image(image, path: Path) -> None:


    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), True)


def convert_case(case, folder: Path, label_folder: Path | None) -> dict[str, Any]:
    """Write one case's channels (and label) in nnU-Net's naming.

    Args:
        case: a `mtl_breast.data.case.Case` with at least three phases.
        folder: imagesTr or imagesTs; files `<patient_id>_000k.nii.gz`, k = 0, 1, 2.
        label_folder: labelsTr for a training case (its expert mask, binarised, as `<patient_id>.nii.gz`), else None.

    Returns:
        {"patient_id", "resampled": phases that were not already on phase 1's grid, "size", "spacing"}.

    Raises:
        CaseError: naming the case and the file (too few phases, unreadable or malformed volume, no expert mask).
    """


    pid = case.patient_id
    if len(case.image_paths) < len(PHASES):
        where = case.image_paths[0].parent if case.image_paths else None
        raise CaseError(pid, where, f"needs phases {list(PHASES)} (pre-contrast and two post-contrast), "
                                    f"found {len(case.image_paths)} phase file(s)")
    reference = read_volume(Path(case.image_paths[REFERENCE_PHASE]), pid)
    channels, resampled = [], []
    for k in PHASES:
        phase = reference if k == REFERENCE_PHASE else read_volume(Path(case.image_paths[k]), pid)
        if not same_grid(phase, reference):
            resampled.append(k)
        channels.append(onto_grid(phase, reference, sitk.sitkLinear))
    label = None
    if label_folder is not None:
        if case.mask_path is None:
            raise CaseError(pid, None, "training case without an expert mask (segmentations/expert/<pid>.nii.gz)")
        mask = read_volume(Path(case.mask_path), pid, "mask")
        binary = sitk.Cast(sitk.BinaryThreshold(mask, 0.5, float(np.finfo(np.float32).max), 1, 0), sitk.sitkUInt8)
        label = onto_grid(binary, reference, sitk.sitkNearestNeighbor)
    for k, channel in zip(PHASES, channels, strict=True):
        _write_image(channel, folder / f"{pid}_{k:04d}.nii.gz")
    if label is not None:
        _write_image(label, label_folder / f"{pid}.nii.gz")
    return {"patient_id": pid, "resampled": resampled, "size": list(reference.GetSize()),
            "spacing": [round(s, 4) for s in reference.GetSpacing()]}


def _remove_stale(folder: Path, done: dict[str, list[dict]]) -> None:
    """Delete case files of an earlier conversion into `folder` that this one did not write (nnU-Net would read
    every file it finds)."""
    keep = {"imagesTr": {f"{r['patient_id']}_{k:04d}.nii.gz" for r in done["train"] for k in PHASES},
            "labelsTr": {f"{r['patient_id']}.nii.gz" for r in done["train"]},
            "imagesTs": {f"{r['patient_id']}_{k:04d}.nii.gz" for r in done["test"] for k in PHASES}}
    for sub, names in keep.items():
        for path in (folder / sub).glob("*.nii.gz") if (folder / sub).is_dir() else []:
            if path.name not in names:
                path.unlink()


def convert(data: Path | str, raw: Path | str, dataset_id: int = 501, name: str = "MamaMiaPhantoms") -> dict:
    """Write an nnU-Net v2 raw dataset from a MAMA-MIA root: the training split with labels, the test split without.

    Cases with bad input are skipped and listed (`skipped`: patient_id, reason naming the file); the others are
    written. Files are written atomically; in an existing dataset folder, case files this conversion did not write
    are removed.

    Returns:
        {"dataset": folder, "dataset_id", "num_training", "num_test", "resampled_cases": {pid: phases}, "skipped",
        "spacings": {spacing: cases}}.
    """

    data, raw = Path(data), Path(raw)
    folder = raw / dataset_folder_name(dataset_id, name)
    skipped: list[dict[str, str]] = []
    cases = {c.patient_id.lower(): c for c in read_mamamia(data, skipped=skipped)}
    unreadable = {s["patient_id"].lower() for s in skipped}
    splits = read_splits(data)
    done: dict[str, list[dict]] = {"train": [], "test": []}
    for split, images, labels in (("train", "imagesTr", "labelsTr"), ("test", "imagesTs", None)):
        for pid in splits[split]:
            case = cases.get(pid.lower())
            if case is None:
                if pid.lower() not in unreadable:
                    skipped.append({"patient_id": pid, "reason": f"listed in the {split} split of {data}, no case"})
                continue
            try:
                done[split].append(convert_case(case, folder / images, folder / labels if labels else None))
            except CaseError as err:
                skipped.append({"patient_id": err.patient_id, "reason": str(err)})
    if not done["train"]:
        raise SystemExit(f"{data}: no training case could be converted ({len(skipped)} skipped)")
    _remove_stale(folder, done)
    description = {
        "channel_names": CHANNEL_NAMES,
        "labels": LABELS,
        "numTraining": len(done["train"]),
        "file_ending": ".nii.gz",
        "overwrite_image_reader_writer": "SimpleITKIO",
        "name": name,
        "description": (f"MAMA-MIA-layout root {data}: phases {list(PHASES)} on phase {REFERENCE_PHASE}'s grid as "
                        "channels; labelsTr = expert masks of the training split; imagesTs = the test split"),
    }
    write_text(folder / "dataset.json", json.dumps(description, indent=2) + "\n")
    spacings: dict[str, int] = {}
    for row in done["train"] + done["test"]:
        key = "x".join(f"{s:g}" for s in row["spacing"])
        spacings[key] = spacings.get(key, 0) + 1
    summary = {"dataset": str(folder), "dataset_id": dataset_id, "num_training": len(done["train"]),
               "num_test": len(done["test"]), "train_ids": [r["patient_id"] for r in done["train"]],
               "test_ids": [r["patient_id"] for r in done["test"]],
               "resampled_cases": {r["patient_id"]: r["resampled"] for r in done["train"] + done["test"]
                                   if r["resampled"]},
               "spacings": spacings, "skipped": skipped}
    write_text(folder / "conversion.json", json.dumps(summary, indent=2) + "\n")
    return summary


def our_validation_split(data: Path | str, train_ids: Sequence[str], val_fraction: float = 0.2,
                         seed: int = 0) -> dict[str, list[str]]:
    """The training/validation division `FinetuneDataModule` makes of `train_ids` (stratified by pCR)."""

    pcr = {c.patient_id.lower(): c.pcr for c in read_mamamia(data, skipped=[])}
    train, val = split_train_val(list(train_ids), [pcr[p.lower()] for p in train_ids], val_fraction, seed)
    return {"train": train, "val": val}


# ------------------------------------------------------------------------------------------------ scoring
def score(pred_dir: Path | str, data: Path | str, out: Path | str, cases: Sequence[str] | None = None) -> dict:
    """Score predicted masks `<pred_dir>/pred_segmentations/<pid>.nii.gz` with `mtl_breast.run.evaluate`.

    Returns the segmentation part of its scores.json (dsc, norm_hd, performance, fairness, ranking, n, *_ci,
    per_case, by_variable, missing_predictions); the full file and report.md are in `out`.
    """

    scores = evaluate(pred_dir, data, out, cases=cases)
    if "segmentation" not in scores:
        raise SystemExit(f"{pred_dir}: nothing scored ({'; '.join(scores.get('notes', []))})")
    return scores["segmentation"]


def headline(segmentation: dict) -> dict:
    """The numbers of a segmentation score without its per-case and per-group tables."""
    keys = ("n", "dsc", "dsc_ci", "norm_hd", "norm_hd_ci", "performance", "performance_ci", "fairness", "ranking")
    return {k: segmentation[k] for k in keys if k in segmentation}


def paired_difference(peer: dict, ours: dict, seed: int = 0) -> dict:
    """Mean per-case difference peer - ours of DSC and NormHD on the cases both scored, with bootstrap intervals.

    Args:
        peer, ours: {pid: {"dsc", "norm_hd", ...}} (the `per_case` of two segmentation scores).
    """

    ours_by_key = {k.lower(): v for k, v in ours.items()}
    common = [k for k in peer if k.lower() in ours_by_key]
    out: dict[str, Any] = {"n": len(common), "only_peer": len(peer) - len(common),
                           "only_ours": len(ours_by_key) - len(common)}
    for metric in ("dsc", "norm_hd"):
        diff = np.array([peer[k][metric] - ours_by_key[k.lower()][metric] for k in common], dtype=np.float64)
        out[f"{metric}_diff"] = float(diff.mean()) if len(diff) else None
        out[f"{metric}_diff_ci"] = list(mean_interval(diff, seed=seed)) if len(diff) else None
        out[f"{metric}_peer_better"] = int((diff > 0).sum() if metric == "dsc" else (diff < 0).sum())
    out["intervals"] = describe(seed)
    return out


# ------------------------------------------------------------------------------------------------ nnU-Net stages
def nnunet_env(out: Path, threads: int) -> dict[str, str]:
    """The environment of every nnU-Net subprocess: its three folders under `out`, threads and workers capped."""
    env = dict(os.environ)
    env.update({
        "nnUNet_raw": str(out / "nnUNet_raw"), "nnUNet_preprocessed": str(out / "nnUNet_preprocessed"),
        "nnUNet_results": str(out / "nnUNet_results"),
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
        # augmentation workers besides the training process; 0 = augmentation in the training process itself
        "nnUNet_n_proc_DA": str(max(threads - 1, 0)),
        "nnUNet_def_n_proc": str(threads),
        "nnUNet_compile": "false",
    })
    return env


def run_stage(name: str, entry: str, args: Sequence[str], python: str, env: dict, threads: int, log_dir: Path) -> dict:
    """Run one nnU-Net entry point through `LAUNCHER`; returns {"entry", "args", "seconds", "log", "rc"}.

    Output goes to `<log_dir>/<name>.log`. A non-zero exit raises SystemExit naming the log and its last lines.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    command = [python, "-c", LAUNCHER, str(threads), entry, *args]
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {entry} {shlex.join(args)}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    with open(log, "w") as handle:
        rc = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT, check=False).returncode
    seconds = round(time.perf_counter() - started, 1)
    print(f"[{time.strftime('%H:%M:%S')}] {name}: rc {rc} after {seconds} s", file=sys.stderr, flush=True)
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise SystemExit(f"{name} failed (exit {rc}); log {log}:\n{tail}")
    return {"entry": entry, "args": list(args), "seconds": seconds, "log": str(log), "rc": rc}


def nnunet_versions(python: str) -> dict:
    """Versions of nnunetv2, torch, numpy, SimpleITK and dynamic-network-architectures in `python`'s environment."""
    code = ("import json, importlib.metadata as m\n"
            "names = ['nnunetv2', 'torch', 'numpy', 'SimpleITK', 'dynamic_network_architectures', 'timm']\n"
            "out = {}\n"
            "for n in names:\n"
            "    try: out[n] = m.version(n)\n"
            "    except m.PackageNotFoundError: out[n] = None\n"
            "print(json.dumps(out))")
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def plans_summary(preprocessed: Path) -> dict:
    """What nnU-Net planned for `CONFIGURATION`: patch and batch size, spacing, median shape, network stages."""
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    config = plans["configurations"][CONFIGURATION]
    arch = config.get("architecture", {}).get("arch_kwargs", {})
    fingerprint_path = preprocessed / "dataset_fingerprint.json"
    fingerprint = json.loads(fingerprint_path.read_text()) if fingerprint_path.is_file() else {}
    return {
        "configuration": CONFIGURATION,
        "configurations_planned": sorted(plans["configurations"]),
        "patch_size": config.get("patch_size"), "batch_size": config.get("batch_size"),
        "spacing": config.get("spacing"), "median_image_size_in_voxels": config.get("median_image_size_in_voxels"),
        "normalization_schemes": config.get("normalization_schemes"),
        "n_stages": arch.get("n_stages"), "features_per_stage": arch.get("features_per_stage"),
        "strides": arch.get("strides"), "network": config.get("architecture", {}).get("network_class_name"),
        "transpose_forward": plans.get("transpose_forward"),
        "median_spacing_fingerprint": (np.median(fingerprint["spacings"], axis=0).round(4).tolist()
                                       if fingerprint.get("spacings") else None),
    }


def _debug_value(text: Any) -> Any:
    """A value of nnU-Net's debug.json (every value is a string there) as int, float or bool where it is one."""
    if not isinstance(text, str):
        return text
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def trainer_summary(fold_dir: Path) -> dict:
    """What a finished training did, from nnU-Net's debug.json, training log and validation summary."""
    info: dict[str, Any] = {"folder": str(fold_dir)}
    debug_path = fold_dir / "debug.json"
    if debug_path.is_file():
        debug = json.loads(debug_path.read_text())
        for key in ("num_epochs", "num_iterations_per_epoch", "num_val_iterations_per_epoch", "batch_size",
                    "initial_lr", "weight_decay", "oversample_foreground_percent", "enable_deep_supervision",
                    "fold", "device"):
            if key in debug:
                info[key] = _debug_value(debug[key])
        if all(isinstance(info.get(k), int) for k in ("num_epochs", "num_iterations_per_epoch", "batch_size")):
            info["training_iterations"] = info["num_epochs"] * info["num_iterations_per_epoch"]
            info["training_patches"] = info["training_iterations"] * info["batch_size"]
    logs = sorted(fold_dir.glob("training_log_*.txt"))
    if logs:
        text = logs[-1].read_text(errors="replace")
        info["epoch_seconds"] = [float(s) for s in re.findall(r"Epoch time: ([0-9.]+) s", text)]
        info["pseudo_dice"] = [json.loads(s.replace("np.float32(", "").replace(")", "").replace("np.float64(", ""))
                               for s in re.findall(r"Pseudo dice (\[.*?\])", text)]
        info["train_loss"] = [float(s) for s in re.findall(r"train_loss (-?[0-9.]+)", text)]
        info["val_loss"] = [float(s) for s in re.findall(r"val_loss (-?[0-9.]+)", text)]
    summary = fold_dir / "validation" / "summary.json"
    if summary.is_file():
        val = json.loads(summary.read_text())
        info["validation"] = {"n": len(val.get("metric_per_case", [])),
                              "mean_dice": val.get("foreground_mean", {}).get("Dice")}
    return info


def _record(path: Path, update: dict) -> dict:

    state = json.loads(path.read_text()) if path.is_file() else {}
    state.update(update)
    write_text(path, json.dumps(state, indent=2) + "\n")
    return state


def run(args: argparse.Namespace) -> dict:
    """Convert, plan and preprocess, then per budget: train, predict the test split, score. Resumable: a stage
    whose output exists is not run again (its earlier wall time is kept in `<out>/stages.json`)."""

    out, data = Path(args.out).resolve(), Path(args.data).resolve()
    python = args.nnunet_python or sys.executable
    env = nnunet_env(out, args.threads)
    stages_path, logs = out / "stages.json", out / "logs"
    stages = json.loads(stages_path.read_text()) if stages_path.is_file() else {}
    folder_name = dataset_folder_name(args.dataset_id, args.name)
    raw, preprocessed = out / "nnUNet_raw" / folder_name, out / "nnUNet_preprocessed" / folder_name

    if "convert" not in stages or not (raw / "dataset.json").is_file():
        started = time.perf_counter()
        summary = convert(data, out / "nnUNet_raw", args.dataset_id, args.name)
        stages = _record(stages_path, {"convert": {"seconds": round(time.perf_counter() - started, 1),
                                                   "num_training": summary["num_training"],
                                                   "num_test": summary["num_test"],
                                                   "resampled_cases": len(summary["resampled_cases"]),
                                                   "skipped": summary["skipped"]}})
    conversion = json.loads((raw / "conversion.json").read_text())

    if "preprocess" not in stages or not (preprocessed / "nnUNetPlans.json").is_file():
        stage = run_stage("preprocess", "nnUNetv2_plan_and_preprocess",
                          ["-d", str(args.dataset_id), "-c", CONFIGURATION, "--verify_dataset_integrity",
                           "-np", str(args.threads), "-npfp", str(args.threads)], python, env, args.threads, logs)
        stages = _record(stages_path, {"preprocess": stage})

    split_info: dict[str, Any] = {"fold": args.fold, "split": args.split}
    if args.fold != "all" and args.split == "ours":
        if args.fold != "0":
            raise SystemExit("--split ours defines fold 0 only; use --fold 0 (or --split nnunet)")
        ours = our_validation_split(data, conversion["train_ids"], args.val_fraction, args.split_seed)
        # nnU-Net reads its folds from splits_final.json when the file exists: fold 0 = our division.
        write_text(preprocessed / "splits_final.json", json.dumps([ours], indent=1) + "\n")
        split_info.update({"train": len(ours["train"]), "val": len(ours["val"]),
                           "how": f"split_train_val(val_fraction={args.val_fraction}, seed={args.split_seed}), "
                                  "as FinetuneDataModule divides the training split"})

    results: dict[str, Any] = {"budgets": {}}
    for budget in args.budgets:
        trainer = TRAINERS.get(budget, budget)
        fold_dir = (out / "nnUNet_results" / folder_name / f"{trainer}__nnUNetPlans__{CONFIGURATION}"
                    / ("fold_all" if args.fold == "all" else f"fold_{args.fold}"))
        label = f"{budget}_{args.tag}" if args.tag else budget  # names the predictions, their scores, the entry
        train_key, predict_key = f"train:{budget}", f"predict:{label}"
        if train_key not in stages or not (fold_dir / "checkpoint_final.pth").is_file():
            stage = run_stage(f"train_{budget}", "nnUNetv2_train",
                              [str(args.dataset_id), CONFIGURATION, args.fold, "-tr", trainer, "-device", "cpu"],
                              python, env, args.threads, logs)
            stages = _record(stages_path, {train_key: stage})
        pred_root = out / "predictions" / label
        pred_dir = pred_root / "pred_segmentations"
        if predict_key not in stages or len(list(pred_dir.glob("*.nii.gz"))) < conversion["num_test"]:
            predict_args = ["-i", str(raw / "imagesTs"), "-o", str(pred_dir), "-d", str(args.dataset_id),
                            "-c", CONFIGURATION, "-f", args.fold, "-tr", trainer, "-device", "cpu",
                            "-npp", str(args.threads), "-nps", str(args.threads)]
            if not args.tta:
                predict_args.append("--disable_tta")
            stage = run_stage(f"predict_{label}", "nnUNetv2_predict", predict_args, python, env, args.threads, logs)
            stages = _record(stages_path, {predict_key: stage})
        started = time.perf_counter()
        seg = score(pred_root, data, out / "scores" / label, cases=conversion["test_ids"])
        entry = {"trainer": trainer, **headline(seg), "missing_predictions": seg.get("missing_predictions", []),
                 "seconds": {"preprocess": stages["preprocess"]["seconds"], "train": stages[train_key]["seconds"],
                             "predict": stages[predict_key]["seconds"],
                             "score": round(time.perf_counter() - started, 1)},
                 "tta": args.tta, "training": trainer_summary(fold_dir),
                 "scores": str(out / "scores" / label / "scores.json")}
        if args.ours:
            ours_scores = json.loads(Path(args.ours).read_text())["segmentation"]
            entry["vs_ours"] = paired_difference(seg["per_case"], ours_scores["per_case"])
        results["budgets"][label] = entry
        partial = {**results, "state": f"after {label}"}
        write_text(out / f"results{'_' + args.tag if args.tag else ''}.partial.json",
                   json.dumps(partial, indent=2, default=str) + "\n")

    if args.ours:
        ours_scores = json.loads(Path(args.ours).read_text())["segmentation"]
        results["ours"] = {"scores": str(args.ours), **headline(ours_scores)}
    results.update({
        "data": str(data), "dataset": str(raw), "conversion": {k: v for k, v in conversion.items()
                                                               if k not in ("train_ids", "test_ids")},
        "split": split_info, "tta": args.tta, "plans": plans_summary(preprocessed),
        "versions": nnunet_versions(python), "nnunet_python": python, "cpu_count": os.cpu_count(),
        "note": args.note,
        "environment": {k: env[k] for k in ("OMP_NUM_THREADS", "nnUNet_n_proc_DA", "nnUNet_def_n_proc",
                                            "nnUNet_compile")},
        "stages": stages,
    })
    return results


# ------------------------------------------------------------------------------------------------ CLI
def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)

    def dataset_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data", required=True, help="MAMA-MIA-layout root (e.g. made by `mtl-breast synth`)")
        p.add_argument("--dataset-id", type=int, default=501, help="nnU-Net dataset id (default 501)")
        p.add_argument("--name", default="MamaMiaPhantoms", help="nnU-Net dataset name (letters and digits)")

    p = sub.add_parser("convert", help="write an nnU-Net raw dataset from a MAMA-MIA root")
    dataset_flags(p)
    p.add_argument("--raw", required=True, help="nnUNet_raw folder; the dataset goes to <raw>/Dataset<ID>_<name>")

    p = sub.add_parser("run", help="convert, plan+preprocess, train budgets, predict the test split, score")
    dataset_flags(p)
    p.add_argument("--out", default=str(ROOT / "runs" / "nnunet_peer"), help="folder of everything (nnUNet_raw, "
                   "nnUNet_preprocessed, nnUNet_results, predictions, scores, logs, results.json)")
    p.add_argument("--budgets", nargs="+", default=["1epoch"],
                   help=f"trainer budgets: {', '.join(TRAINERS)} or a trainer class name (default 1epoch)")
    p.add_argument("--fold", default="0", help="nnU-Net fold: 0 (default) or all")
    p.add_argument("--split", choices=("ours", "nnunet"), default="ours",
                   help="fold 0 = our training/validation division of the training split (default), or nnU-Net's "
                        "own 5-fold split")
    p.add_argument("--val-fraction", type=float, default=0.2, help="as the fine-tuning config (default 0.2)")
    p.add_argument("--split-seed", type=int, default=0, help="as the fine-tuning config (default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch threads and worker processes of nnU-Net (default 1)")
    p.add_argument("--no-tta", dest="tta", action="store_false",
                   help="predict without nnU-Net's mirroring test-time augmentation (default: with it)")
    p.add_argument("--ours", help="our model's scores.json (mtl-breast evaluate) for a paired comparison")
    p.add_argument("--nnunet-python", help="python of the environment with nnunetv2 (default: this one)")
    p.add_argument("--note", help="free text stored in the results (e.g. what else shared the CPU)")
    p.add_argument("--tag", help="suffix of the prediction/score folders and results file of this run, e.g. tta: "
                                 "predictions of the same trained budgets under other settings")

    p = sub.add_parser("score", help="score predicted masks with mtl_breast's evaluate job")
    p.add_argument("--data", required=True)
    p.add_argument("--pred", required=True, help="folder holding pred_segmentations/<pid>.nii.gz")
    p.add_argument("--out", required=True)
    p.add_argument("--ours", help="our model's scores.json for a paired comparison")

    for each in sub.choices.values():
        each.add_argument("--json", dest="json_out", help="also write the printed JSON to this file (run: default "
                                                          "<out>/results.json)")
    args = parser.parse_args(argv)
    command = ["bench/nnunet_peer.py", *(sys.argv[1:] if argv is None else argv)]
    started = time.perf_counter()
    if args.cmd == "convert":
        result = convert(args.data, args.raw, args.dataset_id, args.name)
        threads = None
    elif args.cmd == "score":
        seg = score(args.pred, args.data, args.out)
        result = headline(seg)
        if args.ours:
            result["vs_ours"] = paired_difference(seg["per_case"],
                                                  json.loads(Path(args.ours).read_text())["segmentation"]["per_case"])
        threads = None
    else:
        result = run(args)
        threads = args.threads
    result = {**result, **run_meta(command, started, threads)}
    if args.cmd == "run" and not args.json_out:
        args.json_out = str(Path(args.out) / f"results{'_' + args.tag if args.tag else ''}.json")
    out = args.json_out
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if out:

        write_text(out, text + "\n")
    return result


if __name__ == "__main__":
    main()
