"""The learned kinetic pathway of the pCR head: what it reads (tumour and shell tokens per phase), what it ignores
(tokens far from the tumour, padded phases), and that it can learn a washout the hand features are not given."""

from __future__ import annotations

import math

import pytest
import torch

from mtl_breast.metrics.classification import roc_auc
from mtl_breast.models.heads import PCRHead
from mtl_breast.models.registry import create_model
from mtl_breast.models.tumour_pathway import LearnedKineticPathway, tumour_and_shell_weights

GRID = (4, 4, 4)  # tokens of a 32^3 window with 8^3 patches


def _tumour(b: int = 2, centre: int = 12, radius: int = 4) -> torch.Tensor:
    """A cube tumour [B, 1, 32, 32, 32] in the first octant of the window."""
    mask = torch.zeros(b, 1, 32, 32, 32)
    lo, hi = centre - radius, centre + radius
    mask[:, :, lo:hi, lo:hi, lo:hi] = 1.0
    return mask


def test_tumour_and_shell_weights_are_patch_fractions():
    mask = torch.zeros(1, 1, 32, 32, 32)
    mask[:, :, 0:8, 0:8, 0:4] = 1.0  # half of token 0
    inside, around = tumour_and_shell_weights(mask, GRID, shell=2)
    assert inside.shape == around.shape == (1, 64)
    assert inside[0, 0] == pytest.approx(0.5)
    assert inside[0, 1:].sum() == 0
    # The shell is the tumour dilated by 2 voxels less the tumour (x, y 0..10, z 0..6): z 4..6 in token 0, and a
    # 2-voxel layer in the next token along x and along y; the next token along z (z 8..16) is out of reach.
    assert around[0, 0] == pytest.approx(8 * 8 * 2 / 512)
    assert around[0, 16] == pytest.approx(2 * 8 * 6 / 512)  # token (1, 0, 0)
    assert around[0, 4] == pytest.approx(8 * 2 * 6 / 512)  # token (0, 1, 0)
    assert around[0, 1] == 0 and around[0, 63] == 0


def test_learned_pathway_shapes_padding_and_locality():
    torch.manual_seed(0)
    pathway = LearnedKineticPathway(16, num_layers=2, shell=2).eval()
    tokens = [torch.randn(2, 4, 64, 16) for _ in range(2)]
    tumour = _tumour()
    time = torch.tensor([[0.0, 60.0, 120.0, 240.0], [0.0, 90.0, math.nan, 300.0]])
    out = pathway(tokens, tumour, GRID, phase_time=time)
    assert out.shape == (2,) and torch.isfinite(out).all()

    # A padded phase (False in phase_mask) changes nothing, whatever it holds.
    padded = [torch.cat([t, torch.randn(2, 1, 64, 16) * 100], dim=1) for t in tokens]
    mask = torch.tensor([[True] * 4 + [False]] * 2)
    time5 = torch.cat([time, torch.full((2, 1), 999.0)], dim=1)
    assert torch.allclose(pathway(padded, tumour, GRID, mask, time5), out, atol=1e-5)

    # Tokens outside the tumour and its shell do not reach the term: change the far octant's tokens.
    inside, around = tumour_and_shell_weights(tumour, GRID, shell=2)
    far = (inside[0] == 0) & (around[0] == 0)
    assert far.sum() > 30
    moved = [t.clone() for t in tokens]
    for t in moved:
        t[:, :, far] += 50.0
    assert torch.allclose(pathway(moved, tumour, GRID, phase_time=time), out, atol=1e-5)
    # ... while tumour tokens of a post-contrast phase do.
    changed = [t.clone() for t in tokens]
    changed[-1][:, 2, inside[0] > 0] += 1.0
    assert not torch.allclose(pathway(changed, tumour, GRID, phase_time=time), out, atol=1e-3)


def test_learned_pathway_empty_mask_and_single_phase_are_finite():
    pathway = LearnedKineticPathway(8).eval()
    tokens = [torch.randn(3, 1, 64, 8)]
    out = pathway(tokens, torch.zeros(3, 1, 32, 32, 32), GRID)
    assert torch.isfinite(out).all()


def test_learned_pathway_bad_arguments():
    with pytest.raises(ValueError, match="num_layers"):
        LearnedKineticPathway(8, num_layers=0)
    with pytest.raises(ValueError, match="shell"):
        LearnedKineticPathway(8, shell=-1)
    pathway = LearnedKineticPathway(8, num_layers=2)
    with pytest.raises(ValueError, match="pools 2 encoder layer"):
        pathway([torch.randn(1, 2, 64, 8)], _tumour(1), GRID)


