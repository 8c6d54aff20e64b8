"""Released weights in use: strict reloading, `mtl-breast predict`, the challenge adapter, feature extraction."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
from conftest import run_cli

from mtl_breast import extract_features, load_pretrained
from mtl_breast.models.mae import MAEPretrainer
from mtl_breast.models.mtl import MTLModel


def _case_dir(root: Path, pid: str) -> Path:
    (folder,) = [p for p in (root / "images").iterdir() if p.name.lower() == pid.lower()]
    return folder


def _phases(root: Path, pid: str) -> list[Path]:
    return sorted(_case_dir(root, pid).glob("*.nii.gz"))


def _assert_same_geometry(mask: sitk.Image, reference: sitk.Image) -> None:
    assert mask.GetSize() == reference.GetSize()
    np.testing.assert_allclose(mask.GetSpacing(), reference.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(mask.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(mask.GetDirection(), reference.GetDirection(), atol=1e-6)


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path) as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


# ---------------------------------------------------------------------------------------------- weights
def test_exported_weights_reload_strictly(mtl_weights, mae_weights, finetune_run):
    model = load_pretrained(mtl_weights)
    assert isinstance(model, MTLModel) and not model.training
    ckpt = torch.load(finetune_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    trained = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    state = model.state_dict()
    assert state.keys() == trained.keys()
    assert all(torch.equal(state[k], trained[k]) for k in state)
    assert isinstance(load_pretrained(mae_weights), MAEPretrainer)


# ---------------------------------------------------------------------------------------------- predict
def test_predict_writes_masks_in_the_original_image_space(predictions, phantoms, mtl_weights):
    columns, rows = _read_csv(predictions / "predictions.csv")
    # The challenge's columns, then what the kinetic features assumed (tumour T10 and relaxivity always), then the
    # pCR logit's terms by pathway, which add up to the logit of the score (empty for a pathway the model lacks).
    assert columns == ["patient_id", "pcr", "score", "assumed_acquisition", "logit_tokens", "logit_learned",
                       "logit_kinetic"]
    assert all("tumour_t10_s=" in r["assumed_acquisition"] and "relaxivity=" in r["assumed_acquisition"] for r in rows)
    for r in rows:
        terms = [float(r[c]) for c in ("logit_tokens", "logit_learned", "logit_kinetic") if r[c] != ""]
        # The test model's head: tokens and hand kinetic features, no learned pathway.
        assert r["logit_tokens"] != "" and r["logit_kinetic"] != "" and r["logit_learned"] == ""
        assert 1.0 / (1.0 + math.exp(-sum(terms))) == pytest.approx(float(r["score"]), abs=2e-6)
    with open(phantoms / "train_test_splits.csv") as f:
        test_split = {r["test_split"].lower() for r in csv.DictReader(f) if r["test_split"]}
    assert {r["patient_id"].lower() for r in rows} == test_split
    # The test split of the session phantoms holds a 3-phase and a 5-phase case.
    assert {len(_phases(phantoms, r["patient_id"])) for r in rows} >= {3, 5}
    threshold = json.loads((mtl_weights / "config.json").read_text())["inference"]["pcr_threshold"]
    for row in rows:
        score = float(row["score"])
        assert 0.0 <= score <= 1.0
        assert int(row["pcr"]) == int(score >= threshold)
        mask = sitk.ReadImage(str(predictions / "pred_segmentations" / f"{row['patient_id']}.nii.gz"))
        (first_post,) = [p for p in _phases(phantoms, row["patient_id"]) if p.name.endswith("_0001.nii.gz")]
        _assert_same_geometry(mask, sitk.ReadImage(str(first_post)))
        assert mask.GetPixelID() == sitk.sitkUInt8
        assert set(np.unique(sitk.GetArrayViewFromImage(mask))) <= {0, 1}
    assert not list(predictions.rglob(".*tmp*"))


def test_predict_reports_a_broken_case_and_predicts_the_others(mtl_weights, phantoms, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(phantoms, data)
    _, rows = _read_csv(data / "train_test_splits.csv")
    test_ids = sorted(r["test_split"] for r in rows if r["test_split"])
    broken, fine = test_ids[0], test_ids[1:]
    bad_file = _phases(data, broken)[2]
    bad_file.write_bytes(b"this is not a NIfTI file" * 10)

    out = tmp_path / "out"
    code = run_cli(["predict", "--weights", mtl_weights, "--data", data, "--out", out, "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1
    assert f"skipped {broken}" in err and bad_file.name in err
    _, predicted = _read_csv(out / "predictions.csv")
    assert [r["patient_id"] for r in predicted] == fine
    assert sorted(p.name for p in (out / "pred_segmentations").iterdir()) == [f"{pid}.nii.gz" for pid in fine]


# ---------------------------------------------------------------------------------------------- challenge
class FakeChallengeDataset:
    """What the MAMA-MIA platform hands a submission: image paths and the patient JSON without labels."""

    def __init__(self, root: Path, patient_ids: list[str]):
        self.root, self.ids = root, patient_ids

    def get_patient_id_list(self) -> list[str]:
        return list(self.ids)

    def get_dce_mri_path_list(self, pid: str) -> list[str]:
        return [str(p) for p in _phases(self.root, pid)]

    def read_json_file(self, pid: str) -> dict:
        info = json.loads((self.root / "patient_info_files" / f"{pid.lower()}.json").read_text())
        info.pop("clinical_data", None)
        info["primary_lesion"].pop("pcr", None)
        return info


def test_challenge_model_writes_masks_and_returns_the_table(mtl_weights, phantoms, tmp_path, monkeypatch):
    from mtl_breast.run.challenge import Model

    _, rows = _read_csv(phantoms / "train_test_splits.csv")
    ids = sorted(r["test_split"] for r in rows if r["test_split"])
    monkeypatch.setenv("MTL_BREAST_WEIGHTS", str(mtl_weights))
    model = Model(FakeChallengeDataset(phantoms, ids), device="cpu")

    seg_dir = Path(model.predict_segmentation(str(tmp_path)))
    assert seg_dir == tmp_path / "pred_segmentations"
    assert sorted(p.name for p in seg_dir.iterdir()) == [f"{pid}.nii.gz" for pid in ids]
    for pid in ids:
        (first_post,) = [p for p in _phases(phantoms, pid) if p.name.endswith("_0001.nii.gz")]
        _assert_same_geometry(sitk.ReadImage(str(seg_dir / f"{pid}.nii.gz")), sitk.ReadImage(str(first_post)))

    table = model.predict_classification(str(tmp_path))
    assert isinstance(table, pd.DataFrame)
    assert list(table.columns) == ["patient_id", "pcr", "score"]
    assert sorted(table["patient_id"]) == ids
    assert set(table["pcr"]) <= {0, 1} and table["score"].between(0, 1).all()


def test_challenge_model_without_weights_says_how_to_give_them(monkeypatch, phantoms):
    from mtl_breast.run.challenge import Model

    monkeypatch.delenv("MTL_BREAST_WEIGHTS", raising=False)
    with pytest.raises(ValueError, match="MTL_BREAST_WEIGHTS"):
        Model(FakeChallengeDataset(phantoms, []))


# ---------------------------------------------------------------------------------------------- features
@pytest.mark.parametrize("phases", [3, 5])
def test_extract_features_shapes(mae_weights, phases):
    model = load_pretrained(mae_weights)
    torch.manual_seed(0)
    image = torch.randn(2, phases, 32, 32, 32)
    times = torch.tensor([[0.0, 90.0, 180.0, 270.0, 360.0][:phases]] * 2)
    feats = extract_features(model, image, phase_time=times)
    width = model.encoder.embed_dim if hasattr(model.encoder, "embed_dim") else feats["pooled"].shape[-1]
    assert feats["tokens"].shape == (2, phases, (32 // 8) ** 3, width)
    assert feats["per_phase"].shape == (2, phases, width)
    assert feats["pooled"].shape == (2, width)
    torch.testing.assert_close(feats["pooled"], feats["per_phase"].mean(1))
    torch.testing.assert_close(feats["per_phase"], feats["tokens"].mean(2))


def test_extract_features_ignores_padded_phases(mae_weights):
    """A 3-phase case padded to 5 phases (phase_mask False) gets the features it gets alone."""
    model = load_pretrained(mae_weights)
    torch.manual_seed(0)
    alone = torch.randn(1, 3, 32, 32, 32)
    padded = torch.cat([alone, torch.zeros(1, 2, 32, 32, 32)], dim=1)
    mask = torch.tensor([[True, True, True, False, False]])
    times = torch.tensor([[0.0, 90.0, 180.0, float("nan"), float("nan")]])
    ref = extract_features(model, alone, phase_time=times[:, :3])
    out = extract_features(model, padded, phase_mask=mask, phase_time=times)
    assert torch.all(out["per_phase"][:, 3:] == 0)
    torch.testing.assert_close(out["per_phase"][:, :3], ref["per_phase"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["pooled"], ref["pooled"], atol=1e-5, rtol=1e-4)


def test_extract_features_of_a_joint_model_use_its_encoder(mtl_weights):
    model = load_pretrained(mtl_weights)
    feats = extract_features(model, torch.randn(1, 4, 32, 32, 32))
    assert feats["pooled"].shape == (1, feats["tokens"].shape[-1])
    assert model.training is False
