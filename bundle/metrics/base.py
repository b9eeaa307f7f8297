"""Base of the bundle's per-sample metrics (MONAI ``CumulativeIterationMetric`` with MONAI's reductions)."""

from __future__ import annotations

import torch
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction

__all__ = ["PerSampleMetric"]


class PerSampleMetric(CumulativeIterationMetric):
    """Buffers one value per sample (``(B, 1)``) and reduces them with ``do_metric_reduction``.

    Args:
        reduction: ``monai.utils.MetricReduction`` mode of :meth:`aggregate`.
        get_not_nans: also return the count of non-NaN values from :meth:`aggregate`.
    """

    def __init__(self, reduction: MetricReduction | str = MetricReduction.MEAN, get_not_nans: bool = False) -> None:
        super().__init__()
        self.reduction = reduction
        self.get_not_nans = get_not_nans

    def aggregate(
        self, reduction: MetricReduction | str | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Reduce the buffered per-sample values (``reduction`` overrides ``self.reduction``).

        Returns:
            The reduced metric, and the ``not_nans`` count if ``get_not_nans`` is True.

        Raises:
            ValueError: when the buffer is empty or not a tensor.
        """
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError(f"the data to aggregate must be PyTorch Tensor, got {type(data)}.")
        f, not_nans = do_metric_reduction(data, reduction or self.reduction)
        return (f, not_nans) if self.get_not_nans else f
