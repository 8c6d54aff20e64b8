"""Kinetic features of the tumour curve, the kinetic pathway of the pCR head, and where its window goes."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mtl_breast.acquisition import ACQUISITION_FIELDS
from mtl_breast.data.dataset import acquisition_vector
from mtl_breast.data.window import tumour_centre, tumour_window, window_start
from mtl_breast.hub import load_pretrained, save_pretrained
from mtl_breast.models.heads import FEATURE_FUNCTIONS, PCRHead
from mtl_breast.models.kinetics import (
    CONCENTRATION_FEATURES,
    FEATURE_SETS,
    INNER_RIM_FEATURES,
    KINETIC_FEATURES,
    RIM_FEATURES,
    concentration_feature_sets,
    edge_depth,
    spgr_concentration,
    tumour_concentration,
    tumour_kinetics,
    tumour_rim_concentration,
)
from mtl_breast.models.registry import create_model
from mtl_breast.phantoms.physics import R1_RELAXIVITY, spgr_signal

ROOT = Path(__file__).resolve().parents[1]


def _volume(curve, tumour=(slice(2, 5), slice(2, 5), slice(2, 5)), background=0.2, size=8):
    """[1, T, size^3]: a cube tumour following `curve`, constant background elsewhere, and its mask."""
    t = len(curve)
    image = torch.full((1, t, size, size, size), background)
    mask = torch.zeros(1, 1, size, size, size)
    mask[(0, 0, *tumour)] = 1.0
    for k, value in enumerate(curve):
        image[(0, k, *tumour)] = value
    return image, mask


def test_kinetic_features_by_hand():
    image, mask = _volume([1.0, 3.0, 2.5, 2.0])
    times = torch.tensor([[0.0, 90.0, 180.0, 270.0]])
    f = dict(zip(KINETIC_FEATURES, tumour_kinetics(image, mask, phase_time=times)[0].tolist(), strict=True))
    assert f["log_volume"] == pytest.approx(math.log1p(27) - 6.0)
    assert f["wash_in"] == pytest.approx(2.0)
    assert f["peak_enhancement"] == pytest.approx(2.0)
    assert f["washout_ratio"] == pytest.approx((2.0 - 3.0) / (2.0 + 0.1))
    assert f["washout_per_min"] == pytest.approx((2.0 - 3.0) / 2.1 / 3.0)  # 180 s from phase 1 to the last
    assert f["contrast_to_surround"] == pytest.approx(2.0)  # the background does not enhance
    # Unknown times fall back to 90 s between phases: the same numbers here.
    unknown = tumour_kinetics(image, mask, phase_time=torch.full((1, 4), float("nan")))
    torch.testing.assert_close(unknown, tumour_kinetics(image, mask, phase_time=times))


def test_kinetic_features_are_invariant_to_the_case_normalisation_where_they_should_be():
    image, mask = _volume([1.0, 3.0, 2.5, 2.0])
    a = tumour_kinetics(image, mask)
    b = tumour_kinetics(image * 2.0 + 5.0, mask)  # another mean/std of the case
    ratios = [KINETIC_FEATURES.index(n) for n in ("washout_ratio", "washout_per_min")]
    assert torch.allclose(a[:, ratios], b[:, ratios], atol=0.02)  # up to the +0.1 in the denominator
    torch.testing.assert_close(b[:, 1], 2.0 * a[:, 1])  # wash-in scales with the intensity unit


def test_kinetic_features_see_washout_and_ignore_padding():
    rising, mask = _volume([1.0, 3.0, 3.5, 4.0])
    washout, _ = _volume([1.0, 3.0, 2.5, 2.0])
    r = KINETIC_FEATURES.index("washout_ratio")
    assert tumour_kinetics(rising, mask)[0, r] > 0 > tumour_kinetics(washout, mask)[0, r]
    # A padded fifth phase (NaN voxels) changes nothing; the last REAL phase defines the washout.
    padded = torch.cat([washout, torch.full_like(washout[:, :1], float("nan"))], dim=1)
    real = torch.tensor([[True, True, True, True, False]])
    torch.testing.assert_close(tumour_kinetics(padded, mask, real), tumour_kinetics(washout, mask))
    # Two phases: no washout to measure, finite zeros.
    two = tumour_kinetics(washout[:, :2], mask)
    assert torch.isfinite(two).all() and two[0, r] == 0
    empty = tumour_kinetics(washout, torch.zeros_like(mask))
    assert torch.isfinite(empty).all()


@pytest.mark.parametrize("features", sorted(FEATURE_FUNCTIONS))
def test_pcr_head_kinetic_pathway_uses_the_image(features):
    torch.manual_seed(0)
    head = PCRHead(embed_dim=16, kinetic=True, kinetic_features=features).eval()
    with torch.no_grad():
        head.kinetic_fc.weight.normal_()
    tokens = torch.randn(1, 4, 8, 16)
    washout, mask = _volume([1.0, 3.0, 2.5, 2.0])
    rising, _ = _volume([1.0, 3.0, 3.5, 4.0])
    flat = washout.clone()
    flat[:, 2:] = flat[:, 1:2]  # every post-contrast phase replaced by the first one
    # The images are the signal itself: offset 0, scale 1, a 1.5 T protocol.
    acquisition = acquisition_vector({"mean": 0.0, "std": 1.0},
                                     {"field_strength": 1.5, "repetition_time": 4.5, "flip_angle": 10.0})[None]
    with torch.no_grad():
        logits = [head(tokens, seg_prob=mask, grid=(2, 2, 2), image=x, acquisition=acquisition)
                  for x in (washout, rising, flat)]
    assert len({round(float(v), 5) for v in logits}) == 3
    if features != "curve":
        # Without the acquisition vector the concentration terms are unknown and take their training mean: only the
        # tumour's size is left, the same for the three images.
        with torch.no_grad():
            blind = {round(float(head(tokens, seg_prob=mask, grid=(2, 2, 2), image=x)), 5)
                     for x in (washout, rising, flat)}
        assert len(blind) == 1
    with pytest.raises(ValueError, match="kinetic pathway needs image"):
        head(tokens, seg_prob=mask, grid=(2, 2, 2))
    # Zero-initialised: a fresh head starts as the token-only head.
    fresh, plain = PCRHead(embed_dim=16, kinetic=True, kinetic_features="curve"), PCRHead(embed_dim=16)
    plain.load_state_dict({k: v for k, v in fresh.state_dict().items() if not k.startswith("kinetic")})
    torch.testing.assert_close(fresh(tokens, seg_prob=mask, grid=(2, 2, 2), image=washout),
                               plain(tokens, seg_prob=mask, grid=(2, 2, 2)))


def test_joint_models_have_the_kinetic_pathway_and_older_weights_still_load(tmp_path):
    model = create_model("mtl_vit_test")
    assert model.pcr_head.kinetic and model.model_args["pcr_head"]["kinetic"] is True
    assert model.model_args["pcr_head"]["kinetic_features"] == "rim"
    # Weights exported before the feature sets had names: the 6 curve features, no `kinetic_features` argument.
    curve = create_model("mtl_vit_test", pcr_head={"kinetic_features": "curve"})
    out = save_pretrained(curve, tmp_path / "curve")
    config = json.loads((out / "config.json").read_text())
    del config["model_args"]["pcr_head"]["kinetic_features"]
    (out / "config.json").write_text(json.dumps(config))
    loaded = load_pretrained(out)
    assert loaded.pcr_head.kinetic_features == "curve" and loaded.pcr_head.kinetic_fc.weight.shape == (1, 6)
    # Weights exported before the pathway: no `kinetic` argument and no kinetic_fc tensor.
    old = create_model("mtl_vit_test", pcr_head={"kinetic": False})
    out = save_pretrained(old, tmp_path / "old")
    config = json.loads((out / "config.json").read_text())
    del config["model_args"]["pcr_head"]["kinetic"]
    (out / "config.json").write_text(json.dumps(config))
    loaded = load_pretrained(out)
    assert not loaded.pcr_head.kinetic
    for k, v in old.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


def test_tumour_centre_is_the_largest_component():
    prob = np.zeros((20, 20, 20), dtype=np.float32)
    prob[2:8, 2:8, 2:8] = 0.9  # the tumour
    prob[15:17, 15:17, 15:17] = 0.99  # a smaller, more confident false positive
    prob += 0.01  # background probability everywhere
    assert tumour_centre(prob) == pytest.approx((4.5, 4.5, 4.5))
    # Nothing above the threshold: the most probable voxel; nothing at all: None.
    low = np.full((6, 6, 6), 0.1, dtype=np.float32)
    low[1, 2, 3] = 0.3
    assert tumour_centre(low) == (1.0, 2.0, 3.0)
    assert tumour_centre(np.zeros((4, 4, 4))) is None
    assert window_start((4.5, 4.5, 4.5), (4, 4, 4), (20, 20, 20)) == (3, 3, 3)
    assert window_start((0.0, 19.0, 10.0), (4, 4, 4), (20, 20, 20)) == (0, 16, 9)
    with pytest.raises(ValueError, match="larger than the volume"):
        window_start((1, 1, 1), (8, 8, 8), (4, 8, 8))


def test_pcr_window_follows_the_largest_component_not_the_probability_mass():
    x = torch.arange(32.0).view(1, 1, 32, 1, 1).expand(1, 2, 32, 32, 32).contiguous()
    prob = torch.zeros(32, 32, 32)
    prob[4:8, 4:8, 4:8] = 0.9  # tumour near a corner
    prob[20:32, 20:32, 20:32] = 0.3  # diffuse background probability below the threshold, much more mass
    window = tumour_window(x, prob, (8, 8, 8))
    assert window.shape == (1, 2, 8, 8, 8)
    assert window[0, 0, :, 0, 0].tolist() == list(range(2, 10))  # centred on 5.5 along the first axis


def test_windows_batched_by_volume_predict_the_same_as_one_at_a_time():
    from mtl_breast.predictor import InferenceSettings, default_sw_batch_size, predict_volume

    # ViT-B windows one at a time on the CPU (memory), two on a GPU; small windows batched (speed).
    assert default_sw_batch_size((128, 128, 128), "cpu") == 1 and default_sw_batch_size((128,) * 3, "cuda") == 2
    assert default_sw_batch_size((32, 32, 32), "cpu") == 4 and default_sw_batch_size((256, 256, 256), "cpu") == 1
    torch.manual_seed(0)
    model = create_model("mtl_vit_test").eval()
    image, times = torch.randn(3, 48, 40, 48), torch.tensor([0.0, 90.0, 180.0])
    outputs = [predict_volume(model, image, times, InferenceSettings(roi_size=(32, 32, 32), sw_batch_size=n))
               for n in (1, None)]
    assert np.allclose(outputs[0][0], outputs[1][0], atol=1e-5) and outputs[0][1] == pytest.approx(outputs[1][1])


# ---------------------------------------------------------------------------------------------- concentration
_SEQUENCE = {1.5: dict(tr_ms=4.5, flip_deg=10.0, t10=1.1), 3.0: dict(tr_ms=8.0, flip_deg=20.0, t10=1.3)}


@pytest.mark.parametrize("field", [1.5, 3.0])
def test_spgr_inversion_recovers_the_phantoms_concentration(field):
    seq = _SEQUENCE[field]
    conc = np.array([0.0, 0.05, 0.3, 1.0, 2.5])  # mM
    signal = spgr_signal(0.9, seq["t10"], conc, tr_ms=seq["tr_ms"], flip_deg=seq["flip_deg"], r1=R1_RELAXIVITY[field])
    s = torch.tensor(signal, dtype=torch.float32).reshape(1, -1, 1) * 500.0  # any receiver gain
    got = spgr_concentration(s, s[:, :1], torch.tensor([field]), torch.tensor([seq["tr_ms"]]),
                             torch.tensor([seq["flip_deg"]]))[0, :, 0]
    assert got.tolist() == pytest.approx(conc.tolist(), abs=2e-3, rel=2e-3)


def _scanner_case(curves, size=12, field=1.5):
    """[1, T, size^3] scanner signal: background tissue without contrast, a tumour cube whose shell follows
    curves[0] and whose core (2 voxels in) follows curves[1]; its mask; the signal z-scored as preprocessing
    does, and the acquisition vector that undoes it."""
    seq = _SEQUENCE[field]
    kw = dict(tr_ms=seq["tr_ms"], flip_deg=seq["flip_deg"], r1=R1_RELAXIVITY[field])
    shell, core = (np.asarray(c, dtype=np.float64) for c in curves)
    t = len(shell)
    signal = torch.full((1, t, size, size, size), float(spgr_signal(1.0, 1.3, 0.0, **kw)) * 300)
    mask = torch.zeros(1, 1, size, size, size)
    mask[0, 0, 2:10, 2:10, 2:10] = 1
    for k in range(t):
        signal[0, k, 2:10, 2:10, 2:10] = float(spgr_signal(1.0, seq["t10"], shell[k], **kw)) * 300
        signal[0, k, 4:8, 4:8, 4:8] = float(spgr_signal(1.0, seq["t10"], core[k], **kw)) * 300
    mean, std = float(signal.mean()), float(signal.std())
    acquisition = acquisition_vector({"mean": mean, "std": std},
                                     {"field_strength": field, "repetition_time": seq["tr_ms"],
                                      "flip_angle": seq["flip_deg"]})
    return (signal - mean) / std, mask, acquisition[None]


def test_concentration_features_by_hand_from_the_normalised_image():
    curve = [0.0, 0.8, 0.6, 0.4]  # mM: wash-in, then washout
    image, mask, acquisition = _scanner_case([curve, curve])
    times = torch.tensor([[0.0, 90.0, 180.0, 270.0]])
    f = dict(zip(CONCENTRATION_FEATURES, tumour_concentration(image, mask, None, times, acquisition)[0].tolist(),
                 strict=True))
    assert f["log_volume"] == pytest.approx(math.log1p(512) - 6.0)
    assert f["ln_conc_first"] == pytest.approx(math.log(0.8), abs=0.01)
    assert f["ln_conc_last"] == pytest.approx(math.log(0.4), abs=0.01)
    assert f["conc_log_slope"] == pytest.approx(math.log(0.4 / 0.8) / 3.0, abs=0.01)  # per minute, 180 s
    assert f["core_ratio"] == pytest.approx(0.0, abs=0.01)
    # The same tumour without its washout (post-contrast phases flattened to the first): the slope is gone.
    flat = image.clone()
    flat[:, 2:] = flat[:, 1:2]
    g = dict(zip(CONCENTRATION_FEATURES, tumour_concentration(flat, mask, None, times, acquisition)[0].tolist(),
                 strict=True))
    assert g["conc_log_slope"] == pytest.approx(0.0, abs=1e-4)
    assert g["ln_conc_last"] == pytest.approx(g["ln_conc_first"])


def test_concentration_features_see_a_rim_and_read_its_enhancing_part():
    rim, necrotic = [0.0, 0.9, 0.7, 0.5], [0.0, 0.05, 0.1, 0.15]
    image, mask, acquisition = _scanner_case([rim, necrotic])
    f = dict(zip(CONCENTRATION_FEATURES, tumour_concentration(image, mask, None, None, acquisition)[0].tolist(),
                 strict=True))
    assert f["core_ratio"] < -0.5  # the core enhances far less than the tumour as a whole
    # 448 of the 512 voxels are shell: the enhancing half is all rim, so the curve is the rim's.
    assert f["ln_conc_first"] == pytest.approx(math.log(0.9), abs=0.01)
    assert f["conc_log_slope"] < 0  # washout of the rim, not the core's slow rise


def test_concentration_features_need_the_intensity_normalisation():
    image, mask, acquisition = _scanner_case([[0.0, 0.8, 0.6], [0.0, 0.8, 0.6]])
    acquisition[0, ACQUISITION_FIELDS.index("intensity_offset")] = float("nan")
    f = tumour_concentration(image, mask, None, None, acquisition)[0]
    assert math.isfinite(f[0]) and torch.isnan(f[1:]).all()  # size is known; the concentration is not
    assert torch.isnan(acquisition_vector(None, None)).all()
    # Unknown sequence parameters fall back to a typical protocol: finite, and close for a similar one.
    image, mask, acquisition = _scanner_case([[0.0, 0.8, 0.6], [0.0, 0.8, 0.6]])
    acquisition[0, 3:] = float("nan")
    f = tumour_concentration(image, mask, None, None, acquisition)[0]
    assert torch.isfinite(f).all() and f[1].item() == pytest.approx(math.log(0.8), abs=0.3)


def test_concentration_features_skip_voxels_without_a_pre_contrast_signal():
    """A tumour at the edge of the pre-contrast phase's field of view: resampling fills that phase with 0 there
    while the post-contrast phases have signal. S/S0 has no meaning in those voxels; a 16-bit cache rounds the 0 to
    a tiny positive value, which once read as a saturated 100+ mM and swung the pCR logit by 15."""
    curve = [0.0, 0.8, 0.6, 0.4]  # mM
    times = torch.tensor([[0.0, 90.0, 180.0, 270.0]])
    image, mask, acquisition = _scanner_case([curve, curve])
    offset = acquisition[0, ACQUISITION_FIELDS.index("intensity_offset")]
    scale = acquisition[0, ACQUISITION_FIELDS.index("intensity_scale")]
    zero_filled = image.clone()
    zero_filled[0, 0, 2] = (0.0 - offset) / scale  # the tumour's first face: no pre-contrast signal
    rounded = zero_filled.clone()
    rounded[0, 0, 2] = (0.05 - offset) / scale  # the same 0 after 16-bit rounding: 0.05 scanner units
    inside = mask.clone()
    inside[0, 0, 2] = 0  # the tumour without that face
    a = concentration_feature_sets(zero_filled, mask, None, times, acquisition)
    b = concentration_feature_sets(rounded, mask, None, times, acquisition)
    reference = concentration_feature_sets(image, inside, None, times, acquisition)
    for sets in (a, b):
        for names, features in sets.items():
            named = dict(zip(names, features[0].tolist(), strict=True))
            assert named["log_volume"] == pytest.approx(math.log1p(512) - 6.0)  # size counts the whole mask
            assert named["ln_conc_first"] == pytest.approx(math.log(0.8), abs=0.01)
            assert named["ln_conc_last"] == pytest.approx(math.log(0.4), abs=0.01)
            torch.testing.assert_close(features[0, 1:4], reference[names][0, 1:4], atol=2e-3, rtol=0)
    for names in a:
        torch.testing.assert_close(a[names], b[names], atol=0.02, rtol=0)


def test_edge_depth_counts_voxel_layers_from_the_surface():
    mask = torch.zeros(1, 1, 9, 9, 9, dtype=torch.bool)
    mask[0, 0, 2:7, 2:7, 2:7] = True  # a 5^3 cube: layers 1, 2 and its centre 3
    depth = edge_depth(mask)[0, 0]
    assert depth[2, 2, 2] == 1 and depth[3, 3, 3] == 2 and depth[4, 4, 4] == 3 and depth[0, 0, 0] == 0
    assert int((depth == 1).sum()) == 5**3 - 3**3
    assert edge_depth(mask, max_depth=2)[0, 0, 4, 4, 4] == 2  # capped
    # A tumour cut by the volume's border keeps its depth there: the border is not tissue outside it.
    cut = torch.zeros(1, 1, 9, 9, 9, dtype=torch.bool)
    cut[0, 0, 0:5, 2:7, 2:7] = True
    assert edge_depth(cut)[0, 0, 0, 4, 4] == 3


def test_rim_features_flag_a_rim_and_share_the_concentration_columns():
    rim, necrotic = [0.0, 0.9, 0.7, 0.5], [0.0, 0.05, 0.1, 0.15]
    times = torch.tensor([[0.0, 90.0, 180.0, 270.0]])
    for shell, core, sign in ((rim, necrotic, 1), (necrotic, rim, -1)):  # rim enhancement, then the centre's
        image, mask, acquisition = _scanner_case([shell, core])
        f = tumour_rim_concentration(image, mask, None, times, acquisition)[0]
        g = tumour_concentration(image, mask, None, times, acquisition)[0]
        torch.testing.assert_close(f[:4], g[:4])
        named = dict(zip(RIM_FEATURES, f.tolist(), strict=True))
        assert sign * named["rim_index"] > 0.5
    # The rim's surface layer follows the rim curve: its signal washes out.
    image, mask, acquisition = _scanner_case([rim, necrotic])
    named = dict(zip(RIM_FEATURES, tumour_rim_concentration(image, mask, None, times, acquisition)[0].tolist(),
                     strict=True))
    assert named["shell_log_slope"] < -0.05
    # One curve everywhere: no enhancement spread to correlate with depth.
    image, mask, acquisition = _scanner_case([rim, rim])
    assert tumour_rim_concentration(image, mask, None, times, acquisition)[0, 4] == 0.0


def test_shell_washout_ignores_partial_volume_with_non_enhancing_tissue():
    """A surface voxel that is part tumour, part fat enhances by that part of the tumour's enhancement in every
    phase, so the ratio of its late to its early enhancement, hence shell_log_slope, stays the tumour's."""
    curve, background = torch.tensor([100.0, 180.0, 170.0, 150.0]), 60.0
    times = torch.tensor([[0.0, 60.0, 120.0, 240.0]])
    acquisition = acquisition_vector({"mean": 0.0, "std": 1.0}, {"field_strength": 3.0})[None]
    mask = torch.zeros(1, 1, 12, 12, 12)
    mask[0, 0, 3:9, 3:9, 3:9] = 1
    surface = (edge_depth(mask.bool()) == 1)[0, 0]
    slopes = []
    for part in (1.0, 0.3):
        image = torch.full((1, 4, 12, 12, 12), background)
        image[0, :, mask[0, 0].bool()] = curve[:, None]
        image[0][:, surface] = part * curve[:, None] + (1 - part) * background
        slopes.append(dict(zip(RIM_FEATURES, tumour_rim_concentration(image, mask, None, times, acquisition)[0]
                               .tolist(), strict=True))["shell_log_slope"])
    assert slopes[0] == pytest.approx(math.log((150.0 - 100.0) / (180.0 - 100.0)) / 3.0, rel=1e-5)
    assert slopes[1] == pytest.approx(slopes[0], rel=1e-5)
    # Post-contrast phases flattened to the first: no washout left.
    flat = image.clone()
    flat[:, 2:] = flat[:, 1:2]
    assert tumour_rim_concentration(flat, mask, None, times, acquisition)[0, 5] == pytest.approx(0.0, abs=1e-6)


