"""Instance-specific optimisation of the predicted DDF (InstanceOptimisationInferer)."""

from __future__ import annotations

import pytest
import torch

from bundle.engines import InstanceOptimisationInferer
from bundle.losses import JointRegSegLoss, RegistrationLoss
from bundle.networks import JointRegSegNet, RegistrationUNet


def _shifted_pair(shape=(32, 32, 32)):
    """A smooth blob and the same blob shifted by 2 voxels along the first axis."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij"))
    centre = torch.tensor(shape, dtype=torch.float32).view(3, 1, 1, 1) / 2
    fixed = torch.exp(-((grid - centre) ** 2).sum(0) / 40.0)
    moving = torch.roll(fixed, shifts=2, dims=0)
    return moving[None, None], fixed[None, None]


@pytest.mark.parametrize("joint", [False, True])
def test_optimisation_lowers_the_loss_and_keeps_segmentations(joint):
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
        refined = InstanceOptimisationInferer(loss, steps=40, learning_rate=0.2)(inputs, net)
    assert refined.shape == plain.shape and not refined.requires_grad
    with torch.no_grad():
        assert loss(refined, target) < loss(plain, target) - 1e-3
    # the DDF moved toward the true shift (+2 voxels along axis 0 in the pull-back convention)
    assert refined[:, 0, 12:20, 12:20, 12:20].mean() > 0.5
    torch.testing.assert_close(refined[:, 3:], plain[:, 3:])  # segmentation channels as predicted


def test_bad_arguments():
    with pytest.raises(ValueError, match="steps must be"):
        InstanceOptimisationInferer(RegistrationLoss(), steps=-1)
    inferer = InstanceOptimisationInferer(RegistrationLoss(), steps=2, num_channels=2)
    net = RegistrationUNet(3, 2, channels=((4, 8, 8, 8), (8, 8, 8, 8, 4, 4)))
    with pytest.raises(ValueError, match="cat\\(\\[moving, fixed\\]\\)"):
        inferer(torch.zeros(1, 2, 16, 16, 16), net)
