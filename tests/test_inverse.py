"""Inverse DDF of the diffeomorphic (``"svf"``) models: ``exp(-svf)`` composed with ``exp(svf)`` is ~identity.

Composition of pull-backs on one grid (voxel units): ``(phi o psi)(x) = x + v(x) + u(x + v(x))``; the
residual ``|v(x) + u(x + v(x))|`` (and the same with ``u``, ``v`` swapped) is measured away from the border
(4 voxels), where the zero padding of the scaling and squaring does not reach.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.networks.blocks import Warp

from bundle.networks import VM1_CHANNELS, DeformationHead, JointRegSegNet, RegistrationUNet

SHAPE = (32, 32, 32)
MARGIN = 4


def _residual(forward: torch.Tensor, inverse: torch.Tensor) -> tuple[float, float]:
    """Max and mean over the interior of the larger of the two composition residuals, in voxels."""
    warp = Warp(mode="bilinear", padding_mode="border")
    r1 = (inverse + warp(forward, inverse)).norm(dim=1)
    r2 = (forward + warp(inverse, forward)).norm(dim=1)
    interior = (slice(None), *[slice(MARGIN, -MARGIN)] * 3)
    r = torch.maximum(r1, r2)[interior]
    return r.max().item(), r.mean().item()


def _smooth_velocity(amplitude: float, sigma: float = 3.0, seed: int = 0) -> torch.Tensor:
    """``(1, 3, *SHAPE)`` Gaussian-smoothed noise scaled to ``amplitude`` voxels at most."""
    noise = torch.randn(1, 3, *SHAPE, generator=torch.Generator().manual_seed(seed))
    radius = int(3 * sigma)
    k = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-(k**2) / (2 * sigma**2))
    g = g / g.sum()
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = -1
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        noise = F.conv3d(F.pad(noise, pad, mode="replicate"), g.view(*shape).repeat(3, 1, 1, 1, 1), groups=3)
    return noise / noise.abs().max() * amplitude


def test_inverse_of_a_smooth_velocity_composes_to_identity():
    velocity = _smooth_velocity(amplitude=4.0)
    head = DeformationHead(3, 3, deformation="svf", integration_steps=7)
    with torch.no_grad():  # the head's convolution passes its input through: svf = velocity
        head.conv.weight.zero_()
        for c in range(3):
            head.conv.weight[c, c, 1, 1, 1] = 1.0
        out = head(velocity, SHAPE, inverse=True)
    torch.testing.assert_close(out["svf"], velocity)
    assert out["ddf"].abs().max() > 2.0  # a large deformation (voxels)
    worst, mean = _residual(out["ddf"], out["inverse_ddf"])
    naive_worst, naive_mean = _residual(out["ddf"], -out["ddf"])  # negating the DDF is not its inverse
    print(f"smooth velocity (max 4 voxels): residual max {worst:.4f}, mean {mean:.4f} voxels "
          f"(negated DDF: max {naive_worst:.3f}, mean {naive_mean:.3f})")
    assert worst < 0.05 and mean < 0.01
    assert naive_mean > 3 * mean


@pytest.mark.parametrize(
    "make",
    (
        lambda: RegistrationUNet(channels=VM1_CHANNELS, integration_steps=7),
        lambda: RegistrationUNet(channels=VM1_CHANNELS, integration_steps=7, half_res=True),
        lambda: JointRegSegNet(channels=VM1_CHANNELS, deformation="svf", integration_steps=7),
    ),
    ids=("unet", "unet-half-res", "joint"),
)
def test_network_inverse_composes_to_identity(make):
    torch.manual_seed(0)
    net = make().eval()
    head = net.head if isinstance(net, RegistrationUNet) else net.reg_head
    keys = set(net.state_dict())
    x = F.avg_pool3d(torch.rand(1, 2, *SHAPE, generator=torch.Generator().manual_seed(1)), 5, 1, 2)
    with torch.no_grad():  # random flow layer scaled to a velocity of at most 3 voxels
        torch.nn.init.normal_(head.conv.weight, std=0.02)
        head.conv.weight *= 3.0 / net.fields(x)["svf"].abs().max()
        forward, inverse = net.forward_and_inverse(x)
        fields = net.fields(x)
    assert set(net.state_dict()) == keys  # no new parameters or buffers: checkpoints load unchanged
    assert "inverse_ddf" not in fields  # only on request
    torch.testing.assert_close(forward, fields["ddf"])
    assert forward.abs().max() > 1.5
    worst, mean = _residual(forward, inverse)
    naive_worst, naive_mean = _residual(forward, -forward)
    print(f"{type(net).__name__}: ddf max {forward.abs().max():.2f}, residual max {worst:.4f}, mean {mean:.4f} voxels "
          f"(negated DDF: max {naive_worst:.3f}, mean {naive_mean:.3f})")
    assert worst < 0.4 and mean < 0.1  # rougher than a smooth velocity: a random flow layer on image features
    assert naive_mean > 3 * mean


@pytest.mark.parametrize("make", (lambda: RegistrationUNet(channels=VM1_CHANNELS), lambda: JointRegSegNet(channels=VM1_CHANNELS, deformation="cumsum")))
def test_inverse_needs_svf(make):
    net = make()
    with pytest.raises(ValueError, match="inverse=True needs deformation 'svf'"):
        net.forward_and_inverse(torch.rand(1, 2, 16, 16, 16))
