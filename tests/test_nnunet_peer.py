"""bench/nnunet_peer.py: the nnU-Net v2 raw dataset written from a MAMA-MIA root, and the scoring of its predictions."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import load_bench_script

from mtl_breast.data.mamamia import read_mamamia, read_splits
from mtl_breast.metrics.segmentation import segmentation_case_metrics
from mtl_breast.phantoms.collection import generate_dataset

ROOT = Path(__file__).resolve().parents[1]


peer = load_bench_script("nnunet_peer")


def _shift_phase(path: Path, shift_mm: tuple[float, float, float]) -> None:
    """Rewrite a phase file with its origin moved (voxels unchanged): a grid that differs from phase 1's."""
    image = sitk.ReadImage(str(path))
    image.SetOrigin(tuple(o + s for o, s in zip(image.GetOrigin(), shift_mm, strict=True)))
    sitk.WriteImage(image, str(path), True)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """Three tiny phantoms (2 training, 1 test); phase 2 of the first training case moved off phase 1's grid."""
    root = tmp_path_factory.mktemp("phantoms")
    generate_dataset(root, num_cases=3, seed=5, size=24, test_fraction=0.34)
    splits = read_splits(root)
    cases = {c.patient_id: c for c in read_mamamia(root)}
    moved = cases[splits["train"][0]]
    spacing = sitk.ReadImage(str(moved.image_paths[2])).GetSpacing()
    _shift_phase(moved.image_paths[2], (0.5 * spacing[0], 0.3 * spacing[1], 0.0))
    raw = tmp_path_factory.mktemp("raw")
    summary = peer.convert(root, raw, dataset_id=7, name="Tiny")
    return {"root": root, "raw": raw, "summary": summary, "splits": splits, "cases": cases, "moved": moved.patient_id,
            "folder": raw / "Dataset007_Tiny"}


def test_dataset_json_and_file_names(phantoms):
    folder, splits = phantoms["folder"], phantoms["splits"]
    assert len(splits["train"]) == 2 and len(splits["test"]) == 1
    info = json.loads((folder / "dataset.json").read_text())
    assert info["channel_names"] == {"0": "phase0_precontrast", "1": "phase1_postcontrast",
                                     "2": "phase2_postcontrast"}
    assert info["labels"] == {"background": 0, "tumour": 1}
    assert info["numTraining"] == 2 and info["file_ending"] == ".nii.gz"
    names = {sub: sorted(p.name for p in (folder / sub).iterdir()) for sub in ("imagesTr", "labelsTr", "imagesTs")}
    assert names["imagesTr"] == sorted(f"{pid}_{k:04d}.nii.gz" for pid in splits["train"] for k in range(3))
    assert names["labelsTr"] == sorted(f"{pid}.nii.gz" for pid in splits["train"])
    assert names["imagesTs"] == sorted(f"{pid}_{k:04d}.nii.gz" for pid in splits["test"] for k in range(3))
    summary = phantoms["summary"]
    assert summary["num_training"] == 2 and summary["num_test"] == 1 and summary["skipped"] == []
    assert 2 in summary["resampled_cases"][phantoms["moved"]]
    assert not any(f.name.startswith(".") for f in folder.rglob("*"))  # no temporary files left


def _assert_same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


