"""ViTEncoder3d, its layers and the MONAI ViT converter (tiny sizes, CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from mtl_breast.models.convert import convert_monai_vit_state_dict
from mtl_breast.models.encoder import ViTEncoder3d
from mtl_breast.models.layers import PatchEmbed3d, resample_pos_embed_3d, sincos_pos_embed_3d
from mtl_breast.models.registry import create_model
from mtl_breast.models.temporal import PhaseEncoding

TINY = {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def tiny(**overrides) -> ViTEncoder3d:
    torch.manual_seed(0)
    return ViTEncoder3d(**{**TINY, **overrides}).eval()


@pytest.mark.parametrize("attn_mode", ["divided", "joint"])
def test_shapes_for_2_to_8_phases(attn_mode):
    model = tiny(attn_mode=attn_mode)
    for t in range(2, 9):
        out = model(torch.randn(2, t, 16, 16, 24))
        assert out.shape == (2, t, 2 * 2 * 3, 32)
        assert torch.isfinite(out).all()


def test_vit_test_runs_a_32_cube_two_phase_input():
    model = create_model("vit_test").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 2, 32, 32, 32))
    assert out.shape == (1, 2, 64, 64)


@pytest.mark.parametrize("attn_mode", ["divided", "joint"])
def test_padded_phase_changes_nothing_in_real_phases(attn_mode):
    model = tiny(attn_mode=attn_mode)
    x = torch.randn(2, 3, 16, 16, 16)
    times = torch.tensor([[0.0, 90.0, 400.0], [0.0, float("nan"), 300.0]])
    with torch.no_grad():
        ref = model(x, phase_time=times)
        # Padding at the end (index fallback keeps its positions), filled with NaN garbage.
        pad = torch.full((2, 2, 16, 16, 16), float("nan"))
        mask = torch.tensor([[True] * 3 + [False] * 2] * 2)
        padded_times = torch.cat([times, torch.full((2, 2), float("nan"))], dim=1)
        out = model(torch.cat([x, pad], dim=1), phase_mask=mask, phase_time=padded_times)
        assert torch.allclose(out[:, :3], ref, atol=1e-5)
        # Padding in the middle: with known times a phase's position in T does not matter.
        timed = torch.tensor([[0.0, 90.0, 400.0]] * 2)
        ref = model(x, phase_time=timed)
        mid = torch.stack([x[:, 0], torch.randn(2, 16, 16, 16) * 100, x[:, 1], x[:, 2]], dim=1)
        mid_times = torch.tensor([[0.0, 7.0, 90.0, 400.0]] * 2)
        mid_mask = torch.tensor([[True, False, True, True]] * 2)
        out = model(mid, phase_mask=mid_mask, phase_time=mid_times)
        assert torch.allclose(out[:, [0, 2, 3]], ref, atol=1e-5)


def test_phase_time_nan_falls_back_to_index_embedding():
    torch.manual_seed(0)
    enc = PhaseEncoding(16, max_phases=4)
    times = torch.tensor([[0.0, float("nan"), 300.0, float("nan")]], requires_grad=False)
    emb = enc(4, times)
    assert torch.equal(emb[0, 1], enc.index_embed[1]) and torch.equal(emb[0, 3], enc.index_embed[3])
    assert not torch.allclose(emb[0, 2], enc.index_embed[2])
    assert torch.equal(enc(4, None, batch_size=2), enc.index_embed[None].expand(2, -1, -1))
    emb.sum().backward()  # NaN times must not leak NaN into the time MLP's gradients
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters())
    # Through the encoder: all-NaN times == no times; known times change the features.
    model = tiny()
    x = torch.randn(1, 3, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x, phase_time=torch.full((1, 3), float("nan"))), model(x))
        assert not torch.allclose(model(x, phase_time=torch.tensor([[0.0, 100.0, 500.0]])), model(x))


def test_phase_time_drop_hides_times_in_training_only():
    enc = PhaseEncoding(8, max_phases=2, time_drop=1.0)
    times = torch.tensor([[0.0, 120.0]])
    assert torch.equal(enc(2, times), enc.index_embed[None])
    assert not torch.equal(enc.eval()(2, times), enc.index_embed[None])


@pytest.mark.parametrize("attn_mode", ["divided", "joint"])
def test_grad_checkpointing_same_output_and_gradients(attn_mode):
    model = tiny(attn_mode=attn_mode, drop_path_rate=0.3, depth=3).train()
    x = torch.randn(2, 3, 16, 16, 16)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    results = []
    for ckpt in (False, True):
        model.set_grad_checkpointing(ckpt)
        model.zero_grad()
        torch.manual_seed(1)  # same DropPath draws in both runs
        out = model(x, phase_mask=mask, phase_time=torch.tensor([[0.0, 80.0, 160.0]] * 2))
        (out.pow(2).mean()).backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (out0, g0), (out1, g1) = results
    assert torch.allclose(out0, out1, atol=1e-6)
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-6), name


@pytest.mark.parametrize("attn_mode", ["divided", "joint"])
def test_every_parameter_gets_a_gradient(attn_mode):
    model = tiny(attn_mode=attn_mode, pos_embed_type="learnable", init_values=1e-2).train()
    x = torch.randn(2, 3, 16, 16, 16)
    times = torch.tensor([[0.0, 60.0, float("nan")], [0.0, 90.0, 200.0]])  # time MLP and index table both used
    model(x, phase_mask=torch.tensor([[True, True, True], [True, True, False]]), phase_time=times).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad


def test_intermediate_layers_and_ids_keep():
    model = tiny(depth=3)
    x = torch.randn(2, 2, 16, 16, 16)
    with torch.no_grad():
        full = model.forward_features(x)
        layers = model.get_intermediate_layers(x, [0, -1])
        assert [t.shape for t in layers] == [full.shape, full.shape]
        assert torch.allclose(layers[1], full, atol=1e-6)
        raw = model.get_intermediate_layers(x, [2], norm=False)[0]
        assert torch.allclose(model.norm(raw), full, atol=1e-6)
        # Keeping all tokens in permuted order permutes the output (attention is permutation-equivariant).
        perm = torch.stack([torch.randperm(8), torch.randperm(8)])
        kept = model.forward_features(x, ids_keep=perm)
        assert torch.allclose(kept, torch.stack([full[i][:, perm[i]] for i in range(2)]), atol=1e-5)
        assert model.forward_features(x, ids_keep=perm[:, :3]).shape == (2, 2, 3, 32)
    with pytest.raises(ValueError, match="out of range"):
        model.get_intermediate_layers(x, [3])


def test_patch_embed_grid_and_pos_embeddings():
    embed = PatchEmbed3d(patch_size=(4, 8, 8), embed_dim=12)
    assert embed(torch.randn(1, 2, 8, 16, 24)).shape == (1, 2, 2 * 2 * 3, 12)
    pe = sincos_pos_embed_3d((2, 3, 4), 64)  # 64 is not a multiple of 6: trailing channels are zero
    assert pe.shape == (24, 64) and torch.equal(pe[:, 60:], torch.zeros(24, 4))
    assert len({tuple(r.tolist()) for r in pe}) == 24  # every position distinct
    # Trilinear resampling reproduces a field that is linear in the (cell-centred) coordinates.
    d, h, w = torch.meshgrid(*(torch.arange(n) + 0.5 for n in (2, 4, 4)), indexing="ij")
    field = torch.stack([d.flatten() / 2, h.flatten() / 4, w.flatten() / 4], dim=-1)[None]
    up = resample_pos_embed_3d(field, (2, 4, 4), (4, 8, 8))
    d, h, w = torch.meshgrid(*(torch.arange(n) + 0.5 for n in (4, 8, 8)), indexing="ij")
    expect = torch.stack([d.flatten() / 4, h.flatten() / 8, w.flatten() / 8], dim=-1)[None]
    inner = (expect > 0.2).all(-1) & (expect < 0.8).all(-1)  # away from the clamped border cells
    assert up.shape == (1, 256, 3) and torch.allclose(up[inner], expect[inner], atol=1e-6)
    assert torch.equal(resample_pos_embed_3d(pe, (2, 3, 4), (2, 3, 4)), pe)
    # Other input sizes run: sincos is recomputed, learnable is resampled.
    for kind in ("sincos", "learnable"):
        assert tiny(pos_embed_type=kind)(torch.randn(1, 2, 24, 16, 32)).shape == (1, 2, 24, 32)


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match=r"\(16, 16, 20\)"):
        tiny()(torch.randn(1, 2, 16, 16, 20))
    with pytest.raises(ValueError, match="not divisible"):
        ViTEncoder3d(**{**TINY, "img_size": 20})
    with pytest.raises(ValueError, match="must divide"):
        ViTEncoder3d(**{**TINY, "num_heads": 3})
    with pytest.raises(ValueError, match="attn_mode"):
        ViTEncoder3d(**{**TINY, "attn_mode": "axial"})
    with pytest.raises(ValueError, match="pos_embed_type"):
        ViTEncoder3d(**{**TINY, "pos_embed_type": "rope"})
    model = tiny(max_phases=3)
    with pytest.raises(ValueError, match="max_phases"):
        model(torch.randn(1, 4, 16, 16, 16))
    with pytest.raises(ValueError, match="at least one real phase"):
        model(torch.randn(2, 2, 16, 16, 16), phase_mask=torch.tensor([[True, False], [False, False]]))
    with pytest.raises(ValueError, match=r"\[B, T, D, H, W\]"):
        model(torch.randn(2, 16, 16, 16))


def test_parameter_counts_of_named_sizes():
    counts = {}
    with torch.device("meta"):
        for name in ("vit_small", "vit_base", "vit_large"):
            counts[name] = sum(p.numel() for p in create_model(name).parameters())
        spatial_base = sum(p.numel() for p in create_model("vit_base", time_attn=False).parameters())
    assert math.isclose(spatial_base / 1e6, 88.8, abs_tol=0.5)  # ViT-B's 86M + a 16^3-voxel tokenizer
    assert math.isclose(counts["vit_base"] / 1e6, 117.2, abs_tol=0.5)
    assert counts["vit_small"] < counts["vit_base"] < counts["vit_large"]


@pytest.mark.filterwarnings("ignore:torch.meshgrid")  # inside MONAI's sin-cos table
@pytest.mark.parametrize("pos_embed_type", ["learnable", "sincos"])
@pytest.mark.parametrize("qkv_bias", [True, False])
@pytest.mark.parametrize("mode", [{"attn_mode": "joint"}, {"attn_mode": "divided", "time_attn": False}])
def test_matches_monai_vit(pos_embed_type, qkv_bias, mode):
    from monai.networks.nets import ViT

    torch.manual_seed(0)
    ref = ViT(
        in_channels=1, img_size=(16, 16, 24), patch_size=8, hidden_size=48, mlp_dim=192, num_layers=2,
        num_heads=4, pos_embed_type=pos_embed_type, qkv_bias=qkv_bias,
    ).eval()  # fmt: skip
    ours = ViTEncoder3d(
        img_size=(16, 16, 24), patch_size=8, embed_dim=48, depth=2, num_heads=4, mlp_ratio=4.0, qkv_bias=qkv_bias,
        pos_embed_type="learnable", phase_embed=False, norm_eps=1e-5, **mode,
    ).eval()  # fmt: skip
    ours.load_state_dict(convert_monai_vit_state_dict(ref.state_dict()), strict=True)
    x = torch.randn(2, 1, 16, 16, 24)
    with torch.no_grad():
        expected, _ = ref(x)
        assert (ours(x)[:, 0] - expected).abs().max() <= 1e-5


def test_monai_converter_handles_split_qkv_and_rejects_unknown_keys():
    from monai.networks.nets import ViT

    torch.manual_seed(0)
    ref = ViT(in_channels=1, img_size=16, patch_size=8, hidden_size=24, mlp_dim=48, num_layers=1, num_heads=2)
    sd = convert_monai_vit_state_dict(ref.state_dict())
    split = {k: v for k, v in ref.state_dict().items() if "attn.qkv" not in k}
    q, k, v = ref.state_dict()["blocks.0.attn.qkv.weight"].chunk(3)
    split.update({"blocks.0.attn.to_q.weight": q, "blocks.0.attn.to_k.weight": k, "blocks.0.attn.to_v.weight": v})
    assert torch.equal(convert_monai_vit_state_dict(split)["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"])
    with pytest.raises(ValueError, match="rel_pos"):
        convert_monai_vit_state_dict({**ref.state_dict(), "blocks.0.attn.rel_pos.weight": q})


# ---- phases stacked as input channels (the plain spatial ViT baseline) --------------------------------------------
def test_channel_layout_stacks_phases_into_one_token_map_per_patch():
    model = tiny(phase_layout="channels", max_phases=5)
    assert model.patch_embed.proj.in_channels == 5 and model.phase_embed is None
    assert all(blk.time_attn is None for blk in model.blocks)
    x = torch.randn(2, 3, 16, 16, 16)
    with torch.no_grad():
        out = model(x, phase_time=torch.tensor([[0.0, 90.0, 400.0]] * 2))
        # One token map, repeated for every phase: downstream [B, T, N, E] consumers take it unchanged.
        assert out.shape == (2, 3, 8, 32) and torch.equal(out[:, 0], out[:, 2])
        # The channel order carries the phases: times are not used, swapping two phases changes the tokens.
        assert torch.equal(model(x)[:, 0], out[:, 0])
        assert not torch.allclose(model(x[:, [0, 2, 1]])[:, 0], out[:, 0], atol=1e-3)
        # Padded phases (NaN garbage) are zero channels, exactly as a shorter series is padded.
        pad = torch.cat([x, torch.full((2, 2, 16, 16, 16), float("nan"))], dim=1)
        mask = torch.tensor([[True] * 3 + [False] * 2] * 2)
        assert torch.allclose(model(pad, phase_mask=mask)[:, 0], out[:, 0], atol=1e-6)
        layers = model.get_intermediate_layers(x, [0, 1])
        assert [tuple(f.shape) for f in layers] == [(2, 3, 8, 32)] * 2 and torch.allclose(layers[1], out, atol=1e-6)
    with pytest.raises(ValueError, match="phase_layout"):
        tiny(phase_layout="stacked")


def test_channel_layout_joint_model_and_mae_train_and_round_trip(tmp_path):
    from mtl_breast.hub import load_pretrained, save_pretrained

    torch.manual_seed(0)
    mtl = create_model("mtl_vit_test", encoder={"phase_layout": "channels"})
    x, mask = torch.randn(2, 3, 32, 32, 32), torch.tensor([[True, True, True], [True, True, False]])
    out = mtl(x, phase_mask=mask)
    (out["seg_logits"].mean() + out["pcr_logits"].mean()).backward()
    assert all(p.grad is not None for n, p in mtl.named_parameters() if n.startswith("encoder."))
    save_pretrained(mtl, tmp_path / "w")
    loaded = load_pretrained(tmp_path / "w")
    assert loaded.encoder.phase_layout == "channels"
    with torch.no_grad():
        assert torch.equal(mtl.eval()(x, phase_mask=mask)["pcr_logits"], loaded(x, phase_mask=mask)["pcr_logits"])
    mae = create_model("mae_vit_test", phase_layout="channels")
    result = mae(x, phase_mask=mask)
    result["loss"].backward()
    assert torch.isfinite(result["loss"]) and mae.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
