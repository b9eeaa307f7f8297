"""Instance-specific optimisation of the predicted DDF (InstanceOptimisationInferer)."""

from __future__ import annotations

import pytest
import torch

from monai.networks.blocks import Warp

from bundle.engines import InstanceOptimisationInferer
from bundle.losses import JointRegSegLoss, RegistrationLoss
from bundle.metrics import jacobian_determinant
from bundle.networks import JointRegSegNet, RegistrationUNet


def _shifted_pair(shape=(32, 32, 32)):
    """A smooth blob and the same blob shifted by 2 voxels along the first axis."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij"))
    centre = torch.tensor(shape, dtype=torch.float32).view(3, 1, 1, 1) / 2
    fixed = torch.exp(-((grid - centre) ** 2).sum(0) / 40.0)
    moving = torch.roll(fixed, shifts=2, dims=0)
    return moving[None, None], fixed[None, None]


@pytest.mark.parametrize("residual, integration_downsample", [("ddf", 1), ("svf", 1), ("svf", 2)])
@pytest.mark.parametrize("joint", [False, True])
def test_optimisation_lowers_the_loss_and_keeps_segmentations(joint, residual, integration_downsample):
    torch.manual_seed(0)
    moving, fixed = _shifted_pair()
    if joint:
        net, loss = JointRegSegNet(3, 1, 2, channels=((4, 8, 8, 8), (8, 8, 8, 8, 4, 4))), JointRegSegLoss(2, mask_source="prediction", seg_weight=0.0)
    else:
        net, loss = RegistrationUNet(3, 2, channels=((4, 8, 8, 8), (8, 8, 8, 8, 4, 4))), RegistrationLoss(smoothness_weight=0.1)
    net.eval()
    inputs = torch.cat([moving, fixed], dim=1)
    target = {"moving": moving, "fixed": fixed}
    with torch.no_grad():  # as in an evaluator
        plain = InstanceOptimisationInferer(loss, steps=0)(inputs, net)
        refined = InstanceOptimisationInferer(
            loss, steps=40, learning_rate=0.2, residual=residual, integration_downsample=integration_downsample
        )(inputs, net)
    assert refined.shape == plain.shape and not refined.requires_grad
    with torch.no_grad():
        assert loss(refined, target) < loss(plain, target) - 1e-3
    # the DDF moved toward the true shift (+2 voxels along axis 0 in the pull-back convention)
    assert refined[:, 0, 12:20, 12:20, 12:20].mean() > 0.5
    torch.testing.assert_close(refined[:, 3:], plain[:, 3:])  # segmentation channels as predicted


def test_svf_residual_composes_with_the_network_field_without_folding():
    """phi = phi_net o exp(v): a zero velocity returns the network's DDF; a large one still does not fold."""
    torch.manual_seed(0)
    shape = (24, 24, 24)
    grid = torch.stack(torch.meshgrid(*[torch.linspace(0, 3.14, s) for s in shape], indexing="ij"))
    start = torch.stack([1.5 * torch.sin(grid[1]), torch.zeros(shape), 0.8 * torch.cos(grid[0])])[None]  # smooth
    inferer = InstanceOptimisationInferer(RegistrationLoss(), steps=1, residual="svf")
    torch.testing.assert_close(inferer._refined(start, torch.zeros_like(start)), start)
    # a constant velocity of +1 voxel along axis 2: exp(v) is that translation, composed with the start field
    v = torch.zeros_like(start)
    v[:, 2] = 1.0
    composed = inferer._refined(start, v)
    expected = Warp(padding_mode="border")(start, v) + v
    inner = (..., slice(2, -2), slice(2, -2), slice(2, -4))  # exp(v) uses zero padding: not exact at the far end
    torch.testing.assert_close(composed[inner], expected[inner], atol=1e-4, rtol=0)
    # a smooth random velocity up to ~7 voxels: used as a DDF it folds, its exponential does not
    noise = torch.randn(1, 3, *shape)
    for _ in range(2):
        noise = torch.nn.functional.avg_pool3d(noise, 7, stride=1, padding=3)
    velocity = 1.5 * noise / noise.std()
    assert jacobian_determinant(velocity).le(0).float().mean() > 0.01
    assert jacobian_determinant(inferer._refined(torch.zeros_like(start), velocity))[..., 2:-2, 2:-2, 2:-2].gt(0).all()
    # integrated on a 2x coarser grid and upsampled: the composed field has the start field's shape, no folding
    coarse = InstanceOptimisationInferer(RegistrationLoss(), steps=1, residual="svf", integration_downsample=2)
    composed = coarse._refined(start, velocity[..., ::2, ::2, ::2])
    assert composed.shape == start.shape
    assert jacobian_determinant(composed)[..., 2:-2, 2:-2, 2:-2].gt(0).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="steps must be"):
        InstanceOptimisationInferer(RegistrationLoss(), steps=-1)
    with pytest.raises(ValueError, match="residual must be"):
        InstanceOptimisationInferer(RegistrationLoss(), residual="bspline")
    with pytest.raises(ValueError, match="integration_downsample must be"):
        InstanceOptimisationInferer(RegistrationLoss(), residual="svf", integration_downsample=0)
    with pytest.raises(ValueError, match="needs residual='svf'"):
        InstanceOptimisationInferer(RegistrationLoss(), residual="ddf", integration_downsample=2)
    inferer = InstanceOptimisationInferer(RegistrationLoss(), steps=2, num_channels=2)
    net = RegistrationUNet(3, 2, channels=((4, 8, 8, 8), (8, 8, 8, 8, 4, 4)))
    with pytest.raises(ValueError, match="cat\\(\\[moving, fixed\\]\\)"):
        inferer(torch.zeros(1, 2, 16, 16, 16), net)
