"""Partially labelled tumour maps (``bundle.losses.partial_labels``): a label value standing for a set of classes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

from bundle.losses.partial_labels import check_partial_labels, partial_cross_entropy, partial_dice_loss

PARTIAL = {3: (0, 1)}  # "background or oedema": outside an enhancing-core-only mask


def _case(seed=0, b=2, c=3, shape=(5, 6, 4)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, *shape, generator=g)
    label = torch.randint(0, c, (b, 1, *shape), generator=g)
    return logits, label


def test_fully_labelled_images_give_the_usual_losses():
    logits, label = _case()
    expected = F.cross_entropy(logits, label[:, 0], reduction="none").mean((1, 2, 3))
    torch.testing.assert_close(partial_cross_entropy(logits, label, PARTIAL), expected)
    weights = torch.tensor([1.0, 10.0, 10.0])
    voxel = F.cross_entropy(logits, label[:, 0], reduction="none")
    w = weights[label[:, 0]]
    torch.testing.assert_close(partial_cross_entropy(logits, label, PARTIAL, weights), (voxel * w).sum((1, 2, 3)) / w.sum((1, 2, 3)))
    monai = DiceLoss(include_background=False, softmax=True, to_onehot_y=True, reduction="none")(logits, label).mean((1, 2, 3, 4))
    torch.testing.assert_close(partial_dice_loss(logits, label, PARTIAL), monai, atol=1e-5, rtol=1e-5)


def test_a_partial_voxel_takes_the_merged_class_probability():
    logits = torch.tensor([2.0, 1.0, -1.0])[None, :, None, None, None]  # one voxel
    p = torch.softmax(logits.flatten(), 0)
    label = torch.full((1, 1, 1, 1, 1), 3)
    assert partial_cross_entropy(logits, label, PARTIAL).item() == pytest.approx(-math.log(p[0] + p[1]), rel=1e-5)
    # a confident oedema or background prediction costs nothing there; the core does
    sure_oedema = torch.tensor([-9.0, 9.0, -9.0])[None, :, None, None, None]
    sure_core = torch.tensor([-9.0, -9.0, 9.0])[None, :, None, None, None]
    assert partial_cross_entropy(sure_oedema, label, PARTIAL).item() < 1e-6
    assert partial_cross_entropy(sure_core, label, PARTIAL).item() > 10
    # class weights: the partial voxel weighs as the lightest class of its set (background, 1)
    two = torch.cat([logits, logits], dim=-1)
    mixed = torch.tensor([3, 2]).reshape(1, 1, 1, 1, 2)
    ce = F.cross_entropy(logits.flatten()[None], torch.tensor([2])).item()
    expected = (1.0 * -math.log(p[0] + p[1]) + 10.0 * ce) / 11.0
    assert partial_cross_entropy(two, mixed, PARTIAL, torch.tensor([1.0, 10.0, 10.0])).item() == pytest.approx(expected, rel=1e-5)


def test_dice_scores_only_the_classes_the_labels_decide():
    """With value 3 present the oedema (1) is undecided: a perfect core with any oedema scores 0; a sample without
    partial values scores both classes."""
    shape = (4, 4, 4)
    label = torch.full((1, 1, *shape), 3)
    label[..., :2, :, :] = 2  # core
    logits = torch.full((1, 3, *shape), -20.0)
    logits[:, 2][label[:, 0] == 2] = 20.0
    logits[:, 1][label[:, 0] == 3] = 20.0  # everything else called oedema: not contradicted
    assert partial_dice_loss(logits, label, PARTIAL).item() == pytest.approx(0.0, abs=1e-4)
    missed = logits.clone()
    missed[:, 2], missed[:, 0] = -20.0, 20.0 * (label[:, 0] == 2)  # the core called background
    assert partial_dice_loss(missed, label, PARTIAL).item() == pytest.approx(1.0, abs=1e-3)
    # batch: one partial sample, one full one; per-sample values
    full = torch.zeros_like(label)
    full[..., :2, :, :] = 1
    both = partial_dice_loss(torch.cat([logits, logits]), torch.cat([label, full]), PARTIAL)
    assert both.shape == (2,) and both[0].item() < 1e-3 and both[1].item() > 0.4


def test_partial_label_sets_are_checked():
    assert check_partial_labels({"3": [1, 0]}, 3) == {3: (0, 1)}
    assert check_partial_labels(None, 3) == {}
    with pytest.raises(ValueError, match="is a class"):
        check_partial_labels({2: (0, 1)}, 3)
    with pytest.raises(ValueError, match="2 or more classes"):
        check_partial_labels({3: (0,)}, 3)
    with pytest.raises(ValueError, match="2 or more classes"):
        check_partial_labels({3: (0, 3)}, 3)


def test_the_joint_loss_with_partial_labels():
    """``JointRegSegLoss(partial_labels=...)``: the same terms as without on fully labelled pairs; on a partially
    labelled pair the segmentation term is the marginal one and the similarity mask takes the prediction where the
    label is partial; other values and 2-class models are refused."""
    from bundle.losses import JointRegSegLoss

    shape = (12, 12, 12)
    g = torch.Generator().manual_seed(3)
    moving, fixed = torch.rand(1, 1, *shape, generator=g), torch.rand(1, 1, *shape, generator=g)
    seg_moving, seg_fixed = torch.randn(1, 3, *shape, generator=g), torch.randn(1, 3, *shape, generator=g)
    ddf = torch.zeros(1, 3, *shape)
    packed = torch.cat([ddf, seg_moving, seg_fixed], 1)
    full = torch.zeros(1, 1, *shape, dtype=torch.long)
    full[..., 3:7, 3:7, 3:7], full[..., 4:6, 4:6, 4:6] = 1, 2
    options = dict(num_classes=3, similarity="mse", dice_weight=1.0, class_weights=[1.0, 10.0, 10.0])
    target = {"moving": moving, "fixed": fixed, "moving_tumour": full, "fixed_tumour": full}
    plain, partial = JointRegSegLoss(**options), JointRegSegLoss(**options, partial_labels={"3": [0, 1]})
    for name, value in plain.terms(packed, target).items():
        torch.testing.assert_close(partial.terms(packed, target)[name], value, rtol=1e-5, atol=1e-5)

    core_only = torch.where(full == 2, 2, 3)  # an expert mask of the core: the rest background or oedema
    target = dict(target, fixed_tumour=core_only)
    terms = partial.terms(packed, target)
    expected = (partial_cross_entropy(seg_moving, full, PARTIAL, partial.class_weights) + partial_dice_loss(seg_moving, full, PARTIAL)
                + partial_cross_entropy(seg_fixed, core_only, PARTIAL, partial.class_weights) + partial_dice_loss(seg_fixed, core_only, PARTIAL))
    torch.testing.assert_close(terms["segmentation"], expected.mean())
    mask = partial.valid_mask(ddf, seg_moving, seg_fixed, target)
    predicted = seg_fixed.argmax(1, keepdim=True) > 0
    fixed_tumour = (core_only == 2) | ((core_only == 3) & predicted)
    assert torch.equal(mask[0, 0] == 0, (fixed_tumour | (full > 0))[0, 0])
    with pytest.raises(ValueError, match=r"partial values \[3\], got \[4\]"):
        partial.terms(packed, dict(target, fixed_tumour=torch.full_like(full, 4)))
    with pytest.raises(ValueError, match="num_classes >= 3"):
        JointRegSegLoss(num_classes=2, partial_labels={2: (0, 1)})
