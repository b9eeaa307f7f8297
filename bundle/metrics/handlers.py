"""Ignite metric handlers (MONAI style) for displacement-field regularity and label distances in mm.

The DDF follows the package conventions: ``(B, ndim, *spatial)`` (or a list of channel-first ``(ndim, *spatial)``
after decollation), on the fixed grid, pull-back ``warped(x) = moving(x + ddf(x))``, in voxel units.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.handlers import IgniteMetricHandler, from_engine
from monai.metrics import HausdorffDistanceMetric
from monai.utils import MetricReduction

from .jacobian import FoldingMetric, LogJacobianStdMetric
from .objective import RegistrationObjectiveMetric

__all__ = ["ddf_output_transform", "Folding", "LogJacobianStd", "PhysicalHausdorffDistance", "PhysicalHausdorffDistanceMetric",
           "RegistrationObjective"]


def ddf_output_transform(ddf_key: str = "pred") -> Callable[[Any], tuple[Any, None]]:
    """
    Build an ``output_transform`` returning ``(ddf, None)`` from ``engine.state.output``.

    Args:
        ddf_key: key of the DDF in the output dict, or in each dict of a decollated list of dicts.

    Returns:
        A callable mapping the engine output to ``(y_pred, None)`` as expected by ``IgniteMetricHandler.update``;
        ``y_pred`` is a batch-first tensor for a dict output, a list of channel-first tensors for a list of dicts.
    """
    extract = from_engine([ddf_key], first=False)

    def _transform(output: Any) -> tuple[Any, None]:
        ddf = extract(output)
        return (ddf[0] if isinstance(ddf, tuple) else ddf), None

    return _transform


class Folding(IgniteMetricHandler):
    """
    Percentage of voxels with a non-positive Jacobian determinant, averaged over samples and iterations.

    Args:
        ddf_key: key of the DDF in ``engine.state.output``, used when ``output_transform`` is None.
        output_transform: callable mapping ``engine.state.output`` to ``(ddf, None)``;
            defaults to ``ddf_output_transform(ddf_key)``.
        save_details: whether to save the per-sample values to ``engine.state.metric_details[name]``.
        reduction: reduction mode (see ``monai.utils.MetricReduction``), default ``"mean"``.

    See also:
        :py:class:`bundle.metrics.jacobian.FoldingMetric`
    """

    def __init__(
        self,
        ddf_key: str = "pred",
        output_transform: Callable | None = None,
        save_details: bool = True,
        reduction: MetricReduction | str = MetricReduction.MEAN,
    ) -> None:
        super().__init__(
            metric_fn=FoldingMetric(reduction=reduction),
            output_transform=output_transform or ddf_output_transform(ddf_key),
            save_details=save_details,
        )


class LogJacobianStd(IgniteMetricHandler):
    """
    Standard deviation of the log Jacobian determinant (clipped at ``eps``), averaged over samples and iterations.

    Args:
        ddf_key: key of the DDF in ``engine.state.output``, used when ``output_transform`` is None.
        output_transform: callable mapping ``engine.state.output`` to ``(ddf, None)``;
            defaults to ``ddf_output_transform(ddf_key)``.
        save_details: whether to save the per-sample values to ``engine.state.metric_details[name]``.
        eps: lower clip applied to the determinant before the log, default ``1e-9``.
        reduction: reduction mode (see ``monai.utils.MetricReduction``), default ``"mean"``.

    See also:
        :py:class:`bundle.metrics.jacobian.LogJacobianStdMetric`
    """

    def __init__(
        self,
        ddf_key: str = "pred",
        output_transform: Callable | None = None,
        save_details: bool = True,
        eps: float = 1e-9,
        reduction: MetricReduction | str = MetricReduction.MEAN,
    ) -> None:
        super().__init__(
            metric_fn=LogJacobianStdMetric(eps=eps, reduction=reduction),
            output_transform=output_transform or ddf_output_transform(ddf_key),
            save_details=save_details,
        )


class PhysicalHausdorffDistanceMetric(HausdorffDistanceMetric):
    """MONAI ``HausdorffDistanceMetric`` on a grid of fixed voxel ``spacing``, so distances are in millimetres.

    MONAI's Ignite handler passes no spacing to the metric, which then reports voxels.
    """

    def __init__(self, spacing: Sequence[float], **kwargs) -> None:
        super().__init__(**kwargs)
        self.spacing = list(spacing)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs):
        return super()._compute_tensor(y_pred, y, spacing=self.spacing)


class PhysicalHausdorffDistance(IgniteMetricHandler):
    """Ignite handler of the percentile Hausdorff distance in millimetres (HD95 by default) of one-hot labels.

    Args:
        spacing: voxel size of the grid the labels are on (mm per spatial axis).
        percentile: 95 for HD95; ``None`` for the maximum.
        include_background: include channel 0.
        output_transform: engine output -> ``(y_pred, y)`` one-hot label batches.
        save_details: keep per-sample values in ``engine.state.metric_details``.
    """

    def __init__(
        self,
        spacing: Sequence[float],
        percentile: float | None = 95,
        include_background: bool = False,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
    ) -> None:
        metric_fn = PhysicalHausdorffDistanceMetric(
            spacing, include_background=include_background, percentile=percentile, reduction=MetricReduction.MEAN
        )
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)


class RegistrationObjective(IgniteMetricHandler):
    """
    Minus the registration objective ``-(similarity_loss + λ · smoothness)`` per pair, averaged over samples and
    iterations: the validation key of pairs without labels (see :class:`bundle.metrics.objective.RegistrationObjectiveMetric`).

    Args:
        smoothness_weight, spatial_dims, similarity, similarity_kwargs, smoothness: as the metric.
        ddf_key, warped_key, fixed_key: keys of the DDF, the warped moving image and the fixed image in each
            (decollated) output dict, used when ``output_transform`` is None.
        output_transform: callable mapping ``engine.state.output`` to ``(ddf, cat([warped, fixed]))``.
        save_details: whether to save the per-sample values to ``engine.state.metric_details[name]``.
    """

    def __init__(
        self,
        smoothness_weight: float,
        spatial_dims: int = 3,
        similarity: str = "lncc",
        similarity_kwargs: dict | None = None,
        smoothness: str = "diffusion",
        ddf_key: str = "pred",
        warped_key: str = "warped",
        fixed_key: str = "fixed_image",
        output_transform: Callable | None = None,
        save_details: bool = True,
    ) -> None:
        extract = from_engine([ddf_key, warped_key, fixed_key], first=False)

        def _transform(output: Any) -> tuple[Any, Any]:
            ddf, warped, fixed = extract(output)
            if isinstance(ddf, torch.Tensor):
                return ddf, torch.cat([warped, fixed], dim=1)
            return list(ddf), [torch.cat([w, f], dim=0) for w, f in zip(warped, fixed)]

        super().__init__(
            metric_fn=RegistrationObjectiveMetric(smoothness_weight, spatial_dims, similarity, similarity_kwargs, smoothness),
            output_transform=output_transform or _transform,
            save_details=save_details,
        )
