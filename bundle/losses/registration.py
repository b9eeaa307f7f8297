"""Unsupervised (optionally label-supervised) registration loss of VoxelMorph."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from monai.losses import (
    BendingEnergyLoss,
    DiffusionLoss,
    GlobalMutualInformationLoss,
    LocalNormalizedCrossCorrelationLoss,
)
from monai.networks.blocks import Warp
from monai.networks.utils import one_hot
from monai.utils import LossReduction
from torch.nn.modules.loss import MSELoss, _Loss

from bundle.spatial import pool_field

__all__ = [
    "RegistrationLoss", "smoothness_weights", "make_similarity", "make_smoothness", "present_class_dice_loss", "per_sample", "reduce",
    "SIMILARITIES", "SMOOTHNESS",
]

SIMILARITIES = ("lncc", "mse", "mi")
SMOOTHNESS = ("diffusion", "bending")


def make_similarity(name: str, spatial_dims: int = 3, reduction: str = "mean", **kwargs) -> _Loss:
    """Build an image dissimilarity loss (lower is more similar).

    Args:
        name: ``"lncc"`` (local normalised cross-correlation, ``kernel_size`` window, default 9),
            ``"mse"`` or ``"mi"`` (global mutual information, ``num_bins`` default 23).
        spatial_dims: 2 or 3.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (voxel-wise map for lncc and mse).
        kwargs: passed to the MONAI loss.

    Raises:
        ValueError: unknown ``name``.
    """
    if name == "lncc":
        kwargs.setdefault("kernel_size", 9)
        return LocalNormalizedCrossCorrelationLoss(spatial_dims=spatial_dims, reduction=reduction, **kwargs)
    if name == "mse":
        return MSELoss(reduction=reduction)
    if name == "mi":
        return GlobalMutualInformationLoss(reduction=reduction, **kwargs)
    raise ValueError(f"similarity must be one of {SIMILARITIES}, got {name!r}.")


def make_smoothness(name: str, reduction: str = "mean") -> _Loss:
    """Build a displacement regulariser: ``"diffusion"`` (squared gradient) or ``"bending"`` energy.

    Raises:
        ValueError: unknown ``name``.
    """
    if name == "diffusion":
        return DiffusionLoss(reduction=reduction)
    if name == "bending":
        return BendingEnergyLoss(reduction=reduction)
    raise ValueError(f"smoothness must be one of {SMOOTHNESS}, got {name!r}.")


def smoothness_weights(target: Mapping, default: float, like: torch.Tensor) -> torch.Tensor | float:
    """The smoothness weight per pair: ``target["regularisation_weight"]`` ``(B,)`` when the batch carries one
    (a network conditioned on λ), else the loss's own ``default``.

    Raises:
        ValueError: a weight tensor that does not hold one value per pair.
    """
    weights = target.get("regularisation_weight") if isinstance(target, Mapping) else None
    if weights is None:
        return default
    weights = torch.as_tensor(weights, dtype=like.dtype, device=like.device).flatten()
    if weights.numel() != like.shape[0]:
        raise ValueError(f"regularisation_weight must hold one value per pair ({like.shape[0]}), got {weights.numel()}.")
    return weights


def per_sample(values: torch.Tensor, batch: int) -> torch.Tensor:
    """``(B,)`` means of a loss given per voxel, per channel or per sample (a scalar is repeated for each sample)."""
    if values.ndim == 0:
        return values.expand(batch)
    return values.reshape(values.shape[0], -1).mean(1)


def reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce ``(B,)`` per-sample losses as a ``_Loss`` with this ``reduction`` does (``"none"`` keeps them)."""
    reduction = LossReduction(reduction).value
    if reduction == "mean":
        return values.mean()
    return values.sum() if reduction == "sum" else values


def present_class_dice_loss(
    warped_moving_label: torch.Tensor, fixed_label: torch.Tensor, num_classes: int, ddf: torch.Tensor,
    warp: Warp, downsample: int = 1, smooth: float = 1e-5, reduction: str = "mean",
) -> torch.Tensor:
    """Soft Dice loss of the warped moving labels against the fixed labels, over the foreground classes present.

    The moving label map is one-hot encoded and warped linearly with ``ddf`` (VoxelMorph TMI's auxiliary
    loss). Only the classes present in either image count, so pairs from data sets with different label
    sets (e.g. 3 tissues and 56 structures) share one ``num_classes`` without absent classes diluting the mean.
    With ``downsample > 1`` the one-hot maps and the field are average-pooled by that factor first (the warp
    of dozens of channels otherwise costs more than the network on a CPU).

    Args:
        warped_moving_label: the moving label map ``(B, 1, *spatial)`` (warped here).
        fixed_label: ``(B, 1, *spatial)`` integer label map.
        num_classes: classes including background; label values must be below it.
        ddf: ``(B, ndim, *spatial)`` pull-back field in voxel units.
        warp: the warping block.
        downsample: integer pooling factor (1: full resolution).
        reduction: over the batch, ``"mean"``, ``"sum"`` or ``"none"`` (``(B,)``).

    Returns:
        ``1 - mean Dice`` over the present foreground classes of each pair (0 when none is present), reduced.

    Raises:
        ValueError: label values outside ``[0, num_classes)``.
    """
    moving, fixed = warped_moving_label.long(), fixed_label.long()
    for name, lab in (("moving", moving), ("fixed", fixed)):
        if lab.min() < 0 or lab.max() >= num_classes:
            raise ValueError(
                f"{name} label values must be in [0, {num_classes - 1}] (num_classes={num_classes}), "
                f"got [{int(lab.min())}, {int(lab.max())}]; remap them (e.g. the label_map config id)."
            )
    moving_oh = one_hot(moving, num_classes).to(ddf.dtype)
    fixed_oh = one_hot(fixed, num_classes).to(ddf.dtype)
    if downsample > 1:
        moving_oh, fixed_oh = (pool_field(x, downsample, scale_vectors=False) for x in (moving_oh, fixed_oh))
        ddf = pool_field(ddf, downsample)  # voxel units of the coarser grid
    warped = warp(moving_oh, ddf)
    dims = tuple(range(2, ddf.ndim))
    intersection = (warped * fixed_oh).sum(dims)
    denominator = warped.sum(dims) + fixed_oh.sum(dims)
    dice = (2 * intersection + smooth) / (denominator + smooth)  # (B, C)
    present = ((moving_oh.sum(dims) + fixed_oh.sum(dims)) > 0).to(dice.dtype)
    present[:, 0] = 0  # background excluded
    count = present.sum(1)
    per_pair = ((1 - dice) * present).sum(1) / count.clamp(min=1)
    return reduce(per_pair, reduction)


