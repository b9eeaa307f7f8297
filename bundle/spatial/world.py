"""World coordinates: the RAS (MONAI, nibabel) <-> LPS (ITK, ANTs) conversion and ITK grid descriptions.

The bundle works in RAS millimetres; ITK and ANTs describe grids and transforms in LPS millimetres. The two
differ by the flip ``F = diag(-1, -1, 1)`` (its own inverse). Pure numpy: ITK itself is imported only by the
code that builds ITK objects (``bundle.alignment``, ``bundle.io.itk_export``).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "lps_flip", "ras_lps_conjugate", "itk_grid_from_affine", "affine_from_itk_direction", "ddf_to_lps_mm", "lps_mm_to_ddf",
]

# ours, not MONAI's ``orientation_ras_lps``: that converts voxel-to-world affines only; displacement vectors and
# point-to-point matrices need the same flip


def lps_flip(ndim: int, homogeneous: bool = False) -> np.ndarray:
    """``diag(-1, -1, 1)`` (3D) or ``diag(-1, -1)`` (2D), with a trailing 1 when ``homogeneous``: RAS <-> LPS."""
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}.")
    return np.diag([-1.0, -1.0] + [1.0] * (ndim - 2 + int(homogeneous)))


def ras_lps_conjugate(matrix: np.ndarray) -> np.ndarray:
    """A homogeneous point-to-point matrix expressed in the other convention: ``F M F`` (RAS <-> LPS both ways)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    flip = lps_flip(matrix.shape[0] - 1, homogeneous=True)
    return flip @ matrix @ flip


def itk_grid_from_affine(affine) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ITK ``(origin, spacing, direction)`` in LPS of a grid given by its RAS voxel-to-world affine.

    Args:
        affine: ``(ndim+1, ndim+1)`` voxel-to-world affine, RAS millimetres.

    Returns:
        origin ``(ndim,)`` (LPS mm), spacing ``(ndim,)`` (mm), direction ``(ndim, ndim)`` (LPS, unit columns).

    Raises:
        ValueError: the affine is singular or sheared (ITK grids have orthogonal axes).
    """
    affine = np.asarray(affine, dtype=np.float64)
    ndim = affine.shape[0] - 1
    lin = lps_flip(ndim) @ affine[:ndim, :ndim]
    spacing = np.linalg.norm(lin, axis=0)
    if np.any(spacing <= 0) or abs(np.linalg.det(lin)) < 1e-12:
        raise ValueError(f"affine has a zero-length axis or is singular: {affine.tolist()}.")
    direction = lin / spacing
    if not np.allclose(direction.T @ direction, np.eye(ndim), atol=1e-4):
        raise ValueError(f"affine is sheared (non-orthogonal axes), which ITK grids cannot hold: {affine.tolist()}.")
    origin = lps_flip(ndim) @ affine[:ndim, ndim]
    return origin, spacing, direction


def affine_from_itk_direction(origin, spacing, direction) -> np.ndarray:
    """RAS voxel-to-world affine ``(ndim+1, ndim+1)`` of an ITK grid (the inverse of :func:`itk_grid_from_affine`)."""
    origin, spacing = np.asarray(origin, dtype=np.float64), np.asarray(spacing, dtype=np.float64)
    direction = np.asarray(direction, dtype=np.float64)
    ndim = origin.shape[0]
    affine = np.eye(ndim + 1)
    affine[:ndim, :ndim] = lps_flip(ndim) @ direction @ np.diag(spacing)
    affine[:ndim, ndim] = lps_flip(ndim) @ origin
    return affine


def ddf_to_lps_mm(ddf: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Physical LPS displacement vectors ``(*spatial, ndim)`` in mm of a voxel-unit DDF ``(ndim, *spatial)`` on
    the grid of the RAS ``affine`` (``u = F M ddf``, ``M`` the affine's linear part, ``F`` :func:`lps_flip`)."""
    ndim = ddf.shape[0]
    return np.einsum("kl,l...->...k", lps_flip(ndim) @ np.asarray(affine)[:ndim, :ndim], ddf)


def lps_mm_to_ddf(values: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The inverse of :func:`ddf_to_lps_mm`: voxel-unit DDF ``(ndim, *spatial)`` of LPS mm vectors ``(*spatial, ndim)``."""
    ndim = values.shape[-1]
    return np.einsum("kl,...l->k...", np.linalg.inv(lps_flip(ndim) @ np.asarray(affine)[:ndim, :ndim]), values)
