"""grid_sample spread over the CPU threads: the same values and gradients as torch's, bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bundle.spatial.sampling import grid_sample


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("depth", [6, 7, 1])  # even (a view), odd (a padded slice), thinner than the thread count
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
def test_values_and_gradients_equal_torch_bit_for_bit(two_threads, depth, channels, padding_mode):
    torch.manual_seed(0)
    image = torch.rand(1, channels, 9, 8, 10, requires_grad=True)
    grid = F.affine_grid(torch.eye(3, 4)[None], [1, 1, depth, 5, 6], align_corners=True)
    grid = (grid + 0.3 * torch.randn_like(grid)).requires_grad_(True)  # some points outside: padding matters
    weights = torch.rand(1, channels, depth, 5, 6)

    expected = F.grid_sample(image, grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)
    (expected * weights).sum().backward()
    expected_grads = image.grad.clone(), grid.grad.clone()
    image.grad, grid.grad = None, None

    out = grid_sample(image, grid, mode="bilinear", padding_mode=padding_mode)
    (out * weights).sum().backward()
    assert out.shape == expected.shape
    assert torch.equal(out, expected)
    assert torch.equal(grid.grad, expected_grads[1])
    assert torch.allclose(image.grad, expected_grads[0], atol=1e-6)  # summed over the slabs: order of additions


def test_batches_and_two_dimensional_images_go_straight_to_torch(two_threads):
    image, grid = torch.rand(2, 1, 5, 5, 5), torch.rand(2, 4, 4, 4, 3) * 2 - 1
    assert torch.equal(grid_sample(image, grid), F.grid_sample(image, grid, align_corners=True))
    image2, grid2 = torch.rand(1, 2, 7, 7), torch.rand(1, 6, 6, 2) * 2 - 1
    assert torch.equal(grid_sample(image2, grid2, mode="nearest"),
                       F.grid_sample(image2, grid2, mode="nearest", align_corners=True))
