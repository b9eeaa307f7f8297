"""Grids: voxel-index grids, sampling a field at voxel points, and resampling images and DDFs between grids
of the same physical space (see :mod:`bundle.spatial` for the conventions)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["index_grid", "sample_field", "resample_to_grid", "resample_ddf", "ddf_source_points"]


def index_grid(spatial_shape: Sequence[int], dtype=torch.float32, device=None) -> torch.Tensor:
    """Voxel indices of a grid, ``(ndim, *spatial_shape)``, channel k = index along axis k."""
    axes = [torch.arange(s, dtype=dtype, device=device) for s in spatial_shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)


def sample_field(
    field: torch.Tensor, points: torch.Tensor, padding_mode: str = "border", mode: str = "bilinear"
) -> torch.Tensor:
    """Interpolate a channel-first field at voxel-index points.

    Args:
        field: ``(C, *spatial)`` values on a grid.
        points: ``(ndim, *out_shape)`` voxel indices (channel k along axis k) of that grid.
        padding_mode: ``grid_sample`` padding outside the grid.
        mode: ``"bilinear"`` (trilinear in 3D) or ``"nearest"``.

    Returns:
        ``(C, *out_shape)`` interpolated values.
    """
    ndim = points.shape[0]
    sizes = torch.tensor(field.shape[1:], dtype=points.dtype, device=points.device).view(ndim, *([1] * ndim))
    normalised = 2.0 * points / (sizes - 1).clamp(min=1) - 1.0  # align_corners=True
    grid = normalised.flip(0).movedim(0, -1).unsqueeze(0)  # grid_sample wants (x, y, z) = reversed axes
    out = F.grid_sample(field.unsqueeze(0).to(points.dtype), grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    return out[0]


def _destination_points(src_affine, dst_affine, dst_shape, device):
    """Source-grid indices of every destination voxel, and the linear part of that index map."""
    ndim = len(dst_shape)
    src = torch.as_tensor(src_affine, dtype=torch.float64)
    dst = torch.as_tensor(dst_affine, dtype=torch.float64)
    if src.shape != (ndim + 1, ndim + 1) or dst.shape != (ndim + 1, ndim + 1):
        raise ValueError(f"affines must be {ndim + 1}x{ndim + 1}, got {tuple(src.shape)} and {tuple(dst.shape)}.")
    a = torch.linalg.solve(src, dst)
    lin, offset = a[:ndim, :ndim].to(device), a[:ndim, ndim].to(device)
    idx = index_grid(dst_shape, dtype=torch.float64, device=device)
    return torch.einsum("kl,l...->k...", lin, idx) + offset.view(ndim, *([1] * ndim)), lin


def resample_to_grid(
    values: torch.Tensor,
    src_affine: torch.Tensor,
    dst_affine: torch.Tensor,
    dst_shape: Sequence[int],
    mode: str = "bilinear",
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Resample a channel-first image ``(C, *src_shape)`` onto another grid of the same physical space.

    Ours, not MONAI's ``SpatialResample``: the sampling points are computed in float64 and shared with
    :func:`resample_ddf`, so images and DDFs land on exactly the same points.

    Args:
        values: image on the source grid.
        src_affine, dst_affine: voxel-to-world affines of the source and destination grids.
        dst_shape: spatial shape of the destination grid.
        mode: ``"bilinear"`` for intensities or ``"nearest"`` for label maps.
        padding_mode: value outside the source grid (``grid_sample`` modes).

    Returns:
        ``(C, *dst_shape)`` in the dtype of ``values``.
    """
    points, _ = _destination_points(src_affine, dst_affine, dst_shape, values.device)
    return sample_field(values.to(torch.float64), points, padding_mode, mode).to(values.dtype)


def resample_ddf(
    ddf: torch.Tensor,
    src_affine: torch.Tensor,
    dst_affine: torch.Tensor,
    dst_shape: Sequence[int],
) -> torch.Tensor:
    """Express a pull-back DDF given on a source grid on another grid of the same physical space.

    Both the moving and the fixed image are assumed to be on the source grid (the network's grid) and
    on the destination grid (e.g. the fixed image's native grid) after the same spatial resampling. With
    ``A = src_affine^-1 @ dst_affine`` mapping destination indices ``i`` to source indices, the result is
    ``ddf_dst(i) = L^-1 ddf_src(A i)`` with ``L`` the linear part of ``A`` (vectors change units and axes).

    Args:
        ddf: ``(ndim, *src_shape)`` DDF in voxel units of the source grid.
        src_affine: ``(ndim+1, ndim+1)`` voxel-to-world affine of the source grid.
        dst_affine: ``(ndim+1, ndim+1)`` voxel-to-world affine of the destination grid.
        dst_shape: spatial shape of the destination grid.

    Returns:
        ``(ndim, *dst_shape)`` DDF in voxel units of the destination grid (float32).

    Raises:
        ValueError: inconsistent dimensions.
    """
    ndim = ddf.shape[0]
    if ddf.ndim != ndim + 1 or len(dst_shape) != ndim:
        raise ValueError(f"ddf must be (ndim, *spatial) matching dst_shape {tuple(dst_shape)}, got {tuple(ddf.shape)}.")
    src_points, lin = _destination_points(src_affine, dst_affine, dst_shape, ddf.device)
    sampled = sample_field(ddf.to(torch.float64), src_points)
    out = torch.einsum("kl,l...->k...", torch.linalg.inv(lin), sampled)
    return out.to(torch.float32)


def ddf_source_points(ddf: torch.Tensor, ddf_affine: torch.Tensor, src_affine: torch.Tensor) -> torch.Tensor:
    """Voxel indices, in a source image's own grid, that a pull-back DDF samples.

    ``warped(x) = source(S^-1 A (x + ddf(x)))`` with ``A`` the DDF grid's and ``S`` the source's
    voxel-to-world affines: the source need not be on the DDF's grid (e.g. a moving image as loaded).

    Args:
        ddf: ``(ndim, *spatial)`` DDF in voxel units of its grid.
        ddf_affine, src_affine: ``(ndim+1, ndim+1)`` voxel-to-world affines.

    Returns:
        ``(ndim, *spatial)`` float64 indices of the source grid (for :func:`sample_field`).
    """
    ndim = ddf.shape[0]
    index_map = torch.linalg.solve(
        torch.as_tensor(src_affine, dtype=torch.float64), torch.as_tensor(ddf_affine, dtype=torch.float64)
    ).to(ddf.device)
    points = index_grid(ddf.shape[1:], dtype=torch.float64, device=ddf.device) + ddf.to(torch.float64)
    shape = (ndim, *([1] * ndim))
    return torch.einsum("kl,l...->k...", index_map[:ndim, :ndim], points) + index_map[:ndim, ndim].view(shape)
