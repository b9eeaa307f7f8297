"""Loss of the joint registration + tumour segmentation model (Estienne et al. 2020)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.networks.blocks import Warp
from torch.nn.modules.loss import _Loss

from ..networks.joint import logits_to_labels
from ..networks.outputs import split_joint_output
from monai.utils import LossReduction

from .masked_similarity import MaskedSimilarityLoss
from .partial_labels import check_partial_labels, partial_cross_entropy, partial_dice_loss
from .registration import make_smoothness, per_sample, present_class_dice_loss, reduce, smoothness_weights

__all__ = ["JointRegSegLoss", "MASK_SOURCES"]

MASK_SOURCES = ("auto", "label", "prediction", "none")


class JointRegSegLoss(_Loss):
    """``masked similarity + alpha * smoothness + beta * (CE(seg_moving) + CE(seg_fixed)) [+ Dice] [+ gamma * label Dice]``.

    The similarity of the warped moving image and the fixed image is computed only where neither the
    fixed-image tumour nor the warped moving-image tumour is (Estienne et al. 2020, L*_reg), normalised by
    that volume. Tumour masks come from the ground-truth labels ``moving_tumour``/``fixed_tumour`` (any value
    > 0 is tumour) when the target has them, else from the predicted segmentations (argmax != 0, no gradient),
    as ``mask_source`` says. The masks never carry gradient: the network cannot shrink the loss by moving
    the tumour over dissimilar tissue. Without tumour labels the segmentation term is skipped.

    Args:
        num_classes: segmentation classes including background. With 2, any tumour label > 0 is the tumour
            class; with more, the label values are the classes and must be < num_classes.
        spatial_dims: 2 or 3.
        similarity: ``"lncc"``, ``"mse"`` or ``"mi"``.
        similarity_kwargs: passed to the similarity.
        smoothness: ``"diffusion"`` or ``"bending"``.
        smoothness_weight: alpha; a ``target["regularisation_weight"]`` (one λ per pair, from the prepare_batch of
            a network conditioned on λ) replaces it.
        seg_weight: beta (cross-entropy on both images).
        dice_weight: weight of an extra Dice loss on both segmentations (0 = off).
        class_weights: cross-entropy weight per class (the paper's weighted cross-entropy; tumours are rare).
        mask_source: ``"auto"`` (labels if present, else predictions), ``"label"``, ``"prediction"`` or
            ``"none"`` (plain, unmasked similarity: the ablation baseline).
        label_weight: gamma, the anatomical supervision of VoxelMorph TMI: Dice of the warped moving label map
            against the fixed one (``moving_label``/``fixed_label``, :func:`present_class_dice_loss`), used on
            the batches that have both labels.
        label_weight_classes: anatomical label classes including background (needed when ``label_weight > 0``).
        label_downsample: pooling factor of the label Dice term (1: full resolution).
        partial_labels: ``{value: classes}``, tumour label values (>= ``num_classes``) that stand for a set of classes,
            for partially labelled images (e.g. ``{3: (0, 1)}``: "background or oedema" outside a mask of the enhancing
            core only): their cross-entropy is the merged classes' (:mod:`bundle.losses.partial_labels`), Dice leaves
            the set's classes out for that image, and the similarity mask takes the prediction there. Needs
            ``num_classes >= 3``.
        reduction: over the batch: ``"mean"`` (default), ``"sum"`` or ``"none"`` (one value per pair). Each term is
            a per-pair mean (the weighted cross-entropy: weighted mean over that pair's voxels).

    Raises:
        ValueError: bad options.
    """

    def __init__(
        self,
        num_classes: int = 2,
        spatial_dims: int = 3,
        similarity: str = "lncc",
        similarity_kwargs: Mapping | None = None,
        smoothness: str = "diffusion",
        smoothness_weight: float = 1.0,
        seg_weight: float = 1.0,
        dice_weight: float = 0.0,
        mask_source: str = "auto",
        class_weights: Sequence[float] | None = None,
        label_weight: float = 0.0,
        label_weight_classes: int | None = None,
        label_downsample: int = 1,
        partial_labels: Mapping[int, Sequence[int]] | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        if label_weight < 0:
            raise ValueError(f"label_weight must be >= 0, got {label_weight}.")
        if label_weight > 0 and (label_weight_classes is None or label_weight_classes < 2):
            raise ValueError(f"label_weight > 0 needs label_weight_classes >= 2 (background included), got {label_weight_classes}.")
        if label_downsample < 1:
            raise ValueError(f"label_downsample must be >= 1, got {label_downsample}.")
        self.label_weight, self.label_weight_classes = float(label_weight), label_weight_classes
        self.label_downsample = int(label_downsample)
        self.last_terms: dict[str, float] = {}  # unweighted terms of the last call, for training logs
        if mask_source not in MASK_SOURCES:
            raise ValueError(f"mask_source must be one of {MASK_SOURCES}, got {mask_source!r}.")
        if min(smoothness_weight, seg_weight, dice_weight) < 0:
            raise ValueError("loss weights must be >= 0.")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
        if class_weights is not None and len(class_weights) != num_classes:
            raise ValueError(f"class_weights needs one weight per class ({num_classes}), got {list(class_weights)}.")
        self.num_classes, self.spatial_dims = num_classes, spatial_dims
        self.partial_labels = check_partial_labels(partial_labels, num_classes)
        if self.partial_labels and num_classes == 2:
            raise ValueError("partial_labels need num_classes >= 3: a 2-class model takes any tumour label > 0 as tumour.")
        self.register_buffer("class_weights", None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32))
        self.similarity = MaskedSimilarityLoss(similarity, spatial_dims, reduction="none", **dict(similarity_kwargs or {}))
        self.smoothness = make_smoothness(smoothness, reduction="none")
        self.smoothness_weight, self.seg_weight, self.dice_weight = smoothness_weight, seg_weight, dice_weight
        self.mask_source = mask_source
        self.dice = DiceLoss(include_background=False, softmax=True, to_onehot_y=True, reduction="none")
        self.warp = Warp(mode="bilinear", padding_mode="border")  # as RegistrationLoss: one padding mode

    def _tumour(self, target: Mapping, key: str, logits: torch.Tensor) -> torch.Tensor | None:
        """Binary tumour mask ``(B, 1, *spatial)`` of one image, from its label or its prediction."""
        use_label = self.mask_source == "label" or (self.mask_source == "auto" and key in target)
        if use_label:
            if key not in target:
                raise KeyError(f"mask_source='label' needs {key!r} in the batch.")
            label = target[key]
            if not self.partial_labels:
                return (label > 0).to(logits.dtype)
            # a partial value does not say whether the voxel is tumour (e.g. oedema or background): the prediction does
            decided = label < self.num_classes
            predicted = logits_to_labels(logits.detach()) > 0
            return torch.where(decided, label > 0, predicted).to(logits.dtype)
        if self.mask_source in ("prediction", "auto"):
            return (logits_to_labels(logits.detach()) > 0).to(logits.dtype)
        return None

    def valid_mask(self, ddf: torch.Tensor, seg_moving: torch.Tensor, seg_fixed: torch.Tensor, target: Mapping):
        """Where the similarity is computed: outside the fixed tumour and the warped moving tumour (or ``None``)."""
        if self.mask_source == "none":
            return None
        with torch.no_grad():
            moving_tumour = self._tumour(target, "moving_tumour", seg_moving)
            fixed_tumour = self._tumour(target, "fixed_tumour", seg_fixed)
            warped_tumour = self.warp(moving_tumour, ddf.detach())
            return (1.0 - fixed_tumour) * (1.0 - (warped_tumour > 0.5).to(ddf.dtype))

    def _segmentation(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        # two classes: any tumour label (e.g. BraTS 1, 2, 4) is "tumour"; more: the label values are the classes
        label = (label > 0).long() if self.num_classes == 2 else label.long()
        if self.partial_labels:
            allowed = torch.tensor([*range(self.num_classes), *self.partial_labels], device=label.device)
            if not torch.isin(label, allowed).all():
                raise ValueError(f"tumour label values must be classes in [0, {self.num_classes - 1}] or partial values "
                                 f"{sorted(self.partial_labels)}, got {sorted(set(label.unique().tolist()) - set(allowed.tolist()))}.")
            loss = partial_cross_entropy(logits, label, self.partial_labels, self.class_weights)
            if self.dice_weight > 0:
                loss = loss + self.dice_weight * partial_dice_loss(logits, label, self.partial_labels)
            return loss
        if label.min() < 0 or label.max() >= self.num_classes:
            raise ValueError(f"tumour label values must be in [0, {self.num_classes - 1}], got [{label.min()}, {label.max()}].")
        voxel_loss = F.cross_entropy(logits, label[:, 0], reduction="none")  # (B, *spatial)
        if self.class_weights is None:
            loss = per_sample(voxel_loss, logits.shape[0])
        else:  # weighted mean over each pair's voxels (F.cross_entropy's weighted "mean", per pair)
            weight = self.class_weights.to(logits)[label[:, 0]]
            dims = tuple(range(1, voxel_loss.ndim))
            loss = (voxel_loss * weight).sum(dims) / weight.sum(dims)
        if self.dice_weight > 0:
            loss = loss + self.dice_weight * per_sample(self.dice(logits, label), logits.shape[0])
        return loss

    def terms(self, packed: torch.Tensor, target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Unweighted terms (batch means): ``similarity`` (masked), ``smoothness``, with tumour labels
        ``segmentation``, with anatomical labels and ``label_weight`` ``label_dice``."""
        return {k: v.mean() for k, v in self.sample_terms(packed, target).items()}

    def sample_terms(self, packed: torch.Tensor, target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The terms of :meth:`terms`, one value per pair ``(B,)``."""
        out = split_joint_output(packed, self.spatial_dims, self.num_classes)
        ddf, moving, fixed = out["ddf"], target["moving"], target["fixed"]
        mask = self.valid_mask(ddf, out["seg_moving"], out["seg_fixed"], target)
        terms = {
            "similarity": self.similarity(self.warp(moving, ddf), fixed, mask),
            "smoothness": per_sample(self.smoothness(ddf), ddf.shape[0]),
        }
        seg_terms = [
            self._segmentation(out[name], target[key])
            for name, key in (("seg_moving", "moving_tumour"), ("seg_fixed", "fixed_tumour"))
            if key in target
        ]
        if seg_terms:
            terms["segmentation"] = sum(seg_terms)
        if self.label_weight > 0 and "moving_label" in target and "fixed_label" in target:
            terms["label_dice"] = present_class_dice_loss(
                target["moving_label"], target["fixed_label"], self.label_weight_classes, ddf, self.warp, self.label_downsample,
                reduction="none",
            )
        return terms

    def forward(self, packed: torch.Tensor, target: Mapping[str, torch.Tensor]) -> torch.Tensor:
        terms = self.sample_terms(packed, target)
        self.last_terms = {k: float(v.detach().mean()) for k, v in terms.items()}
        ddf = packed[:, : self.spatial_dims]
        total = terms["similarity"] + smoothness_weights(target, self.smoothness_weight, ddf) * terms["smoothness"]
        if "segmentation" in terms:
            total = total + self.seg_weight * terms["segmentation"]
        if "label_dice" in terms:
            total = total + self.label_weight * terms["label_dice"]
        return reduce(total, self.reduction)
