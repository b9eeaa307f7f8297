"""Segmentation losses for partially labelled images: a label value may stand for a set of classes.

E.g. clinical tumour masks that mark the enhancing core only: outside them a voxel is background or oedema, which
the mask does not tell. With ``partial = {3: (0, 1)}`` a voxel labelled 3 counts as "class 0 or 1": its
cross-entropy is that of the merged class, ``-log(p0 + p1)`` (the marginal likelihood; Fidon et al., "Label-set
loss functions for partial supervision", 2021), and Dice scores only the classes the labels do decide. MONAI's
losses take one class per voxel, hence our own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = ["check_partial_labels", "partial_cross_entropy", "partial_dice_loss"]


def check_partial_labels(partial: Mapping | None, num_classes: int) -> dict[int, tuple[int, ...]]:
    """``{value: classes}`` with int keys (JSON gives strings): each value >= ``num_classes`` (it cannot be a class),
    each set of 2 or more distinct classes ``< num_classes``.

    Raises:
        ValueError: a value that is a class, or a set that is not.
    """
    out = {}
    for value, classes in dict(partial or {}).items():
        value, classes = int(value), tuple(sorted({int(c) for c in classes}))
        if value < num_classes:
            raise ValueError(f"partial label value {value} is a class (< num_classes={num_classes}): use a value >= {num_classes}.")
        if len(classes) < 2 or classes[0] < 0 or classes[-1] >= num_classes:
            raise ValueError(f"partial label {value} must stand for 2 or more classes in [0, {num_classes - 1}], got {list(classes)}.")
        out[value] = classes
    return out


def _class_sets(num_classes: int, partial: Mapping[int, Sequence[int]], device) -> torch.Tensor:
    """``(num_classes + max extra value, num_classes)`` boolean table: which classes each label value allows."""
    size = max([num_classes - 1, *partial]) + 1
    table = torch.zeros(size, num_classes, dtype=torch.bool, device=device)
    table[torch.arange(num_classes), torch.arange(num_classes)] = True
    for value, classes in partial.items():
        table[value, list(classes)] = True
    return table


def partial_cross_entropy(logits: torch.Tensor, label: torch.Tensor, partial: Mapping[int, Sequence[int]],
                          class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample ``(B,)`` cross-entropy where a partial value's voxels take ``-log`` of their classes' summed
    probability; equals ``F.cross_entropy`` (per-sample mean, or weighted mean with ``class_weights``) on fully
    labelled images. A partial voxel weighs as the lightest class of its set.

    Args:
        logits: ``(B, C, *spatial)``.
        label: ``(B, 1, *spatial)`` integers: classes ``< C`` or keys of ``partial``.
    """
    num_classes = logits.shape[1]
    allowed = _class_sets(num_classes, partial, logits.device)[label[:, 0].long()]  # (B, *spatial, C)
    allowed = allowed.movedim(-1, 1)  # (B, C, *spatial)
    log_p = torch.log_softmax(logits.float(), dim=1)
    voxel = -torch.logsumexp(log_p.masked_fill(~allowed, float("-inf")), dim=1)  # (B, *spatial)
    dims = tuple(range(1, voxel.ndim))
    if class_weights is None:
        return voxel.mean(dims)
    w = class_weights.to(voxel)[None, :, *([None] * (voxel.ndim - 1))].expand_as(log_p)
    weight = w.masked_fill(~allowed, float("inf")).amin(1)
    return (voxel * weight).sum(dims) / weight.sum(dims)


def partial_dice_loss(logits: torch.Tensor, label: torch.Tensor, partial: Mapping[int, Sequence[int]],
                      smooth: float = 1e-5) -> torch.Tensor:
    """Per-sample ``(B,)`` soft Dice loss (softmax), mean over the foreground classes that no partial value of the
    sample stands for (for the sample above: the core, not the oedema, wherever a voxel is labelled 3); the
    foreground classes of a fully labelled sample otherwise (as MONAI's ``DiceLoss(include_background=False,
    softmax=True, to_onehot_y=True)`` with its default smoothing).
    """
    num_classes = logits.shape[1]
    prob = torch.softmax(logits.float(), dim=1)
    values = label[:, 0].long()
    losses = []
    for b in range(logits.shape[0]):
        present = {int(v) for v in torch.unique(values[b]).tolist()}
        undecided = {c for v, classes in partial.items() if v in present for c in classes}
        scored = [c for c in range(1, num_classes) if c not in undecided]
        if not scored:
            losses.append(prob.new_zeros(()))
            continue
        per_class = []
        for c in scored:
            p, t = prob[b, c], (values[b] == c).to(prob.dtype)
            inter, total = (p * t).sum(), p.sum() + t.sum()
            per_class.append(1.0 - (2.0 * inter + smooth) / (total + smooth))
        losses.append(torch.stack(per_class).mean())
    return torch.stack(losses)
