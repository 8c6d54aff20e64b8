"""Segmentation, pCR, multi-task and fairness losses (CPU, tiny tensors)."""

from __future__ import annotations

import math

import monai.losses
import pytest
import torch
import torch.nn.functional as F

from mtl_breast.losses.classification import PCRLoss
from mtl_breast.losses.fairness import SubgroupReweighter, group_weighted_loss
from mtl_breast.losses.multitask import MultiTaskLoss
from mtl_breast.losses.segmentation import DiceCELoss

nan = float("nan")


def _seg_case(k: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, k, 4, 5, 6, generator=g)
    target = torch.randint(0, k, (3, 1, 4, 5, 6), generator=g, dtype=torch.uint8)
    return logits, target


@pytest.mark.parametrize(("k", "include_background"), [(2, False), (2, True), (3, False)])
@pytest.mark.parametrize("batch_dice", [True, False])
def test_dice_ce_matches_monai(k, include_background, batch_dice):
    logits, target = _seg_case(k)
    ref = monai.losses.DiceCELoss(include_background=include_background, to_onehot_y=True, softmax=True,
                                  batch=batch_dice)
    ours = DiceCELoss(include_background=include_background, batch_dice=batch_dice)
    torch.testing.assert_close(ours(logits, target), ref(logits, target.long()), atol=1e-6, rtol=1e-6)
    # Per-sample values are MONAI's loss on each sample alone.
    per = ours.per_sample(logits, target)
    for i in range(3):
        torch.testing.assert_close(per[i], ref(logits[i : i + 1], target[i : i + 1].long()), atol=1e-6, rtol=1e-6)


def test_batch_dice_scores_tumour_free_crops_by_their_false_positives():
    """A tumour-free crop adds no constant term: predicted background costs ~nothing, false positives cost."""
    target = torch.zeros(2, 1, 4, 4, 4, dtype=torch.long)
    target[0, :, 1:3, 1:3, 1:3] = 1  # sample 0 holds a tumour, sample 1 none
    onehot = torch.cat([1 - target, target], dim=1).float()
    logits = (8.0 * (2 * onehot - 1)).requires_grad_()  # confident and right everywhere
    batch = DiceCELoss(batch_dice=True)
    alone = DiceCELoss(batch_dice=True)(logits[:1], target[:1])
    both = batch(logits, target)
    # The empty crop predicted as background changes the Dice term by ~0; a per-sample Dice gives it a term near
    # 0.4 (smoothing against ~1e-5 of residual probability) that no prediction can lower much.
    assert abs(batch._batch_dice(logits, target, torch.ones(2)) - batch._batch_dice(logits[:1], target[:1],
                                                                                   torch.ones(1))) < 1e-3
    assert DiceCELoss(batch_dice=False)(logits, target) - DiceCELoss(batch_dice=False)(logits[:1], target[:1]) > 0.1
    assert both <= alone + 1e-3
    # False positives in the empty crop raise the loss and get a gradient through the Dice term.
    fp = logits.detach().clone()
    fp[1, :, 0, 0, :] = torch.tensor([-1.0, 1.0])[:, None]  # unsaturated, so the softmax passes a gradient
    fp.requires_grad_()
    dice_fp = batch._batch_dice(fp, target, torch.ones(2))
    dice_fp.backward()
    assert dice_fp > 0.1 and fp.grad[1].abs().max() > 1e-3


def test_dice_ce_hand_case():
    # Perfect, confident prediction: Dice -> 0 and CE -> 0. Inverted prediction: Dice -> 1, CE = 20.
    target = torch.zeros(1, 1, 2, 2, 2, dtype=torch.long)
    target[..., 0, 0, 0] = 1
    onehot = torch.cat([1 - target, target], dim=1).float()
    loss = DiceCELoss()
    assert loss(20.0 * (2 * onehot - 1), target).item() < 1e-6
    assert loss(20.0 * (1 - 2 * onehot), target).item() == pytest.approx(1.0 + 40.0, abs=1e-4)


