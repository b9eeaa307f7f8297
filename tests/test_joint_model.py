"""Tests for bundle.networks.joint (JointRegSegNet, Estienne et al. 2020) and the cumsum deformation head."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bundle.networks.blocks import ConvDecoder, ConvEncoder, DeformationHead
from bundle.networks.joint import JointRegSegNet, merge_features
from bundle.networks.outputs import join_ddf, pack_joint_output, split_ddf, split_joint_output

# tiny network: 4 encoder levels (size divisor 16), few features, so every test runs in well under a second
CHANNELS = ((4, 8, 8, 8), (8, 8, 8, 8, 8, 4))
SIZE = {2: (32, 16), 3: (16, 16, 16)}


def _net(dims: int = 3, **kwargs) -> JointRegSegNet:
    torch.manual_seed(0)
    kwargs.setdefault("channels", CHANNELS)
    return JointRegSegNet(spatial_dims=dims, **kwargs).eval()


def _images(dims: int = 3, channels: int = 1, batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (batch, channels, *SIZE[dims])
    return torch.rand(shape, generator=g), torch.rand(shape, generator=g)


def _randomise(module: torch.nn.Module, scale: float = 0.1, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g))


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


# ---------------------------------------------------------------------------------------------- sharing


def test_encoder_and_seg_decoder_are_shared_modules_called_twice():
    net = _net()
    encoders = [m for m in net.modules() if isinstance(m, ConvEncoder)]
    assert len(encoders) == 1 and encoders[0] is net.encoder
    enc_calls, seg_calls, reg_calls = _count_calls(net.encoder), _count_calls(net.seg_decoder), _count_calls(net.reg_decoder)
    moving, fixed = _images()
    net(torch.cat([moving, fixed], 1))
    assert enc_calls[0] == 2  # once for the moving, once for the fixed image (not their concatenation)
    assert seg_calls[0] == 2
    assert reg_calls[0] == 1


def test_encoder_receives_one_image_not_the_pair():
    net = _net(in_channels=4)
    seen = []
    net.encoder.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    moving, fixed = _images(channels=4)
    net(torch.cat([moving, fixed], 1))
    assert seen == [4, 4]
    assert net.encoder.blocks[0].conv.in_channels == 4


def test_parameter_count_is_one_encoder_plus_decoders_and_heads():
    net = _net(num_classes=3)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    encoder = ConvEncoder(3, 1, CHANNELS[0])
    seg_decoder = ConvDecoder(3, encoder.out_channels, CHANNELS[1])
    reg_decoder = ConvDecoder(3, encoder.out_channels, CHANNELS[1])
    seg_head = seg_decoder.out_channels * 3 + 3  # 1x1 conv
    reg_head = reg_decoder.out_channels * 3 * 27 + 3  # 3x3x3 conv to 3 channels
    expected = n(encoder) + n(seg_decoder) + n(reg_decoder) + seg_head + reg_head
    assert n(net) == expected
    # a second (unshared) encoder would add exactly n(encoder) parameters
    assert n(net) - n(net.encoder) == n(seg_decoder) + n(reg_decoder) + seg_head + reg_head


def test_modifying_one_encoder_weight_changes_both_segmentations():
    net = _net()
    moving, fixed = _images()
    x = torch.cat([moving, fixed], 1)
    with torch.no_grad():
        before = net.unpack(net(x))
        net.encoder.blocks[0].conv.weight[0, 0, 1, 1, 1] += 1.0
        after = net.unpack(net(x))
    assert not torch.allclose(before["seg_moving"], after["seg_moving"])
    assert not torch.allclose(before["seg_fixed"], after["seg_fixed"])


def test_segmentation_is_symmetric_in_the_pair():
    net = _net()
    a, b = _images()
    with torch.no_grad():
        ab = net.unpack(net(torch.cat([a, b], 1)))
        ba = net.unpack(net(torch.cat([b, a], 1)))
    # the shared encoder + shared seg decoder segment each image independently of its partner
    torch.testing.assert_close(ab["seg_moving"], ba["seg_fixed"])
    torch.testing.assert_close(ab["seg_fixed"], ba["seg_moving"])


# ------------------------------------------------------------------------------------------------ merge


def test_merge_features():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, 4, 4, generator=g), torch.randn(2, 5, 4, 4, generator=g)
    assert torch.equal(merge_features(a, a, "subtract"), torch.zeros_like(a))
    torch.testing.assert_close(merge_features(a, b, "subtract"), -merge_features(b, a, "subtract"))
    torch.testing.assert_close(merge_features(a, b, "subtract"), a - b)
    cat = merge_features(a, b, "concat")
    assert cat.shape == (2, 10, 4, 4)
    assert torch.equal(cat[:, :5], a) and torch.equal(cat[:, 5:], b)
    torch.testing.assert_close(merge_features(a, b, "add"), a + b)
    with pytest.raises(ValueError):
        merge_features(a, b, "multiply")
    with pytest.raises(ValueError):
        JointRegSegNet(3, channels=CHANNELS, merge="multiply")


@pytest.mark.parametrize("dims", [2, 3])
def test_subtract_identical_images_give_an_image_independent_ddf(dims):
    """moving == fixed => merged code is 0 at every level, so the ddf depends only on the biases."""
    net = _net(dims)
    _randomise(net.reg_decoder, seed=2)
    _randomise(net.reg_head, seed=3)
    a, b = _images(dims, batch=1)
    with torch.no_grad():
        ddf_a = net.unpack(net(torch.cat([a, a], 1)))["ddf"]
        ddf_b = net.unpack(net(torch.cat([b, b], 1)))["ddf"]
        ddf_ab = net.unpack(net(torch.cat([a, b], 1)))["ddf"]
    assert ddf_a.abs().max() > 0  # the random head is not the identity...
    torch.testing.assert_close(ddf_a, ddf_b, rtol=0, atol=1e-6)  # ... but it does not see the image
    assert not torch.allclose(ddf_a, ddf_ab)  # different images do move the field
    # zero all biases: zero code -> zero features everywhere -> zero ddf
    with torch.no_grad():
        for name, p in net.reg_decoder.named_parameters():
            if name.endswith("bias"):
                p.zero_()
        net.reg_head.conv.bias.zero_()
        ddf0 = net.unpack(net(torch.cat([b, b], 1)))["ddf"]
    assert torch.equal(ddf0, torch.zeros_like(ddf0))
    assert ddf0.shape == (1, dims, *SIZE[dims])


def test_subtract_merge_swapping_images_negates_the_merged_code():
    net = _net()
    a, b = _images(batch=1)
    inputs = []
    net.reg_decoder.register_forward_hook(lambda m, args, out: inputs.append(args[0]))
    with torch.no_grad():
        net(torch.cat([a, b], 1))
        net(torch.cat([b, a], 1))
    for level_ab, level_ba in zip(inputs[0], inputs[1]):
        torch.testing.assert_close(level_ab, -level_ba)
    assert torch.equal(inputs[0][0], a - b)  # level 0 is the image difference


@pytest.mark.parametrize("merge", ["concat", "add"])
def test_other_merges_run(merge):
    net = _net(merge=merge)
    _randomise(net.reg_head, seed=4)
    a, b = _images(batch=1)
    with torch.no_grad():
        out = net.unpack(net(torch.cat([a, b], 1)))
    assert out["ddf"].shape == (1, 3, *SIZE[3])
    assert torch.isfinite(out["ddf"]).all() and out["ddf"].abs().max() > 0
    first = net.reg_decoder.up_blocks[0].conv.in_channels
    assert first == (2 if merge == "concat" else 1) * CHANNELS[0][-1]


# --------------------------------------------------------------------------------------- packed output


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("in_channels,num_classes", [(1, 2), (4, 4)])
def test_packed_output_and_unpack_roundtrip(dims, in_channels, num_classes):
    net = _net(dims, in_channels=in_channels, num_classes=num_classes)
    moving, fixed = _images(dims, channels=in_channels, batch=2)
    x = torch.cat([moving, fixed], 1)
    with torch.no_grad():
        packed = net(x)
        fields = net.fields(x)
    assert net.out_channels == dims + 2 * num_classes
    assert packed.shape == (2, dims + 2 * num_classes, *SIZE[dims])
    out = net.unpack(packed)
    assert out["ddf"].shape == (2, dims, *SIZE[dims])
    assert out["seg_moving"].shape == out["seg_fixed"].shape == (2, num_classes, *SIZE[dims])
    for key in ("ddf", "seg_moving", "seg_fixed"):
        assert torch.equal(out[key], fields[key])
    assert torch.equal(torch.cat([out["ddf"], out["seg_moving"], out["seg_fixed"]], 1), packed)
    assert split_joint_output(packed, dims, num_classes).keys() == out.keys()
    with pytest.raises(ValueError):
        split_joint_output(packed[:, :-1], dims, num_classes)
    with pytest.raises(ValueError):
        net.unpack(torch.cat([packed, packed[:, :1]], 1))
    assert torch.equal(pack_joint_output(out["ddf"], out["seg_moving"], out["seg_fixed"]), packed)
    ddf, extra = split_ddf(packed, dims)  # the layout every consumer relies on: the DDF first
    assert torch.equal(ddf, out["ddf"]) and extra.shape[1] == 2 * num_classes
    assert torch.equal(join_ddf(ddf, extra), packed)
    ddf_only, nothing = split_ddf(out["ddf"], dims)  # a registration network's output: no extra channel
    assert nothing.shape[1] == 0 and torch.equal(join_ddf(ddf_only, nothing), out["ddf"])
    with pytest.raises(ValueError, match="DDF channels"):
        split_ddf(packed[:, : dims - 1], dims)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("in_channels,num_classes", [(1, 2), (4, 4)])
def test_predict(dims, in_channels, num_classes):
    net = _net(dims, in_channels=in_channels, num_classes=num_classes)
    moving, fixed = _images(dims, channels=in_channels, batch=2)
    with torch.no_grad():
        out = net.predict(torch.cat([moving, fixed], 1))
    spatial = SIZE[dims]
    assert out["ddf"].shape == (2, dims, *spatial)
    assert out["warped"].shape == (2, in_channels, *spatial)
    assert out["seg_moving"].shape == out["seg_fixed"].shape == (2, num_classes, *spatial)
    assert out["warped_seg_moving"].shape == (2, num_classes, *spatial)
    # zero-initialised head: identity at init
    assert torch.equal(out["ddf"], torch.zeros_like(out["ddf"]))
    torch.testing.assert_close(out["warped"], moving, rtol=0, atol=1e-5)
    torch.testing.assert_close(out["warped_seg_moving"], torch.softmax(out["seg_moving"], 1), rtol=0, atol=1e-5)
    torch.testing.assert_close(out["warped_seg_moving"].sum(1), torch.ones(2, *spatial), rtol=0, atol=1e-5)


def test_predict_warps_with_the_predicted_ddf():
    net = _net(2)
    with torch.no_grad():
        net.reg_head.conv.bias.copy_(torch.tensor([2.0, 0.0]))  # constant shift of 2 voxels along axis 0
    moving, fixed = _images(2, batch=1)
    with torch.no_grad():
        out = net.predict(torch.cat([moving, fixed], 1))
    ddf = out["ddf"]
    torch.testing.assert_close(ddf[:, 0], torch.full_like(ddf[:, 0], 2.0))
    # pull-back: warped(i) = moving(i + 2) away from the border
    torch.testing.assert_close(out["warped"][0, 0, :-2], moving[0, 0, 2:], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ deformations


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("deformation", ["svf", "cumsum"])
def test_svf_and_cumsum_deformations(dims, deformation):
    net = _net(dims, deformation=deformation, integration_steps=5)
    moving, fixed = _images(dims, batch=2)
    x = torch.cat([moving, fixed], 1)
    with torch.no_grad():
        fields = net.fields(x)
        out = net.unpack(net(x))
    extra = "svf" if deformation == "svf" else "grid_gradient"
    assert fields[extra].shape == (2, dims, *SIZE[dims])
    # zero-initialised head: both parameterisations start at exactly the identity
    assert torch.equal(out["ddf"], torch.zeros_like(out["ddf"]))
    if deformation == "cumsum":
        assert torch.equal(fields["grid_gradient"], torch.ones_like(fields["grid_gradient"]))
    _randomise(net.reg_head, seed=5)
    with torch.no_grad():
        out = net.unpack(net(x))
    assert torch.isfinite(out["ddf"]).all() and out["ddf"].abs().max() > 0


def test_cumsum_neutral_value_is_exactly_the_identity():
    head = DeformationHead(3, 4, "cumsum")
    features = torch.randn(2, 4, 8, 6, 5)
    out = head(features, (8, 6, 5))
    assert torch.equal(out["grid_gradient"], torch.ones(2, 3, 8, 6, 5))  # sigmoid(0) * 2
    assert torch.equal(out["ddf"], torch.zeros(2, 3, 8, 6, 5))  # no one-voxel offset


@pytest.mark.parametrize("dims", [2, 3])
def test_cumsum_constant_gradient_gives_exclusive_cumulative_sum(dims):
    shape = (9, 7, 6)[:dims]
    head = DeformationHead(dims, 3, "cumsum")
    c = torch.tensor([1.5, 0.4, 1.2])[:dims]
    with torch.no_grad():
        head.conv.bias.copy_(torch.log(c / (2 - c)))  # 2 * sigmoid(b) = c
    out = head(torch.randn(1, 3, *shape), shape)
    phi = out["grid_gradient"]
    torch.testing.assert_close(phi, c.view(1, dims, *([1] * dims)).expand_as(phi), rtol=0, atol=1e-6)
    ddf = out["ddf"]
    for k in range(dims):
        index = torch.arange(shape[k], dtype=torch.float32).view(*([1] * k), -1, *([1] * (dims - k - 1)))
        expected = ((c[k] - 1) * index).expand(shape)
        torch.testing.assert_close(ddf[0, k], expected, rtol=0, atol=1e-5)
        assert torch.equal(ddf[0, k].select(k, 0), torch.zeros_like(ddf[0, k].select(k, 0)))  # first voxel fixed


def test_cumsum_grid_is_monotonic_along_each_axis():
    """phi = 2 sigmoid(.) > 0: the sampling grid increases strictly along its own axis (no folding)."""
    head = DeformationHead(3, 4, "cumsum")
    _randomise(head, scale=0.3, seed=6)
    out = head(torch.randn(1, 4, 8, 8, 8), (8, 8, 8))
    index = torch.stack(torch.meshgrid(*[torch.arange(8.0)] * 3, indexing="ij"))
    grid = out["ddf"][0] + index
    for k in range(3):
        assert (torch.diff(grid[k], dim=k) > 0).all()
        torch.testing.assert_close(torch.diff(grid[k], dim=k), out["grid_gradient"][0, k].narrow(k, 0, 7))


def test_deformation_head_option_errors():
    with pytest.raises(ValueError):
        DeformationHead(3, 4, "cumsum", half_res=True)
    with pytest.raises(ValueError):
        DeformationHead(3, 4, "svf", integration_steps=0)
    with pytest.raises(ValueError):
        DeformationHead(3, 4, "bspline")
    with pytest.raises(ValueError):
        JointRegSegNet(3, channels=CHANNELS, deformation="svf", integration_steps=0)
    with pytest.raises(ValueError):
        JointRegSegNet(3, channels=CHANNELS, deformation="affine")
    with pytest.raises(ValueError):
        JointRegSegNet(4, channels=CHANNELS)
    with pytest.raises(ValueError):
        JointRegSegNet(3, channels=CHANNELS, num_classes=1)


# ------------------------------------------------------------------------------------ gradients, inputs


def _encoder_grad_norm(net) -> float:
    return sum(float(p.grad.abs().sum()) for p in net.encoder.parameters() if p.grad is not None)


def test_gradient_reaches_the_shared_encoder_from_both_losses():
    net = _net().train()
    _randomise(net.reg_head, scale=0.05, seed=7)  # a zero head blocks the gradient to the decoder at init
    moving, fixed = _images()
    x = torch.cat([moving, fixed], 1)
    label = (moving[:, 0] > 0.5).long()

    net.zero_grad()
    out = net.unpack(net(x))
    F.cross_entropy(out["seg_moving"], label).backward()
    seg_grad = _encoder_grad_norm(net)
    assert seg_grad > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in net.reg_decoder.parameters())

    net.zero_grad()
    out = net.predict(x)
    F.mse_loss(out["warped"], fixed).backward()
    reg_grad = _encoder_grad_norm(net)
    assert reg_grad > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in net.seg_head.parameters())

    # the fixed image's segmentation also trains the (same) encoder
    net.zero_grad()
    out = net.unpack(net(x))
    F.cross_entropy(out["seg_fixed"], (fixed[:, 0] > 0.5).long()).backward()
    assert _encoder_grad_norm(net) > 0


def test_bad_input_raises():
    net = _net()
    with pytest.raises(ValueError, match="multiple of 16"):
        net(torch.rand(1, 2, 24, 16, 16))
    with pytest.raises(ValueError):
        net(torch.rand(1, 3, 16, 16, 16))  # not 2 * in_channels
    with pytest.raises(ValueError):
        net(torch.rand(1, 2, 16, 16))  # 2-D input to a 3-D net
    assert net.size_divisor == 16


@pytest.mark.parametrize("deformation", ["ddf", "cumsum"])
def test_torchscript_trace(deformation):
    net = _net(deformation=deformation)
    _randomise(net.reg_head, scale=0.05, seed=8)
    moving, fixed = _images(batch=1)
    x = torch.cat([moving, fixed], 1)
    with torch.no_grad():
        traced = torch.jit.trace(net, x, check_trace=False)
        expected = net(x)
        a, b = _images(batch=1, seed=9)
        y = torch.cat([a, b], 1)
        torch.testing.assert_close(traced(x), expected)
        torch.testing.assert_close(traced(y), net(y))
        z = torch.rand(1, 2, 32, 16, 16, generator=torch.Generator().manual_seed(10))  # another valid size
        torch.testing.assert_close(traced(z), net(z))
    assert not torch.allclose(traced(x), traced(y))
    # note: the size check of check_pair_input is a Python branch, so the traced module no longer validates sizes
    assert math.isfinite(float(traced(y).abs().sum()))


def test_logits_to_labels_matches_monai_argmax_and_keeps_meta():
    from monai.data import MetaTensor
    from monai.transforms import AsDiscreted

    from bundle.networks import logits_to_labels
    from bundle.transforms import LogitsToLabelsd

    torch.manual_seed(0)
    logits = MetaTensor(torch.randn(3, 6, 5, 4), affine=torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0])))
    ours = LogitsToLabelsd("seg")({"seg": logits})["seg"]
    monai = AsDiscreted("seg", argmax=True)({"seg": logits})["seg"]
    assert ours.shape == (1, 6, 5, 4) and ours.dtype == monai.dtype
    torch.testing.assert_close(ours.as_tensor(), monai.as_tensor())
    torch.testing.assert_close(ours.affine, logits.affine)
    batch = torch.randn(2, 3, 4, 4, 4)
    torch.testing.assert_close(logits_to_labels(batch), batch.argmax(dim=1, keepdim=True))


# ------------------------------------------------------------------------------------- half resolution


def _half_res_net(dims: int = 3, **kwargs) -> JointRegSegNet:
    return _net(dims, half_res=True, **kwargs)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("deformation", ["ddf", "svf"])
def test_half_res_decodes_at_half_size_and_keeps_the_output_shapes(dims, deformation):
    full = _net(dims, deformation=deformation, num_classes=3)
    half = _half_res_net(dims, deformation=deformation, num_classes=3)
    decoded = []
    for decoder in (half.reg_decoder, half.seg_decoder):
        decoder.register_forward_hook(lambda m, args, out: decoded.append(tuple(out.shape[2:])))
    x = torch.cat(_images(dims, batch=2), 1)
    with torch.no_grad():
        packed_full, packed_half = full(x), half(x)
        fields_full, fields_half = full.fields(x), half.fields(x)
    assert packed_half.shape == packed_full.shape == (2, dims + 6, *SIZE[dims])
    assert {k: v.shape for k, v in fields_half.items()} == {k: v.shape for k, v in fields_full.items()}
    assert decoded == [tuple(s // 2 for s in SIZE[dims])] * 6  # forward, fields: 1 registration + 2 segmentations each
    assert len(half.reg_decoder.up_blocks) == len(half.seg_decoder.up_blocks) == len(full.reg_decoder.up_blocks) - 1
    with pytest.raises(ValueError, match="cumsum"):
        _half_res_net(dims, deformation="cumsum")


@pytest.mark.parametrize("dims", [2, 3])
def test_half_res_constant_flow_is_doubled_and_constant_logits_are_not(dims):
    net = _half_res_net(dims)
    shift = torch.tensor([1.0, -0.5, 0.25])[:dims]
    with torch.no_grad():
        net.reg_head.conv.bias.copy_(shift)  # zero weights: a constant field of half-resolution voxels
        net.seg_head.weight.zero_()
        out = net.unpack(net(torch.cat(_images(dims), 1)))
    for k in range(dims):  # twice as many full-resolution voxels
        torch.testing.assert_close(out["ddf"][0, k], torch.full(SIZE[dims], 2 * float(shift[k])), rtol=0, atol=1e-6)
    prior = net.seg_head.bias.view(1, -1, *([1] * dims)).expand_as(out["seg_moving"])
    torch.testing.assert_close(out["seg_moving"], prior, rtol=0, atol=1e-6)  # logits are values, not vectors
    torch.testing.assert_close(out["seg_fixed"], prior, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dims", [2, 3])
def test_half_res_svf_is_integrated_at_half_size_then_upsampled(dims):
    from monai.networks.blocks.warp import DVF2DDF

    from bundle.spatial import resize_field

    net = _half_res_net(dims, deformation="svf", integration_steps=5)
    _randomise(net.reg_head, scale=0.5, seed=11)
    half_svf, half_logits = [], []
    net.reg_head.conv.register_forward_hook(lambda m, args, out: half_svf.append(out))
    net.seg_head.register_forward_hook(lambda m, args, out: half_logits.append(out))
    x = torch.cat(_images(dims), 1)
    with torch.no_grad():
        fields = net.fields(x, inverse=True)
    (v,) = half_svf
    assert v.shape[2:] == tuple(s // 2 for s in SIZE[dims]) and v.abs().max() > 0.1
    integrate = DVF2DDF(num_steps=5)
    with torch.no_grad():
        for key, expected in (("svf", v), ("ddf", integrate(v)), ("inverse_ddf", integrate(-v))):
            torch.testing.assert_close(fields[key], resize_field(expected, SIZE[dims]), rtol=0, atol=1e-6)
    torch.testing.assert_close(fields["svf"].mean(), 2 * v.mean())  # vectors in full-resolution voxels
    for key, logits in zip(("seg_moving", "seg_fixed"), half_logits):
        mode = "trilinear" if dims == 3 else "bilinear"
        expected = F.interpolate(logits, size=SIZE[dims], mode=mode, align_corners=False)
        torch.testing.assert_close(fields[key], expected, rtol=0, atol=1e-6)


def test_half_res_svf_forward_and_inverse_compose_to_identity():
    """As tests/test_inverse.py checks for the full-resolution joint net: ``exp(-svf) o exp(svf)`` ~ identity."""
    from monai.networks.blocks import Warp

    shape, margin = (32, 32, 32), 4
    net = JointRegSegNet(channels=CHANNELS, deformation="svf", integration_steps=7, half_res=True).eval()
    keys = set(net.state_dict())
    x = F.avg_pool3d(torch.rand(1, 2, *shape, generator=torch.Generator().manual_seed(1)), 5, 1, 2)
    with torch.no_grad():  # random flow layer scaled to a velocity of at most 3 voxels
        torch.nn.init.normal_(net.reg_head.conv.weight, generator=torch.Generator().manual_seed(12), std=0.02)
        net.reg_head.conv.weight *= 3.0 / net.fields(x)["svf"].abs().max()
        forward, inverse = net.forward_and_inverse(x)
        fields = net.fields(x)
    assert set(net.state_dict()) == keys and "inverse_ddf" not in fields
    torch.testing.assert_close(forward, fields["ddf"])
    assert forward.abs().max() > 1.5
    warp = Warp(mode="bilinear", padding_mode="border")
    interior = (slice(None), *[slice(margin, -margin)] * 3)

    def residual(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.maximum((v + warp(u, v)).norm(dim=1), (u + warp(v, u)).norm(dim=1))[interior]

    r, naive = residual(forward, inverse), residual(forward, -forward)
    assert r.max() < 0.4 and r.mean() < 0.1
    assert naive.mean() > 3 * r.mean()  # negating the DDF is not its inverse


def test_half_res_gradients_reach_both_decoders_heads_and_encoder():
    net = _half_res_net(deformation="svf", integration_steps=5).train()
    _randomise(net.reg_head, scale=0.05, seed=13)  # a zero head blocks the gradient to the decoder at init
    moving, fixed = _images()
    out = net.predict(torch.cat([moving, fixed], 1))
    loss = F.mse_loss(out["warped"], fixed)
    loss = loss + F.cross_entropy(out["seg_moving"], (moving[:, 0] > 0.5).long())
    loss = loss + F.cross_entropy(out["seg_fixed"], (fixed[:, 0] > 0.5).long())
    loss.backward()
    for module in (net.encoder, net.reg_decoder, net.reg_head, net.seg_decoder, net.seg_head):
        for name, p in module.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_default_net_keeps_its_checkpoint_layout_and_outputs():
    """``half_res=False`` (the default): the committed pretrained joint checkpoint loads strictly, the outputs are
    the full-resolution decoders' own, and a half-resolution net rejects it (its decoders differ)."""
    from bundle.configs import REPO_ROOT

    state = torch.load(REPO_ROOT / "models" / "pretrained" / "joint_t1_ibsr_4mm.pt", map_location="cpu")
    net = JointRegSegNet().eval()
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in state.items()}
    net.load_state_dict(state)
    with pytest.raises(RuntimeError):
        JointRegSegNet(half_res=True).load_state_dict(state)
    moving, fixed = (torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(s)) for s in (14, 15))
    with torch.no_grad():
        out = net.fields(torch.cat([moving, fixed], 1))
        codes = [net.encoder(moving), net.encoder(fixed)]
        merged = [m - f for m, f in zip(*codes)]
        assert torch.equal(out["ddf"], net.reg_head.conv(net.reg_decoder(merged)))
        assert torch.equal(out["seg_moving"], net.seg_head(net.seg_decoder(codes[0])))
        assert torch.equal(out["seg_fixed"], net.seg_head(net.seg_decoder(codes[1])))


@pytest.mark.parametrize("dims", [2, 3])
def test_half_res_segmentation_only_net(dims):
    from bundle.networks import TumourSegmentationNet

    joint = _half_res_net(dims, num_classes=3)
    _randomise(joint.seg_head, seed=16)
    seg = TumourSegmentationNet(spatial_dims=dims, channels=CHANNELS, num_classes=3, half_res=True).eval()
    seg.load_state_dict(joint.state_dict())
    moving, fixed = _images(dims, batch=2)
    with torch.no_grad():
        logits = seg(moving)
        expected = joint.fields(torch.cat([moving, fixed], 1))["seg_moving"]
    assert logits.shape == (2, 3, *SIZE[dims])
    torch.testing.assert_close(logits, expected)
