"""bench/representation.py: the ridge probe, the mask-weighted pooling, the random-init encoder and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import load_bench_script
from torch import nn

from mtl_breast.features import pad_to_patch_multiple
from mtl_breast.hub import save_pretrained
from mtl_breast.models.registry import create_model
from mtl_breast.phantoms.collection import generate_dataset

rep = load_bench_script("representation")


def test_ridge_cv_recovers_a_linear_target_and_not_noise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 12))
    y = x @ rng.normal(size=12) + 0.05 * rng.normal(size=60)
    fit = rep.ridge_cv(x, y, seed=0)
    assert np.isfinite(fit["pred"]).all()
    assert rep.r2_score(y, fit["pred"]) > 0.98
    low, high = rep.r2_interval(y, fit["pred"])
    assert 0.9 < low <= high <= 1.0

    noise = rng.normal(size=60)
    r2 = rep.r2_score(noise, rep.ridge_cv(x, noise, seed=0)["pred"])
    assert r2 < 0.1
    # more features than cases, some missing: still finite, still no signal found
    wide = rng.normal(size=(40, 200))
    wide[rng.random(wide.shape) < 0.05] = np.nan
    fit = rep.ridge_cv(wide, noise[:40], seed=1)
    assert np.isfinite(fit["pred"]).all() and rep.r2_score(noise[:40], fit["pred"]) < 0.1
    # seeded: the same call gives the same predictions
    np.testing.assert_array_equal(fit["pred"], rep.ridge_cv(wide, noise[:40], seed=1)["pred"])


def test_token_fractions_follow_the_encoders_token_order():
    mask = torch.zeros(8, 8, 16)
    mask[4:6, 0:4, 8:12] = 1  # half of patch (1, 0, 2) on a 4^3 patch grid of 2 x 2 x 4 tokens
    fractions = rep.token_fractions(mask, (4, 4, 4))
    expected = torch.zeros(2, 2, 4)
    expected[1, 0, 2] = 0.5
    torch.testing.assert_close(fractions, expected.reshape(-1))


class PatchOnly(nn.Module):
    """An encoder whose tokens see only their own patch (the real one attends across the volume), so the
    pooling's own locality shows through: an image change outside the tumour's patches must change nothing."""

    def __init__(self, patch: int = 4, embed_dim: int = 6):
        super().__init__()
        self.patch_size, self.max_phases = (patch,) * 3, 8
        self.proj = nn.Conv3d(1, embed_dim, patch, stride=patch)

    def forward_features(self, x, phase_mask=None, phase_time=None):
        b, t = x.shape[:2]
        tokens = self.proj(x.flatten(0, 1)[:, None]).flatten(2).transpose(1, 2)  # [B*T, N, E], row-major grid
        return tokens.reshape(b, t, *tokens.shape[1:])


def test_pooling_ignores_tokens_outside_the_tumour():
    torch.manual_seed(0)
    tokens = torch.randn(3, 8, 5)
    weights = torch.tensor([0.0, 1.0, 0.5, 0.0, 0.0, 0.25, 0.0, 0.0])
    pooled = rep.pool_tokens(tokens, weights)
    changed = tokens.clone()
    changed[:, weights == 0] += 100.0
    torch.testing.assert_close(rep.pool_tokens(changed, weights), pooled)
    changed[:, 2] += 1.0
    assert not torch.allclose(rep.pool_tokens(changed, weights), pooled)
    expected = (tokens[:, 1] + 0.5 * tokens[:, 2] + 0.25 * tokens[:, 5]) / 1.75
    torch.testing.assert_close(pooled, expected)

    # Through images and masks: voxels in patches the tumour does not touch change nothing, inside they do.
    encoder = PatchOnly()
    image, mask = torch.randn(3, 8, 8, 8), torch.zeros(8, 8, 8)
    mask[1:3, 1:3, 1:3] = 1  # inside patch (0, 0, 0) only
    features = rep.pooled_features(encoder, image, mask, None, shell=0)
    assert set(features) == {"tumour"} and features["tumour"].shape == (4 * 6,)
    outside = image.clone()
    outside[:, 4:, :, :] = 50.0
    np.testing.assert_array_equal(rep.pooled_features(encoder, outside, mask, None, shell=0)["tumour"],
                                  features["tumour"])
    inside = image.clone()
    inside[:, 0, 0, 0] += 5.0  # same patch as the tumour, outside the mask itself: the token changes
    assert not np.allclose(rep.pooled_features(encoder, inside, mask, None, shell=0)["tumour"], features["tumour"])
    # the shell reads the ring around the tumour: it sees the patch next door, the tumour pooling does not
    with_shell = rep.pooled_features(encoder, outside, mask, None, shell=2)
    assert not np.allclose(with_shell["shell"], rep.pooled_features(encoder, image, mask, None, shell=2)["shell"])


def test_phase_summary_has_a_fixed_length_whatever_the_phase_count():
    for t in (2, 3, 6):
        per_phase = torch.arange(t * 4, dtype=torch.float32).reshape(t, 4)
        summary = rep.summarise_phases(per_phase)
        assert summary.shape == (16,)
        torch.testing.assert_close(summary[8:12], per_phase[1] - per_phase[0])
        assert rep.summarise_phases(per_phase, "concat", max_phases=8).shape == (32,)
    mask = torch.zeros(5, 5, 5)
    mask[2, 2, 2] = 1
    shell = rep.shell_of(mask, 1)
    assert shell.sum() == 26 and shell[2, 2, 2] == 0


def test_random_encoder_is_deterministic_given_the_seed():
    config = {"arch": "mae_vit_test", "model_args": {"img_size": 16}}
    a, b, c = rep.random_encoder(config, 0), rep.random_encoder(config, 0), rep.random_encoder(config, 1)
    for key, value in a.state_dict().items():
        torch.testing.assert_close(value, b.state_dict()[key])
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())
    before = torch.get_rng_state()
    rep.random_encoder(config, 0)
    assert torch.equal(before, torch.get_rng_state())  # the global generator is left alone
    image, mask = torch.randn(4, 16, 16, 16), torch.zeros(16, 16, 16)
    mask[4:10, 4:10, 4:10] = 1
    times = torch.tensor([0.0, 90.0, 180.0, 270.0])
    np.testing.assert_array_equal(rep.pooled_features(a, image, mask, times)["tumour"],
                                  rep.pooled_features(b, image, mask, times)["tumour"])


@pytest.fixture(scope="module")
def tiny_phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("representation") / "data"
    generate_dataset(root, num_cases=8, seed=5, size=16, test_fraction=0.0)
    return root


def test_cli_end_to_end(tiny_phantoms, tmp_path):
    weights = tmp_path / "mae"
    torch.manual_seed(3)
    save_pretrained(create_model("mae_vit_test", img_size=16), weights)
    joint = tmp_path / "mtl"  # a joint model's encoder is read the same way
    save_pretrained(create_model("mtl_vit_test", encoder={"img_size": 16}), joint)
    out, table = tmp_path / "out" / "probe.json", tmp_path / "out" / "probe.md"
    code = rep.main(["--data", str(tiny_phantoms), "--weights", f"mae={weights}", "--weights", f"mtl={joint}",
                     "--out", str(out), "--markdown", str(table), "--device", "cpu", "--folds", "3"])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["cases"] == 8 and result["device"].startswith("cpu")
    assert result["window"] == [16, 16, 16]
    sets = ["mae", "mae+shell", "mtl", "mtl+shell", "random (seed 0)", "random (seed 0)+shell", "hand: curve",
            "hand: concentration", "hand: rim", "hand: curve + 256 noise"]
    assert list(result["feature_dims"]) == sets
    assert result["feature_dims"]["mae"] == 4 * 64 and result["feature_dims"]["mae+shell"] == 8 * 64
    assert result["feature_dims"]["hand: curve + 256 noise"] == 6 + 256
    targets = set(result["table"])
    assert {"ln_ktrans", "ln_kep", "ln_fp", "ln_ps", "ve", "vp", "necrotic_fraction", "grade",
            "ln_volume_mm3"} <= targets
    assert {f"ln_kep|{f}" for f in result["kinetic_families"]} <= targets
    cell = result["table"]["ln_volume_mm3"]["hand: curve"]
    # (8 cases say nothing about the numbers: their check is the ridge test above)
    assert cell["n"] == 8 and len(cell["fold_r2"]) == 3 and np.isfinite(cell["r2"])
    assert all(np.isfinite(c["r2"]) for t in ("ln_ktrans", "ln_kep", "grade") for c in result["table"][t].values())
    text = table.read_text()
    assert "| ln_kep (n=8) |" in text and "hand: rim" in text
    # a second run reuses the cache and gives the same numbers
    again = tmp_path / "again.json"
    assert rep.main(["--data", str(tiny_phantoms), "--weights", f"mae={weights}", "--weights", f"mtl={joint}",
                     "--out", str(again),
                     "--cache", str(out.parent / "cache"), "--device", "cpu", "--folds", "3"]) == 0
    assert json.loads(again.read_text())["table"] == result["table"]


def test_pad_keeps_mask_and_tokens_aligned():
    # a window that is not a patch multiple is padded at the end, the mask alike
    mask = torch.ones(6, 8, 8)
    padded = pad_to_patch_multiple(mask[None], (4, 4, 4))[0]
    assert padded.shape == (8, 8, 8)
    torch.testing.assert_close(rep.token_fractions(padded, (4, 4, 4)).reshape(2, 2, 2)[1], torch.full((2, 2), 0.5))


def test_ridge_cv_refuses_too_few_cases():
    with pytest.raises(ValueError, match="at least"):
        rep.ridge_cv(np.ones((5, 2)), np.arange(5.0), folds=5)
