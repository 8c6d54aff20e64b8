"""Model cards: every exported weights folder explains itself, from its config.json and nothing else."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from mtl_breast.acquisition import summarise_assumed
from mtl_breast.hub import save_pretrained
from mtl_breast.hub.modelcard import NOT_RECORDED, render_model_card
from mtl_breast.models.registry import create_model

REQUIRED_TAGS = {"medical-imaging", "mri", "breast", "dce-mri"}
FULL_EXTRA = {
    "preprocess": {"spacing": [0.75, 0.8, 1.5], "orientation": "LPS", "crop_to_breast": True, "margin_mm": 12.5,
                   "clip_percentiles": [0.5, 99.5]},
    "inference": {"roi_size": [32, 32, 32], "pcr_threshold": 0.4237, "pcr_temperature": 1.7},
    "training": {"task": "finetune", "datasets": {"DUKE": 40, "ISPY2": 13}, "train_cases": 53, "val_cases": 9,
                 "epochs": 5, "steps": 120, "base_weights": "lab/mae-dce@v1", "patient_ids": ["DUKE_007"]},
    "validation": {"val/dsc": 0.8123, "val/pcr_auc": 0.6789},
}


def read_card(folder) -> tuple[dict, str, dict]:
    """(front matter, body, config.json) of a weights folder."""
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body, json.loads((folder / "config.json").read_text())


def field(body: str, label: str) -> str:
    """The value of the bullet ``- <label>: <value>``."""
    match = re.search(rf"^- {re.escape(label)}: (.+)$", body, re.M)
    assert match, f"no {label!r} line in the card"
    return match.group(1)


def numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", text)]


def check_front_matter(meta: dict) -> None:
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "mtl-breast"
    assert REQUIRED_TAGS <= set(meta["tags"])


def test_card_of_save_pretrained_matches_config(tmp_path):
    model = create_model("mtl_vit_test")
    save_pretrained(model, tmp_path, extra_config=FULL_EXTRA)
    meta, body, config = read_card(tmp_path)
    check_front_matter(meta)
    assert {"segmentation", "pcr", "mae"} <= set(meta["tags"]) and meta["pipeline_tag"] == "image-segmentation"
    assert meta["base_model"] == "lab/mae-dce"  # a Hub id, without the revision the Hub would reject
    assert (tmp_path / "README.md").read_text() == render_model_card(config)  # nothing but the config
    assert field(body, "Architecture (`arch`)") == f"`{config['arch']}`"
    assert int(field(body, "Parameters").split()[0]) == config["num_parameters"] == sum(
        p.numel() for p in model.parameters())
    enc = config["model_args"]["encoder"]
    assert numbers(field(body, "Embedding dim")) == [enc["embed_dim"]]
    assert numbers(field(body, "Depth (blocks)")) == [enc["depth"]]
    assert numbers(field(body, "Attention heads")) == [enc["num_heads"]]
    assert numbers(field(body, "Patch size (voxels)")) == [enc["patch_size"]] * 3
    assert numbers(field(body, "Image size (voxels per window)")) == [enc["img_size"]] * 3
    assert numbers(field(body, "Voxel spacing (mm, x y z)")) == config["preprocess"]["spacing"]
    assert numbers(field(body, "`clip_percentiles`")) == config["preprocess"]["clip_percentiles"]
    assert field(body, "`orientation`") == "LPS"
    assert numbers(field(body, "pCR decision threshold (probability, chosen on validation)")) == [
        config["inference"]["pcr_threshold"]]
    for name, count in config["training"]["datasets"].items():
        assert f"  - {name}: {count}\n" in body
    assert numbers(field(body, "Training cases")) == [53] and numbers(field(body, "Validation cases")) == [9]
    for metric, value in config["validation"].items():
        assert re.search(rf"\| `{re.escape(metric)}` \| {value:.4g} \|", body)
    assert "DUKE_007" not in body  # keys the card does not know (patient ids) are never rendered
    assert "not a medical device" in body and "Trained on: DUKE, ISPY2" in body
    assert NOT_RECORDED in field(body, "Synthetic phantoms")


def test_missing_information_says_not_recorded(tmp_path):
    save_pretrained(create_model("vit_test"), tmp_path)
    meta, body, config = read_card(tmp_path)
    check_front_matter(meta)
    assert "base_model" not in meta and "pcr" not in meta["tags"]
    assert numbers(field(body, "Parameters"))[0] == config["num_parameters"]
    for label in ("Voxel spacing (mm, x y z)", "pCR decision threshold (probability, chosen on validation)",
                  "Trained on", "Orientation"):
        assert field(body, label).startswith(NOT_RECORDED), label
    assert f"Preprocessing: {NOT_RECORDED}" in body and f"Training data: {NOT_RECORDED}" in body
    assert f"Validation scores: {NOT_RECORDED}" in body
    # An old config (no parameter count, no checksum) is rendered without inventing them.
    old = {"arch": "vit_test", "model_args": config["model_args"]}
    assert field(render_model_card(old).split("---\n", 2)[2], "Parameters") == NOT_RECORDED


def test_card_of_phantom_training_and_local_base_weights(tmp_path):
    training = {"task": "finetune", "datasets": {"DUKE": 6}, "base_weights": "/runs/mae/weights", "synthetic": True}
    save_pretrained(create_model("mtl_vit_test"), tmp_path, extra_config={"training": training})
    meta, body, _ = read_card(tmp_path)
    assert "base_model" not in meta  # a local path is not a Hub id
    assert field(body, "Started from") == "/runs/mae/weights"
    assert "Trained on synthetic phantoms" in body
    scratch = render_model_card({"arch": "mtl_vit_test", "training": {"task": "finetune", "base_weights": None}})
    assert "- Started from: scratch" in scratch


ASSUMED_LABEL = "Acquisition values assumed by the pCR kinetic features (not given by the case)"


def test_card_lists_the_acquisition_values_assumed_in_training(tmp_path):
    given_field_only = {"flip_angle": 12.0, "tumour_t10_s": 1.1, "relaxivity": 4.5}
    nothing_given = {"field_strength": 1.5, "repetition_time": 5.0, "flip_angle": 12.0, "tumour_t10_s": 1.1,
                     "relaxivity": 4.5}
    assumed = {**summarise_assumed([given_field_only] * 3 + [nothing_given]), "unread": 0}
    save_pretrained(create_model("mtl_vit_test"), tmp_path,
                    extra_config={"training": {"task": "finetune", "train_cases": 4, "assumed": assumed}})
    _, body, _ = read_card(tmp_path)
    assert field(body, ASSUMED_LABEL) == (
        "field_strength = 1.5 T for 1 of 4 training cases; repetition_time = 5 ms for 1 of 4 training cases; "
        "flip_angle = 12 deg for 4 of 4 training cases; tumour_t10_s = 1.1 s for 4 of 4 training cases (never "
        "given); relaxivity = 4.5 /mM/s for 4 of 4 training cases (never given)")
    # Weights trained before this was recorded, or a hand-edited entry: nothing is made up.
    for training in ({"task": "finetune"}, {"task": "finetune", "assumed": {"cases": 2, "values": {"flip_angle": 1}}}):
        card = render_model_card({"arch": "mtl_vit_test", "training": training})
        assert field(card, ASSUMED_LABEL) == NOT_RECORDED
    # An MAE computes no kinetic features: no such line.
    assert ASSUMED_LABEL not in render_model_card({"arch": "mae_vit_test", "training": {"task": "pretrain"}})


@pytest.mark.parametrize("fixture", ["mae_weights", "mtl_weights"])
def test_card_of_exported_checkpoint(request, fixture):
    folder = request.getfixturevalue(fixture)
    meta, body, config = read_card(folder)
    check_front_matter(meta)
    assert (folder / "README.md").read_text() == render_model_card(config)
    assert field(body, "Architecture (`arch`)") == f"`{config['arch']}`"
    assert numbers(field(body, "Parameters"))[0] == config["num_parameters"]
    assert numbers(field(body, "Voxel spacing (mm, x y z)")) == pytest.approx(config["preprocess"]["spacing"])
    threshold = field(body, "pCR decision threshold (probability, chosen on validation)")
    if fixture == "mtl_weights":
        assert float(threshold) == pytest.approx(config["inference"]["pcr_threshold"], rel=1e-5)
        # Fine-tuning recorded what the kinetic features assumed for every training case.
        assert config["training"]["assumed"]["cases"] == config["training"]["train_cases"]
        assert f"of {config['training']['train_cases']} training cases (never given)" in field(body, ASSUMED_LABEL)
    else:
        assert threshold == NOT_RECORDED and "mae" in meta["tags"]
