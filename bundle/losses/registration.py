"""Unsupervised (optionally label-supervised) registration loss of VoxelMorph."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from monai.losses import (
    BendingEnergyLoss,
    DiceLoss,
    DiffusionLoss,
    GlobalMutualInformationLoss,
    LocalNormalizedCrossCorrelationLoss,
)
from monai.networks.blocks import Warp
from monai.networks.utils import one_hot
from torch.nn.modules.loss import MSELoss, _Loss

__all__ = ["RegistrationLoss", "make_similarity", "make_smoothness", "SIMILARITIES", "SMOOTHNESS"]

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


class RegistrationLoss(_Loss):
    """VoxelMorph loss: similarity(warped moving, fixed) + lambda * smoothness(ddf) + gamma * Dice(labels).

    The moving image (and its one-hot label, for the auxiliary Dice term of VoxelMorph TMI) is warped
    with the DDF (voxel units, pull-back, MONAI ``Warp`` convention) with linear interpolation.

    Args:
        similarity: ``"lncc"``, ``"mse"`` or ``"mi"``.
        smoothness: ``"diffusion"`` or ``"bending"``.
        smoothness_weight: lambda.
        label_weight: gamma; the Dice term is used only when > 0 and both labels are in the target.
        num_classes: label classes including background (needed when ``label_weight > 0``).
        spatial_dims: 2 or 3.
        similarity_kwargs: passed to the similarity loss (e.g. ``{"kernel_size": 9}``).

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
    ) -> None:
        super().__init__()
        if smoothness_weight < 0 or label_weight < 0:
            raise ValueError(f"weights must be >= 0, got smoothness_weight={smoothness_weight}, label_weight={label_weight}.")
        if label_weight > 0 and (num_classes is None or num_classes < 2):
            raise ValueError(f"label_weight > 0 needs num_classes >= 2 (background included), got {num_classes}.")
        self.similarity = make_similarity(similarity, spatial_dims, **dict(similarity_kwargs or {}))
        self.smoothness = make_smoothness(smoothness)
        self.smoothness_weight = float(smoothness_weight)
        self.label_weight = float(label_weight)
        self.num_classes = num_classes
        self.dice = DiceLoss(include_background=False, smooth_nr=1e-5, smooth_dr=1e-5)
        self.warp = Warp(mode="bilinear", padding_mode="border")

    def terms(self, ddf: torch.Tensor, target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Unweighted loss terms: ``similarity``, ``smoothness`` and, when used, ``label_dice``.

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
        out = {
            "similarity": self.similarity(self.warp(moving, ddf), fixed),
            "smoothness": self.smoothness(ddf),
        }
        if self.label_weight > 0 and "moving_label" in target and "fixed_label" in target:
            moving_oh = one_hot(target["moving_label"].long(), self.num_classes).to(ddf.dtype)
            fixed_oh = one_hot(target["fixed_label"].long(), self.num_classes).to(ddf.dtype)
            out["label_dice"] = self.dice(self.warp(moving_oh, ddf), fixed_oh)
        return out

    def forward(self, ddf: torch.Tensor, target: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Weighted sum of :meth:`terms`, averaged over the batch (the component losses give voxel maps)."""
        terms = self.terms(ddf, target)
        total = terms["similarity"] + self.smoothness_weight * terms["smoothness"]
        if "label_dice" in terms:
            total = total + self.label_weight * terms["label_dice"]
        return total
