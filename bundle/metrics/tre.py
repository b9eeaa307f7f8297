"""Target registration error (TRE) between corresponding landmarks in physical (world) coordinates.

Conventions: the DDF lives on the fixed image grid, is a pull-back map ``warped(x) = moving(x + ddf(x))`` in VOXEL
units, channel ``k`` along spatial axis ``k`` (MONAI ``Warp``). Affines are 4x4 (3D) or 3x3 (2D) voxel-to-world
matrices as in nibabel / MONAI ``meta["affine"]``; landmarks are in the world space of these affines (mm).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from bundle.spatial import sample_field

from .base import PerSampleMetric

__all__ = ["target_registration_error", "TREMetric"]

ArrayLike = torch.Tensor | np.ndarray | Sequence


def _apply_affine(affine: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Apply a homogeneous ``(ndim+1, ndim+1)`` affine to points ``(N, ndim)``."""
    return points @ affine[:-1, :-1].T + affine[:-1, -1]


def target_registration_error(
    fixed_points: ArrayLike,
    moving_points: ArrayLike,
    ddf: ArrayLike,
    fixed_affine: ArrayLike,
    moving_affine: ArrayLike | None = None,
) -> torch.Tensor:
    """
    Compute the per-landmark target registration error in mm.

    Each fixed landmark ``p_f`` is mapped to the fixed voxel index ``i = A_f^-1 p_f``, the DDF is linearly
    interpolated there (border values beyond the grid), and the mapped point is ``A_m (i + ddf(i))``.
    ``A_m`` is the voxel-to-world affine of the grid that ``x + ddf(x)`` indexes, i.e. of the moving image as it was
    fed to the warp. It defaults to ``A_f``: the usual case where the moving image was resampled onto the fixed grid.
    TRE is ``||A_m (i + ddf(i)) - p_m||_2`` for the corresponding moving landmark ``p_m``.

    Args:
        fixed_points: fixed-image landmarks in world coordinates (mm), shape ``(N, ndim)``.
        moving_points: corresponding moving-image landmarks in world coordinates (mm), shape ``(N, ndim)``.
        ddf: channel-first displacement field ``(ndim, *spatial)`` on the fixed grid, in voxel units.
        fixed_affine: voxel-to-world affine of the fixed grid, shape ``(ndim+1, ndim+1)``.
        moving_affine: voxel-to-world affine of the grid indexed by ``x + ddf(x)``; defaults to ``fixed_affine``.

    Returns:
        Tensor of shape ``(N,)`` (float64, on ``ddf``'s device) with the TRE of each landmark in mm.

    Raises:
        ValueError: when the landmark arrays are not both ``(N, ndim)``, ``ddf`` is not ``(ndim, *spatial)``
            or an affine is not ``(ndim+1, ndim+1)``.
    """
    ddf_t = torch.as_tensor(ddf)
    device = ddf_t.device
    p_f = torch.as_tensor(fixed_points, dtype=torch.float64, device=device)
    p_m = torch.as_tensor(moving_points, dtype=torch.float64, device=device)
    a_f = torch.as_tensor(fixed_affine, dtype=torch.float64, device=device)
    a_m = a_f if moving_affine is None else torch.as_tensor(moving_affine, dtype=torch.float64, device=device)
    ndim = ddf_t.ndim - 1
    if ndim not in (2, 3) or ddf_t.shape[0] != ndim:
        raise ValueError(f"ddf must have shape (ndim, *spatial) with ndim in {{2, 3}}, got {tuple(ddf_t.shape)}.")
    if p_f.ndim != 2 or p_f.shape != p_m.shape or p_f.shape[1] != ndim:
        raise ValueError(
            f"fixed and moving points must both have shape (N, {ndim}), got {tuple(p_f.shape)} and {tuple(p_m.shape)}."
        )
    for name, a in (("fixed_affine", a_f), ("moving_affine", a_m)):
        if a.shape != (ndim + 1, ndim + 1):
            raise ValueError(f"{name} must have shape {(ndim + 1, ndim + 1)}, got {tuple(a.shape)}.")
    index = _apply_affine(torch.linalg.inv(a_f), p_f)
    points = index.T.reshape(ndim, -1, *([1] * (ndim - 1)))  # grid_sample wants as many spatial dims as the field
    mapped = _apply_affine(a_m, index + sample_field(ddf_t, points).reshape(ndim, -1).T)
    return torch.linalg.norm(mapped - p_m, dim=-1)


class TREMetric(PerSampleMetric):
    """
    Mean target registration error (mm) per sample, see :py:func:`target_registration_error`.

    Call as ``metric(y_pred=ddf, fixed_points=..., moving_points=..., fixed_affine=..., moving_affine=None)`` where
    ``ddf`` is batch-first ``(B, ndim, *spatial)`` or a list of channel-first DDFs and the other arguments hold one
    item per sample (a batch-first tensor or a list, so landmark counts may differ between samples); then
    ``metric.aggregate()``.

    Args:
        reduction: reduction mode for ``aggregate`` (see ``monai.utils.MetricReduction``), default ``"mean"``.
        get_not_nans: whether ``aggregate`` also returns the count of not-nan values.
    """


    def __call__(  # type: ignore[override]
        self,
        y_pred: torch.Tensor | Sequence[torch.Tensor],
        fixed_points: ArrayLike,
        moving_points: ArrayLike,
        fixed_affine: ArrayLike,
        moving_affine: ArrayLike | None = None,
    ) -> torch.Tensor:
        """
        Compute and buffer the mean TRE of each sample.

        Returns:
            Tensor of shape ``(B, 1)`` with the mean TRE (mm) of each sample.

        Raises:
            ValueError: when the per-sample arguments do not have the same number of samples as ``y_pred``,
                or a sample is invalid for :py:func:`target_registration_error`.
        """
        samples = [fixed_points, moving_points, fixed_affine]
        samples.append([None] * len(y_pred) if moving_affine is None else moving_affine)
        if any(len(s) != len(y_pred) for s in samples):
            counts = [len(s) for s in samples]
            raise ValueError(f"all per-sample arguments must have {len(y_pred)} items, got {counts}.")
        ret = torch.stack(
            [
                target_registration_error(pf, pm, torch.as_tensor(d).detach(), af, am).mean().float()
                for d, pf, pm, af, am in zip(y_pred, *samples)
            ]
        ).unsqueeze(1)
        self.extend(ret)
        return ret

    def _compute_tensor(  # type: ignore[override]
        self, y_pred: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        raise NotImplementedError("TREMetric computes in __call__, it needs landmarks and affines per sample.")

