"""Image similarity restricted to a mask (Estienne et al. 2020: ignore the tumours when registering)."""

from __future__ import annotations

import torch
from monai.losses import GlobalMutualInformationLoss
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from bundle.spatial import compose_ddf

from .registration import SIMILARITIES, make_similarity, reduce

__all__ = ["MaskedSimilarityLoss", "consistency_mask", "masked_mean"]


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


def consistency_mask(
    ddf_forward: torch.Tensor,
    ddf_backward: torch.Tensor,
    threshold: float | None = None,
    k: float = 2.0,
    min_threshold: float = 0.5,
    roi: torch.Tensor | None = None,
) -> torch.Tensor:
    """Where a forward and a backward registration agree: 1 = corresponding voxel, 0 = inconsistent.

    In the spirit of DIRAC (Mok & Chung, MICCAI 2022): a voxel ``x`` of the fixed grid whose forward map, followed
    by the backward one, does not come back to ``x`` has no reliable correspondence (e.g. a tumour present in one
    image only), so the similarity should ignore it. The inconsistency is
    ``e(x) = |u_f(x) + u_b(x + u_f(x))|`` (:func:`bundle.spatial.compose_ddf`), in voxels.

    Threshold rule: ``threshold`` (voxels) when given; otherwise, per pair, ``max(min_threshold, mean + k * std)``
    of ``e`` over ``roi``. A relative rule because the overall level of inconsistency depends on the network and
    on the pair (an absolute value masks everything for one model and nothing for another); ``k = 2`` keeps the
    voxels that stand out from that level (DIRAC thresholds its smoothed error at its brain mean plus a small
    margin, which also adapts to the pair). The floor of half a voxel keeps an (almost) exactly inverse pair, whose
    errors are interpolation noise, from having its noise tail masked.

    Args:
        ddf_forward: ``(B, ndim, *spatial)`` pull-back DDF of moving -> fixed (on the fixed grid), voxel units.
        ddf_backward: ``(B, ndim, *spatial)`` DDF of fixed -> moving (on the moving grid, the same grid here).
        threshold: fixed threshold in voxels, or ``None`` for the relative rule.
        k: standard deviations above the mean (relative rule).
        min_threshold: floor of the relative threshold, in voxels.
        roi: ``(B, 1, *spatial)`` voxels whose errors set the relative threshold (e.g. the brain); default all.

    Returns:
        ``(B, 1, *spatial)`` float mask, 1 where ``e <= threshold``.

    Raises:
        ValueError: fields of different shapes, a ``roi`` that does not match them, a negative threshold or ``k``.
    """
    if ddf_forward.shape != ddf_backward.shape:
        raise ValueError(f"ddf_forward {tuple(ddf_forward.shape)} and ddf_backward {tuple(ddf_backward.shape)} "
                         "must have the same shape.")
    if (threshold is not None and threshold < 0) or k < 0 or min_threshold < 0:
        raise ValueError(f"threshold, k and min_threshold must be >= 0, got {threshold}, {k} and {min_threshold}.")
    error = torch.linalg.vector_norm(compose_ddf(ddf_backward, ddf_forward), dim=1, keepdim=True)
    if threshold is not None:
        return (error <= threshold).to(ddf_forward.dtype)
    if roi is None:
        roi = torch.ones_like(error, dtype=torch.bool)
    if roi.shape != error.shape:
        raise ValueError(f"roi {tuple(roi.shape)} must be (B, 1, *spatial) = {tuple(error.shape)}.")
    limits = []
    for e, r in zip(error, roi.bool()):
        values = e[r] if r.any() else e.flatten()
        limits.append(max(min_threshold, float(values.mean() + k * values.std(unbiased=False))))
    limit = torch.as_tensor(limits, dtype=error.dtype, device=error.device).view(-1, *([1] * (error.ndim - 1)))
    return (error <= limit).to(ddf_forward.dtype)