def test_each_channel_is_the_source_phase_on_phase_1_grid(phantoms):
    folder = phantoms["folder"]
    for split, sub in (("train", "imagesTr"), ("test", "imagesTs")):
        for pid in phantoms["splits"][split]:
            case = phantoms["cases"][pid]
            reference = sitk.ReadImage(str(case.image_paths[1]), sitk.sitkFloat32)
            for k in range(3):
                channel = sitk.ReadImage(str(folder / sub / f"{pid}_{k:04d}.nii.gz"))
                _assert_same_geometry(channel, reference)
                source = sitk.ReadImage(str(case.image_paths[k]), sitk.sitkFloat32)
                expected = sitk.Resample(source, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
                np.testing.assert_allclose(sitk.GetArrayFromImage(channel), sitk.GetArrayFromImage(expected),
                                           rtol=1e-5, atol=1e-3, err_msg=f"{pid} phase {k}")
            assert not (folder / sub / f"{pid}_0003.nii.gz").exists()


def test_the_moved_phase_is_resampled_not_copied(phantoms):
    pid = phantoms["moved"]
    case = phantoms["cases"][pid]
    channel = sitk.GetArrayFromImage(sitk.ReadImage(str(phantoms["folder"] / "imagesTr" / f"{pid}_0002.nii.gz")))
    source = sitk.GetArrayFromImage(sitk.ReadImage(str(case.image_paths[2]), sitk.sitkFloat32))
    assert channel.shape == source.shape and not np.allclose(channel, source)


def test_labels_are_binary_on_phase_1_grid(phantoms):
    for pid in phantoms["splits"]["train"]:
        case = phantoms["cases"][pid]
        label = sitk.ReadImage(str(phantoms["folder"] / "labelsTr" / f"{pid}.nii.gz"))
        _assert_same_geometry(label, sitk.ReadImage(str(case.image_paths[1])))
        values = sitk.GetArrayFromImage(label)
        expert = sitk.GetArrayFromImage(sitk.ReadImage(str(case.mask_path))) > 0
        assert set(np.unique(values).tolist()) <= {0, 1} and values.any()
        np.testing.assert_array_equal(values.astype(bool), expert)


def test_bad_input_is_skipped_naming_case_and_file(tmp_path):
    root = tmp_path / "data"
    generate_dataset(root, num_cases=3, seed=5, size=24, test_fraction=0.34)
    train = read_splits(root)["train"]
    cases = {c.patient_id: c for c in read_mamamia(root)}
    broken = cases[train[0]].image_paths[2]
    broken.write_bytes(b"not a nifti file")
    stale = tmp_path / "raw" / "Dataset501_MamaMiaPhantoms" / "imagesTr" / "OLD_001_0000.nii.gz"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"from an earlier conversion")
    summary = peer.convert(root, tmp_path / "raw")
    assert summary["num_training"] == 1
    assert not stale.exists()
    assert not list(stale.parent.glob(f"{train[0]}_*"))  # the skipped case leaves no channel behind
    (entry,) = summary["skipped"]
    assert entry["patient_id"] == train[0] and broken.name in entry["reason"]
    # A case with too few phases for three channels is refused by name as well.
    from mtl_breast.data.case import CaseError

    short = cases[train[1]]
    short.image_paths = short.image_paths[:2]
    with pytest.raises(CaseError, match=train[1]):
        peer.convert_case(short, tmp_path / "x", None)


def test_scoring_matches_the_package_formulas(phantoms, tmp_path):
    root, test_ids = phantoms["root"], phantoms["splits"]["test"]
    # Hand-made predictions for the test split: the expert mask moved by two voxels along the first array axis.
    pred_dir = tmp_path / "pred" / "pred_segmentations"
    pred_dir.mkdir(parents=True)
    expected = {}
    for pid in test_ids:
        expert_image = sitk.ReadImage(str(phantoms["cases"][pid].mask_path))
        expert = sitk.GetArrayFromImage(expert_image) > 0
        pred = np.roll(expert, 2, axis=0)
        image = sitk.GetImageFromArray(pred.astype(np.uint8))
        image.CopyInformation(expert_image)
        sitk.WriteImage(image, str(pred_dir / f"{pid}.nii.gz"))
        expected[pid] = segmentation_case_metrics(pred, expert)
    seg = peer.score(tmp_path / "pred", root, tmp_path / "scores")
    assert seg["n"] == len(test_ids)
    for pid, metrics in expected.items():
        assert seg["per_case"][pid]["dsc"] == pytest.approx(metrics["dsc"])
        assert seg["per_case"][pid]["norm_hd"] == pytest.approx(metrics["norm_hd"])
    assert seg["dsc"] == pytest.approx(np.mean([m["dsc"] for m in expected.values()]))
    head = peer.headline(seg)
    assert set(head) >= {"dsc", "dsc_ci", "norm_hd", "norm_hd_ci", "n"} and "per_case" not in head
    assert (tmp_path / "scores" / "scores.json").is_file()


