"""Weights export/import (safetensors + config.json), the registry round trip and partial encoder loads."""

from __future__ import annotations

import json
import shutil
import socket

import pytest
import torch
from torch import nn

from mtl_breast.hub import (
    WeightsError,
    checkpoint_filter_fn,
    load_encoder_into,
    load_pretrained,
    read_safetensors,
    read_safetensors_shapes,
    resolve_weights,
    save_pretrained,
)
from mtl_breast.models.layers import resample_pos_embed_3d
from mtl_breast.models.registry import MODELS, create_model, list_models


class JointToy(nn.Module):
    """Stands in for the joint model: an encoder at ``encoder`` plus task modules."""

    def __init__(self, **encoder_overrides) -> None:
        super().__init__()
        self.encoder = create_model("vit_test", **encoder_overrides)
        self.seg_decoder = nn.Linear(64, 2)
        self.pcr_head = nn.Linear(64, 1)


def test_registry_names_and_round_trip():
    names = list_models()
    for size in ("test", "small", "base", "large"):
        assert f"vit_{size}" in names and f"mae_vit_{size}" in names
    for arch in ("vit_test", "mae_vit_test"):
        model = create_model(arch, attn_mode="joint", img_size=(32, 32, 48))
        assert model.arch == arch
        args = json.loads(json.dumps(model.model_args))  # what config.json stores
        rebuilt = create_model(arch, **args)
        assert rebuilt.model_args == model.model_args
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
            k: v.shape for k, v in model.state_dict().items()
        }
    with pytest.raises(ValueError, match="unknown model"):
        create_model("vit_huge")
    with pytest.raises(ValueError, match="unknown argument"):
        create_model("vit_test", embed_dims=32)
    assert callable(MODELS["mae_vit_base"])


