"""Local normalised cross-correlation against one fixed target, for optimising many steps towards the same image.

Same value as MONAI's ``LocalNormalizedCrossCorrelationLoss`` with a rectangular kernel (squared local NCC,
zero padding, ``smooth_dr`` floor on the variances). Ours because MONAI's recomputes the target's local sums on
every call and filters by convolution (5 filterings per call, each slower on CPU than summing shifted copies): here the
target's sums are computed once and each call filters 3 images by shifted sums (same values as the convolution;
running sums would be as fast but lose the small local variances to float32 cancellation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

__all__ = ["FixedTargetLNCCLoss", "box_sum"]


def box_sum(image: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Sum over a ``kernel_size``-wide centred box at every voxel of a ``(B, C, *spatial)`` tensor, zero padded (as
    ``monai.networks.layers.separable_filtering`` with a kernel of ones), by adding shifted copies along each axis."""
    half = kernel_size // 2
    out = image
    for dim in range(2, image.ndim):
        n = out.shape[dim]
        padded = F.pad(out, [0, 0] * (image.ndim - 1 - dim) + [half, half])
        out = padded.narrow(dim, 0, n)
        for shift in range(1, kernel_size):
            out = out + padded.narrow(dim, shift, n)
    return out


class FixedTargetLNCCLoss(_Loss):
    """Negative squared local NCC between a prediction and the target given at construction.

    Args:
        target: ``(B, C, *spatial)`` the image every prediction is compared with (its local sums are kept).
        kernel_size: the odd width of the cubic window, in voxels.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (the voxel-wise map, negated), as MONAI's losses.
        smooth_nr: added to the squared cross term (MONAI's default 0).
        smooth_dr: floor of each local variance (MONAI's default 1e-5).

    Raises:
        ValueError: an even or non-positive ``kernel_size``, or (at call time) a prediction whose shape is not the
            target's.
    """

    def __init__(self, target: torch.Tensor, kernel_size: int = 5, reduction: LossReduction | str = LossReduction.MEAN,
                 smooth_nr: float = 0.0, smooth_dr: float = 1e-5) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}.")
        self.kernel_size, self.smooth_nr, self.smooth_dr = int(kernel_size), float(smooth_nr), float(smooth_dr)
        self.volume = float(kernel_size ** (target.ndim - 2))
        target = target.detach()
        self.target = target
        self.t_sum = box_sum(target, self.kernel_size)
        self.t_var = (box_sum(target * target, self.kernel_size) - self.t_sum * self.t_sum / self.volume).clamp_min(
            self.smooth_dr)

    def forward(self, pred: torch.Tensor) -> torch.Tensor:
        if pred.shape != self.target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} must have the target's shape {tuple(self.target.shape)}.")
        p_sum = box_sum(pred, self.kernel_size)
        p2_sum = box_sum(pred * pred, self.kernel_size)
        tp_sum = box_sum(self.target * pred, self.kernel_size)
        p_avg = p_sum / self.volume
        cross = tp_sum - p_avg * self.t_sum
        p_var = (p2_sum - p_avg * p_sum).clamp_min(self.smooth_dr)
        ncc = (cross * cross + self.smooth_nr) / (self.t_var * p_var)
        if self.reduction == LossReduction.SUM.value:
            return ncc.sum().neg()
        if self.reduction == LossReduction.NONE.value:
            return ncc.neg()
        return ncc.mean().neg()
