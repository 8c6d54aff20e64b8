"""Assumed acquisition values: which a case does not give, recorded per case (cache info, predictions.csv) and
reported once per job (preprocess, predict) and in the model card's training summary.

The dataset is written here rather than taken from the phantom generator, so the cases that give or withhold the
flip angle, TR, field strength and acquisition times are exactly the ones the assertions expect.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import run_cli

from mtl_breast.acquisition import (
    DEFAULT_FIELD_T,
    DEFAULT_FLIP_DEG,
    DEFAULT_INTERVAL_S,
    DEFAULT_TR_MS,
    assumed_values,
    summarise_assumed,
)
from mtl_breast.data.cache import CaseCache
from mtl_breast.data.case import CaseError
from mtl_breast.data.dataset import acquisition_vector
from mtl_breast.data.folder import read_dataset
from mtl_breast.data.mamamia import read_mamamia
from mtl_breast.data.preprocess import PreprocessConfig, preprocess_case

SIZE = 32
TIMES = [0.0, 90.0, 180.0]
# imaging_data of each case's JSON: one gives every sequence parameter and its times, one gives the field strength
# and times only (as a real MAMA-MIA JSON, which never has a flip angle), one gives nothing.
IMAGING = {
    "GIVEN_1": {"field_strength": 3.0, "repetition_time": 4.5, "flip_angle": 10.0, "acquisition_times": TIMES},
    "BARE_2": {"field_strength": 1.5, "acquisition_times": TIMES},
    "NONE_3": {},
}
ASSUMED = {
    "GIVEN_1": {"tumour_t10_s": 1.3, "relaxivity": 4.0},
    "BARE_2": {"repetition_time": 5.0, "flip_angle": 12.0, "tumour_t10_s": 1.1, "relaxivity": 4.5},
    "NONE_3": {"field_strength": 1.5, "repetition_time": 5.0, "flip_angle": 12.0, "phase_interval_s": 90.0,
               "tumour_t10_s": 1.1, "relaxivity": 4.5},
}
CELLS = {
    "GIVEN_1": "tumour_t10_s=1.3;relaxivity=4",
    "BARE_2": "repetition_time=5;flip_angle=12;tumour_t10_s=1.1;relaxivity=4.5",
    "NONE_3": "field_strength=1.5;repetition_time=5;flip_angle=12;phase_interval_s=90;tumour_t10_s=1.1;relaxivity=4.5",
}
LINE = ("assumed acquisition values: field_strength = 1.5 T for 1 of 3 cases; repetition_time = 5 ms for 2 of 3 "
        "cases; flip_angle = 12 deg for 2 of 3 cases; phase_interval_s = 90 s for 1 of 3 cases; tumour_t10_s = "
        "1.1 s for 2, 1.3 s for 1 of 3 cases (never given); relaxivity = 4 /mM/s for 1, 4.5 /mM/s for 2 of 3 cases "
        "(never given)")


def _write(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A MAMA-MIA root of the three `IMAGING` cases: 3 phases of an enhancing sphere in a block, masks, pCR."""
    root = tmp_path_factory.mktemp("acquisition") / "data"
    grid = np.indices((SIZE,) * 3)
    tumour = sum((g - SIZE / 2) ** 2 for g in grid) <= 6**2
    rng = np.random.default_rng(0)
    for k, (pid, imaging) in enumerate(IMAGING.items()):
        for phase, uptake in enumerate((0.0, 200.0, 150.0)):
            image = 100.0 + uptake * tumour + rng.normal(0, 2, tumour.shape)
            image[:, :, :4] = 0.0  # air
            _write(image.astype(np.float32), root / "images" / pid / f"{pid.lower()}_{phase:04d}.nii.gz")
        _write(tumour.astype(np.uint8), root / "segmentations" / "expert" / f"{pid.lower()}.nii.gz")
        box = dict(zip(("x_min", "x_max", "y_min", "y_max", "z_min", "z_max"), (0, SIZE) * 3, strict=True))
        doc = {"primary_lesion": {"breast_coordinates": box, "pcr": k % 2}, "imaging_data": imaging}
        info = root / "patient_info_files" / f"{pid.lower()}.json"
        info.parent.mkdir(parents=True, exist_ok=True)
        info.write_text(json.dumps(doc))
    return root


def test_assumed_values_are_what_the_kinetic_features_fill_in():
    # One definition: kinetics reads as missing (NaN) exactly the values `assumed_values` lists.
    for meta in ({}, {"field_strength": 3.0}, {"repetition_time": "4.5", "flip_angle": float("nan")},
                 {"field_strength": "unknown", "repetition_time": 4.0, "flip_angle": 15}):
        vector = acquisition_vector({"mean": 0.0, "std": 1.0}, meta)
        missing = {key for key, value in zip(("field_strength", "repetition_time", "flip_angle"), vector[2:].tolist(),
                                             strict=True) if math.isnan(value)}
        assumed = assumed_values(meta, phase_times_known=True)
        assert set(assumed) - {"tumour_t10_s", "relaxivity"} == missing, meta
        assert {key: assumed[key] for key in missing} == {k: v for k, v in {
            "field_strength": DEFAULT_FIELD_T, "repetition_time": DEFAULT_TR_MS, "flip_angle": DEFAULT_FLIP_DEG
        }.items() if k in missing}
    # T10 and relaxivity by the given field, or by the assumed one; the phase spacing only without times.
    assert assumed_values({"field_strength": 3.0}, True)["tumour_t10_s"] == 1.3
    assert assumed_values({"field_strength": None}, True)["relaxivity"] == 4.5
    assert assumed_values({}, False)["phase_interval_s"] == DEFAULT_INTERVAL_S
    with pytest.raises(TypeError, match="must be a mapping"):
        assumed_values(["field_strength"], True)


