"""Displacement-field maths on one grid: resizing (one rule), pooling, composition and the Jacobian determinant.

Fields are ``(B, ndim, *spatial)`` pull-back DDFs in voxel units, channel k along spatial axis k (see
:mod:`bundle.spatial`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Warp

from .grid import affine_points

__all__ = ["resize_field", "pool_field", "compose_ddf", "compose_affine_ddf", "jacobian_determinant"]

_COMPOSE = Warp(mode="bilinear", padding_mode="border")  # outside the grid the field continues as at its border


def _interpolation(ndim: int) -> str:
    return "bilinear" if ndim == 2 else "trilinear"


def resize_field(field: torch.Tensor, spatial_size: Sequence[int], scale_vectors: bool = True) -> torch.Tensor:
    """Resize a field to ``spatial_size`` with the bundle's one rule, rescaling displacement vectors.

    The rule is ``align_corners=False`` linear interpolation (voxel ``i`` of a grid ``f`` times coarser is centred
    on fine position ``f * i + (f - 1) / 2``, as average pooling makes it): a constant field stays constant and a
    linear one stays linear away from the borders. Vector channel k is multiplied by the size ratio along axis k,
    so voxel units follow the new grid.

    Args:
        field: ``(B, C, *spatial)``; with ``scale_vectors`` the first ``ndim`` channels are the vector.
        spatial_size: target spatial size (same number of dims).
        scale_vectors: ``False`` resizes the channels as plain values (e.g. segmentation logits).

    Raises:
        ValueError: ``spatial_size`` has the wrong number of dims.
    """
    ndim = field.ndim - 2
    if len(spatial_size) != ndim:
        raise ValueError(f"spatial_size {tuple(spatial_size)} must have {ndim} entries for a field {tuple(field.shape)}.")
    if tuple(spatial_size) == tuple(field.shape[2:]):
        return field
    resized = F.interpolate(field, size=tuple(int(s) for s in spatial_size), mode=_interpolation(ndim), align_corners=False)
    if not scale_vectors:
        return resized
    if field.shape[1] < ndim:
        raise ValueError(f"a {ndim}D vector field needs at least {ndim} channels, got {field.shape[1]}.")
    scale = torch.ones(field.shape[1], dtype=field.dtype, device=field.device)
    scale[:ndim] = torch.tensor([t / s for t, s in zip(spatial_size, field.shape[2:])], dtype=field.dtype)
    return resized * scale.view(1, -1, *([1] * ndim))


def pool_field(field: torch.Tensor, factor: int, scale_vectors: bool = True) -> torch.Tensor:
    """Average-pool a field (or one-hot maps with ``scale_vectors=False``) by an integer ``factor``.

    The coarse grid is the one :func:`resize_field` assumes; vectors are divided by ``factor`` (voxel units of
    the coarse grid).

    Raises:
        ValueError: ``factor`` is not an integer >= 1.
    """
    if int(factor) != factor or factor < 1:
        raise ValueError(f"factor must be an integer >= 1, got {factor}.")
    if factor == 1:
        return field
    pool = F.avg_pool3d if field.ndim == 5 else F.avg_pool2d
    pooled = pool(field, int(factor))
    return pooled / factor if scale_vectors else pooled


def compose_ddf(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """The DDF of ``outer o inner``: ``x -> x + inner(x) + outer(x + inner(x))`` (``inner`` is applied first).

    Warping with the result equals warping with ``outer`` and then with ``inner`` (pull-backs compose in
    reverse): ``warp(warp(m, outer), inner) ~= warp(m, compose_ddf(outer, inner))``. ``outer`` is sampled
    linearly, continuing as at its border outside the grid.
    """
    if outer.shape != inner.shape:
        raise ValueError(f"fields must have the same shape, got {tuple(outer.shape)} and {tuple(inner.shape)}.")
    return inner + _COMPOSE(outer, inner)


def compose_affine_ddf(matrix: torch.Tensor, ddf: torch.Tensor, grid_affine: torch.Tensor) -> torch.Tensor:
    """One pull-back DDF for a world-space matrix applied after a DDF: ``A^-1 T A (x + ddf(x)) - x``.

    Args:
        matrix: ``(ndim+1, ndim+1)`` world pull-back matrix ``T`` (RAS mm: fixed world point -> moving world point).
        ddf: ``(ndim, *spatial)`` DDF on the grid of ``grid_affine`` (voxel units).
        grid_affine: that grid's voxel-to-world affine ``A``.

    Returns:
        ``(ndim, *spatial)`` float32 DDF on the same grid: ``warped(x) = moving(A (x + result(x)))``.
    """
    grid_affine = torch.as_tensor(grid_affine, dtype=torch.float64)
    matrix = torch.as_tensor(matrix, dtype=torch.float64)
    ndim = ddf.shape[0]
    ddf = torch.as_tensor(ddf).to(torch.float32)
    # x + result(x) = M (x + ddf(x)) + m  with  [M m] = A^-1 T A:  result = M ddf + (M - I) x + m, in float32
    # without an index grid (the affine part is built from 1-D float64 terms)
    m = torch.linalg.solve(grid_affine, matrix @ grid_affine)
    out = torch.einsum("kl,l...->k...", m[:ndim, :ndim].to(ddf), ddf)
    m_minus_identity = m.clone()
    m_minus_identity[:ndim, :ndim] -= torch.eye(ndim, dtype=torch.float64)
    for k, term in enumerate(affine_points(m_minus_identity, ddf.shape[1:], device=ddf.device)):
        out[k] += term
    return out


def _check_ddf(ddf: torch.Tensor) -> int:
    """Validate a batch-first DDF and return its number of spatial dimensions."""
    if not isinstance(ddf, torch.Tensor) or ddf.ndim not in (4, 5) or ddf.shape[1] != ddf.ndim - 2:
        shape = tuple(ddf.shape) if isinstance(ddf, torch.Tensor) else type(ddf).__name__
        raise ValueError(f"ddf must be a tensor of shape (B, ndim, *spatial) with ndim in {{2, 3}}, got {shape}.")
    if min(ddf.shape[2:]) < 2:
        raise ValueError(f"ddf needs at least 2 voxels along every spatial axis, got {tuple(ddf.shape)}.")
    return ddf.ndim - 2


def jacobian_determinant(ddf: torch.Tensor) -> torch.Tensor:
    """``det(I + grad ddf)``, the Jacobian determinant of ``x -> x + ddf(x)``.

    Spatial derivatives use central differences in the interior and one-sided differences at the borders
    (``torch.gradient`` with a spacing of 1 voxel), so the result is dimensionless and exact for affine fields.
    ``J[k, j] = delta_kj + d ddf_k / d x_j``. Differentiable; stays on ``ddf``'s device.

    Args:
        ddf: ``(B, ndim, *spatial)`` in voxel units, ``ndim`` in {2, 3}.

    Returns:
        ``(B, 1, *spatial)``; values ``<= 0`` mark folding.

    Raises:
        ValueError: not a rank 4/5 tensor whose channel count equals its number of spatial dims, or a spatial
            axis with fewer than 2 voxels.
    """
    ndim = _check_ddf(ddf)
    grads = torch.gradient(ddf, dim=tuple(range(2, ddf.ndim)))
    # j[k][l] is the (k, l) entry of I + grad ddf, each of shape (B, *spatial)
    j = [[grads[col][:, row] + (1.0 if row == col else 0.0) for col in range(ndim)] for row in range(ndim)]
    if ndim == 2:
        det = j[0][0] * j[1][1] - j[0][1] * j[1][0]
    else:
        det = (
            j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
            - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
            + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0])
        )
    return det.unsqueeze(1)
