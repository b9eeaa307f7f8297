"""Jacobian-determinant based regularity metrics for dense displacement fields.

Conventions: a displacement field (DDF) has shape ``(B, ndim, *spatial)`` with ``ndim`` in {2, 3}. It lives on the
fixed image grid and is a pull-back map, ``warped(x) = moving(x + ddf(x))``, expressed in VOXEL units, with channel
``k`` the displacement along spatial axis ``k`` (the MONAI ``Warp`` convention).
"""

from __future__ import annotations

import torch
from monai.utils import MetricReduction

from bundle.spatial import jacobian_determinant  # re-exported: the metrics API names it

from .base import PerSampleMetric

__all__ = ["jacobian_determinant", "FoldingMetric", "LogJacobianStdMetric"]


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