@pytest.mark.parametrize("batch_dice", [True, False])
def test_dice_ce_sample_weights(batch_dice):
    logits, target = _seg_case()
    logits.requires_grad_()
    loss = DiceCELoss(batch_dice=batch_dice)
    torch.testing.assert_close(loss(logits, target, torch.ones(3)), loss(logits, target))
    weighted = loss(logits, target, torch.tensor([2.0, 1.0, 0.0]))
    if not batch_dice:
        per = loss.per_sample(logits, target).detach()
        torch.testing.assert_close(weighted, (2 * per[0] + per[1]) / 3)
    else:  # a weight-0 sample is left out of the Dice sums; a weight-2 sample counts twice
        twice = torch.cat([logits[:1], logits[:1], logits[1:2]]).detach()
        torch.testing.assert_close(loss._batch_dice(logits, target.long(), torch.tensor([2.0, 1.0, 0.0])),
                                   loss._batch_dice(twice, torch.cat([target[:1], target[:2]]).long(), torch.ones(3)))
    weighted.backward()
    assert logits.grad[2].abs().max() == 0 and logits.grad[0].abs().max() > 0
    with pytest.raises(ValueError):
        loss(logits, target, torch.ones(2))


def test_pcr_loss_masks_missing_labels():
    loss = PCRLoss(kind="bce", pos_weight=None)
    target = torch.tensor([1.0, nan, 0.0, nan])
    a = torch.tensor([0.3, 5.0, -0.7, -2.0], requires_grad=True)
    b = torch.tensor([0.3, -9.0, -0.7, 40.0], requires_grad=True)
    la, lb = loss(a, target), loss(b, target)
    torch.testing.assert_close(la, lb)
    expected = (F.softplus(torch.tensor(-0.3)) + F.softplus(torch.tensor(-0.7))) / 2  # mean over the 2 labeled
    torch.testing.assert_close(la, expected)
    la.backward()
    assert a.grad[1] == 0 and a.grad[3] == 0 and a.grad[0] != 0
    # A missing label is not a negative label.
    assert not torch.allclose(la, loss(a, torch.tensor([1.0, 0.0, 0.0, 0.0])))


def test_pcr_loss_all_missing_is_zero_with_grad():
    for kind in ("bce", "focal"):
        logits = torch.randn(3, requires_grad=True)
        out = PCRLoss(kind=kind)(logits, torch.full((3,), nan))
        assert out.item() == 0.0 and out.requires_grad
        out.backward()
        assert torch.equal(logits.grad, torch.zeros(3))


def test_pcr_loss_balanced_weights_by_hand():
    z = torch.tensor([0.5, -1.0, 2.0, 0.3, 1.0])
    y = torch.tensor([1.0, 0.0, 0.0, 0.0, nan])
    sp = F.softplus
    # Batch counts: 1 positive, 3 negatives -> w_pos = 4 / (2 * 1) = 2, w_neg = 4 / (2 * 3) = 2/3.
    expected = (2 * sp(-z[0]) + (2 / 3) * (sp(z[1]) + sp(z[2]) + sp(z[3]))) / 4
    torch.testing.assert_close(PCRLoss(pos_weight="balanced")(z, y), expected)
    # Given counts override the batch: 1 positive, 9 negatives -> w_pos = 5, w_neg = 10 / 18.
    loss = PCRLoss(pos_weight="balanced")
    loss.set_class_counts(n_pos=1, n_neg=9)
    expected = (5 * sp(-z[0]) + (10 / 18) * (sp(z[1]) + sp(z[2]) + sp(z[3]))) / 4
    torch.testing.assert_close(loss(z, y), expected)
    # A one-class batch keeps weight 1.
    torch.testing.assert_close(PCRLoss()(z[1:4], y[1:4]), F.binary_cross_entropy_with_logits(z[1:4], y[1:4]))
    # A float pos_weight follows BCEWithLogitsLoss.
    ref = F.binary_cross_entropy_with_logits(z[:4], y[:4], pos_weight=torch.tensor(3.0))
    torch.testing.assert_close(PCRLoss(pos_weight=3.0)(z, y), ref)