def test_inner_rim_features_hold_when_the_mask_is_one_voxel_too_large():
    """A mask grown by one voxel into non-enhancing tissue empties the surface layer's enhancement, so the surface
    rim features move; read one layer below the surface (surface_layers=1) they still see the rim."""
    rim, necrotic = [0.0, 0.9, 0.7, 0.5], [0.0, 0.05, 0.1, 0.15]
    times = torch.tensor([[0.0, 90.0, 180.0, 270.0]])
    image, mask, acquisition = _scanner_case([rim, necrotic])  # rim two voxels thick, then the core
    grown = torch.zeros_like(mask)
    grown[0, 0, 1:11, 1:11, 1:11] = 1

    def features(m: torch.Tensor, layers: int) -> dict[str, float]:
        names = INNER_RIM_FEATURES if layers else RIM_FEATURES
        return dict(zip(names, tumour_rim_concentration(image, m, None, times, acquisition, surface_layers=layers)[0]
                        .tolist(), strict=True))

    exact, exact_inner = features(mask, 0), features(mask, 1)
    over, over_inner = features(grown, 0), features(grown, 1)
    # On the exact mask both layers of the rim wash out alike.
    assert exact_inner["inner_shell_log_slope"] == pytest.approx(exact["shell_log_slope"], rel=1e-5)
    assert exact["shell_log_slope"] < -0.05 and exact_inner["inner_rim_index"] > 0.5
    # One voxel too large: the surface layer is background (no wash-in, so no washout), the layer below is the rim.
    assert over["shell_log_slope"] == 0.0
    assert over_inner["inner_shell_log_slope"] == pytest.approx(exact["shell_log_slope"], rel=1e-5)
    assert over_inner["inner_rim_index"] > 0.5
    assert over["rim_index"] < exact["rim_index"] - 0.3
    with pytest.raises(ValueError, match="surface_layers"):
        tumour_rim_concentration(image, mask, None, times, acquisition, surface_layers=-1)


