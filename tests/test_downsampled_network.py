"""DownsampledNetwork: a network run on a coarser grid than the pipeline's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bundle.networks import DownsampledNetwork, JointRegSegNet

TINY = ((4, 8, 8, 8), (8, 8, 8, 8, 4, 4))


class _ConstantField(nn.Module):
    """A stand-in network returning a linear DDF along axis 0 (coarse voxels) and one logit channel = input."""

    size_divisor = 4

    def forward(self, x):
        ramp = torch.arange(x.shape[2], dtype=x.dtype).view(1, 1, -1, 1, 1).expand(x.shape[0], 1, *x.shape[2:])
        return torch.cat([1.5 + 0.25 * ramp, torch.zeros_like(ramp), -torch.ones_like(ramp), x[:, :1]], dim=1)


def test_ddf_is_rescaled_to_input_voxels_and_linear_fields_survive():
    net = DownsampledNetwork(_ConstantField(), factor=2)
    assert net.size_divisor == 8
    x = torch.rand(1, 2, 16, 8, 8)
    out = net(x)
    assert out.shape == (1, 4, 16, 8, 8)
    torch.testing.assert_close(out[:, 2], torch.full_like(out[:, 2], -2.0))  # -1 coarse voxel = -2 fine voxels
    # coarse voxel i sits at fine position 2i + 0.5: the linear coarse field 1.5 + 0.25 i becomes 2 (1.5 + 0.25 (p - 0.5) / 2)
    p = torch.arange(16, dtype=torch.float32)
    expected = 2 * (1.5 + 0.25 * (p - 0.5) / 2)
    torch.testing.assert_close(out[0, 0, 1:-1, 3, 3], expected[1:-1])  # borders clamp (interpolation edge)
    # the segmentation channel is the pooled input, upsampled back: same mean
    torch.testing.assert_close(out[:, 3].mean(), x[:, 0].mean(), atol=1e-5, rtol=0)


def test_wrap_with_factor_one_is_the_network_itself_and_state_dict_is_unchanged():
    joint = JointRegSegNet(3, 1, 2, channels=TINY)
    assert DownsampledNetwork.wrap(joint, 1) is joint
    wrapped = DownsampledNetwork.wrap(joint, 2)
    assert isinstance(wrapped, DownsampledNetwork) and wrapped.network is joint
    assert set(joint.state_dict()) == {k.removeprefix("network.") for k in wrapped.state_dict()}
    out = wrapped(torch.rand(1, 2, 32, 32, 32))
    assert out.shape == (1, joint.out_channels, 32, 32, 32)


def test_bad_factor_and_input_size():
    with pytest.raises(ValueError, match="factor must be"):
        DownsampledNetwork(_ConstantField(), factor=0)
    with pytest.raises(ValueError, match="factor must be"):
        DownsampledNetwork(_ConstantField(), factor=1.5)
    with pytest.raises(ValueError, match="multiple of factor"):
        DownsampledNetwork(_ConstantField(), factor=2)(torch.rand(1, 2, 15, 8, 8))