def test_pcr_loss_sample_weight():
    z, y = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1.0, 0.0, nan])
    loss = PCRLoss(pos_weight=None)
    torch.testing.assert_close(loss(z, y, torch.tensor([0.0, 1.0, 7.0])), F.softplus(z[1]) / 2)


def test_focal_loss():
    z = torch.tensor([2.0, -0.5, 0.1, 3.0])
    y = torch.tensor([1.0, 1.0, 0.0, nan])
    for pw in ("balanced", 2.0, None):
        torch.testing.assert_close(PCRLoss(kind="focal", gamma=0.0, pos_weight=pw)(z, y), PCRLoss(pos_weight=pw)(z, y))
    # Single positive with z = 2: (1 - p)^2 * -log p.
    p = torch.sigmoid(torch.tensor(2.0))
    focal = PCRLoss(kind="focal", gamma=2.0, pos_weight=None)
    torch.testing.assert_close(focal(z[:1], y[:1]), (1 - p) ** 2 * -torch.log(p))
    assert focal(z, y) < PCRLoss(pos_weight=None)(z, y)


def test_pcr_loss_bad_args():
    for kwargs in ({"kind": "hinge"}, {"pos_weight": "auto"}, {"pos_weight": -1.0}, {"gamma": -1.0}):
        with pytest.raises(ValueError):
            PCRLoss(**kwargs)
    with pytest.raises(ValueError):
        PCRLoss()(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError):
        PCRLoss().set_class_counts(0, 0)


def test_multitask_fixed():
    mtl = MultiTaskLoss(weighting="fixed", weights={"seg": 1.0, "pcr": 0.5})
    seg, pcr = torch.tensor(0.8, requires_grad=True), torch.tensor(0.6, requires_grad=True)
    total, logs = mtl({"seg": seg, "pcr": pcr})
    torch.testing.assert_close(total, torch.tensor(0.8 + 0.3))
    assert logs["weight_pcr"].item() == 0.5 and logs["loss_seg"].item() == pytest.approx(0.8)
    assert not logs["loss_total"].requires_grad
    assert list(mtl.parameters()) == []
    total, _ = mtl({"seg": seg})  # a task absent from a step contributes nothing
    torch.testing.assert_close(total, seg)


def test_multitask_uncertainty_gradients():
    mtl = MultiTaskLoss(weighting="uncertainty", weights=[1.0, 0.5])
    seg, pcr = torch.tensor(0.8), torch.tensor(0.6)
    total, logs = mtl({"seg": seg, "pcr": pcr})
    # s_seg = 0, s_pcr = log 2 at start: total = 0.8 + 0.5 * 0.6 + 0.5 * log 2.
    torch.testing.assert_close(total, torch.tensor(0.8 + 0.3 + 0.5 * math.log(2)))
    assert logs["weight_pcr"].item() == pytest.approx(0.5)
    total.backward()
    # d/ds [exp(-s) L + s / 2] = 0.5 - exp(-s) L.
    assert mtl.log_vars["seg"].grad.item() == pytest.approx(0.5 - 0.8)
    assert mtl.log_vars["pcr"].grad.item() == pytest.approx(0.5 - 0.5 * 0.6)
    # Optimising the log-variances moves the weights towards 1 / (2 L).
    opt = torch.optim.SGD(mtl.parameters(), lr=0.5)
    for _ in range(300):
        opt.zero_grad()
        mtl({"seg": seg, "pcr": pcr})[0].backward()
        opt.step()
    assert torch.exp(-mtl.log_vars["seg"]).item() == pytest.approx(1 / 1.6, rel=1e-3)


def test_multitask_bad_args():
    with pytest.raises(ValueError):
        MultiTaskLoss(weighting="gradnorm")
    with pytest.raises(ValueError):
        MultiTaskLoss(weights={"seg": 1.0})
    with pytest.raises(ValueError):
        MultiTaskLoss(weighting="uncertainty", weights=[1.0, 0.0])
    with pytest.raises(ValueError):
        MultiTaskLoss()({"mae": torch.tensor(1.0)})


