"""Jacobian-determinant based regularity metrics for dense displacement fields.

Conventions: a displacement field (DDF) has shape ``(B, ndim, *spatial)`` with ``ndim`` in {2, 3}. It lives on the
fixed image grid and is a pull-back map, ``warped(x) = moving(x + ddf(x))``, expressed in VOXEL units, with channel
``k`` the displacement along spatial axis ``k`` (the MONAI ``Warp`` convention).
"""

from __future__ import annotations

import torch
from monai.utils import MetricReduction

from .base import PerSampleMetric

__all__ = ["jacobian_determinant", "FoldingMetric", "LogJacobianStdMetric"]


def _check_ddf(ddf: torch.Tensor) -> int:
    """Validate a batch-first DDF and return its number of spatial dimensions."""
    if not isinstance(ddf, torch.Tensor) or ddf.ndim not in (4, 5) or ddf.shape[1] != ddf.ndim - 2:
        shape = tuple(ddf.shape) if isinstance(ddf, torch.Tensor) else type(ddf).__name__
        raise ValueError(f"ddf must be a tensor of shape (B, ndim, *spatial) with ndim in {{2, 3}}, got {shape}.")
    if min(ddf.shape[2:]) < 2:
        raise ValueError(f"ddf needs at least 2 voxels along every spatial axis, got {tuple(ddf.shape)}.")
    return ddf.ndim - 2


def jacobian_determinant(ddf: torch.Tensor) -> torch.Tensor:
    """
    Compute the Jacobian determinant of the map ``x -> x + ddf(x)``, i.e. ``det(I + grad ddf)``.

    Spatial derivatives use central differences in the interior and one-sided differences at the borders
    (as ``torch.gradient`` with a spacing of 1 voxel), so the result is dimensionless and exact for affine fields.
    ``J[k, j] = delta_kj + d ddf_k / d x_j``. The computation is differentiable and stays on ``ddf``'s device.

    Args:
        ddf: displacement field of shape ``(B, ndim, *spatial)`` in voxel units, ``ndim`` in {2, 3}.

    Returns:
        Tensor of shape ``(B, 1, *spatial)``; values ``<= 0`` mark folding.

    Raises:
        ValueError: when ``ddf`` is not a rank 4/5 tensor whose channel count equals its number of spatial dims,
            or a spatial axis has fewer than 2 voxels.
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


class _JacobianMetric(PerSampleMetric):
    """Shared reduction logic for per-sample metrics computed from a DDF's Jacobian determinant."""


    def _per_sample(self, det: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _compute_tensor(  # type: ignore[override]
        self, y_pred: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            y_pred: batch-first DDF ``(B, ndim, *spatial)`` in voxel units.
            y: unused, kept for the MONAI metric interface.

        Returns:
            Tensor of shape ``(B, 1)``, one value per sample.
        """
        det = jacobian_determinant(y_pred).flatten(1).float()
        return self._per_sample(det).unsqueeze(1)



class FoldingMetric(_JacobianMetric):
    """
    Percentage of voxels whose Jacobian determinant is ``<= 0`` (true folding, no clipping), per sample.

    Call as ``metric(y_pred=ddf)`` with a batch-first DDF ``(B, ndim, *spatial)`` in voxel units or a list of
    channel-first DDFs; then ``metric.aggregate()``. See :py:func:`jacobian_determinant` for the conventions.

    Args:
        reduction: reduction mode for ``aggregate`` (see ``monai.utils.MetricReduction``), default ``"mean"``.
        get_not_nans: whether ``aggregate`` also returns the count of not-nan values.
    """

    def _per_sample(self, det: torch.Tensor) -> torch.Tensor:
        return 100.0 * (det <= 0).float().mean(dim=1)


class LogJacobianStdMetric(_JacobianMetric):
    """
    Standard deviation of the log Jacobian determinant (SDlogJ), per sample.

    Definition (as in Learn2Reg): ``std(log(clamp(det J, min=eps)))`` over all voxels, using the population
    standard deviation (``torch.std(unbiased=False)``). Call as ``metric(y_pred=ddf)``, see :py:class:`FoldingMetric`.

    Args:
        eps: lower clip applied to ``det J`` before the log, default ``1e-9``.
        reduction: reduction mode for ``aggregate`` (see ``monai.utils.MetricReduction``), default ``"mean"``.
        get_not_nans: whether ``aggregate`` also returns the count of not-nan values.
    """

    def __init__(
        self, eps: float = 1e-9, reduction: MetricReduction | str = MetricReduction.MEAN, get_not_nans: bool = False
    ) -> None:
        super().__init__(reduction=reduction, get_not_nans=get_not_nans)
        self.eps = eps

    def _per_sample(self, det: torch.Tensor) -> torch.Tensor:
        return torch.log(det.double().clamp(min=self.eps)).std(dim=1, unbiased=False).float()