def test_reader_refuses_unusable_acquisition_values_naming_case_and_file(dataset, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(dataset, root)
    path = root / "patient_info_files" / "bare_2.json"
    doc = json.loads(path.read_text())
    doc["imaging_data"]["repetition_time"] = 0
    path.write_text(json.dumps(doc))
    with pytest.raises(CaseError, match=r"case BARE_2 \(.*bare_2\.json\): repetition_time 0 must be a number > 0"):
        read_mamamia(root)
    doc["imaging_data"]["repetition_time"], doc["imaging_data"]["flip_angle"] = 4.0, "wide"
    path.write_text(json.dumps(doc))
    skipped = []
    assert [c.patient_id for c in read_mamamia(root, skipped=skipped)] == ["GIVEN_1", "NONE_3"]
    assert "bare_2.json" in skipped[0]["reason"] and "flip_angle 'wide'" in skipped[0]["reason"]


def test_preprocess_records_and_reports_assumed_values(dataset, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert run_cli(["preprocess", "--data", dataset, "--cache", cache]) == 0
    out = capsys.readouterr().out
    assert out.count("assumed acquisition values") == 1 and LINE in out
    store = CaseCache(cache, PreprocessConfig())
    for pid, expected in ASSUMED.items():
        assert store.read_info(pid)["assumed"] == expected, pid
    report = json.loads((store.dir / "report.json").read_text())
    assert report["assumed"]["line"] == LINE and report["assumed"]["cases"] == 3
    assert report["assumed"]["values"]["flip_angle"] == [{"value": 12.0, "cases": 2}]
    assert "flip_angle" not in store.read_info("GIVEN_1")["assumed"]

    # A second job finds every case cached and still reports them all.
    assert run_cli(["preprocess", "--data", dataset, "--cache", cache]) == 0
    assert LINE in capsys.readouterr().out

    # Cache files written before info["assumed"] existed: worked out from their metadata and stored times.
    for case in read_dataset(dataset):
        pre = preprocess_case(case, PreprocessConfig())
        del pre.info["assumed"]
        store.write(pre)
        assert "assumed" not in store.read_info(case.patient_id)
        assert store.assumed(case.patient_id) == ASSUMED[case.patient_id]


def test_training_summary_counts_assumed_values_of_the_training_cases(dataset, tmp_path):
    from mtl_breast.data.build import preprocess_dataset
    from mtl_breast.tasks.loggers import training_summary

    cache = tmp_path / "cache"
    preprocess_dataset(dataset, cache, PreprocessConfig(), progress=False)
    dm = SimpleNamespace(train_ids=["BARE_2", "NONE_3", "MISSING_9"], val_ids=["GIVEN_1"], roots=[dataset],
                         cache=CaseCache(cache, PreprocessConfig()))

    def module() -> SimpleNamespace:  # what training_summary reads of a LightningModule
        return SimpleNamespace(_trainer=SimpleNamespace(datamodule=dm, current_epoch=1, global_step=4),
                               hparams=SimpleNamespace(pretrained=None))

    summary = training_summary(module(), "finetune")
    expected = summarise_assumed([ASSUMED["BARE_2"], ASSUMED["NONE_3"]])
    assert summary["assumed"] == {**expected, "unread": 1} and summary["train_cases"] == 3
    assert "assumed" not in training_summary(module(), "pretrain")  # MAE pretraining computes no kinetics


def test_predict_writes_what_was_assumed_and_reports_it_once(dataset, tmp_path, capsys):
    from mtl_breast.hub import save_pretrained
    from mtl_breast.models.registry import create_model

    torch.manual_seed(0)
    weights = tmp_path / "weights"
    save_pretrained(create_model("mtl_vit_test"), weights, extra_config={"inference": {"roi_size": [SIZE] * 3}})
    out = tmp_path / "out"
    assert run_cli(["predict", "--weights", weights, "--data", dataset, "--out", out, "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("assumed acquisition values") == 1 and LINE in printed
    with open(out / "predictions.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames[:4] == ["patient_id", "pcr", "score", "assumed_acquisition"]  # new columns after
    assert {r["patient_id"]: r["assumed_acquisition"] for r in rows} == CELLS

    # The scorers read the challenge's columns and ignore the new one.
    assert run_cli(["evaluate", "--pred", out, "--data", dataset, "--out", tmp_path / "scores"]) == 0
    scores = json.loads((tmp_path / "scores" / "scores.json").read_text())
    assert scores["scored_cases"]["n"] == 3
