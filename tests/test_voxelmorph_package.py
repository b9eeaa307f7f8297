"""VoxelMorphPackageNet: the voxelmorph package's model behind the bundle's network interface."""

from __future__ import annotations

import pytest
import torch
from monai.networks.blocks import Warp

pytest.importorskip("voxelmorph")
from bundle.networks import VoxelMorphPackageNet  # noqa: E402


def test_displacement_follows_monai_warp_convention():
    torch.manual_seed(0)
    net = VoxelMorphPackageNet()
    x = torch.rand(1, 2, 32, 48, 16)
    with torch.no_grad():
        net.net.flow_layer.conv0.weight.normal_(0.0, 1.0)  # a field of a few voxels instead of ~0 at initialisation
        ddf = net(x)
        _, warped = net.net(x[:, :1], x[:, 1:], return_warped_source=True)
    assert ddf.shape == (1, 3, 32, 48, 16) and float(ddf.abs().max()) > 0.8
    ours = Warp("bilinear", "zeros")(x[:, :1], ddf)
    assert torch.allclose(ours[..., 3:-3, 3:-3, 3:-3], warped[..., 3:-3, 3:-3, 3:-3], atol=1e-4)


def test_bad_shapes_are_clear_errors():
    net = VoxelMorphPackageNet()
    with pytest.raises(ValueError, match="multiple of 16"):
        net(torch.rand(1, 2, 24, 32, 32))
    with pytest.raises(ValueError, match="even"):
        VoxelMorphPackageNet(in_channels=3)


def test_one_training_step_through_the_bundle_loss_moves_the_field():
    from bundle.losses import RegistrationLoss

    torch.manual_seed(0)
    net = VoxelMorphPackageNet()
    loss = RegistrationLoss(similarity="mse", smoothness="diffusion", smoothness_weight=0.1)
    moving = torch.zeros(1, 1, 16, 16, 16)
    moving[..., 4:10, 4:10, 4:10] = 1.0
    fixed = torch.roll(moving, 1, dims=2)
    optimiser = torch.optim.Adam(net.parameters(), 1e-2)
    values = []
    for _ in range(5):
        optimiser.zero_grad()
        value = loss(net(torch.cat([moving, fixed], 1)), {"moving": moving, "fixed": fixed})
        value.backward()
        optimiser.step()
        values.append(float(value))
    assert all(torch.isfinite(torch.tensor(values))) and values[-1] < values[0]