@pytest.mark.parametrize("arch", ["vit_test", "mae_vit_test"])
def test_save_load_bit_exact(tmp_path, arch):
    model = create_model(arch, pos_embed_type="learnable")
    save_pretrained(model, tmp_path / "w", extra_config={"preprocessing": {"spacing": [1.0, 1.0, 1.0]}})
    # The model card travels with the weights; no temp files are left behind.
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((tmp_path / "w" / "config.json").read_text())
    assert config["arch"] == arch and config["format_version"] == 1
    assert config["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert config["model_args"] == model.model_args and config["preprocessing"]["spacing"] == [1.0, 1.0, 1.0]
    loaded = load_pretrained(tmp_path / "w")
    assert loaded.pretrained_config["preprocessing"] == config["preprocessing"] and not loaded.training
    ref, got = model.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    x = torch.randn(1, 2, 32, 32, 32)
    if arch == "vit_test":
        assert torch.equal(model.eval()(x), loaded(x))


def test_save_strips_compile_and_lightning_prefixes(tmp_path):
    model = create_model("vit_test")
    wrapped = {f"model._orig_mod.{k}": v for k, v in model.state_dict().items()}
    assert checkpoint_filter_fn(wrapped, model).keys() == model.state_dict().keys()
    ddp = {f"module.{k}": v for k, v in model.state_dict().items()}
    assert checkpoint_filter_fn(ddp, model).keys() == model.state_dict().keys()
    compiled = torch.compile(model)  # wraps as _orig_mod without compiling until called
    save_pretrained(compiled, tmp_path)
    assert set(read_safetensors(tmp_path / "model.safetensors")) == set(model.state_dict())
    with pytest.raises(ValueError, match="reserved"):
        save_pretrained(model, tmp_path, extra_config={"arch": "x"})
    with pytest.raises(ValueError, match="create_model"):
        save_pretrained(nn.Linear(2, 2), tmp_path)


def test_load_into_new_grid_resamples_learnable_pos_embed(tmp_path):
    model = create_model("vit_test", pos_embed_type="learnable")
    save_pretrained(model, tmp_path)
    bigger = load_pretrained(tmp_path, img_size=(32, 48, 64))
    assert bigger.grid_size == (4, 6, 8)
    expected = resample_pos_embed_3d(model.pos_embed.detach(), (4, 4, 4), (4, 6, 8))
    assert torch.equal(bigger.pos_embed.detach(), expected)
    assert bigger(torch.randn(1, 2, 32, 48, 64)).shape == (1, 2, 192, 64)
    # A fixed sin-cos embedding is not stored: a new grid loads with nothing to resample.
    save_pretrained(create_model("vit_test"), tmp_path / "s")
    assert load_pretrained(tmp_path / "s", img_size=64).grid_size == (8, 8, 8)


def test_load_encoder_into_larger_model(tmp_path):
    encoder = create_model("vit_test")
    save_pretrained(encoder, tmp_path / "enc")
    mae = create_model("mae_vit_test")
    save_pretrained(mae, tmp_path / "mae")
    head_keys = {"seg_decoder.weight", "seg_decoder.bias", "pcr_head.weight", "pcr_head.bias"}
    for source, ref in ((tmp_path / "enc", encoder), (tmp_path / "mae", mae.encoder), (mae.state_dict(), mae.encoder)):
        joint = JointToy()
        missing = load_encoder_into(joint, source, expected_missing_prefixes=("seg_decoder.", "pcr_head."))
        assert set(missing) == head_keys
        assert all(torch.equal(v, ref.state_dict()[k]) for k, v in joint.encoder.state_dict().items())
    # The default expectation is "everything outside the encoder".
    assert set(load_encoder_into(JointToy(), tmp_path / "enc")) == head_keys


def test_load_encoder_into_asserts_exact_key_sets(tmp_path):
    encoder = create_model("vit_test")
    sd = dict(encoder.state_dict())
    with pytest.raises(WeightsError, match="unexpected in the source.*encoder.extra_token"):
        load_encoder_into(JointToy(), {**sd, "extra_token": torch.zeros(3)})
    with pytest.raises(WeightsError, match="missing from the source.*encoder.norm.weight"):
        load_encoder_into(JointToy(), {k: v for k, v in sd.items() if k != "norm.weight"})
    with pytest.raises(WeightsError, match="expected missing but provided"):
        load_encoder_into(JointToy(), sd, expected_missing_prefixes=("seg_decoder.", "pcr_head.", "encoder.norm"))
    # A spatial-only source (e.g. converted from MONAI) into a divided encoder: name the temporal keys.
    spatial = create_model("vit_test", time_attn=False)
    expected = ("seg_decoder.", "pcr_head.", "encoder.blocks.*time*")
    loaded = load_encoder_into(JointToy(), spatial.state_dict(), expected_missing_prefixes=expected)
    assert any(".time_attn." in k for k in loaded) and any(".norm_time." in k for k in loaded)
    with pytest.raises(WeightsError, match="blocks.0.attn.qkv.weight: weights \\(96, 32\\) vs model \\(192, 64\\)"):
        load_encoder_into(JointToy(), create_model("vit_test", embed_dim=32).state_dict())


def test_config_not_matching_tensors_names_key_and_shapes(tmp_path):
    save_pretrained(create_model("vit_test"), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_args"]["embed_dim"] = 32
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"norm.weight: weights \(64,\) vs model \(32,\)"):
        load_pretrained(tmp_path)



def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        target = config["model_args"].get("encoder", config["model_args"]) if key != "arch" else config
        target[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def test_header_shapes_are_read_without_the_data(tmp_path):
    model = create_model("mae_vit_test")
    save_pretrained(model, tmp_path)
    shapes = read_safetensors_shapes(tmp_path / "model.safetensors")
    assert shapes == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    good = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(good[:-100])  # the header claims more data than the file holds
    with pytest.raises(WeightsError, match="cut.safetensors.*corrupted or truncated"):
        read_safetensors_shapes(tmp_path / "cut.safetensors")


@pytest.mark.parametrize(("arch", "change", "match"), [
    ("vit_test", {"depth": 100_000}, r"model_args.depth=100000 asks for more layers than .*model.safetensors holds "
                                     r"tensors \(45\)"),
    ("mtl_vit_test", {"depth": 100_000}, r"model_args.encoder.depth=100000"),
    ("vit_test", {"embed_dim": 10**6, "num_heads": 2}, r"asks for [\d,]+ elements, the file holds 175,296.*\n"
                                                       r"  .*: weights \(64,\) vs model \(1000000,\)"),
    ("mae_vit_test", {"depth": 3}, r"does not fit 'mae_vit_test': missing keys \['encoder.blocks.2"),
    # The default volume sets the position-embedding table, which a sin-cos embedding does not store in the file.
    ("mtl_vit_test", {"img_size": [1024] * 3}, r"model_args.encoder.img_size=\[1024, 1024, 1024\] is "
                                               r"1,073,741,824 voxels, more than the 134,217,728 \(512\^3\) accepted"),
    ("vit_test", {"img_size": [100_000] * 3}, r"config.json: model_args.img_size=\[100000, 100000, 100000\] is "),
    ("mae_vit_test", {"img_size": 100_000}, r"model_args.*img_size=\[100000, 100000, 100000\] is "),
])
def test_absurd_config_is_refused_before_the_model_is_allocated(tmp_path, monkeypatch, arch, change, match):
    save_pretrained(create_model(arch), tmp_path)
    _edit_config(tmp_path, **change)

    def meta_only(name, **kwargs):
        if torch.empty(0).device.type != "meta":  # inside `with torch.device("meta")` new tensors are meta
            raise AssertionError(f"{name} was built with real memory before the config was checked")
        return create_model(name, **kwargs)

    monkeypatch.setattr("mtl_breast.hub.pretrained.create_model", meta_only)
    with pytest.raises(WeightsError, match=match):
        load_pretrained(tmp_path)


def test_weights_of_another_or_unknown_arch_name_folder_and_archs(tmp_path):
    save_pretrained(create_model("mae_vit_test"), tmp_path / "mae")
    with pytest.raises(WeightsError, match=r"mae holds 'mae_vit_test' weights \(an MAE pretrainer\), but "
                                           r"'mtl_vit_test' \(a joint segmentation \+ pCR model\) was asked for"):
        load_pretrained(tmp_path / "mae", arch="mtl_vit_test")
    assert type(load_pretrained(tmp_path / "mae", arch="mae_vit_small")).__name__ == "MAEPretrainer"  # same kind
    _edit_config(tmp_path / "mae", arch="mae_vit_huge")
    with pytest.raises(WeightsError, match=r"mae: its config.json names arch 'mae_vit_huge', which .* does not know; "
                                           r"known archs: .*mae_vit_base.*mtl_vit_test"):
        load_pretrained(tmp_path / "mae")
    _edit_config(tmp_path / "mae", arch="mae_vit_test", embed_dims=32)
    with pytest.raises(WeightsError, match=r"mae/config.json: model_args do not build 'mae_vit_test'.*embed_dims"):
        load_pretrained(tmp_path / "mae")
    # A joint export given where an encoder is wanted: the message says what the folder holds.
    save_pretrained(create_model("mtl_vit_test"), tmp_path / "mtl")
    with pytest.raises(WeightsError, match=r"mtl/model.safetensors \('mtl_vit_test': a joint segmentation \+ pCR "
                                           r"model\) do not fit JointToy"):
        load_encoder_into(JointToy(), tmp_path / "mtl")


def test_bad_weight_files_give_clear_errors(tmp_path, monkeypatch):
    model = create_model("vit_test")
    save_pretrained(model, tmp_path / "ok")
    good = (tmp_path / "ok" / "model.safetensors").read_bytes()
    cases = {
        "garbage": b"\x12\x00\x00\x00\x00\x00\x00\x00not json at all" * 4,
        "truncated": good[: len(good) // 2],
        "bad_header": good[:8] + b"{" + b"\xff" * 200 + good[209:],
    }
    for name, payload in cases.items():
        (tmp_path / f"{name}.safetensors").write_bytes(payload)
        with pytest.raises(WeightsError, match="safetensors"):
            read_safetensors(tmp_path / f"{name}.safetensors")
    # A flipped data byte passes the format checks but not the checksum in config.json.
    flipped = bytearray(good)
    flipped[-5] ^= 0xFF
    (tmp_path / "ok" / "model.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(WeightsError, match="sha256"):
        load_pretrained(tmp_path / "ok")
    # A torch.save pickle renamed model.safetensors is refused without being unpickled.
    torch.save(model.state_dict(), tmp_path / "ok" / "model.safetensors")

    def forbidden(*args, **kwargs):
        raise AssertionError("a weights file was unpickled")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr("pickle.load", forbidden)
    monkeypatch.setattr("pickle.loads", forbidden)
    with pytest.raises(WeightsError, match="pickle"):
        load_pretrained(tmp_path / "ok")
    with pytest.raises(WeightsError, match="pickle"):
        load_encoder_into(JointToy(), tmp_path / "ok")
    with pytest.raises(FileNotFoundError):
        load_pretrained(tmp_path / "missing", arch="vit_test")


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _hf_cache(root, weights_dir, repo_id="org/name", commit=COMMIT, ref="main"):
    """A Hugging Face Hub cache as `snapshot_download` leaves it: blobs, symlinked snapshot files, refs/<ref>."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for name in ("model.safetensors", "config.json"):
        blob = repo / "blobs" / f"blob-{name}"
        shutil.copyfile(weights_dir / name, blob)
        (snapshot / name).symlink_to(blob)
    (repo / "refs").mkdir()
    (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """A cache under tmp_path selected through the environment, offline, with any network connection failing."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # so a relative "org/name" is not a local folder

    def no_network(*args, **kwargs):
        raise AssertionError("weights lookup tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    return tmp_path / "hf" / "hub"


def test_load_pretrained_resolves_hub_id_from_local_cache(tmp_path, offline_hub):
    model = create_model("mae_vit_test", pos_embed_type="learnable")
    save_pretrained(model, tmp_path / "export")
    snapshot = _hf_cache(offline_hub, tmp_path / "export")
    assert resolve_weights("org/name") == snapshot
    for name in ("org/name", f"org/name@{COMMIT}", "org/name@main"):
        loaded = load_pretrained(name)
        ref, got = model.state_dict(), loaded.state_dict()
        assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
        assert loaded.pretrained_config["arch"] == "mae_vit_test"
    joint = JointToy(pos_embed_type="learnable")  # the encoder helpers accept an id too
    load_encoder_into(joint, "org/name")
    assert torch.equal(joint.encoder.pos_embed, model.encoder.pos_embed)


def test_hub_cache_found_through_hf_home(tmp_path, offline_hub, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    save_pretrained(create_model("vit_test"), tmp_path / "export")
    _hf_cache(tmp_path / "hf" / "hub", tmp_path / "export", repo_id="lab/encoder")
    assert load_pretrained("lab/encoder").arch == "vit_test"


def test_local_folder_wins_over_hub_id(tmp_path, offline_hub):
    save_pretrained(create_model("vit_test"), tmp_path / "export")
    _hf_cache(offline_hub, tmp_path / "export")
    save_pretrained(create_model("mae_vit_test"), tmp_path / "org" / "name")  # cwd is tmp_path
    assert load_pretrained("org/name").arch == "mae_vit_test"


def test_uncached_hub_id_gives_a_clear_error(tmp_path, offline_hub):
    searched = str(offline_hub / "models--org--missing")
    with pytest.raises(WeightsError, match="never downloaded") as err:
        load_pretrained("org/missing")
    assert "'org/missing'" in str(err.value) and searched in str(err.value)
    save_pretrained(create_model("vit_test"), tmp_path / "export")
    _hf_cache(offline_hub, tmp_path / "export")
    with pytest.raises(WeightsError, match="revision v2.*never downloaded"):
        load_pretrained("org/name@v2")  # cached, but not at this revision
    # A snapshot without the weights file is not taken for weights.
    (offline_hub / "models--org--name" / "snapshots" / COMMIT / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="has no model.safetensors"):
        load_pretrained("org/name")
    # Anything not shaped like an id is a plain path, with the plain error.
    with pytest.raises(FileNotFoundError):
        load_pretrained("a/b/c", arch="vit_test")


def test_jobs_read_the_config_of_a_cached_hub_id(tmp_path, offline_hub):
    # predict / extract start from `read_weights_config`: `--weights org/name` works like a folder.
    from mtl_breast.predictor import read_weights_config

    model = create_model("mae_vit_test", pos_embed_type="learnable")
    save_pretrained(model, tmp_path / "export", extra_config={"preprocess": {"spacing": [1.0, 1.0, 1.0]}})
    _hf_cache(offline_hub, tmp_path / "export")
    assert read_weights_config("org/name") == json.loads((tmp_path / "export" / "config.json").read_text())
    with pytest.raises(WeightsError, match="never downloaded"):
        read_weights_config("org/other")
