"""Ignite metric handlers (MONAI style) for displacement-field regularity.

The DDF follows the package conventions: ``(B, ndim, *spatial)`` (or a list of channel-first ``(ndim, *spatial)``
after decollation), on the fixed grid, pull-back ``warped(x) = moving(x + ddf(x))``, in voxel units.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from monai.handlers import IgniteMetricHandler, from_engine
from monai.utils import MetricReduction

from .jacobian import FoldingMetric, LogJacobianStdMetric

__all__ = ["ddf_output_transform", "Folding", "LogJacobianStd"]


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
