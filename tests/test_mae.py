"""MAEPretrainer: patching, masking, loss and a short learning run (tiny sizes, CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtl_breast.models.encoder import ViTEncoder3d
from mtl_breast.models.mae import MAEPretrainer
from mtl_breast.models.registry import create_model


def tiny_mae(**overrides) -> MAEPretrainer:
    torch.manual_seed(0)
    encoder = ViTEncoder3d(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    args = {"decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2, **overrides}
    return MAEPretrainer(encoder, **args)


def test_patchify_unpatchify_round_trip_and_token_order():
    encoder = ViTEncoder3d(img_size=(8, 16, 24), patch_size=(4, 8, 4), embed_dim=12, depth=1, num_heads=2)
    mae = MAEPretrainer(encoder, decoder_embed_dim=12, decoder_depth=1, decoder_num_heads=2)
    x = torch.randn(2, 3, 8, 16, 24)
    patches = mae.patchify(x)
    assert patches.shape == (2, 3, 2 * 2 * 6, 4 * 8 * 4)
    assert torch.equal(mae.unpatchify(patches, (2, 2, 6)), x)
    # Patch n of patchify is exactly what the tokenizer turns into token n (targets line up with tokens).
    conv = encoder.patch_embed.proj
    tokens = patches @ conv.weight.reshape(12, -1).T + conv.bias
    assert torch.allclose(tokens, encoder.patch_embed(x), atol=1e-5)


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
def test_random_masking_keeps_int_n_times_one_minus_ratio(ratio):
    mae = tiny_mae(mask_ratio=ratio)
    n = 27
    ids_keep, ids_restore, mask = mae.random_masking(3, n)
    keep = int(n * (1 - ratio))
    assert ids_keep.shape == (3, keep)
    assert torch.equal(mask.sum(1), torch.full((3,), float(n - keep)))
    assert torch.equal(torch.gather(mask, 1, ids_keep), torch.zeros(3, keep))  # kept = unmasked
    shuffle = torch.argsort(ids_restore, dim=1)
    assert torch.equal(torch.gather(shuffle, 1, ids_restore), torch.arange(n).expand(3, n))


def test_forward_tube_mask_and_visible_only_encoding():
    mae = tiny_mae()
    seen = []
    mae.encoder.blocks[0].register_forward_hook(lambda mod, args, out: seen.append(args[0].shape))
    out = mae(torch.randn(2, 3, 16, 16, 16))
    n, keep = 8, int(8 * 0.25)
    assert out["pred"].shape == (2, 3, n, 512) and out["mask"].shape == (2, 3, n)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    assert torch.equal(out["mask"], out["mask"][:, :1].expand(-1, 3, -1))  # same patches hidden in every phase
    assert torch.equal(out["mask"].sum(-1), torch.full((2, 3), float(n - keep)))
    assert seen == [torch.Size([2, 3, keep, 32])]  # the encoder saw the visible tokens only


def test_whole_phase_masking_rules():
    mae = tiny_mae(phase_mask_ratio=1.0)
    real = torch.tensor([[True, True, True, False], [True, True, False, False], [True, True, True, True]])
    for _ in range(20):
        hidden = mae.random_phase_masking(real)
        assert not hidden[:, 0].any() and not (hidden & ~real).any()
        assert hidden.sum(1).tolist() == [1, 0, 1]  # never when only 2 real phases would leave one
    out = mae(torch.randn(3, 4, 16, 16, 16), phase_mask=real, phase_time=torch.tensor([[0.0, 60, 120, 180]] * 3))
    fully_hidden = (out["mask"] == 1).all(-1)
    assert fully_hidden[0, 1:3].sum() == 1 and fully_hidden[2, 1:].sum() == 1 and not fully_hidden[1].any()


def test_hidden_phase_content_never_reaches_the_prediction():
    mae = tiny_mae(phase_mask_ratio=1.0).eval()
    x = torch.randn(1, 3, 16, 16, 16)
    torch.manual_seed(5)
    out = mae(x)
    hidden = int((out["mask"][0] == 1).all(-1).nonzero()[0, 0])
    x2 = x.clone()
    x2[:, hidden] = torch.randn(16, 16, 16) * 10
    torch.manual_seed(5)
    out2 = mae(x2)
    assert torch.equal(out["mask"], out2["mask"])
    assert torch.allclose(out["pred"], out2["pred"], atol=1e-6)


def test_loss_counts_masked_patches_of_real_phases_only():
    mae = tiny_mae(norm_pix_loss=False)
    x = torch.randn(2, 3, 16, 16, 16)
    pred = torch.randn(2, 3, 8, 512)
    mask = torch.zeros(2, 3, 8)
    mask[:, :, :6] = 1
    phase_mask = torch.tensor([[True, True, False], [True, True, True]])
    loss = mae.forward_loss(x, pred, mask, phase_mask)
    expected = ((pred - mae.patchify(x)) ** 2).mean(-1)
    weight = mask * phase_mask[:, :, None]
    assert torch.allclose(loss, (expected * weight).sum() / weight.sum())
    changed = pred.clone()
    changed[:, :, 6:] += 5.0  # visible patches
    changed[0, 2] += 5.0  # a padded phase
    x_nan = x.clone()
    x_nan[0, 2] = float("nan")  # padding may hold anything
    assert torch.equal(mae.forward_loss(x_nan, changed, mask, phase_mask), loss)
    changed[1, 0, 0] += 1.0  # a masked patch of a real phase
    assert not torch.equal(mae.forward_loss(x, changed, mask, phase_mask), loss)


def _tube_normalised(x: torch.Tensor, mae) -> torch.Tensor:
    """Reference: each spatial patch normalised with one mean/std over all phases and voxels."""
    target = mae.patchify(x)  # [B, T, N, P]
    tube = target.transpose(1, 2).flatten(2)  # [B, N, T*P]
    mean, var = tube.mean(-1), tube.var(-1, unbiased=False)
    return (target - mean[:, None, :, None]) / (var[:, None, :, None] + 1e-6).sqrt()


def test_norm_pix_loss_and_reconstruct():
    mae = tiny_mae(norm_pix_loss=True)
    x = torch.randn(2, 2, 16, 16, 16) * 3 + 1
    perfect = _tube_normalised(x, mae)
    mask = (torch.rand(2, 2, 8) > 0.5).float()
    assert mae.forward_loss(x, perfect, mask) < 1e-10
    masked, recon = mae.reconstruct(perfect, mask, x)
    assert masked.shape == recon.shape == x.shape
    assert torch.allclose(recon, x, atol=1e-4)
    hide = mae.unpatchify(mask[..., None].expand(-1, -1, -1, 512), (2, 2, 2)).bool()
    assert torch.equal(masked[~hide], x[~hide]) and (masked[hide] == 0).all()


def test_enhancement_target_is_phase_zero_and_the_subtractions():
    """The subtraction target: phase 0 as acquired, later phases minus phase 0; a perfect prediction reconstructs
    the input, and a change of phase 0 alone moves every subtraction the opposite way."""
    mae = tiny_mae(norm_pix_loss=True, target="enhancement")
    x = torch.randn(2, 3, 16, 16, 16) * 2 + 1
    target, mean, std = mae._target(x)
    patches = mae.patchify(x)
    assert torch.allclose(target[:, 0], patches[:, 0]) and torch.allclose(target[:, 2], patches[:, 2] - patches[:, 0])
    perfect = (target - mean) / std
    mask = (torch.rand(2, 3, 8) > 0.5).float()
    assert mae.forward_loss(x, perfect, mask) < 1e-10
    masked, recon = mae.reconstruct(perfect, mask, x)
    assert torch.allclose(recon, x, atol=1e-4)
    hide = mae.unpatchify(mask[..., None].expand(-1, -1, -1, 512), (2, 2, 2)).bool()
    assert torch.allclose(masked[~hide], x[~hide], atol=1e-6) and (masked[hide] == 0).all()
    brighter = x.clone()
    brighter[:, 0] += 1.0
    moved = mae._target(brighter)[0] - target
    assert torch.allclose(moved[:, 0], torch.ones_like(moved[:, 0]))
    assert torch.allclose(moved[:, 1:], -torch.ones_like(moved[:, 1:]))
    with pytest.raises(ValueError, match="target must be"):
        tiny_mae(target="difference")


def test_normalised_target_keeps_the_enhancement_between_phases():
    """A uniform enhancement change in one phase changes the target: MAE must predict wash-in and washout."""
    mae = tiny_mae(norm_pix_loss=True)
    x = torch.randn(1, 3, 16, 16, 16)
    washout = x.clone()
    washout[:, 2] -= 0.8  # the last phase loses signal everywhere (patch-wise it is a pure offset)
    t1, m1, s1 = mae._target(x)
    t2, m2, s2 = mae._target(washout)
    norm1, norm2 = (t1 - m1) / s1, (t2 - m2) / s2
    assert (norm1[:, 2] - norm2[:, 2]).abs().mean() > 0.1
    # A per-phase normalisation would have made the two targets identical: that is what the tube statistics avoid.
    per_phase = [(t - t.mean(-1, keepdim=True)) / t.std(-1, keepdim=True) for t in (t1, t2)]
    assert torch.allclose(per_phase[0], per_phase[1], atol=1e-5)
    # Padded phases do not enter the statistics of a tube.
    padded = torch.cat([x, torch.full_like(x[:, :1], float("nan"))], dim=1)
    _, mp, sp = mae._target(padded, torch.tensor([[True, True, True, False]]))
    assert torch.allclose(mp, m1, atol=1e-6) and torch.allclose(sp, s1, atol=1e-5)


def test_every_parameter_gets_a_gradient():
    mae = tiny_mae(phase_mask_ratio=0.5).train()
    times = torch.tensor([[0.0, 60.0, float("nan")], [0.0, 90.0, 200.0]])
    mae(torch.randn(2, 3, 16, 16, 16), phase_time=times)["loss"].backward()
    no_grad = [n for n, p in mae.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad


def test_padded_phase_changes_nothing_in_the_mae():
    mae = tiny_mae().eval()
    x = torch.randn(1, 2, 16, 16, 16)
    padded = torch.cat([x, torch.randn(1, 1, 16, 16, 16)], 1)
    torch.manual_seed(3)  # same tube mask in both runs
    ref = mae(x)
    torch.manual_seed(3)
    out = mae(padded, phase_mask=torch.tensor([[True, True, False]]))
    assert torch.allclose(out["pred"][:, :2], ref["pred"], atol=1e-5)
    assert torch.allclose(out["loss"], ref["loss"], atol=1e-6)


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="mask_ratio"):
        tiny_mae(mask_ratio=1.0)
    with pytest.raises(ValueError, match="decoder_num_heads"):
        tiny_mae(decoder_embed_dim=15, decoder_num_heads=2)
    with pytest.raises(ValueError, match="not divisible"):
        tiny_mae()(torch.randn(1, 2, 16, 16, 12))


def test_mae_learns_smooth_volumes():
    """100 AdamW steps of mae_vit_test on four smooth two-phase volumes at least halve the loss (~3 s)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(4, 1, 2, 2, 2, generator=g)
    base = F.interpolate(coarse, size=(32, 32, 32), mode="trilinear", align_corners=True)
    data = base * (1 + torch.rand(4, 2, 1, 1, 1, generator=g))  # phase 1 = enhanced phase 0
    model = create_model("mae_vit_test")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(100):
        loss = model(data)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_step_on_gpu_with_checkpointing_and_padding():
    model = create_model("mae_vit_test", grad_checkpointing=True, phase_mask_ratio=0.5).cuda()
    x = torch.randn(2, 4, 32, 32, 32, device="cuda")
    phase_mask = torch.tensor([[True, True, True, False], [True] * 4], device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x, phase_mask=phase_mask)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
