"""Image similarity restricted to a mask (Estienne et al. 2020: ignore the tumours when registering)."""

from __future__ import annotations

import torch
from monai.losses import GlobalMutualInformationLoss
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from .registration import SIMILARITIES, make_similarity, reduce

__all__ = ["MaskedSimilarityLoss", "masked_mean"]


def masked_mean(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-sample ``(B,)`` mean of a voxel map ``(B, C, *spatial)`` (channels averaged) over a mask ``(B, 1, *spatial)``.

    The functional form of the masked similarity, also used by region metrics. An empty mask gives 0.
    """
    values = values.mean(dim=1, keepdim=True)
    mask = mask.to(values.dtype)
    dims = tuple(range(1, values.ndim))
    return (values * mask).sum(dims) / (mask.sum(dims) + eps)


class MaskedSimilarityLoss(_Loss):
    """Dissimilarity of ``pred`` and ``target`` computed only where ``mask`` is 1, normalised by the masked volume.

    - ``"lncc"`` and ``"mse"``: the voxel-wise loss map (computed on the unmodified images, so the local
      windows still see the real intensities) is multiplied by the mask and summed over the mask's volume.
    - ``"mi"``: global mutual information from a mask-weighted joint histogram (MONAI's Gaussian Parzen
      window; intensities expected in [0, 1]). MONAI's loss has no voxel weights, hence this class.

    With ``mask=None`` or a mask of ones the value equals the unmasked MONAI loss.

    Args:
        similarity: ``"lncc"``, ``"mse"`` or ``"mi"``.
        spatial_dims: 2 or 3.
        eps: added to the masked volume (an empty mask gives 0, not NaN).
        reduction: over the batch: ``"mean"`` (default), ``"sum"`` or ``"none"`` (``(B,)``).
        kwargs: passed to the similarity (``kernel_size`` for lncc, ``num_bins``/``sigma_ratio`` for mi).

    Raises:
        ValueError: unknown ``similarity``; mask shape not broadcastable to ``(B, 1, *spatial)``.
    """

    def __init__(self, similarity: str = "lncc", spatial_dims: int = 3, eps: float = 1e-6, reduction: str = "mean",
                 **kwargs) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}.")
        self.similarity = similarity
        self.eps = eps
        if similarity == "mi":
            if kwargs.get("kernel_type", "gaussian") != "gaussian":
                raise ValueError(f"masked mutual information supports kernel_type='gaussian' only, got {kwargs['kernel_type']!r}.")
            self.mi = GlobalMutualInformationLoss(**kwargs)
        else:
            self.voxelwise = make_similarity(similarity, spatial_dims, reduction="none", **kwargs)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Masked dissimilarity (lower is more similar), reduced over the batch by ``reduction``.

        Args:
            pred: warped moving image ``(B, C, *spatial)``.
            target: fixed image, same shape.
            mask: ``(B, 1, *spatial)`` weights in [0, 1]; 1 = voxel used. ``None`` uses every voxel.
        """
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape.")
        if mask is None:
            mask = torch.ones_like(pred[:, :1])
        if mask.ndim != pred.ndim or mask.shape[0] != pred.shape[0] or mask.shape[2:] != pred.shape[2:]:
            raise ValueError(f"mask {tuple(mask.shape)} must be (B, 1, *spatial) for images {tuple(pred.shape)}.")
        mask = mask.to(pred.dtype)
        if self.similarity == "mi":
            return reduce(self._masked_mi(pred, target, mask), self.reduction)
        return reduce(masked_mean(self.voxelwise(pred, target), mask, self.eps), self.reduction)

    def _masked_mi(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weight_a, _ = self.mi.parzen_windowing_gaussian(pred)  # (B, N, bins), channels folded into N
        weight_b, _ = self.mi.parzen_windowing_gaussian(target)
        voxel_weight = mask.expand_as(pred).reshape(pred.shape[0], -1, 1)
        total = voxel_weight.sum(dim=1, keepdim=True) + self.eps
        p_a = (weight_a * voxel_weight).sum(dim=1, keepdim=True) / total  # (B, 1, bins)
        p_b = (weight_b * voxel_weight).sum(dim=1, keepdim=True) / total
        p_ab = torch.bmm((weight_a * voxel_weight).permute(0, 2, 1), weight_b) / total  # (B, bins, bins)
        p_a_p_b = torch.bmm(p_a.permute(0, 2, 1), p_b)
        nr, dr = self.mi.smooth_nr, self.mi.smooth_dr
        mi = torch.sum(p_ab * torch.log((p_ab + nr) / (p_a_p_b + dr) + dr), dim=(1, 2))
        return -mi  # (B,)