class RegistrationLoss(_Loss):
    """VoxelMorph loss: similarity(warped moving, fixed) + lambda * smoothness(ddf) + gamma * Dice(labels).

    The moving image (and its one-hot label, for the auxiliary Dice term of VoxelMorph TMI) is warped
    with the DDF (voxel units, pull-back, MONAI ``Warp`` convention) with linear interpolation.

    Args:
        similarity: ``"lncc"``, ``"mse"`` or ``"mi"``.
        smoothness: ``"diffusion"`` or ``"bending"``.
        smoothness_weight: lambda.
        label_weight: gamma; the Dice term (:func:`present_class_dice_loss`) is used only when > 0 and both
            labels are in the target.
        num_classes: label classes including background (needed when ``label_weight > 0``).
        label_downsample: pooling factor of the label Dice term (1: full resolution).
        spatial_dims: 2 or 3.
        similarity_kwargs: passed to the similarity loss (e.g. ``{"kernel_size": 9}``).
        reduction: over the batch: ``"mean"`` (default), ``"sum"`` or ``"none"`` (one value per pair).

    Raises:
        ValueError: bad option values.
    """

    def __init__(
        self,
        similarity: str = "lncc",
        smoothness: str = "diffusion",
        smoothness_weight: float = 1.0,
        label_weight: float = 0.0,
        num_classes: int | None = None,
        spatial_dims: int = 3,
        similarity_kwargs: Mapping | None = None,
        label_downsample: int = 1,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        if label_downsample < 1:
            raise ValueError(f"label_downsample must be >= 1, got {label_downsample}.")
        if smoothness_weight < 0 or label_weight < 0:
            raise ValueError(f"weights must be >= 0, got smoothness_weight={smoothness_weight}, label_weight={label_weight}.")
        if label_weight > 0 and (num_classes is None or num_classes < 2):
            raise ValueError(f"label_weight > 0 needs num_classes >= 2 (background included), got {num_classes}.")
        self.similarity = make_similarity(similarity, spatial_dims, reduction="none", **dict(similarity_kwargs or {}))
        self.smoothness = make_smoothness(smoothness, reduction="none")
        self.smoothness_weight = float(smoothness_weight)
        self.label_weight = float(label_weight)
        self.num_classes = num_classes
        self.label_downsample = int(label_downsample)
        self.warp = Warp(mode="bilinear", padding_mode="border")
        self.last_terms: dict[str, float] = {}  # unweighted terms of the last call, for training logs

    def terms(self, ddf: torch.Tensor, target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Unweighted loss terms (batch means): ``similarity``, ``smoothness`` and, when used, ``label_dice``."""
        return {k: v.mean() for k, v in self.sample_terms(ddf, target).items()}

    def sample_terms(self, ddf: torch.Tensor, target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Unweighted loss terms, one value per pair ``(B,)``: ``similarity``, ``smoothness``, ``label_dice``.

        Args:
            ddf: (B, ndim, *spatial) predicted DDF.
            target: ``moving``, ``fixed`` images (B, C, *spatial) and optionally ``moving_label``,
                ``fixed_label`` (B, 1, *spatial) integer label maps.
        """
        moving, fixed = target["moving"], target["fixed"]
        if moving.shape[2:] != ddf.shape[2:] or fixed.shape != moving.shape:
            raise ValueError(
                f"shape mismatch: moving {tuple(moving.shape)}, fixed {tuple(fixed.shape)}, ddf {tuple(ddf.shape)}."
            )
        batch = ddf.shape[0]
        out = {
            "similarity": per_sample(self.similarity(self.warp(moving, ddf), fixed), batch),
            "smoothness": per_sample(self.smoothness(ddf), batch),
        }
        if self.label_weight > 0 and "moving_label" in target and "fixed_label" in target:
            out["label_dice"] = present_class_dice_loss(
                target["moving_label"], target["fixed_label"], self.num_classes, ddf, self.warp, self.label_downsample,
                reduction="none",
            )
        return out

    def forward(self, ddf: torch.Tensor, target: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Weighted sum of the terms per pair, reduced over the batch by ``reduction``; a
        ``target["regularisation_weight"]`` (one λ per pair, from a conditioned network's prepare_batch) replaces
        ``smoothness_weight``."""
        terms = self.sample_terms(ddf, target)
        self.last_terms = {k: float(v.detach().mean()) for k, v in terms.items()}
        total = terms["similarity"] + smoothness_weights(target, self.smoothness_weight, ddf) * terms["smoothness"]
        if "label_dice" in terms:
            total = total + self.label_weight * terms["label_dice"]
        return reduce(total, self.reduction)
