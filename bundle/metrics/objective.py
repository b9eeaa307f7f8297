"""The unsupervised registration objective as a validation metric, for pairs without labels."""

from __future__ import annotations

import torch
from monai.utils import MetricReduction

from bundle.losses.registration import make_similarity, make_smoothness  # the training loss's terms

from .base import PerSampleMetric

__all__ = ["RegistrationObjectiveMetric"]


class RegistrationObjectiveMetric(PerSampleMetric):
    """Minus the registration objective of each pair: ``-(similarity_loss(warped, fixed) + λ · smoothness(ddf))``
    (higher is better), with the training loss's terms (:func:`bundle.losses.registration.make_smoothness`, MONAI's
    LNCC / MSE / MI losses).

    A selection key for validation pairs without anatomical labels: a similarity alone (PSNR) rewards rough
    fields, the objective at a fixed λ does not. Unlike the training loss it scores the whole image (no tumour mask).

    Call as ``metric(y_pred=ddf, y=cat([warped, fixed], dim=1))`` with batch-first tensors (or lists of
    channel-first ones), then ``aggregate()``.

    Args:
        smoothness_weight: λ of the objective.
        spatial_dims: 2 or 3.
        similarity: ``"lncc"``, ``"mse"`` or ``"mi"``; ``similarity_kwargs`` are passed to it.
        smoothness: ``"diffusion"`` or ``"bending"``.
        reduction: ``monai.utils.MetricReduction`` mode of :meth:`aggregate`.

    Raises:
        ValueError: a negative λ, an unknown similarity or smoothness.
    """

    def __init__(
        self,
        smoothness_weight: float,
        spatial_dims: int = 3,
        similarity: str = "lncc",
        similarity_kwargs: dict | None = None,
        smoothness: str = "diffusion",
        reduction: MetricReduction | str = MetricReduction.MEAN,
    ) -> None:
        super().__init__(reduction=reduction)
        if not float(smoothness_weight) >= 0:
            raise ValueError(f"smoothness_weight must be >= 0, got {smoothness_weight}.")
        self.smoothness_weight = float(smoothness_weight)
        self.similarity = make_similarity(similarity, spatial_dims, **dict(similarity_kwargs or {}))
        self.smoothness = make_smoothness(smoothness)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        """``y_pred``: DDF ``(B, ndim, *spatial)``; ``y``: ``cat([warped, fixed], dim=1)``. Returns ``(B, 1)``."""
        if y is None or y.shape[1] % 2 or y.shape[2:] != y_pred.shape[2:]:
            raise ValueError(f"y must be cat([warped, fixed]) on the DDF's grid {tuple(y_pred.shape[2:])}, "
                             f"got {None if y is None else tuple(y.shape)}.")
        channels = y.shape[1] // 2
        values = []
        for b in range(y_pred.shape[0]):  # one value per pair (the MONAI losses reduce over the batch)
            warped, fixed, ddf = y[b : b + 1, :channels].float(), y[b : b + 1, channels:].float(), y_pred[b : b + 1].float()
            values.append(-(self.similarity(warped, fixed) + self.smoothness_weight * self.smoothness(ddf)))
        return torch.stack(values).view(-1, 1)