def test_reweighter_raises_worst_group_and_keeps_mean_one():
    rw = SubgroupReweighter(variables=("age", "breast_density"), temperature=0.1, momentum=0.0)
    batch = [{"age": "(40,50]", "breast_density": "b"}, {"age": "(60,70]"}, {"age": None}, {}]
    torch.testing.assert_close(rw.weights(batch), torch.ones(4))  # no scores yet: uniform
    rw.update({"age": {"(40,50]": 0.9, "(60,70]": 0.5, "(70,100]": nan}, "unused": {"x": 0.1}})
    w = rw.weights(batch)
    assert w.mean().item() == pytest.approx(1.0, abs=1e-6)
    assert w[1] > w[2] > w[0]  # worst group > unknown > best group
    assert w[2] == w[3]
    # Target for 2 groups: 2 * softmax(-s / 0.1); the weight is a geometric mean over the 2 variables.
    w_bad = 2 * math.exp(-5) / (math.exp(-5) + math.exp(-9))
    assert rw.raw_weight({"age": "(60,70]"}) == pytest.approx(math.sqrt(w_bad))
    assert "(70,100]" not in rw.group_weights["age"]  # NaN score: untouched
    with pytest.raises(ValueError):
        rw.update({"age": {"(40,50]": 1.5}})


def test_reweighter_momentum_state_and_differentiable_use():
    rw = SubgroupReweighter(variables=("menopausal_status",), temperature=0.2, momentum=0.5)
    rw.update({"menopausal_status": {"pre": 0.4, "post": 0.8}})
    target_pre = 2 * math.exp(-2) / (math.exp(-2) + math.exp(-4))
    assert rw.group_weights["menopausal_status"]["pre"] == pytest.approx(0.5 + 0.5 * target_pre)
    clone = SubgroupReweighter(variables=("menopausal_status",))
    clone.load_state_dict(rw.state_dict())
    assert clone.group_weights == rw.group_weights
    groups = [{"menopausal_status": "pre"}, {"menopausal_status": "post"}]
    logits = torch.randn(2, requires_grad=True)
    per = PCRLoss(pos_weight=None).per_sample(logits, torch.tensor([1.0, 0.0]))[0]
    (per * rw.weights(groups)).mean().backward()
    assert logits.grad.abs().min() > 0


def test_group_weighted_loss():
    loss = torch.tensor([1.0, 3.0, 2.0, 10.0], requires_grad=True)
    groups = torch.tensor([0, 0, 1, 2])
    # Group means 2, 2, 10: near-zero temperature -> worst group; huge temperature -> mean of group means.
    assert group_weighted_loss(loss[:3], groups[:3], 3, temperature=1e-3).item() == pytest.approx(2.0)
    assert group_weighted_loss(loss, groups, 3, temperature=1e-3).item() == pytest.approx(10.0)
    assert group_weighted_loss(loss, groups, 4, temperature=1e6).item() == pytest.approx(14 / 3, rel=1e-4)
    # Unknown samples (-1) join through a plain mean, weighted by their share.
    mixed = group_weighted_loss(loss, torch.tensor([0, 0, -1, -1]), 2, temperature=1.0)
    assert mixed.item() == pytest.approx(0.5 * 2.0 + 0.5 * 6.0)
    # Weights as constants: the worst group's sample gets the largest gradient.
    group_weighted_loss(loss, groups, 3, detach_weights=True).backward()
    assert loss.grad[3] > loss.grad[2] > 0
    # Differentiable weights also push the gradient through q (a soft maximum).
    loss.grad = None
    group_weighted_loss(loss, groups, 3).backward()
    assert loss.grad[3] > 0 and torch.isfinite(loss.grad).all()
    all_unknown = torch.tensor([1.0, 2.0], requires_grad=True)
    out = group_weighted_loss(all_unknown, torch.tensor([-1, -1]), 2)
    out.backward()
    assert out.item() == pytest.approx(1.5) and torch.isfinite(all_unknown.grad).all()