def test_feature_sets_from_one_inversion_match_the_separate_calls():
    image, mask, acquisition = _scanner_case([[0.0, 0.9, 0.7, 0.5], [0.0, 0.05, 0.1, 0.15]])
    times = torch.tensor([[0.0, 90.0, 180.0, 270.0]])
    sets = concentration_feature_sets(image, mask, None, times, acquisition)
    torch.testing.assert_close(sets[CONCENTRATION_FEATURES], tumour_concentration(image, mask, None, times,
                                                                                  acquisition))
    for layers, names in ((0, RIM_FEATURES), (1, INNER_RIM_FEATURES)):
        torch.testing.assert_close(sets[names], tumour_rim_concentration(image, mask, None, times, acquisition,
                                                                         surface_layers=layers))


def test_one_kinetic_feature_set_default_across_code_configs_docs_and_model_card(tmp_path):
    default = inspect.signature(PCRHead).parameters["kinetic_features"].default
    assert default in FEATURE_SETS and set(FEATURE_FUNCTIONS) <= set(FEATURE_SETS)
    # Every training config trains the default (ablation overlays in configs/experiments/ may change it).
    for path in sorted((ROOT / "configs").glob("*/*.yaml")):
        if path.parent.name == "experiments":
            continue
        head = ((yaml.safe_load(path.read_text()) or {}).get("model") or {}).get("model_args", {}).get("pcr_head") or {}
        assert head.get("kinetic_features", default) == default, path
    assert f"`{default}` (default)" in (ROOT / "finetune" / "README.md").read_text()
    card = (save_pretrained(create_model("mtl_vit_test"), tmp_path / "w") / "README.md").read_text()
    assert f"kinetic pathway `{default}` features" in card
