"""Data modules, the cached-case dataset, batch collation and the training transforms, on synthetic phantoms.

One 12-case phantom dataset (MAMA-MIA layout) is generated and preprocessed once for the module; tests
that damage data work on copies of it.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from argparse import ArgumentError
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from monai.transforms import MapTransform, Randomizable

from mtl_breast.data.cache import CaseCache
from mtl_breast.data.datamodule import FinetuneDataModule, PretrainDataModule, default_cache_dir, split_train_val
from mtl_breast.data.dataset import CachedCaseDataset, collate_cases
from mtl_breast.data.mamamia import read_mamamia
from mtl_breast.data.sampling import EpochSampler, ResumableLoader
from mtl_breast.data.transforms import RandPhaseDropoutd, finetune_transforms, pretrain_transforms, seeded
from mtl_breast.phantoms.collection import generate_dataset

CROP = 32
NUM_CASES = 12


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mama(tmp_path_factory) -> dict:
    """Phantom dataset with a split file written here: 3 test cases (pCR known), the rest train.

    The case without pCR is put in the train split, so training batches meet a NaN label.
    """
    root = tmp_path_factory.mktemp("data") / "MAMA"
    generate_dataset(root, num_cases=NUM_CASES, seed=0, size=CROP)
    cases = {c.patient_id: c for c in read_mamamia(root)}
    assert len(cases) == NUM_CASES
    missing = [pid for pid, c in cases.items() if not c.has_pcr]
    assert missing, "the phantom generator should leave at least one case without pCR"
    # DUKE_001 stays in training: the two-root pretraining test compares it with its copy in a case folder.
    test = sorted(pid for pid, c in cases.items() if c.pcr == 0 and pid != "DUKE_001")[:3]
    train = sorted(set(cases) - set(test))
    pd.DataFrame({"train_split": train, "test_split": test + [None] * (len(train) - len(test))}).to_csv(
        root / "train_test_splits.csv", index=False)
    return {"root": root, "cases": cases, "train": train, "test": test, "no_pcr": missing,
            "cache": root.parent / "cache"}


@pytest.fixture(scope="module")
def finetune(mama) -> FinetuneDataModule:
    dm = FinetuneDataModule(str(mama["root"]), cache_dir=str(mama["cache"]), crop_size=CROP, batch_size=4,
                            val_fraction=0.2, split_seed=0)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _phases(dm, pid: str) -> int:
    return dm.cache.read(pid)["image"].shape[0]


# ------------------------------------------------------------------------------------------- splits
def test_finetune_splits_follow_split_file(finetune, mama):
    train, val, test = set(finetune.train_ids), set(finetune.val_ids), set(finetune.test_ids)
    assert test == set(mama["test"])
    assert train | val == set(mama["train"])
    assert not (train & val) and not (train & test) and not (val & test)
    # Stratified by pCR: every stratum with 2+ training-split cases gives one validation case.
    strata = {}
    for pid in mama["train"]:
        pcr = mama["cases"][pid].pcr
        strata.setdefault("nan" if math.isnan(pcr) else int(pcr), []).append(pid)
    for key, members in strata.items():
        if len(members) >= 2:
            assert val & set(members), f"no validation case with pCR={key}"
        else:
            assert not (val & set(members))
    n_pos = sum(mama["cases"][p].pcr == 1 for p in train)
    n_neg = sum(mama["cases"][p].pcr == 0 for p in train)
    assert finetune.train_pcr_counts() == (n_pos, n_neg)


def test_finetune_split_is_deterministic(finetune, mama):
    again = FinetuneDataModule(str(mama["root"]), cache_dir=str(mama["cache"]), crop_size=CROP, split_seed=0)
    again.setup("fit")
    assert (again.train_ids, again.val_ids, again.test_ids) == (finetune.train_ids, finetune.val_ids,
                                                                finetune.test_ids)
    draws = set()
    for seed in range(8):
        other = FinetuneDataModule(str(mama["root"]), cache_dir=str(mama["cache"]), crop_size=CROP, split_seed=seed)
        other.setup("fit")
        assert set(other.train_ids) | set(other.val_ids) == set(mama["train"])
        draws.add(tuple(other.val_ids))
    assert len(draws) > 1, "the split seed has no effect"


def test_split_train_val_stratifies():
    ids = [f"c{i:02d}" for i in range(20)]
    labels = [1.0] * 5 + [0.0] * 13 + [math.nan] * 2
    train, val = split_train_val(ids, labels, 0.2, seed=3)
    assert sorted(train + val) == ids and not set(train) & set(val)
    by_id = dict(zip(ids, labels, strict=True))
    val_labels = [by_id[p] for p in val]
    assert val_labels.count(1.0) == 1 and val_labels.count(0.0) == 3
    assert sum(math.isnan(y) for y in val_labels) == 1
    assert split_train_val(ids, labels, 0.2, seed=3) == (train, val)
    assert split_train_val(ids, labels, 0.0, seed=3) == (ids, [])


# ------------------------------------------------------------------------------------------- batches
def _check_contract(batch: dict, crop=(CROP, CROP, CROP), label=True):
    b, t = batch["image"].shape[:2]
    assert batch["image"].dtype == torch.float32 and tuple(batch["image"].shape[2:]) == crop
    assert type(batch["image"]) is torch.Tensor  # plain tensors, not MONAI MetaTensors
    assert batch["phase_mask"].dtype == torch.bool and batch["phase_mask"].shape == (b, t)
    assert batch["phase_time"].dtype == torch.float32 and batch["phase_time"].shape == (b, t)
    assert batch["pcr"].dtype == torch.float32 and batch["pcr"].shape == (b,)
    assert len(batch["meta"]) == b and len(batch["patient_id"]) == b
    assert [m["patient_id"] for m in batch["meta"]] == batch["patient_id"]
    assert batch["phase_mask"][:, :3].all()  # phantoms have 3+ phases
    if label:
        assert batch["label"].dtype == torch.uint8 and batch["label"].shape == (b, 1, *crop)
        assert set(batch["label"].unique().tolist()) <= {0, 1}
    else:
        assert "label" not in batch


def test_train_batches_follow_contract(finetune, mama):
    loader = finetune.train_dataloader()
    seen = []
    for batch in loader:
        _check_contract(batch)
        assert batch["image"].shape[0] <= 4
        seen += batch["patient_id"]
        for i, pid in enumerate(batch["patient_id"]):
            t = _phases(finetune, pid)
            assert batch["phase_mask"][i].sum() == t
            pcr = mama["cases"][pid].pcr
            assert math.isnan(batch["pcr"][i]) if math.isnan(pcr) else batch["pcr"][i] == pcr
            assert batch["meta"][i]["dataset"] == mama["cases"][pid].meta["dataset"]
    assert sorted(seen) == sorted(finetune.train_ids)
    assert set(mama["no_pcr"]) & set(seen), "the case without pCR should be in training"


def test_val_and_test_loaders_give_whole_cases(finetune):
    for loader, ids in ((finetune.val_dataloader(), finetune.val_ids), (finetune.test_dataloader(), finetune.test_ids)):
        got = []
        for batch in loader:
            pid = batch["patient_id"][0]
            case = finetune.cache.read(pid)
            assert batch["image"].shape == (1, *case["image"].shape)
            assert torch.equal(batch["image"][0], case["image"])
            assert torch.equal(batch["label"][0, 0], case["label"])
            got.append(pid)
        assert got == ids


def test_batch_larger_than_dataset_pads_phases(finetune):
    finetune.batch_size = 64
    try:
        batches = list(finetune.train_dataloader())
    finally:
        finetune.batch_size = 4
    assert len(batches) == 1
    batch = batches[0]
    _check_contract(batch)
    counts = [_phases(finetune, pid) for pid in batch["patient_id"]]
    assert len(set(counts)) > 1, "phantoms should mix phase counts"
    assert batch["image"].shape[:2] == (len(finetune.train_ids), max(counts))
    for i, t in enumerate(counts):
        assert batch["phase_mask"][i].tolist() == [True] * t + [False] * (max(counts) - t)
        assert torch.isnan(batch["phase_time"][i, t:]).all() and not torch.isnan(batch["phase_time"][i, :t]).any()
        assert (batch["image"][i, t:] == 0).all()


def test_collate_pads_three_and_five_phases(finetune):
    by_count = {}
    for pid in finetune.cache.patient_ids():
        by_count.setdefault(_phases(finetune, pid), pid)
    assert 3 in by_count and 5 in by_count, f"phantom phase counts {sorted(by_count)}"
    ds = CachedCaseDataset(finetune.cache, [by_count[3], by_count[5]],
                           seeded(finetune_transforms(16, intensity_jitter=0.0), 0), with_label=True)
    batch = collate_cases([ds[0], ds[1]])
    _check_contract(batch, crop=(16, 16, 16))
    assert batch["image"].shape[:2] == (2, 5)
    assert batch["phase_mask"].tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert torch.isnan(batch["phase_time"][0, 3:]).all()
    for i, pid in enumerate(batch["patient_id"]):
        times = finetune.cache.read(pid)["phase_time"]
        assert torch.equal(batch["phase_time"][i, : len(times)], times)
    assert (batch["image"][0, 3:] == 0).all() and batch["image"][0, :3].abs().sum() > 0
    assert batch["image"][1, 3:].abs().sum() > 0
    # Each case's acquisition vector: its normalisation (offset, scale) and sequence (field, TR, flip angle).
    assert batch["acquisition"].shape == (2, 5)
    for i, pid in enumerate(batch["patient_id"]):
        info = finetune.cache.read_info(pid)
        assert batch["acquisition"][i, 0] == pytest.approx(info["normalization"]["mean"])
        assert batch["acquisition"][i, 1] == pytest.approx(info["normalization"]["std"])
        assert batch["acquisition"][i, 3] == pytest.approx(info["meta"]["repetition_time"])


def test_missing_pcr_stays_nan(finetune, mama):
    pid = mama["no_pcr"][0]
    ds = CachedCaseDataset(finetune.cache, [pid, mama["train"][0] if mama["train"][0] != pid else mama["train"][1]],
                           seeded(finetune_transforms(CROP), 0), with_label=True)
    batch = collate_cases([ds[0], ds[1]])
    assert math.isnan(batch["pcr"][0]) and not math.isnan(batch["pcr"][1])


def test_collate_rejects_mixed_spatial_sizes(finetune):
    ds = CachedCaseDataset(finetune.cache, finetune.train_ids)
    shapes = {}
    for i in range(len(ds)):
        shapes.setdefault(tuple(ds[i]["image"].shape[1:]), ds[i])
    assert len(shapes) > 1
    with pytest.raises(ValueError, match="different spatial sizes"):
        collate_cases(list(shapes.values())[:2])
    with pytest.raises(ValueError):
        collate_cases([])


# ------------------------------------------------------------------------------------------- oversampling
def _tumour_share(cache: CaseCache, ids: list[str], pos_fraction: float, draws: int = 8, crop: int = 16) -> float:
    ds = CachedCaseDataset(cache, ids, seeded(finetune_transforms(crop, pos_fraction=pos_fraction), 1234),
                           with_label=True, repeats=draws)
    hits = []
    for i in range(len(ds)):
        sample = ds[i]
        assert tuple(sample["label"].shape) == (1, crop, crop, crop)
        assert tuple(sample["image"].shape[1:]) == (crop, crop, crop)
        hits.append(bool(sample["label"].sum() > 0))
    return sum(hits) / len(hits)


def test_tumour_oversampling(finetune):
    ids = finetune.train_ids
    assert _tumour_share(finetune.cache, ids, 1.0) == 1.0
    share = _tumour_share(finetune.cache, ids, 0.67)
    assert share > 0.6
    # Small crops, where a random crop often misses the tumour (16^3 crops of these 32-voxel phantoms rarely do).
    assert _tumour_share(finetune.cache, ids, 0.0, crop=8) < _tumour_share(finetune.cache, ids, 0.67, crop=8)


# ------------------------------------------------------------------------------------------- alignment
def _aligned_sample(seed: int, shape=(20, 24, 28), phases=3, threshold=0.6) -> tuple[dict, float]:
    rng = np.random.default_rng(seed)
    image = torch.from_numpy(rng.random((phases, *shape), dtype=np.float32) + 0.05)  # > 0, so padding is told apart
    label = (image[1] > threshold).to(torch.uint8).unsqueeze(0)
    sample = {"image": image, "label": label, "phase_mask": torch.ones(phases, dtype=torch.bool),
              "phase_time": torch.arange(phases, dtype=torch.float32), "pcr": 1.0, "meta": {}, "patient_id": "x"}
    return sample, threshold


@pytest.mark.parametrize("crop", [16, (16, 32, 12)])
def test_label_stays_aligned_with_image(crop):
    transform = seeded(finetune_transforms(crop, intensity_jitter=0.0, flip_prob=0.5), 7)
    size = (crop,) * 3 if isinstance(crop, int) else crop
    unflipped = 0
    for seed in range(12):
        sample, threshold = _aligned_sample(seed)
        out = transform(sample)
        out = out[0] if isinstance(out, list) else out
        image, label = torch.as_tensor(out["image"]), torch.as_tensor(out["label"])
        assert tuple(image.shape) == (3, *size) and tuple(label.shape) == (1, *size)
        assert torch.equal(label[0].bool(), image[1] > threshold)
        if crop == 16:  # the volume covers the crop: is the output a plain (unflipped) window of the input?
            unflipped += any(torch.equal(image[1], sample["image"][1, a:a + 16, b:b + 16, c:c + 16])
                             for a in range(5) for b in range(9) for c in range(13))
    assert unflipped < 12, "flips never happened"


def test_phases_move_together():
    """Crops and flips act on all phases and the label alike: phase k stays (k+1) x a common volume."""
    base = torch.rand(1, 20, 24, 28) + 0.1
    image = torch.cat([base * (k + 1) for k in range(4)])
    sample = {"image": image, "label": (base > 0.5).to(torch.uint8), "phase_mask": torch.ones(4, dtype=torch.bool),
              "phase_time": torch.zeros(4), "pcr": 0.0, "meta": {}, "patient_id": "x"}
    transform = seeded(finetune_transforms(16, intensity_jitter=0.0), 3)
    for _ in range(5):
        out = transform(dict(sample))
        out = out[0] if isinstance(out, list) else out
        img = torch.as_tensor(out["image"])
        for k in range(4):
            assert torch.allclose(img[k], img[0] * (k + 1))
        assert torch.equal(torch.as_tensor(out["label"])[0].bool(), img[0] > 0.5)
    pre = seeded(pretrain_transforms(16, intensity_jitter=0.0), 3)({"image": image})
    img = torch.as_tensor(pre["image"])
    assert img.shape == (4, 16, 16, 16)
    for k in range(4):
        assert torch.allclose(img[k], img[0] * (k + 1))


def _tumour_sample(shape=(24, 24, 24)) -> dict:
    """A wash-in/washout curve inside a cube tumour on a noisy background, 4 phases."""
    rng = np.random.default_rng(0)
    curve = torch.tensor([1.0, 2.4, 2.1, 1.8])  # S_t inside the tumour
    image = torch.from_numpy(rng.random((4, *shape), dtype=np.float32)) * 0.3 + 0.5
    label = torch.zeros(1, *shape, dtype=torch.uint8)
    label[0, 8:14, 9:15, 10:16] = 1
    image[:, label[0].bool()] = curve[:, None]
    return {"image": image, "label": label, "phase_mask": torch.ones(4, dtype=torch.bool),
            "phase_time": torch.tensor([0.0, 90.0, 180.0, 270.0]), "pcr": 1.0, "meta": {}, "patient_id": "x",
            "acquisition": torch.tensor([0.4, 2.0, 1.5, 4.5, 10.0])}


def test_training_transforms_keep_the_tumour_enhancement_ratios():
    """One gain per case: S_t / S_1 inside the tumour survives crops, flips and intensity jitter."""
    transform = seeded(finetune_transforms(16, pos_fraction=1.0, intensity_jitter=0.3, intensity_prob=1.0), 0)
    gains = set()
    for _ in range(6):
        out = transform(_tumour_sample())
        image, label = torch.as_tensor(out["image"]), torch.as_tensor(out["label"])[0].bool()
        assert out["tumour_window"] and label.any()
        curve = image[:, label].mean(dim=1)
        torch.testing.assert_close(curve / curve[1], torch.tensor([1.0, 2.4, 2.1, 1.8]) / 2.4)
        gains.add(round(float(curve[0]), 5))
        # The normalisation offset follows the gain, so the scanner signal ratios S_t / S_0 are exact too.
        offset, scale = float(out["acquisition"][0]), float(out["acquisition"][1])
        signal = curve * scale + offset
        torch.testing.assert_close(signal / signal[0], (torch.tensor([1.0, 2.4, 2.1, 1.8]) * 2.0 + 0.4) / 2.4)
    assert len(gains) > 1, "the gain was never jittered"
    # The optional per-phase gain does change the ratios: that is why it is off by default.
    per_phase = seeded(finetune_transforms(16, pos_fraction=1.0, intensity_jitter=0.0, phase_jitter=0.3,
                                           intensity_prob=1.0), 0)(_tumour_sample())
    label = torch.as_tensor(per_phase["label"])[0].bool()
    curve = torch.as_tensor(per_phase["image"])[:, label].mean(dim=1)
    assert not torch.allclose(curve / curve[1], torch.tensor([1.0, 2.4, 2.1, 1.8]) / 2.4)


def test_tumour_crops_are_centred_on_the_largest_component():
    sample = _tumour_sample((40, 40, 40))
    sample["label"][0, 30:32, 30:32, 30:32] = 1  # a small second blob must not pull the window
    transform = seeded(finetune_transforms(16, pos_fraction=1.0, crop_jitter=0.0, flip_prob=0.0,
                                           intensity_jitter=0.0), 0)
    out = transform(sample)
    label = torch.as_tensor(out["label"])[0]
    centre = torch.nonzero(label).float().mean(0)
    assert out["tumour_window"] and label.sum() == 6 * 6 * 6
    assert torch.allclose(centre, torch.full((3,), 7.5), atol=0.51)  # the cube sits in the middle of the crop
    random_crops = seeded(finetune_transforms(16, pos_fraction=0.0), 0)
    assert not any(random_crops(_tumour_sample((40, 40, 40)))["tumour_window"] for _ in range(5))


# ------------------------------------------------------------------------------------------- phase dropout
@pytest.mark.parametrize("phases", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("min_phases", [2, 3])
def test_phase_dropout(phases, min_phases):
    dropout = RandPhaseDropoutd(prob=1.0, min_phases=min_phases)
    dropout.set_random_state(seed=phases * 10 + min_phases)
    image = torch.arange(1, phases + 1, dtype=torch.float32).view(phases, 1, 1, 1).expand(phases, 4, 4, 4).clone()
    dropped_any = set()
    for _ in range(30):
        sample = {"image": image, "phase_mask": torch.ones(phases, dtype=torch.bool), "phase_time": torch.zeros(phases)}
        out = sample
        for _ in range(phases):  # repeated application must still keep min_phases
            out = dropout(out)
        mask, img = out["phase_mask"], out["image"]
        assert mask[0]
        assert int(mask.sum()) >= min(min_phases, phases)
        for t in range(phases):
            assert (img[t] == 0).all() if not mask[t] else (img[t] == t + 1).all()
        dropped_any |= {t for t in range(phases) if not mask[t]}
        assert torch.equal(sample["image"], image) and sample["phase_mask"].all()  # input left intact
    if phases > min_phases:
        assert dropped_any == set(range(1, phases)), "every post-contrast phase should be droppable"
    else:
        assert not dropped_any


def test_phase_dropout_skips_padded_phases_and_accepts_numpy():
    dropout = RandPhaseDropoutd(prob=1.0, min_phases=2)
    dropout.set_random_state(seed=0)
    for _ in range(20):
        out = dropout({"image": np.ones((5, 2, 2, 2), dtype=np.float32),
                       "phase_mask": torch.tensor([True, True, True, False, False])})
        assert out["phase_mask"].tolist()[3:] == [False, False] and out["phase_mask"].sum() == 2
        assert out["phase_mask"][0]
    never = RandPhaseDropoutd(prob=0.0)
    sample = {"image": torch.ones(4, 2, 2, 2), "phase_mask": torch.ones(4, dtype=torch.bool)}
    assert never(sample)["phase_mask"].all()


def test_finetune_pipeline_with_phase_dropout(finetune):
    transform = seeded(finetune_transforms(16, phase_dropout=1.0), 5)
    ds = CachedCaseDataset(finetune.cache, finetune.train_ids, transform, with_label=True)
    batch = collate_cases([ds[i] for i in range(len(ds))])
    counts = torch.tensor([_phases(finetune, pid) for pid in batch["patient_id"]])
    real = batch["phase_mask"].sum(1)
    assert batch["phase_mask"][:, 0].all()
    assert torch.equal(real, torch.maximum(counts - 1, torch.full_like(counts, 2)).minimum(counts))
    hidden = ~batch["phase_mask"]
    assert (batch["image"].flatten(2).abs().sum(-1)[hidden] == 0).all()


# ------------------------------------------------------------------------------------------- pretraining
def _folder_root(mama: dict, parent: Path, names: dict[str, str]) -> Path:
    """Case folders (no MAMA-MIA layout) copied from phantom cases: {folder name: phantom pid}.

    The first case lists its phases in a manifest.json with times; the others rely on natural file order.
    """
    root = parent / "folder"
    for i, (name, pid) in enumerate(names.items()):
        case = mama["cases"][pid]
        (root / name).mkdir(parents=True)
        if i == 0:
            files = [f"scan_{k}.nii.gz" for k in range(case.num_phases)]
            times = case.acquisition_times or list(range(case.num_phases))
            (root / name / "manifest.json").write_text(json.dumps({"phases": files, "times": times}))
        else:
            files = [f"t{k}.nii.gz" for k in range(case.num_phases)]  # t10 would sort after t2
        for src, dst in zip(case.image_paths, files, strict=True):
            shutil.copy(src, root / name / dst)
    return root


@pytest.fixture(scope="module")
def folder(mama, tmp_path_factory) -> Path:
    pids = sorted(mama["cases"])
    # DUKE_001 also exists in the MAMA-MIA root: combined, both copies must survive under distinct ids.
    return _folder_root(mama, tmp_path_factory.mktemp("plain"), {"DUKE_001": pids[1], "extra_a": pids[4],
                                                                  "extra_b": pids[7], "extra_c": pids[10]})


def _check_pretrain(dm: PretrainDataModule, expected_ids: set[str]):
    assert set(dm.train_ids) | set(dm.val_ids) == expected_ids
    assert not set(dm.train_ids) & set(dm.val_ids) and dm.val_ids
    seen = []
    for batch in dm.train_dataloader():
        _check_contract(batch, crop=(16, 16, 16), label=False)
        seen += batch["patient_id"]
    assert sorted(seen) == sorted(dm.train_ids)
    first = list(dm.val_dataloader())
    second = list(dm.val_dataloader())
    assert sum(len(b["patient_id"]) for b in first) == len(dm.val_ids)
    for a, b in zip(first, second, strict=True):
        _check_contract(a, crop=(16, 16, 16), label=False)
        assert torch.equal(a["image"], b["image"]) and a["patient_id"] == b["patient_id"]
        for i, pid in enumerate(a["patient_id"]):
            volume = dm.cache.read(pid)["image"]
            assert torch.equal(a["image"][i, : volume.shape[0]], _center(volume, 16))


def _center(volume: torch.Tensor, size: int) -> torch.Tensor:
    out = volume
    for axis in range(1, 4):
        n = out.shape[axis]
        if n < size:
            before = (size - n) // 2
            pad = [0, 0] * 3
            pad[2 * (3 - axis)], pad[2 * (3 - axis) + 1] = before, size - n - before
            out = torch.nn.functional.pad(out, pad)
        else:
            out = out.narrow(axis, (n - size) // 2, size)
    return out


def test_pretrain_on_mamamia_root_leaves_out_the_test_split(mama):
    dm = PretrainDataModule(str(mama["root"]), cache_dir=str(mama["cache"]), crop_size=16, batch_size=3,
                            val_fraction=0.25)
    dm.prepare_data()
    dm.setup("fit")
    _check_pretrain(dm, set(mama["train"]))
    assert not set(dm.train_ids + dm.val_ids) & set(mama["test"])
    # Asked for explicitly, the test split joins the pool.
    everything = PretrainDataModule(str(mama["root"]), cache_dir=str(mama["cache"]), crop_size=16, batch_size=3,
                                    val_fraction=0.25, include_test=True)
    everything.prepare_data()
    everything.setup("fit")
    _check_pretrain(everything, set(mama["cases"]))
    assert len(everything.val_ids) == 3


def test_pretrain_on_case_folders(folder, tmp_path):
    dm = PretrainDataModule(str(folder), cache_dir=str(tmp_path / "cache"), crop_size=16, batch_size=2,
                            val_fraction=0.25)
    dm.prepare_data()
    dm.setup("fit")
    _check_pretrain(dm, {"DUKE_001", "extra_a", "extra_b", "extra_c"})
    manifest = json.loads((folder / "DUKE_001" / "manifest.json").read_text())
    assert dm.cache.read("DUKE_001")["phase_time"].tolist() == pytest.approx(manifest["times"])


def test_pretrain_on_two_roots(mama, folder, tmp_path):
    dm = PretrainDataModule([str(mama["root"]), str(folder)], cache_dir=str(tmp_path / "cache"), crop_size=16,
                            batch_size=4, val_fraction=0.2)
    dm.prepare_data()
    dm.setup("fit")
    train = set(mama["train"])
    expected = (train - {"DUKE_001"}) | ({"MAMA_DUKE_001"} if "DUKE_001" in train else set()) | {
        "folder_DUKE_001", "extra_a", "extra_b", "extra_c"}
    _check_pretrain(dm, expected)
    a, b = dm.cache.read("MAMA_DUKE_001")["image"], dm.cache.read("folder_DUKE_001")["image"]
    assert a.shape != b.shape or not torch.equal(a, b)


def test_default_cache_is_outside_the_dataset(mama, folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    dm = PretrainDataModule(str(mama["root"]))
    assert dm.cache_root.resolve() == (tmp_path / "cache" / "MAMA").resolve()
    for cwd in (mama["root"], mama["root"] / "images", folder):
        monkeypatch.chdir(cwd)
        for roots in ([mama["root"]], [mama["root"], folder], [folder, mama["root"]]):
            where = PretrainDataModule([str(r) for r in roots]).cache_root.resolve()
            for root in roots:
                assert not where.is_relative_to(root.resolve()), (cwd, where)
        assert not default_cache_dir(mama["root"]).resolve().is_relative_to(mama["root"].resolve())
    assert not (mama["root"] / "cache").exists()


@pytest.mark.parametrize("cls", [FinetuneDataModule, PretrainDataModule])
def test_preprocess_is_one_mapping_and_keeps_the_cache_folder(cls, tmp_path):
    # As LightningCLI reads a data module's arguments: `preprocess` is one nested mapping of PreprocessConfig fields.
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "data")

    def cache_folder(yaml_data: str) -> str:
        cfg = parser.parse_string(f"data: {{root: {tmp_path}, cache_dir: {tmp_path / 'cache'}, {yaml_data}}}")
        return parser.instantiate(cfg).data.cache.dir.name

    # Pinned folder names (`PreprocessConfig.key()`): if they change, every existing cache is rebuilt.
    assert cache_folder("crop_size: 32") == "7279e9114bc7"
    assert cache_folder("preprocess: {spacing: [1, 1, 2], margin_mm: 5, crop_to_breast: false, "
                        "clip_percentiles: [0.5, 99.5], cache_dtype: float32}") == "0b469629c9ab"
    with pytest.raises(ArgumentError, match="does not accept option 'spacing'"):
        cache_folder("spacing: [1, 1, 2]")
    with pytest.raises(ArgumentError, match="does not accept option 'preprocess.spacings'"):
        cache_folder("preprocess: {spacings: [1, 1, 2]}")
    with pytest.raises(ValueError, match="cache_dtype must be one of"):
        cache_folder("preprocess: {cache_dtype: int8}")
    with pytest.raises(TypeError, match="preprocess must be a PreprocessConfig"):
        cls(str(tmp_path), preprocess={"margin_mm": 5.0})


# ------------------------------------------------------------------------------------------- bad cases
def test_bad_cases_are_skipped_with_a_warning(mama, tmp_path, caplog):
    root = tmp_path / "damaged"
    shutil.copytree(mama["root"], root)
    truncated, bad_json, no_mask = mama["train"][0], mama["train"][1], mama["train"][2]
    phase = sorted((root / "images" / truncated).glob("*_0001.nii.gz"))[0]
    phase.write_bytes(phase.read_bytes()[:200])
    (root / "patient_info_files" / f"{bad_json.lower()}.json").write_text("{not json")
    (root / "segmentations" / "expert" / f"{no_mask.lower()}.nii.gz").unlink()

    dm = FinetuneDataModule(str(root), cache_dir=str(tmp_path / "cache"), crop_size=CROP, batch_size=2)
    with caplog.at_level(logging.WARNING, logger="mtl_breast.data.datamodule"):
        dm.prepare_data()
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert truncated in warnings and bad_json in warnings
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mtl_breast.data.datamodule"):
        dm.setup("fit")
    assert no_mask in " ".join(r.getMessage() for r in caplog.records)
    used = set(dm.train_ids) | set(dm.val_ids)
    assert used == set(mama["train"]) - {truncated, bad_json, no_mask}
    assert set(dm.test_ids) == set(mama["test"])
    batch = next(iter(dm.train_dataloader()))
    _check_contract(batch)

    pre = PretrainDataModule(str(root), cache_dir=str(tmp_path / "cache"), crop_size=16)
    pre.prepare_data()
    pre.setup("fit")
    assert set(pre.train_ids) | set(pre.val_ids) == set(mama["train"]) - {truncated, bad_json}


def test_finetune_without_split_file_uses_own_cases(mama, tmp_path):
    root = tmp_path / "nosplit"
    shutil.copytree(mama["root"], root)
    (root / "train_test_splits.csv").unlink()
    dm = FinetuneDataModule(str(root), cache_dir=str(mama["cache"]), crop_size=CROP, val_fraction=0.2)
    dm.prepare_data()  # everything is cached already
    # Another dataset's case in the same cache folder must not join this one.
    stray = dm.cache.dir / "STRAY_001.safetensors"
    shutil.copy(dm.cache.path(mama["train"][0]), stray)
    try:
        dm.setup("fit")
    finally:
        stray.unlink()
    assert set(dm.train_ids) | set(dm.val_ids) == set(mama["cases"]) and dm.test_ids == []


# ------------------------------------------------------------------------------------------- loaders
class _Draw(Randomizable, MapTransform):
    """Records one random number per sample, to see which random stream a loader worker uses."""

    def __init__(self):
        MapTransform.__init__(self, ["image"])

    def __call__(self, data):
        d = dict(data)
        d["image"] = torch.full((1, 2, 2, 2), float(self.R.rand()))
        d["phase_mask"] = torch.ones(1, dtype=torch.bool)
        d["phase_time"] = torch.zeros(1)
        return d


def test_every_sample_and_epoch_draws_its_own_augmentation(finetune):
    """Six reads of one case in worker processes: six different draws, and new ones the next epoch."""
    finetune.num_workers = 2
    try:
        loader = finetune._train_loader(CachedCaseDataset(finetune.cache, finetune.train_ids[:1], _Draw(), repeats=6))
        draws = []
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)
            draws.append([float(x) for batch in loader for x in batch["image"][:, 0, 0, 0, 0]])
        for batch in finetune.train_dataloader():
            _check_contract(batch)
    finally:
        finetune.num_workers = 0
    assert len(set(draws[0])) == 6, f"samples repeat each other's random draws: {draws[0]}"
    assert not set(draws[0]) & set(draws[1])


def test_single_worker_loader(mama):
    dm = FinetuneDataModule(str(mama["root"]), cache_dir=str(mama["cache"]), crop_size=CROP, batch_size=3,
                            num_workers=1)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.persistent_workers
    for _ in range(2):
        ids = []
        for batch in loader:
            _check_contract(batch)
            ids += batch["patient_id"]
        assert sorted(ids) == sorted(dm.train_ids)


def test_seeded_runs_repeat_augmentation(finetune):
    def first_batch(seed):
        torch.manual_seed(seed)
        return next(iter(finetune.train_dataloader()))

    a, b, c = first_batch(1), first_batch(1), first_batch(2)
    assert a["patient_id"] == b["patient_id"] and torch.equal(a["image"], b["image"])
    assert a["patient_id"] != c["patient_id"] or not torch.equal(a["image"], c["image"])


def test_repeats_and_bad_arguments(finetune, mama, tmp_path):
    ds = CachedCaseDataset(finetune.cache, finetune.train_ids, repeats=3)
    assert len(ds) == 3 * len(finetune.train_ids)
    assert ds[len(finetune.train_ids)]["patient_id"] == finetune.train_ids[0]
    with pytest.raises(ValueError):
        CachedCaseDataset(finetune.cache, finetune.train_ids, repeats=0)
    with pytest.raises(FileNotFoundError):
        FinetuneDataModule(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError):
        finetune_transforms(16, pos_fraction=1.5)
    with pytest.raises(ValueError):
        finetune_transforms((16, 16))
    empty = FinetuneDataModule(str(mama["root"]), cache_dir=str(tmp_path / "empty_cache"))
    with pytest.raises(RuntimeError, match="no training cases"):
        empty.setup("fit")


# ------------------------------------------------------------------------------------------- sampling
def test_epoch_sampler_shares_one_order_and_gives_each_rank_its_positions():
    world = [EpochSampler(10, seed=5, rank=r, world_size=3) for r in range(3)]
    for epoch in (0, 1):
        for s in world:
            s.set_epoch(epoch)
        keys = [list(s) for s in world]
        assert [len(k) for k in keys] == [4, 4, 4]  # padded to a multiple of the world size, as DistributedSampler
        order = world[0].order(epoch)
        assert all(k[i][0] == order[r + 3 * i] for r, k in enumerate(keys) for i in range(4))
        assert set(order[:10]) == set(range(10))
        seeds = [seed for k in keys for _, seed in k]
        assert len(set(seeds)) == len(seeds)  # every position its own augmentation, across ranks too
    assert not np.array_equal(world[0].order(0), world[0].order(1))
    assert list(EpochSampler(10, seed=5).keys(1)) == list(EpochSampler(10, seed=5).keys(1))  # a pure function
    assert EpochSampler(10, seed=5).keys(1, start=3) == EpochSampler(10, seed=5).keys(1)[3:]


def test_training_batches_do_not_depend_on_the_workers(finetune):
    """Crops, flips and gains come from each sample's own seed: 0 and 2 workers give the same epoch."""
    batches = {}
    for workers in (0, 2):
        finetune.num_workers = workers
        torch.manual_seed(7)  # the run's seed (`seed_everything`) is the order's seed
        try:
            loader = finetune.train_dataloader()
            loader.sampler.set_epoch(1)
            batches[workers] = list(loader)
        finally:
            finetune.num_workers = 0
    assert len(batches[0]) == len(batches[2]) > 1
    for a, b in zip(batches[0], batches[2], strict=True):
        assert a["patient_id"] == b["patient_id"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_resumable_loader_starts_where_the_run_stands(finetune):
    loader = finetune.train_dataloader()
    full = [b["patient_id"] for b in loader]
    where = {"at": (0, 1)}
    resumed = ResumableLoader(loader.dataset, batch_size=loader.batch_size, sampler=loader.sampler,
                              collate_fn=collate_cases, position=lambda: where["at"])
    iterator = iter(resumed)  # made while a trainer sets up, before it restores a checkpoint's counters
    where["at"] = (0, 1)
    assert [b["patient_id"] for b in iterator] == full[1:]
    where["at"] = (0, None)  # epoch 0 complete: the next pass is epoch 1 from its start
    assert resumed.state_dict() == {"seed": loader.sampler.seed, "epoch": 1, "samples_done": 0}
    assert [b["patient_id"] for b in resumed] != full