def test_pcr_head_parts_sum_to_the_logit_and_name_the_pathways():
    torch.manual_seed(0)
    head = PCRHead(embed_dim=16, kinetic=True, kinetic_features="curve", learned=True, learned_layers=2).eval()
    layers = [torch.randn(2, 3, 64, 16) for _ in range(2)]
    image = torch.rand(2, 3, 32, 32, 32)
    prob = _tumour()
    time = torch.tensor([[0.0, 60.0, 180.0]] * 2)
    parts = head.parts(layers[-1], seg_prob=prob, grid=GRID, image=image, phase_time=time, layers=layers)
    assert set(parts) == {"tokens", "learned", "kinetic"}
    logit = head(layers[-1], seg_prob=prob, grid=GRID, image=image, phase_time=time, layers=layers)
    assert torch.allclose(parts["tokens"] + parts["learned"] + parts["kinetic"], logit)
    # A head without the pathway has no such term, and the old forward is unchanged.
    plain = PCRHead(embed_dim=16)
    assert set(plain.parts(layers[-1], seg_prob=prob, grid=GRID)) == {"tokens"}
    with pytest.raises(ValueError, match="learned kinetic pathway needs seg_prob"):
        head.parts(layers[-1], grid=GRID, image=image, layers=layers)


def test_joint_model_returns_pcr_parts_and_learned_only_has_no_hand_features():
    torch.manual_seed(0)
    model = create_model("mtl_vit_test", img_size=32,
                         pcr_head={"kinetic": False, "learned": True, "learned_layers": 2}).eval()
    assert model.pcr_head.kinetic_fc is None
    x = torch.randn(1, 3, 32, 32, 32)
    out = model(x, phase_time=torch.tensor([[0.0, 60.0, 120.0]]))
    assert set(out["pcr_parts"]) == {"tokens", "learned"}
    assert torch.allclose(out["pcr_parts"]["tokens"] + out["pcr_parts"]["learned"], out["pcr_logits"])


def _washout_tokens(n: int, seed: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Tokens whose tumour patches carry an enhancement curve in one channel (plus noise everywhere); the label is
    whether the curve washes out (late phases below the first post-contrast one) or keeps rising."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(n, 4, 64, 16, generator=g) * 0.5
    inside, _ = tumour_and_shell_weights(_tumour(1, centre=16, radius=8), GRID, shell=0)  # 8 whole tokens
    tumour_tokens = inside[0] > 0
    label = (torch.rand(n, generator=g) < 0.5).float()
    peak = 1.0 + torch.rand(n, generator=g)
    slope = torch.where(label > 0, -0.4, 0.4) * peak
    curve = torch.stack([torch.zeros(n), peak, peak + 0.5 * slope, peak + slope], dim=1)  # [n, T]
    tokens[:, :, tumour_tokens, 0] += curve[:, :, None] * 2.0
    return [tokens], _tumour(n, centre=16, radius=8), label


def test_learned_pathway_learns_a_washout_and_needs_the_post_contrast_phases():
    """Trained on tokens that carry a curve, it separates washout from persistent enhancement on new cases; with
    the post-contrast phases flattened (all equal to the first), it cannot."""
    torch.manual_seed(0)
    pathway = LearnedKineticPathway(16, shell=0, dropout=0.0)
    train_tokens, train_mask, train_y = _washout_tokens(256, seed=1)
    time = torch.tensor([[0.0, 60.0, 180.0, 360.0]]).expand(256, -1)
    opt = torch.optim.AdamW(pathway.parameters(), lr=3e-3)
    for _ in range(150):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            pathway(train_tokens, train_mask, GRID, phase_time=time), train_y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    pathway.eval()
    test_tokens, test_mask, test_y = _washout_tokens(200, seed=2)
    with torch.no_grad():
        score = pathway(test_tokens, test_mask, GRID, phase_time=time[:200]).numpy()
        flat = [t.clone() for t in test_tokens]
        flat[0][:, 2:] = flat[0][:, 1:2]
        flat_score = pathway(flat, test_mask, GRID, phase_time=time[:200]).numpy()
    assert roc_auc(test_y.numpy(), score) > 0.95
    assert roc_auc(test_y.numpy(), flat_score) < 0.75


def test_inference_terms_sum_to_the_calibrated_logit_with_flips():
    from mtl_breast.predictor import InferenceSettings, predict_volume, predict_volume_parts

    torch.manual_seed(0)
    model = create_model("mtl_vit_test", img_size=32, pcr_head={"kinetic_features": "curve", "learned": True}).eval()
    image, times = torch.rand(3, 40, 36, 32), torch.tensor([0.0, 70.0, 200.0])
    settings = InferenceSettings(roi_size=(32, 32, 32), tta_flips=True, pcr_temperature=2.0)
    prob, logit, terms = predict_volume_parts(model, image, times, settings)
    assert set(terms) == {"tokens", "learned", "kinetic"}
    assert sum(terms.values()) == pytest.approx(logit, abs=1e-5)
    prob2, logit2 = predict_volume(model, image, times, settings)
    assert logit2 == logit and (prob2 == prob).all()
