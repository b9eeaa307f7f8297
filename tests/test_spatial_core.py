"""bundle.spatial pins the conventions: one resizing rule, pooling on the same grid, composition against analytic
cases, the Jacobian of affine fields, RAS <-> LPS round trips; and every user imports them from there."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from monai.networks.blocks import Warp

from bundle.spatial import (
    affine_from_itk_direction,
    compose_affine_ddf,
    ddf_to_lps_mm,
    compose_ddf,
    index_grid,
    itk_grid_from_affine,
    jacobian_determinant,
    lps_flip,
    lps_mm_to_ddf,
    pool_field,
    ras_lps_conjugate,
    resize_field,
)
from conftest import REPO_ROOT


def _linear_field(shape, gradient=0.1, offset=0.5):
    """``(1, ndim, *shape)``: channel k = offset + gradient * (index along axis k) on this grid."""
    grid = index_grid(shape).unsqueeze(0)
    return offset + gradient * grid


@pytest.mark.parametrize("dims", (2, 3))
def test_resize_rule_keeps_constant_and_linear_fields(dims):
    coarse_shape, fine_shape = (8,) * dims, (16,) * dims
    constant = torch.full((1, dims, *coarse_shape), 1.5)
    torch.testing.assert_close(resize_field(constant, fine_shape), torch.full((1, dims, *fine_shape), 3.0))
    # a linear map in physical terms: a displacement d(p) = c + g p (p in fine voxels) sampled on the coarse grid
    # at the centres of its voxels (fine position 2 i + 0.5), in coarse voxel units, resizes to the same map
    # on the fine grid, away from the borders where interpolation clamps
    g, c = 0.1, 0.4
    coarse_idx = index_grid(coarse_shape).unsqueeze(0)
    coarse = (c + g * (2 * coarse_idx + 0.5)) / 2
    fine = resize_field(coarse, fine_shape)
    expected = c + g * index_grid(fine_shape).unsqueeze(0)
    inner = (slice(None), slice(None)) + (slice(2, -2),) * dims
    torch.testing.assert_close(fine[inner], expected[inner], atol=1e-5, rtol=1e-5)


def test_pool_then_resize_is_the_same_grid():
    """pool_field and resize_field assume the same coarse grid: pooling a linear field then resizing it back
    returns it (interior)."""
    fine = _linear_field((16, 16, 16))
    back = resize_field(pool_field(fine, 2), (16, 16, 16))
    torch.testing.assert_close(back[..., 2:-2, 2:-2, 2:-2], fine[..., 2:-2, 2:-2, 2:-2], atol=1e-5, rtol=1e-5)
    logits = torch.rand(1, 4, 8, 8, 8)
    assert torch.equal(resize_field(logits, (8, 8, 8), scale_vectors=False), logits)
    with pytest.raises(ValueError):
        pool_field(fine, 0)
    with pytest.raises(ValueError, match="entries"):
        resize_field(fine, (16, 16))


def test_compose_translations_add_and_order_matches_warping():
    shape = (12, 12, 12)
    a, b = torch.zeros(1, 3, *shape), torch.zeros(1, 3, *shape)
    a[:, 0], b[:, 1] = 1.0, 2.0
    torch.testing.assert_close(compose_ddf(a, b), a + b)
    # a non-constant outer field: warping twice == warping once with the composite (interior voxels)
    outer = 0.3 * torch.sin(index_grid(shape).unsqueeze(0) / 3.0)
    image = torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(0))
    warp = Warp("bilinear", "border")
    twice = warp(warp(image, outer), b)
    once = warp(image, compose_ddf(outer, b))
    torch.testing.assert_close(twice[..., 3:-3, 3:-3, 3:-3], once[..., 3:-3, 3:-3, 3:-3], atol=0.05, rtol=0)


def test_compose_affine_ddf_against_a_world_translation():
    """T = translate by (4, 0, 0) mm in RAS, a 2 mm grid and a zero DDF: the composite is +2 voxels on axis 0;
    with a DDF of +1 voxel on axis 1 the composite is (2, 1, 0)."""
    grid_affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64))
    grid_affine[:3, 3] = torch.tensor([-10.0, 5.0, 3.0], dtype=torch.float64)
    matrix = torch.eye(4, dtype=torch.float64)
    matrix[0, 3] = 4.0
    ddf = torch.zeros(3, 6, 6, 6)
    torch.testing.assert_close(compose_affine_ddf(matrix, ddf, grid_affine)[:, 2, 2, 2], torch.tensor([2.0, 0.0, 0.0]))
    ddf[1] = 1.0
    torch.testing.assert_close(compose_affine_ddf(matrix, ddf, grid_affine)[:, 2, 2, 2], torch.tensor([2.0, 1.0, 0.0]))


def test_jacobian_of_an_affine_field_is_its_determinant():
    a = torch.tensor([[0.1, 0.05, 0.0], [0.0, -0.2, 0.1], [0.02, 0.0, 0.3]])
    ddf = torch.einsum("kl,l...->k...", a, index_grid((6, 7, 8))).unsqueeze(0)
    det = jacobian_determinant(ddf)
    torch.testing.assert_close(det, torch.full_like(det, float(torch.det(torch.eye(3) + a))), atol=1e-5, rtol=1e-5)


def test_ras_lps_round_trips():
    affine = np.array([[0.0, -1.2, 0.0, 30.0], [0.0, 0.0, 2.0, -4.0], [0.9, 0.0, 0.0, 7.0], [0.0, 0.0, 0.0, 1.0]])
    origin, spacing, direction = itk_grid_from_affine(affine)
    np.testing.assert_allclose(spacing, [0.9, 1.2, 2.0])
    np.testing.assert_allclose(origin, [-30.0, 4.0, 7.0])
    np.testing.assert_allclose(affine_from_itk_direction(origin, spacing, direction), affine, atol=1e-12)
    matrix = np.eye(4)
    matrix[:3, 3] = [1.0, 2.0, 3.0]
    lps = ras_lps_conjugate(matrix)
    np.testing.assert_allclose(lps[:3, 3], [-1.0, -2.0, 3.0])
    np.testing.assert_allclose(ras_lps_conjugate(lps), matrix)
    np.testing.assert_allclose(lps_flip(2), np.diag([-1.0, -1.0]))
    with pytest.raises(ValueError, match="sheared"):
        itk_grid_from_affine(np.array([[1.0, 0.5, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]]))
    ddf = np.zeros((3, 2, 2, 2))
    ddf[0] = 1.0  # one voxel along array axis 0, which is world +z (0.9 mm) in this affine
    np.testing.assert_allclose(ddf_to_lps_mm(ddf, affine)[0, 0, 0], [0.0, 0.0, 0.9])
    ddf[1] = 2.0  # two voxels along axis 1: world -x (1.2 mm each) in RAS, +x in LPS
    np.testing.assert_allclose(ddf_to_lps_mm(ddf, affine)[1, 1, 1], [2.4, 0.0, 0.9])
    np.testing.assert_allclose(lps_mm_to_ddf(ddf_to_lps_mm(ddf, affine), affine), ddf, atol=1e-12)


def test_field_maths_lives_only_in_bundle_spatial():
    """No module outside bundle/spatial resizes fields with F.interpolate, flips RAS/LPS by hand or defines a
    Jacobian determinant."""
    offenders = []
    for path in (REPO_ROOT / "bundle").rglob("*.py"):
        if "spatial" in path.parts:
            continue
        text = path.read_text()
        for pattern in (r"align_corners\s*=\s*True\)\s*\n.*scale", r"np\.diag\(\[-1\.0, -1\.0", r"def jacobian_determinant",
                        r"def upsample_field", r"_RAS_TO_LPS", r"lps_flip\(ndim\) @"):
            if re.search(pattern, text):
                offenders.append(f"{path.relative_to(REPO_ROOT)}: {pattern}")
    assert not offenders, offenders


def _oblique_index_map():
    angle = 0.3
    rot = torch.tensor([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]],
                       dtype=torch.float64)
    a = torch.eye(4, dtype=torch.float64)
    a[:3, :3] = rot @ torch.diag(torch.tensor([0.93, 1.07, 0.5], dtype=torch.float64))
    a[:3, 3] = torch.tensor([-12.345, 33.3, 7.77], dtype=torch.float64)
    return a


def test_float32_points_of_a_large_grid_match_float64_within_a_thousandth_of_a_voxel():
    """The fast path builds float32 sampling points from 1-D float64 terms: on a 256x128x256 grid (the IBSR
    native size) with an oblique index map they must match the float64 computation to 1e-3 voxel."""
    from bundle.spatial import affine_points

    a, shape = _oblique_index_map(), (256, 128, 256)
    points = affine_points(a, shape)
    assert all(p.dtype == torch.float32 and tuple(p.shape) == shape for p in points)
    idx = index_grid(shape, dtype=torch.float64)
    exact = torch.einsum("kl,l...->k...", a[:3, :3], idx) + a[:3, 3].view(3, 1, 1, 1)
    error = max(float((p.double() - e).abs().max()) for p, e in zip(points, exact))
    assert error < 1e-3, f"float32 points differ from float64 by up to {error} voxel"


def test_float32_resampling_matches_float64_interpolation():
    """resample_to_grid and compose_affine_ddf interpolate in float32: against a float64 reference on an oblique
    map, intensities agree to 1e-4 (relative to the image range) and composed displacements to 1e-3 voxel."""
    from bundle.spatial import resample_to_grid, sample_field

    torch.manual_seed(0)
    image = torch.rand(1, 40, 36, 30) * 1000.0
    src, dst = torch.eye(4, dtype=torch.float64), _oblique_index_map()
    dst[:3, 3] = torch.tensor([2.0, -1.0, 3.0], dtype=torch.float64)  # most points inside the source
    shape = (38, 34, 32)
    fast = resample_to_grid(image, src, dst, shape)
    idx = index_grid(shape, dtype=torch.float64)
    points = torch.einsum("kl,l...->k...", dst[:3, :3], idx) + dst[:3, 3].view(3, 1, 1, 1)
    reference = sample_field(image.double(), points, padding_mode="zeros")
    assert fast.dtype == torch.float32
    assert float((fast.double() - reference).abs().max()) < 1e-4 * 1000.0

    ddf = torch.randn(3, *shape) * 2.0
    grid_affine = torch.diag(torch.tensor([1.2, 0.9, 1.1, 1.0], dtype=torch.float64))
    composed = compose_affine_ddf(_oblique_index_map(), ddf, grid_affine)
    m = torch.linalg.solve(grid_affine, _oblique_index_map() @ grid_affine)
    expected = torch.einsum("kl,l...->k...", m[:3, :3], idx + ddf.double()) + m[:3, 3].view(3, 1, 1, 1) - idx
    assert composed.dtype == torch.float32
    assert float((composed.double() - expected).abs().max()) < 1e-3


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
@pytest.mark.parametrize("dims", [2, 3])
def test_axis_aligned_resampling_equals_grid_sample(mode, padding_mode, dims):
    """Axis-aligned maps (permutation, flips, scales, shifts: crop, orientation and spacing changes) take the
    separable path; it must give grid_sample's result (what an oblique map still uses)."""
    from bundle.spatial import resample_to_grid, sample_field

    torch.manual_seed(1)
    src_shape, dst_shape = (13, 9, 11)[:dims], (17, 12, 10)[:dims]
    values = torch.randn(2, *src_shape)
    perm = [2, 0, 1][:dims] if dims == 3 else [1, 0]
    linear = torch.zeros(dims, dims, dtype=torch.float64)
    for k, axis in enumerate(perm):
        linear[k, axis] = [0.61, -0.83, 1.37][k]
    index_map = torch.eye(dims + 1, dtype=torch.float64)
    index_map[:dims, :dims] = linear
    index_map[:dims, dims] = torch.tensor([1.13, 8.27, -0.91][:dims], dtype=torch.float64)  # some points outside
    fast = resample_to_grid(values, torch.eye(dims + 1, dtype=torch.float64), index_map, dst_shape,
                            mode=mode, padding_mode=padding_mode)
    idx = index_grid(dst_shape, dtype=torch.float64)
    points = torch.einsum("kl,l...->k...", linear, idx) + index_map[:dims, dims].view(dims, *[1] * dims)
    reference = sample_field(values.double(), points, padding_mode=padding_mode, mode=mode)
    assert fast.shape == (2, *dst_shape)
    torch.testing.assert_close(fast.double(), reference, atol=1e-5, rtol=0)
