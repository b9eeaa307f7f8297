"""Tests for bundle.engines.acceleration (channels-last, torch.compile with an eager fallback)."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor
from torch import nn

from bundle.engines import CompiledModule, accelerate, channels_last_format, compile_unavailable_reason
from bundle.networks import RegistrationUNet

SMALL = ((4, 8), (8, 8, 4))  # tiny (encoder, decoder) channels: fast on CPU
needs_compile = pytest.mark.skipif(compile_unavailable_reason() is not None, reason=str(compile_unavailable_reason()))


def _net(seed: int = 0) -> RegistrationUNet:
    torch.manual_seed(seed)
    net = RegistrationUNet(channels=SMALL).eval()
    with torch.no_grad():  # a non-zero flow layer, so outputs differ between inputs
        net.head.conv.weight.normal_(0, 0.05)
    return net


def _input(seed: int = 1) -> torch.Tensor:
    return torch.rand(1, 2, 16, 16, 16, generator=torch.Generator().manual_seed(seed))


def _failing_backend(graph_module, example_inputs):
    raise RuntimeError("backend refused the graph")


def test_channels_last_same_output_and_format():
    net, x = _net(), _input()
    with torch.no_grad():
        expected = net(x)
    fast = accelerate(net, channels_last=True)
    assert fast is net  # converted in place, no wrapper
    assert net.encoder.blocks[0].conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        out = fast(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CPU 3D convolutions return contiguous outputs)")
def test_channels_last_convolutions_run_channels_last_on_gpu():
    net = accelerate(_net().cuda(), channels_last=True)
    with torch.no_grad():
        features = net.encoder(_input().cuda())
    assert all(f.is_contiguous(memory_format=torch.channels_last_3d) for f in features[1:])


def test_channels_last_format_by_dimension():
    assert channels_last_format(RegistrationUNet(spatial_dims=3, channels=SMALL)) is torch.channels_last_3d
    assert channels_last_format(RegistrationUNet(spatial_dims=2, channels=SMALL)) is torch.channels_last
    with pytest.raises(ValueError, match="channels_last needs a network with 2D or 3D convolutions"):
        accelerate(nn.Linear(3, 3), channels_last=True)


def test_not_a_module_and_defaults():
    with pytest.raises(TypeError, match="network must be a torch.nn.Module"):
        accelerate(lambda x: x)
    net = _net()
    assert accelerate(net) is net


@needs_compile
def test_compile_matches_eager_and_keeps_state_dict_keys():
    net, x = _net(), _input()
    with torch.no_grad():
        expected = net(x)
    fast = accelerate(net, compile=True, compile_kwargs={"backend": "eager"})  # Dynamo tracing, no C++ build
    assert isinstance(fast, CompiledModule)
    with torch.no_grad():
        out = fast(x)
    torch.testing.assert_close(out, expected)
    assert fast.fallback_reason is None
    # transparent: same keys and parameters, attributes fall through, weights load into either
    assert list(fast.state_dict()) == list(net.state_dict())
    assert {id(p) for p in fast.parameters()} == {id(p) for p in net.parameters()}
    assert fast.size_divisor == net.size_divisor
    other = _net(seed=5)
    fast.load_state_dict(other.state_dict())
    torch.testing.assert_close(net.head.conv.weight, other.head.conv.weight)
    parent = nn.Sequential(fast)  # nested: keys "0.<name>" both ways
    assert list(parent.state_dict()) == [f"0.{k}" for k in net.state_dict()]
    parent.load_state_dict(nn.Sequential(_net(seed=6)).state_dict())
    torch.testing.assert_close(net.head.conv.weight, _net(seed=6).head.conv.weight)


@needs_compile
def test_compile_failure_falls_back_to_eager_with_warning():
    net, x = _net(), _input()
    with torch.no_grad():
        expected = net(x)
    fast = accelerate(net, compile=True, compile_kwargs={"backend": _failing_backend})
    with pytest.warns(RuntimeWarning, match="torch.compile of RegistrationUNet failed"), torch.no_grad():
        out = fast(x)
    torch.testing.assert_close(out, expected)
    assert "backend refused the graph" in fast.fallback_reason
    with torch.no_grad():  # eager from now on, no second warning
        torch.testing.assert_close(fast(_input(seed=2)), net(_input(seed=2)))


@needs_compile
def test_bad_input_raises_the_eager_error_not_a_fallback():
    fast = accelerate(_net(), compile=True, compile_kwargs={"backend": "eager"})
    with pytest.raises(ValueError, match="must be a multiple of 4"), torch.no_grad():
        fast(torch.rand(1, 2, 15, 16, 16))
    assert fast.fallback_reason is None


@needs_compile
def test_metatensor_input_keeps_its_meta():
    net = _net()
    affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64))
    x = MetaTensor(_input(), affine=affine)
    fast = accelerate(net, compile=True, compile_kwargs={"backend": "eager"})
    with torch.no_grad():
        out = fast(x)
        expected = net(x.as_tensor())
    assert isinstance(out, MetaTensor)
    torch.testing.assert_close(out.affine, affine)
    torch.testing.assert_close(out.as_tensor(), expected)


def test_unavailable_compile_warns_and_returns_the_network(monkeypatch):
    monkeypatch.delattr(torch, "compile")
    assert "has no torch.compile" in compile_unavailable_reason()
    net = _net()
    with pytest.warns(RuntimeWarning, match="torch.compile is not used"):
        assert accelerate(net, compile=True) is net
