"""Tests for bundle.losses.fixed_target_lncc: the same loss and gradient as MONAI's LNCC, cheaper."""

from __future__ import annotations

import pytest
import torch
from monai.losses import LocalNormalizedCrossCorrelationLoss
from monai.networks.layers import separable_filtering

from bundle.losses import FixedTargetLNCCLoss, box_sum


def _images(dims: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (2, 1, *[13 + d for d in range(dims)])
    pool = torch.nn.functional.avg_pool3d if dims == 3 else torch.nn.functional.avg_pool2d
    target = pool(torch.rand(shape, generator=g), 3, 1, 1)
    pred = pool(torch.rand(shape, generator=g), 3, 1, 1)
    target[..., :3] = 0  # a flat corner: variances at the floor
    return target.double(), pred.double()


@pytest.mark.parametrize("kernel_size", (1, 3, 5, 9))
@pytest.mark.parametrize("dims", (2, 3))
def test_box_sum_matches_monai_separable_filtering(dims, kernel_size):
    target, _ = _images(dims)
    expected = separable_filtering(target, kernels=[torch.ones(kernel_size, dtype=target.dtype)] * dims)
    torch.testing.assert_close(box_sum(target, kernel_size), expected)


@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
@pytest.mark.parametrize("dims", (2, 3))
def test_value_and_gradient_match_monai(dims, reduction):
    target, pred = _images(dims)
    ours_pred = pred.clone().requires_grad_(True)
    theirs_pred = pred.clone().requires_grad_(True)
    ours = FixedTargetLNCCLoss(target, kernel_size=5, reduction=reduction)(ours_pred)
    theirs = LocalNormalizedCrossCorrelationLoss(spatial_dims=dims, kernel_size=5, reduction=reduction)(theirs_pred, target)
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-6)
    (ours.sum() if reduction == "none" else ours).backward()
    (theirs.sum() if reduction == "none" else theirs).backward()
    torch.testing.assert_close(ours_pred.grad, theirs_pred.grad, rtol=1e-4, atol=1e-6)


def test_identical_image_scores_minus_one_and_the_target_gets_no_gradient():
    target, _ = _images(3)
    target = target.float()[:, :, :, :, 3:]  # no flat region
    target.requires_grad_(True)
    loss = FixedTargetLNCCLoss(target, kernel_size=3)
    value = loss(target.detach().clone().requires_grad_(True))
    assert value.item() == pytest.approx(-1.0, abs=1e-3)
    assert loss.t_sum.requires_grad is False


@pytest.mark.parametrize("kernel_size", (0, 4, -3))
def test_bad_kernel_size_raises(kernel_size):
    with pytest.raises(ValueError, match="odd and positive"):
        FixedTargetLNCCLoss(torch.rand(1, 1, 8, 8), kernel_size=kernel_size)


def test_prediction_of_another_shape_raises():
    loss = FixedTargetLNCCLoss(torch.rand(1, 1, 8, 8, 8))
    with pytest.raises(ValueError, match="target's shape"):
        loss(torch.rand(1, 1, 8, 8, 7))
