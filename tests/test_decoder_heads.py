"""Segmentation decoder, phase pooling, pCR head and LoRA adapters on random feature tensors (CPU, tiny sizes)."""

from __future__ import annotations

import math

import pytest
import torch
from einops import rearrange
from timm.models.vision_transformer import Block
from torch import nn

from mtl_breast.models.decoder import PhaseAttentionPool, SegDecoder, skip_indices
from mtl_breast.models.heads import PCRHead
from mtl_breast.models.lora import LoRALinear, apply_lora, merge_lora

E = 16


def _inputs(b: int, t: int, spatial: tuple[int, int, int], patch, num_skips: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    patch = (patch,) * 3 if isinstance(patch, int) else patch
    n = math.prod(s // p for s, p in zip(spatial, patch, strict=True))
    feats = [torch.randn(b, t, n, E, generator=g) for _ in range(num_skips)]
    return feats, torch.randn(b, t, *spatial, generator=g)


def _pad(x: torch.Tensor, extra: int, seed: int = 1) -> torch.Tensor:
    """Append ``extra`` phases of random junk on axis 1 (they must be ignored once masked)."""
    junk = torch.randn(x.shape[0], extra, *x.shape[2:], generator=torch.Generator().manual_seed(seed)) * 100
    return torch.cat([x, junk], dim=1)


@pytest.mark.parametrize(
    ("depth", "num_skips", "expected"),
    [(12, 4, [2, 5, 8, 11]), (24, 4, [5, 11, 17, 23]), (6, 4, [1, 2, 4, 5]), (2, 4, [0, 0, 1, 1]), (12, 1, [11])],
)
def test_skip_indices(depth, num_skips, expected):
    idx = skip_indices(depth, num_skips)
    assert idx == expected
    assert idx == sorted(idx) and idx[-1] == depth - 1 and len(idx) == num_skips


def test_skip_indices_bad_args():
    with pytest.raises(ValueError):
        skip_indices(0, 4)
    with pytest.raises(ValueError):
        skip_indices(12, 0)


def test_phase_attention_pool_ignores_padded_phases():
    pool = PhaseAttentionPool(E)
    x = torch.randn(2, 3, 5, E)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[:, 3:] = False
    ref = pool(x)
    out = pool(_pad(x, 2), mask)
    assert out.shape == (2, 5, E)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    # Pooling is a convex combination: a phase-constant input comes back unchanged.
    const = x[:, :1].expand(-1, 3, -1, -1)
    torch.testing.assert_close(pool(const), x[:, 0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    ("patch", "spatial", "num_skips", "stem"),
    [
        (16, (16, 32, 16), 4, True),  # UNETR layout: 4 stages, 3 skips + bottleneck
        (8, (16, 8, 24), 4, True),  # 3 stages: the deepest skip joins the bottleneck
        (8, (8, 16, 8), 1, False),  # bottleneck only, no stem
        ((4, 8, 8), (8, 16, 8), 3, True),  # anisotropic patch
    ],
)
def test_decoder_output_shape(patch, spatial, num_skips, stem):
    dec = SegDecoder(embed_dim=E, patch_size=patch, num_skips=num_skips, feature_size=4, out_channels=3, stem=stem)
    feats, image = _inputs(2, 2, spatial, patch, num_skips)
    assert dec(feats, image).shape == (2, 3, *spatial)


def test_decoder_any_phase_count_same_weights():
    dec = SegDecoder(embed_dim=E, patch_size=8, num_skips=2, feature_size=4)
    for t in (2, 5, 8):
        feats, image = _inputs(1, t, (16, 8, 8), 8, 2)
        out = dec(feats, image, torch.ones(1, t, dtype=torch.bool))
        assert out.shape == (1, 2, 16, 8, 8) and torch.isfinite(out).all()


@pytest.mark.parametrize("patch", [8, 16])
def test_decoder_padded_phases_do_not_change_output(patch):
    dec = SegDecoder(embed_dim=E, patch_size=patch, num_skips=3, feature_size=4).eval()
    feats, image = _inputs(2, 3, (16, 16, 32), patch, 3)
    ref = dec(feats, image)
    mask = torch.tensor([[True] * 3 + [False] * 3] * 2)
    out = dec([_pad(f, 3, seed=i) for i, f in enumerate(feats)], _pad(image, 3), mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    # Mixed batch: sample 0 with 2 real phases, sample 1 with 3; each matches its unpadded run.
    mask2 = torch.tensor([[True, True, False], [True, True, True]])
    mixed = dec(feats, image, mask2)
    alone = dec([f[:1, :2] for f in feats], image[:1, :2])
    torch.testing.assert_close(mixed[:1], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1:], ref[1:], atol=1e-5, rtol=0)


def test_decoder_every_parameter_gets_grad():
    torch.manual_seed(0)
    dec = SegDecoder(embed_dim=E, patch_size=8, num_skips=4, feature_size=4)
    feats, image = _inputs(2, 3, (16, 16, 8), 8, 4)
    feats = [f.requires_grad_() for f in feats]
    out = dec(feats, image, torch.tensor([[True, True, True], [True, True, False]]))
    (out * torch.randn_like(out)).sum().backward()
    for name, p in dec.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)


def test_decoder_bad_args():
    dec = SegDecoder(embed_dim=E, patch_size=8, num_skips=2, feature_size=4, in_phases_max=4)
    feats, image = _inputs(1, 2, (16, 16, 16), 8, 2)
    with pytest.raises(ValueError, match="divisible"):
        dec(feats, image[..., :12])
    with pytest.raises(ValueError, match="feature maps"):
        dec(feats[:1], image)
    with pytest.raises(ValueError, match="features\\[0\\]"):
        dec([feats[0][..., :8], feats[1]], image)
    with pytest.raises(ValueError, match="phase_mask"):
        dec(feats, image, torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="phases"):
        f5, im5 = _inputs(1, 5, (16, 16, 16), 8, 2)
        dec(f5, im5)
    with pytest.raises(ValueError, match="image"):
        dec(feats, image[0])
    for bad in ({"patch_size": 12}, {"patch_size": (8, 8)}, {"norm": "layer"}, {"num_skips": 0}):
        with pytest.raises(ValueError):
            SegDecoder(**{"embed_dim": E, "patch_size": 8, **bad})


def test_pcr_head_shape_and_phase_invariance():
    head = PCRHead(embed_dim=E).eval()
    tokens = torch.randn(3, 2, 8, E)
    ref = head(tokens)
    assert ref.shape == (3,)
    mask = torch.tensor([[True, True, False]] * 3)
    torch.testing.assert_close(head(_pad(tokens, 1), mask), ref, atol=1e-6, rtol=0)


def test_pcr_head_prob_weighting():
    torch.manual_seed(0)
    head = PCRHead(embed_dim=E).eval()
    tokens = torch.randn(2, 1, 8, E)  # grid 2x2x2 of patch 4 on an 8^3 volume
    prob = torch.zeros(2, 1, 8, 8, 8)
    prob[:, :, 4:, 4:, 4:] = 1.0  # tumour fills the last patch (token 7, row-major d h w)
    plain = head(tokens)
    weighted = head(tokens, seg_prob=prob, grid=(2, 2, 2))
    assert not torch.allclose(plain, weighted)
    torch.testing.assert_close(head(tokens, seg_prob=prob), weighted)  # grid inferred for an isotropic patch
    # With a strong prior the pooled vector is the tumour token itself.
    with torch.no_grad():
        head.prior_scale.fill_(50.0)
        expected = head.fc(head.norm(tokens[:, 0, 7])).squeeze(-1)
        torch.testing.assert_close(head(tokens, seg_prob=prob, grid=(2, 2, 2)), expected, atol=1e-4, rtol=1e-4)
    # An empty predicted mask biases every token equally: same as no prior.
    torch.testing.assert_close(head(tokens, seg_prob=torch.zeros_like(prob)), plain, atol=1e-6, rtol=0)
    # prob_weighted=False ignores seg_prob.
    off = PCRHead(embed_dim=E, prob_weighted=False)
    torch.testing.assert_close(off(tokens, seg_prob=prob), off(tokens))


def test_pcr_head_grads_and_bad_args():
    torch.manual_seed(0)
    head = PCRHead(embed_dim=E, hidden_dim=8, dropout=0.1, detach_prob=False)
    tokens = torch.randn(2, 3, 8, E, requires_grad=True)
    prob = torch.rand(2, 1, 8, 8, 8, requires_grad=True)
    head(tokens, torch.tensor([[True] * 3, [True, True, False]]), seg_prob=prob).sum().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert prob.grad is not None
    detached = PCRHead(embed_dim=E)
    prob2 = torch.rand(2, 1, 8, 8, 8, requires_grad=True)
    detached(tokens, seg_prob=prob2).sum().backward()
    assert prob2.grad is None
    with pytest.raises(ValueError, match="grid"):
        head(tokens, seg_prob=torch.rand(2, 1, 8, 8, 6))
    with pytest.raises(ValueError, match="tokens"):
        head(tokens[..., :8])
    with pytest.raises(ValueError, match="phase_mask"):
        head(tokens, torch.ones(2, 2, dtype=torch.bool))


class _TinyViT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(1, E, 2, stride=2)  # named "proj" but not a Linear: left alone
        self.blocks = nn.Sequential(Block(E, num_heads=2), Block(E, num_heads=2))
        self.norm = nn.LayerNorm(E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = rearrange(self.patch_embed.proj(x), "b e d h w -> b (d h w) e")
        return self.norm(self.blocks(x))


def test_lora_zero_init_freeze_and_merge():
    torch.manual_seed(0)
    model = _TinyViT().eval()
    x = torch.randn(2, 1, 4, 4, 4)
    ref = model(x)
    plain_keys = set(model.state_dict())
    names = apply_lora(model, rank=4, alpha=8, freeze_others=True)
    assert names == [f"blocks.{i}.attn.{n}" for i in range(2) for n in ("qkv", "proj")]
    assert isinstance(model.blocks[0].attn.qkv, LoRALinear) and isinstance(model.patch_embed.proj, nn.Conv3d)
    assert "blocks.0.attn.qkv.base.weight" in model.state_dict()
    torch.testing.assert_close(model(x), ref, atol=0, rtol=0)  # B = 0: exactly the pretrained function
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.lora_{ab}" for m in names for ab in "ab"}
    assert apply_lora(model) == []  # already wrapped

    # A "trained" adapter changes the output; gradients reach only the adapters.
    with torch.no_grad():
        for m in names:
            model.get_submodule(m).lora_b.normal_(std=0.1)
    adapted = model(x)
    assert not torch.allclose(adapted, ref)
    adapted.square().sum().backward()
    assert all(model.get_submodule(m).lora_a.grad is not None for m in names)
    assert model.blocks[0].attn.qkv.base.weight.grad is None

    assert merge_lora(model) == names
    assert set(model.state_dict()) == plain_keys
    assert type(model.blocks[0].attn.qkv) is nn.Linear
    torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)


def test_lora_freezes_only_wrapped_by_default_and_bad_args():
    model = _TinyViT()
    apply_lora(model, target_names=("qkv",), rank=2)
    assert not model.blocks[0].attn.qkv.base.weight.requires_grad
    assert model.blocks[0].attn.proj.weight.requires_grad and model.norm.weight.requires_grad
    with pytest.raises(ValueError):
        LoRALinear(nn.Linear(4, 4), rank=0)
    with pytest.raises(ValueError):
        LoRALinear(nn.Conv1d(4, 4, 1))  # type: ignore[arg-type]
