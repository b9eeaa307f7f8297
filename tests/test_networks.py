"""Tests for bundle.networks.registration_unet (VoxelMorph U-Net)."""

from __future__ import annotations

import itertools

import pytest
import torch
from monai.networks.blocks.warp import DVF2DDF

from bundle.networks.registration_unet import VM1_CHANNELS, VM2_CHANNELS, RegistrationUNet, upsample_field

COMBOS = list(itertools.product((2, 3), (VM1_CHANNELS, VM2_CHANNELS), (0, 7), (False, True)))


def _ids(combo):
    dims, channels, steps, half = combo
    return f"{dims}d-{'vm1' if channels is VM1_CHANNELS else 'vm2'}-steps{steps}-{'half' if half else 'full'}"


# small non-cubic inputs (multiples of size_divisor=16)
SHAPE = {2: (32, 16), 3: (32, 16, 16)}


def _input(dims: int, batch: int = 2, size: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = SHAPE[dims] if size is None else (size,) * dims
    return torch.rand(batch, 2, *shape, generator=g)


def _randomise_flow(net: RegistrationUNet, scale: float = 0.05, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        net.head.conv.weight.copy_(torch.randn(net.head.conv.weight.shape, generator=g) * scale)
        net.head.conv.bias.copy_(torch.randn(net.head.conv.bias.shape, generator=g) * scale)


@pytest.mark.parametrize("combo", COMBOS, ids=[_ids(c) for c in COMBOS])
def test_output_shape_and_zero_at_init(combo):
    dims, channels, steps, half = combo
    torch.manual_seed(0)
    net = RegistrationUNet(spatial_dims=dims, in_channels=2, channels=channels, integration_steps=steps, half_res=half)
    net.eval()
    x = _input(dims, batch=2)
    with torch.no_grad():
        fields = net.fields(x)
        ddf = net(x)
    assert ddf.shape == (2, dims, *SHAPE[dims])
    assert ddf.dtype == torch.float32
    # zero-initialised flow layer: identity transform at start, exactly
    assert torch.count_nonzero(ddf) == 0
    assert ("svf" in fields) == (steps > 0)
    if steps > 0:
        assert fields["svf"].shape == ddf.shape
        assert torch.count_nonzero(fields["svf"]) == 0
    # the flow layer itself is zero, the rest of the network is not
    assert torch.count_nonzero(net.head.conv.weight) == 0 and torch.count_nonzero(net.head.conv.bias) == 0
    assert net.size_divisor == 16


def test_decoder_channel_count_differs_between_vm1_and_vm2():
    n1 = RegistrationUNet(3, channels=VM1_CHANNELS)
    n2 = RegistrationUNet(3, channels=VM2_CHANNELS)
    # final features feeding the flow layer: 8 for VM1, 16 for VM2 (paper)
    assert n1.head.conv.in_channels == 8
    assert n2.head.conv.in_channels == 16
    assert n1.head.conv.out_channels == n2.head.conv.out_channels == 3
    assert sum(p.numel() for p in n2.parameters()) > sum(p.numel() for p in n1.parameters())


@pytest.mark.parametrize("dims", (2, 3))
def test_diffeomorphic_ddf_is_scaling_and_squaring_of_svf(dims):
    torch.manual_seed(0)
    steps = 7
    net = RegistrationUNet(spatial_dims=dims, channels=VM1_CHANNELS, integration_steps=steps, half_res=False).eval()
    _randomise_flow(net, scale=0.5)
    x = _input(dims, batch=1, seed=3)
    with torch.no_grad():
        fields = net.fields(x)
        svf, ddf = fields["svf"], fields["ddf"]
        expected = DVF2DDF(num_steps=steps)(svf)
        assert torch.equal(net(x), ddf)
    assert svf.abs().max() > 0.05  # non-trivial field
    assert not torch.allclose(svf, ddf, atol=1e-4)  # the exponential is not the velocity itself
    torch.testing.assert_close(ddf, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dims", (2, 3))
def test_half_res_diffeomorphic_ddf_integrated_at_half_res_then_upsampled(dims):
    torch.manual_seed(0)
    net = RegistrationUNet(spatial_dims=dims, channels=VM1_CHANNELS, integration_steps=5, half_res=True).eval()
    _randomise_flow(net, scale=0.5)
    x = _input(dims, batch=1, seed=4)
    with torch.no_grad():
        fields = net.fields(x)
    assert fields["svf"].shape == fields["ddf"].shape == (1, dims, *SHAPE[dims])
    assert fields["ddf"].abs().max() > 0.01
    assert not torch.allclose(fields["svf"], fields["ddf"], atol=1e-4)


@pytest.mark.parametrize("dims", (2, 3))
def test_half_resolution_upsampling_is_resize_field_and_traces_shape_free(dims):
    """Exactly twice the size: scale factor 2 and doubled vectors, the values of ``resize_field``; any other size
    falls back to it. A traced half-resolution network then runs on another input size."""
    from bundle.networks.blocks import _upsample_half_resolution
    from bundle.spatial import resize_field

    field = torch.randn(1, dims, *([6] * dims), generator=torch.Generator().manual_seed(0))
    for size in ([12] * dims, [13] * dims):
        torch.testing.assert_close(_upsample_half_resolution(field, size), resize_field(field, size), atol=1e-6, rtol=0)
    torch.manual_seed(0)
    net = RegistrationUNet(spatial_dims=dims, channels=VM1_CHANNELS, integration_steps=3, half_res=True).eval()
    _randomise_flow(net, scale=0.5)
    with torch.no_grad():
        traced = torch.jit.trace(net, _input(dims, batch=1, seed=1))
        other = torch.rand(1, 2, *([32] * dims), generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(traced(other), net(other), atol=1e-5, rtol=0)


def test_non_diffeomorphic_ddf_is_flow_output_when_full_res():
    torch.manual_seed(0)
    net = RegistrationUNet(spatial_dims=2, channels=VM1_CHANNELS, integration_steps=0, half_res=False).eval()
    with torch.no_grad():
        net.head.conv.bias.copy_(torch.tensor([1.5, -0.25]))
    with torch.no_grad():
        ddf = net(_input(2, batch=1))
    # zero weights + bias -> constant field equal to the bias
    assert torch.allclose(ddf[0, 0], torch.full(SHAPE[2], 1.5))
    assert torch.allclose(ddf[0, 1], torch.full(SHAPE[2], -0.25))


def test_half_res_non_diffeomorphic_bias_is_scaled_to_full_resolution():
    net = RegistrationUNet(spatial_dims=3, channels=VM1_CHANNELS, integration_steps=0, half_res=True).eval()
    with torch.no_grad():
        net.head.conv.bias.copy_(torch.tensor([1.0, -0.5, 0.25]))
        ddf = net(_input(3, batch=1))
    # the bias is a constant field in half-resolution voxels: twice as many full-resolution voxels
    for k, v in enumerate((2.0, -1.0, 0.5)):
        assert torch.allclose(ddf[0, k], torch.full(SHAPE[3], v), atol=1e-6)


@pytest.mark.parametrize("dims", (2, 3))
def test_gradients_reach_the_encoder(dims):
    torch.manual_seed(0)
    net = RegistrationUNet(spatial_dims=dims, channels=VM1_CHANNELS, integration_steps=0)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = _input(dims, batch=1, seed=5)
    target = torch.ones(1, dims, *SHAPE[dims])

    def step():
        opt.zero_grad()
        loss = ((net(x) - target) ** 2).mean()
        loss.backward()
        grads = {
            "flow": net.head.conv.weight.grad.abs().sum().item(),
            "encoder": sum(p.grad.abs().sum().item() for p in net.encoder.parameters()),
        }
        opt.step()
        return loss.item(), grads

    flow_before = net.head.conv.weight.detach().clone()
    loss1, grads1 = step()
    # the zero-initialised flow layer blocks gradients to the rest of the network at first
    assert grads1["flow"] > 0
    assert grads1["encoder"] == 0
    assert not torch.equal(net.head.conv.weight, flow_before)
    enc_before = [p.detach().clone() for p in net.encoder.parameters()]
    loss2, grads2 = step()
    assert grads2["encoder"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(enc_before, net.encoder.parameters()))
    assert loss2 < loss1


@pytest.mark.parametrize(
    "dims, shape, match",
    [
        (3, (1, 3, 16, 16, 16), "channels"),
        (3, (1, 1, 16, 16, 16), "channels"),
        (3, (1, 2, 16, 16), "spatial dims"),
        (2, (1, 2, 16, 16, 16), "spatial dims"),
        (3, (1, 2, 16, 16, 24), "multiple of 16"),
        (2, (1, 2, 8, 16), "multiple of 16"),
    ],
)
def test_bad_input_raises(dims, shape, match):
    net = RegistrationUNet(spatial_dims=dims, channels=VM1_CHANNELS)
    with pytest.raises(ValueError, match=match):
        net(torch.zeros(shape))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"spatial_dims": 1},
        {"spatial_dims": 4},
        {"integration_steps": -1},
        {"channels": ((16, 32, 32, 32), (32, 32))},
    ],
)
def test_bad_constructor_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        RegistrationUNet(**kwargs)


@pytest.mark.parametrize("dims", (2, 3))
def test_upsample_field_scales_vectors(dims):
    field = torch.ones(2, dims, *([8] * dims))
    field[1] *= -0.5
    out = upsample_field(field, [16] * dims)
    assert out.shape == (2, dims, *([16] * dims))
    assert torch.allclose(out[0], torch.full_like(out[0], 2.0))
    assert torch.allclose(out[1], torch.full_like(out[1], -1.0))


def test_upsample_field_anisotropic_scale_per_axis():
    field = torch.ones(1, 3, 4, 8, 8)
    out = upsample_field(field, (16, 16, 8))
    assert out.shape == (1, 3, 16, 16, 8)
    for k, scale in enumerate((4.0, 2.0, 1.0)):
        assert torch.allclose(out[0, k], torch.full((16, 16, 8), scale))


def test_upsample_field_same_size_is_identity():
    field = torch.randn(1, 2, 8, 8)
    torch.testing.assert_close(upsample_field(field, (8, 8)), field)


def test_blocks_have_no_normalisation_layers():
    """Regression: MONAI Convolution's default norm=INSTANCE used to be added to every block (not VoxelMorph)."""
    net = RegistrationUNet(spatial_dims=3, channels=VM1_CHANNELS)
    norm_types = (torch.nn.modules.instancenorm._InstanceNorm, torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm)
    norms = [m for m in net.modules() if isinstance(m, norm_types)]
    assert norms == []
    blocks = [*net.encoder.blocks, *net.decoder.up_blocks, *net.decoder.extra]
    acts = [m for m in net.modules() if isinstance(m, torch.nn.LeakyReLU)]
    assert len(acts) == len(blocks) and all(a.negative_slope == 0.2 for a in acts)


@pytest.mark.parametrize("train", (True, False))
@pytest.mark.parametrize("dims", (2, 3))
def test_forward_on_minimum_size_input(dims, train):
    """Regression: with InstanceNorm the 1-voxel bottleneck of a 16^3 input raised in F.instance_norm."""
    net = RegistrationUNet(spatial_dims=dims, channels=VM1_CHANNELS).train(train)
    with torch.no_grad():
        net.head.conv.bias.fill_(0.5)
    ddf = net(_input(dims, batch=1, size=net.size_divisor))
    assert ddf.shape == (1, dims, *([16] * dims))
    assert torch.allclose(ddf, torch.full_like(ddf, 0.5))
