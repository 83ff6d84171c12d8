"""SAM's training losses against values computed by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from napari_sam.train.losses import (
    dice_loss,
    iou_prediction_loss,
    iou_ranking_loss,
    mask_iou,
    mask_loss,
    sigmoid_focal_loss,
)

LN3 = math.log(3.0)


def test_focal_loss_matches_hand_computed_value():
    # pixel 1: p = 0.5, t = 1 -> ce = ln 2, (1 - p_t)^2 = 1/4, alpha_t = 0.25
    # pixel 2: p = 0.75, t = 0 -> ce = ln 4, (1 - p_t)^2 = 9/16, alpha_t = 0.75
    logits = torch.tensor([[0.0, LN3]])
    targets = torch.tensor([[1.0, 0.0]])
    expected = (0.25 * 0.25 * math.log(2) + 0.75 * (9 / 16) * math.log(4)) / 2
    assert sigmoid_focal_loss(logits, targets).item() == pytest.approx(expected, rel=1e-6)


def test_focal_loss_without_focusing_is_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 5) * 3
    targets = (torch.rand(2, 5, 5) > 0.5).float()
    got = sigmoid_focal_loss(logits, targets, alpha=-1, gamma=0)
    want = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(dim=(-2, -1))
    torch.testing.assert_close(got, want)


def test_focal_loss_is_small_for_confident_right_answers():
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    right = sigmoid_focal_loss(torch.where(targets > 0, 8.0, -8.0), targets)
    wrong = sigmoid_focal_loss(torch.where(targets > 0, -8.0, 8.0), targets)
    assert right.item() < 1e-6
    assert wrong.item() > 1.0


def test_dice_loss_matches_hand_computed_value():
    # p = 0.5 everywhere; targets [1, 1, 0, 0]: intersection 1, sum p 2, sum t 2
    logits = torch.zeros(1, 4)
    targets = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert dice_loss(logits, targets).item() == pytest.approx(1 - (2 * 1 + 1) / (2 + 2 + 1))
    assert dice_loss(logits, targets, smooth=0).item() == pytest.approx(1 - 2 / 4)


def test_dice_loss_of_empty_mask_predicted_empty_is_zero():
    assert dice_loss(torch.full((3, 3), -50.0), torch.zeros(3, 3)).item() == pytest.approx(0.0, abs=1e-6)


def test_mask_loss_weights_focal_and_dice_20_to_1():
    torch.manual_seed(1)
    logits = torch.randn(3, 8, 8)
    targets = (torch.rand(3, 8, 8) > 0.6).float()
    focal, dice = sigmoid_focal_loss(logits, targets), dice_loss(logits, targets)
    torch.testing.assert_close(mask_loss(logits, targets), 20 * focal + dice)
    torch.testing.assert_close(mask_loss(logits, targets, focal_weight=0.0), dice)
    assert not torch.allclose(mask_loss(logits, targets), focal + dice)


def test_losses_are_per_mask_and_broadcast_the_target():
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 6, 6)
    target = (torch.rand(2, 1, 6, 6) > 0.5).float()
    per_mask = mask_loss(logits, target)
    assert per_mask.shape == (2, 3)
    torch.testing.assert_close(per_mask[1, 2], mask_loss(logits[1, 2], target[1, 0]))


def test_mask_iou_and_iou_prediction_loss():
    logits = torch.tensor([[[5.0, 5.0, -5.0, -5.0]]])  # predicts the first two pixels
    targets = torch.tensor([[[0.0, 1.0, 1.0, 0.0]]])  # intersection 1, union 3
    assert mask_iou(logits, targets).item() == pytest.approx(1 / 3)
    assert mask_iou(torch.full((1, 2, 2), -1.0), torch.zeros(1, 2, 2)).item() == 1.0

    pred = torch.tensor([0.5], requires_grad=True)
    logits.requires_grad_(True)
    loss = iou_prediction_loss(pred, logits, targets)
    assert loss.item() == pytest.approx((0.5 - 1 / 3) ** 2)
    loss.sum().backward()
    assert pred.grad.item() == pytest.approx(2 * (0.5 - 1 / 3))
    assert logits.grad is None  # the actual IoU is a target, not a path for gradients


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="binary"):
        dice_loss(torch.zeros(2, 2), torch.full((2, 2), 0.5))
    with pytest.raises(ValueError, match="broadcast"):
        sigmoid_focal_loss(torch.zeros(2, 4, 4), torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="pixels"):
        mask_loss(torch.zeros(1, 4, 4), torch.zeros(1, 1, 4))
    with pytest.raises(ValueError, match="one per mask"):
        iou_prediction_loss(torch.zeros(2), torch.zeros(1, 3, 4, 4), torch.zeros(1, 1, 4, 4))


def test_iou_ranking_loss_charges_masks_ranked_the_wrong_way():
    targets = torch.tensor([[[[1.0, 1.0, 0.0, 0.0]]]])  # (N=1, 1, 1, 4)
    # three masks: exact (IoU 1), half of it (1/2), the other half of the plane (0)
    logits = torch.tensor([[[[5.0, 5.0, -5.0, -5.0]], [[5.0, -5.0, -5.0, -5.0]], [[-5.0, -5.0, 5.0, 5.0]]]])
    right = iou_ranking_loss(torch.tensor([[0.9, 0.5, 0.1]]), logits, targets)
    wrong = iou_ranking_loss(torch.tensor([[0.1, 0.5, 0.9]]), logits, targets)
    assert right.shape == (1,) and right.item() < 1e-3 and wrong.item() > 5
    # by hand: pairs (exact, half) 0.5, (exact, other) 1, (half, other) 0.5, each margin 0.4 or 0.8 at T 0.05
    sp = F.softplus
    want = (0.5 * sp(torch.tensor(8.0)) + 1.0 * sp(torch.tensor(16.0)) + 0.5 * sp(torch.tensor(8.0))) / 3
    assert wrong.item() == pytest.approx(want.item(), rel=1e-5)
    # equally good masks are no pair; gradients raise the better mask's prediction only
    assert iou_ranking_loss(torch.tensor([[0.2, 0.9]]), logits[:, :1].expand(1, 2, 1, 4), targets).item() == 0.0
    pred = torch.tensor([[0.5, 0.5, 0.5]], requires_grad=True)
    iou_ranking_loss(pred, logits, targets).sum().backward()
    assert pred.grad[0, 0] < 0 < pred.grad[0, 2]
    with pytest.raises(ValueError, match="shape"):
        iou_ranking_loss(torch.zeros(3), logits, targets)