def test_paired_difference():
    peer_cases = {"A": {"dsc": 0.9, "norm_hd": 0.01}, "B": {"dsc": 0.5, "norm_hd": 0.20},
                  "C": {"dsc": 0.8, "norm_hd": 0.02}}
    ours = {"a": {"dsc": 0.8, "norm_hd": 0.02}, "b": {"dsc": 0.7, "norm_hd": 0.10}, "d": {"dsc": 1.0, "norm_hd": 0.0}}
    out = peer.paired_difference(peer_cases, ours)
    assert out["n"] == 2 and out["only_peer"] == 1 and out["only_ours"] == 1
    assert out["dsc_diff"] == pytest.approx(-0.05)
    assert out["norm_hd_diff"] == pytest.approx(0.045)
    low, high = out["dsc_diff_ci"]
    assert -0.2 - 1e-9 <= low <= out["dsc_diff"] <= high <= 0.1 + 1e-9
    assert out["dsc_peer_better"] == 1 and out["norm_hd_peer_better"] == 1


def test_our_validation_split_is_the_finetune_division(phantoms):
    from mtl_breast.data.datamodule import split_train_val

    train = phantoms["splits"]["train"]
    division = peer.our_validation_split(phantoms["root"], train, 0.5, 0)
    pcr = [phantoms["cases"][pid].pcr for pid in train]
    assert (division["train"], division["val"]) == split_train_val(train, pcr, 0.5, 0)
    assert sorted(division["train"] + division["val"]) == sorted(train)


def test_dataset_name_rules():
    assert peer.dataset_folder_name(501, "MamaMia") == "Dataset501_MamaMia"
    with pytest.raises(ValueError):
        peer.dataset_folder_name(501, "Mama_Mia")
    with pytest.raises(ValueError):
        peer.dataset_folder_name(1000, "X")


def _nnunet_python() -> str:
    """The interpreter with nnunetv2: $NNUNET_PYTHON (its own environment) or this one."""
    python = os.environ.get("NNUNET_PYTHON")
    if python:
        return python
    pytest.importorskip("nnunetv2")
    return sys.executable


@pytest.mark.slow
def test_nnunet_accepts_the_dataset(phantoms, tmp_path):
    """nnU-Net's own integrity check and planning run on the converted dataset (about a minute on a CPU)."""
    python = _nnunet_python()
    out = tmp_path / "peer"
    (out / "nnUNet_raw").mkdir(parents=True)
    import shutil

    shutil.copytree(phantoms["folder"], out / "nnUNet_raw" / phantoms["folder"].name)
    env = peer.nnunet_env(out, threads=1)
    stage = peer.run_stage("preprocess", "nnUNetv2_plan_and_preprocess",
                           ["-d", "7", "-c", "3d_fullres", "--verify_dataset_integrity", "-np", "1", "-npfp", "1"],
                           python, env, 1, out / "logs")
    assert stage["rc"] == 0
    plans = peer.plans_summary(out / "nnUNet_preprocessed" / "Dataset007_Tiny")
    assert len(plans["patch_size"]) == 3 and plans["batch_size"] >= 2
    assert plans["normalization_schemes"] == ["ZScoreNormalization"] * 3


def test_trainer_summary_reads_what_the_training_did(tmp_path):
    debug = {"num_epochs": "1", "num_iterations_per_epoch": "250", "num_val_iterations_per_epoch": "50",
             "batch_size": "4", "initial_lr": "0.01", "enable_deep_supervision": "True", "device": "cpu"}
    (tmp_path / "debug.json").write_text(json.dumps(debug))
    (tmp_path / "training_log_2026_1_1_00_00_00.txt").write_text(
        "2026-01-01 00:10:00: train_loss -0.4102\n2026-01-01 00:10:00: val_loss -0.5311\n"
        "2026-01-01 00:10:00: Pseudo dice [np.float32(0.8123)]\n2026-01-01 00:10:00: Epoch time: 612.5 s\n")
    (tmp_path / "validation").mkdir()
    (tmp_path / "validation" / "summary.json").write_text(
        json.dumps({"foreground_mean": {"Dice": 0.8}, "metric_per_case": [{}, {}]}))
    info = peer.trainer_summary(tmp_path)
    assert info["training_iterations"] == 250 and info["training_patches"] == 1000
    assert info["initial_lr"] == 0.01 and info["enable_deep_supervision"] is True and info["device"] == "cpu"
    assert info["epoch_seconds"] == [612.5] and info["pseudo_dice"] == [[0.8123]]
    assert info["train_loss"] == [-0.4102] and info["val_loss"] == [-0.5311]
    assert info["validation"] == {"n": 2, "mean_dice": 0.8}
