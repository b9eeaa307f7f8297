"""The spatial core: every convention about grids, displacement fields and world coordinates, written once.

- Tensors are channel-first: images ``(B, C, *spatial)``, displacement fields ``(B, ndim, *spatial)``.
- A DDF lives on the fixed image's grid and is a pull-back: ``warped(x) = moving(x + ddf(x))``, in voxel
  units of that grid, channel k along spatial axis k (MONAI ``Warp`` convention).
- A grid is described by its voxel-to-world affine (``(ndim+1, ndim+1)``, RAS millimetres as MONAI's
  readers give it) and its spatial shape. Physical LPS millimetres (ITK, ANTs) appear only through
  :mod:`bundle.spatial.world`.
- Fields are resized with one rule (:func:`resize_field`, ``align_corners=False``: voxel ``i`` of a grid
  ``f`` times coarser is centred on fine position ``f * i + (f - 1) / 2``, as average pooling makes it).

Modules: :mod:`.grid` (index grids, sampling, resampling between grids), :mod:`.field` (resizing, pooling,
composition, Jacobian determinant), :mod:`.sampling` (``grid_sample`` on every CPU thread), :mod:`.world` (RAS <-> LPS for grids, matrices and DDF vectors; ITK grids). Nothing here imports the rest of
the bundle, so every other module can import it.
"""

from .field import (
    compose_affine_ddf,
    compose_ddf,
    jacobian_determinant,
    pool_field,
    resize_field,
)
from .grid import (
    affine_points,
    ddf_source_points,
    index_grid,
    resample_ddf,
    resample_to_grid,
    sample_field,
    warp_through_world,
)
from .world import (
    affine_from_itk_direction,
    ddf_to_lps_mm,
    itk_grid_from_affine,
    lps_flip,
    lps_mm_to_ddf,
    ras_lps_conjugate,
)

__all__ = [
    "index_grid", "sample_field", "affine_points", "resample_to_grid", "resample_ddf", "ddf_source_points", "warp_through_world",
    "resize_field", "pool_field", "compose_ddf", "compose_affine_ddf", "jacobian_determinant",
    "lps_flip", "ras_lps_conjugate", "itk_grid_from_affine", "affine_from_itk_direction", "ddf_to_lps_mm", "lps_mm_to_ddf",
]
