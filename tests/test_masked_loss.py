"""Tests for bundle.losses.masked_similarity (MaskedSimilarityLoss) and bundle.losses.joint (JointRegSegLoss)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, DiffusionLoss, GlobalMutualInformationLoss, LocalNormalizedCrossCorrelationLoss
from monai.networks.blocks import Warp
from torch.nn import MSELoss

from bundle.losses import JointRegSegLoss, MaskedSimilarityLoss

SIMILARITIES = ("lncc", "mse", "mi")


def _rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _monai(similarity: str, dims: int = 3):
    if similarity == "lncc":
        return LocalNormalizedCrossCorrelationLoss(spatial_dims=dims, kernel_size=9)
    if similarity == "mse":
        return MSELoss()
    return GlobalMutualInformationLoss()


# ------------------------------------------------------------------------------- MaskedSimilarityLoss


@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("dims,channels", [(3, 1), (3, 2), (2, 1)])
def test_no_mask_and_ones_mask_equal_monai(similarity, dims, channels):
    shape = (2, channels, *(16,) * dims)
    pred, target = _rand(*shape, seed=1), _rand(*shape, seed=2)
    target = 0.5 * target + 0.5 * pred  # correlated, so the loss is far from trivial values
    loss = MaskedSimilarityLoss(similarity, spatial_dims=dims)
    expected = _monai(similarity, dims)(pred, target)
    assert abs(float(expected)) > 1e-3
    torch.testing.assert_close(loss(pred, target), expected, rtol=1e-5, atol=1e-5)
    ones = torch.ones(2, 1, *(16,) * dims)
    torch.testing.assert_close(loss(pred, target, ones), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("similarity", ["mse", "mi"])
def test_changes_inside_the_masked_out_region_do_not_matter(similarity):
    pred, target = _rand(2, 1, 16, 16, 16, seed=3), _rand(2, 1, 16, 16, 16, seed=4)
    mask = torch.ones(2, 1, 16, 16, 16)
    mask[:, :, 3:11, 2:9, 5:13] = 0
    loss = MaskedSimilarityLoss(similarity)
    reference = loss(pred, target, mask)
    hole = mask == 0
    pred2 = torch.where(hole, _rand(*pred.shape, seed=5), pred)
    target2 = torch.where(hole, 1.0 - target, target)
    assert torch.equal(loss(pred2, target, mask), reference)
    assert torch.equal(loss(pred, target2, mask), reference)
    assert torch.equal(loss(pred2, target2, mask), reference)
    # ... while the unmasked loss does see the change
    assert not torch.allclose(loss(pred2, target2), loss(pred, target))


def test_lncc_changes_deep_inside_the_masked_out_region_do_not_matter():
    """LNCC is a windowed statistic: the loss of a voxel *inside* the mask is computed from a 9^3 window that
    can straddle the mask boundary, so it sees intensities up to the kernel half-width (4 voxels) *outside* the
    mask. A change of the images within 4 voxels of the mask therefore changes the masked loss (by design: the
    windows see the real intensities); a change deeper than that inside the masked-out block does not."""
    pred, target = _rand(1, 1, 16, 16, 16, seed=6), _rand(1, 1, 16, 16, 16, seed=7)
    target = 0.5 * target + 0.5 * pred
    mask = torch.ones(1, 1, 16, 16, 16)
    mask[..., :8] = 0  # masked-out block: last axis 0..7; used voxels 8..15, whose windows reach down to 4
    loss = MaskedSimilarityLoss("lncc", kernel_size=9)
    reference = loss(pred, target, mask)
    noise = _rand(1, 1, 16, 16, 16, seed=8)

    deep = torch.zeros_like(mask, dtype=torch.bool)
    deep[..., :4] = True  # more than the half-width away from every used voxel
    changed = loss(torch.where(deep, noise, pred), torch.where(deep, 1 - target, target), mask)
    torch.testing.assert_close(changed, reference, rtol=0, atol=1e-7)

    near = torch.zeros_like(deep)
    near[..., 4:8] = True  # masked out, but inside the windows of the used voxels 8..11
    changed_near = loss(torch.where(near, noise, pred), target, mask)
    assert abs(float(changed_near - reference)) > 1e-4


@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_empty_mask_gives_zero_without_nan(similarity):
    pred = _rand(2, 1, 16, 16, 16, seed=9).requires_grad_(True)
    target = _rand(2, 1, 16, 16, 16, seed=10)
    value = MaskedSimilarityLoss(similarity)(pred, target, torch.zeros(2, 1, 16, 16, 16))
    assert float(value) == 0.0
    value.backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred.grad))  # no voxel used: no gradient at all (and no NaN)


def test_mse_is_normalised_by_the_masked_volume():
    target = _rand(1, 1, 8, 8, 8, seed=11)
    pred = target.clone()
    pred[..., :2] += 0.5  # region A: 8*8*2 = 128 voxels with squared error 0.25; elsewhere identical
    loss = MaskedSimilarityLoss("mse", eps=0.0)
    mask = torch.zeros(1, 1, 8, 8, 8)
    mask[..., :4] = 1  # A (128) + 128 voxels where the images agree
    torch.testing.assert_close(loss(pred, target, mask), torch.tensor(0.25 * 128 / 256))
    mask[..., :6] = 1  # doubling the agreeing region: 128 + 256 voxels
    torch.testing.assert_close(loss(pred, target, mask), torch.tensor(0.25 * 128 / 384))
    mask[..., :2] = 0  # only agreeing voxels
    assert float(loss(pred, target, mask)) == 0.0
    # fractional weights are weights: sum(w * err) / sum(w)
    weights = torch.full((1, 1, 8, 8, 8), 0.5)
    weights[..., :2] = 1.0
    torch.testing.assert_close(loss(pred, target, weights), torch.tensor(0.25 * 128 / (128 + 0.5 * 384)))


def test_batch_mean_of_per_sample_normalised_losses():
    target = torch.zeros(2, 1, 8, 8, 8)
    pred = torch.ones(2, 1, 8, 8, 8)  # error 1 everywhere
    pred[1] = 2.0  # error 4 in the second sample
    mask = torch.zeros(2, 1, 8, 8, 8)
    mask[0, ..., :1] = 1  # 64 voxels
    mask[1, ..., :4] = 1  # 256 voxels
    value = MaskedSimilarityLoss("mse", eps=0.0)(pred, target, mask)
    torch.testing.assert_close(value, torch.tensor((1.0 + 4.0) / 2))  # not the pooled (64 + 1024) / 320


def test_shape_errors():
    loss = MaskedSimilarityLoss("mse")
    a = torch.rand(1, 1, 8, 8, 8)
    with pytest.raises(ValueError):
        loss(a, torch.rand(1, 1, 8, 8, 4))
    with pytest.raises(ValueError):
        loss(a, a, torch.ones(1, 1, 8, 8, 4))
    with pytest.raises(ValueError):
        loss(a, a, torch.ones(2, 1, 8, 8, 8))
    with pytest.raises(ValueError):
        loss(a, a, torch.ones(8, 8, 8))
    with pytest.raises(ValueError):
        MaskedSimilarityLoss("ncc")


@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_gradient_flows_to_pred_only_where_masked_in(similarity):
    pred = _rand(1, 1, 16, 16, 16, seed=12).requires_grad_(True)
    target = (0.5 * pred.detach() + 0.5 * _rand(1, 1, 16, 16, 16, seed=13)).requires_grad_(True)
    mask = torch.ones(1, 1, 16, 16, 16)
    mask[..., :6] = 0
    MaskedSimilarityLoss(similarity)(pred, target, mask).backward()
    if similarity == "lncc":  # the windows reach 4 voxels into the masked-out block
        assert torch.equal(pred.grad[..., :2], torch.zeros_like(pred.grad[..., :2]))
    else:
        assert torch.equal(pred.grad[..., :6], torch.zeros_like(pred.grad[..., :6]))
    if similarity == "mse":  # d/dp of sum(mask (p - t)^2) / (sum(mask) + eps), exactly
        expected = 2 * (pred.detach() - target.detach()) * mask / (mask.sum() + 1e-6)
        torch.testing.assert_close(pred.grad, expected, rtol=1e-5, atol=1e-10)
        torch.testing.assert_close(target.grad, -expected, rtol=1e-5, atol=1e-10)
    elif similarity == "lncc":
        # voxels >= 10 lie only in windows centred on used voxels (>= 6): the same gradient as the unmasked loss,
        # whose mean is over 16 instead of 10 slabs of voxels
        free = pred.detach().clone().requires_grad_(True)
        MaskedSimilarityLoss(similarity)(free, target.detach()).backward()
        torch.testing.assert_close(pred.grad[..., 10:], free.grad[..., 10:] * 16 / 10, rtol=1e-4, atol=1e-9)
        assert pred.grad[..., 10:].abs().min() > 0
    else:  # global MI of the used voxels only: their gradient ignores what lies in the masked-out block
        other = torch.where(mask == 0, _rand(1, 1, 16, 16, 16, seed=30), pred.detach()).requires_grad_(True)
        MaskedSimilarityLoss(similarity)(other, target.detach(), mask).backward()
        torch.testing.assert_close(other.grad, pred.grad, rtol=0, atol=1e-9)
        assert (pred.grad[..., 6:] != 0).float().mean() > 0.99


def test_mi_with_bspline_kernel_matches_monai_or_is_rejected():
    """BUG: ``kernel_type="b-spline"`` is forwarded to MONAI's MI at construction, but ``_masked_mi`` always calls
    ``parzen_windowing_gaussian``, which raises ``ValueError: bin_centers and preterm must be defined`` at forward
    time (even with ``mask=None``). Either the option must be rejected at construction or honoured."""
    try:
        loss = MaskedSimilarityLoss("mi", kernel_type="b-spline")
    except ValueError:
        return  # rejected up front: acceptable
    pred, target = _rand(1, 1, 8, 8, 8, seed=14), _rand(1, 1, 8, 8, 8, seed=15)
    expected = GlobalMutualInformationLoss(kernel_type="b-spline")(pred, target)
    torch.testing.assert_close(loss(pred, target), expected, rtol=1e-5, atol=1e-5)



# ------------------------------------------------------------------------------------ JointRegSegLoss

SHAPE = (16, 16, 16)


def _tumour(batch: int = 2) -> torch.Tensor:
    label = torch.zeros(batch, 1, *SHAPE, dtype=torch.long)
    label[:, :, 5:10, 4:11, 6:12] = 1
    return label


def _logits_for(label: torch.Tensor, num_classes: int = 2) -> torch.Tensor:
    """Logits whose argmax is exactly ``label``."""
    return 10.0 * F.one_hot(label[:, 0], num_classes).movedim(-1, 1).float() - 5.0


def _packed(ddf, seg_moving, seg_fixed):
    return torch.cat([ddf, seg_moving, seg_fixed], dim=1)


def _pair_with_noise_in_tumour(batch: int = 2):
    fixed = _rand(batch, 1, *SHAPE, seed=20)
    tumour = _tumour(batch)
    moving = torch.where(tumour > 0, _rand(batch, 1, *SHAPE, seed=21), fixed)
    return moving, fixed, tumour


def test_joint_loss_identical_images_zero_ddf():
    fixed = _rand(2, 1, *SHAPE, seed=22)
    tumour = _tumour()
    g = torch.Generator().manual_seed(23)
    seg_moving, seg_fixed = torch.randn(2, 2, *SHAPE, generator=g), torch.randn(2, 2, *SHAPE, generator=g)
    ddf = torch.zeros(2, 3, *SHAPE)
    target = {"moving": fixed.clone(), "fixed": fixed, "moving_tumour": tumour, "fixed_tumour": tumour}
    loss = JointRegSegLoss(num_classes=2, similarity="lncc", mask_source="label")
    terms = loss.terms(_packed(ddf, seg_moving, seg_fixed), target)
    torch.testing.assert_close(terms["similarity"], torch.tensor(-1.0), rtol=0, atol=1e-4)
    mask = (1 - tumour.float()) * (1 - tumour.float())
    expected_sim = MaskedSimilarityLoss("lncc")(fixed, fixed, mask)
    torch.testing.assert_close(terms["similarity"], expected_sim, rtol=0, atol=1e-5)
    assert float(terms["smoothness"]) == 0.0
    expected_seg = F.cross_entropy(seg_moving, tumour[:, 0]) + F.cross_entropy(seg_fixed, tumour[:, 0])
    torch.testing.assert_close(terms["segmentation"], expected_seg)


@pytest.mark.parametrize("similarity", ["mse", "lncc"])
def test_label_mask_ignores_tumour_differences(similarity):
    moving, fixed, tumour = _pair_with_noise_in_tumour()
    ddf = torch.zeros(2, 3, *SHAPE)
    seg = _logits_for(tumour)
    target = {"moving": moving, "fixed": fixed, "moving_tumour": tumour, "fixed_tumour": tumour}
    identical = dict(target, moving=fixed.clone())

    def sim(source, tgt):
        return JointRegSegLoss(similarity=similarity, mask_source=source).terms(_packed(ddf, seg, seg), tgt)["similarity"]

    if similarity == "mse":  # voxel-wise: outside the tumours the images agree exactly
        torch.testing.assert_close(sim("label", target), torch.tensor(0.0), rtol=0, atol=1e-10)
        torch.testing.assert_close(sim("label", target), sim("label", identical), rtol=0, atol=1e-10)
        assert float(sim("none", target)) > 1e-3
    else:  # windows next to the tumour see the noise: masked lncc is worse than identical, but better than unmasked
        assert float(sim("label", identical)) < float(sim("label", target)) < float(sim("none", target))
    # predictions that match the labels give the same mask
    torch.testing.assert_close(sim("prediction", target), sim("label", target), rtol=0, atol=0)
    torch.testing.assert_close(sim("auto", target), sim("label", target), rtol=0, atol=0)


def test_mask_uses_the_warped_moving_tumour_and_the_fixed_tumour():
    loss = JointRegSegLoss(mask_source="label")
    moving_tumour = torch.zeros(1, 1, *SHAPE, dtype=torch.long)
    moving_tumour[:, :, 6:9, 6:9, 6:9] = 1
    fixed_tumour = torch.zeros_like(moving_tumour)
    fixed_tumour[:, :, 1:3, 1:3, 1:3] = 1
    ddf = torch.zeros(1, 3, *SHAPE)
    ddf[:, 0] = 2.0  # pull-back: warped(i) = moving(i + 2) along axis 0 => the tumour appears at 4:7
    seg = torch.zeros(1, 2, *SHAPE)
    target = {"moving": torch.rand(1, 1, *SHAPE), "fixed": torch.rand(1, 1, *SHAPE),
              "moving_tumour": moving_tumour, "fixed_tumour": fixed_tumour}
    mask = loss.valid_mask(ddf, seg, seg, target)
    expected = torch.ones(1, 1, *SHAPE)
    expected[:, :, 4:7, 6:9, 6:9] = 0
    expected[:, :, 1:3, 1:3, 1:3] = 0
    assert torch.equal(mask, expected)


def test_auto_without_labels_uses_predictions_and_skips_segmentation():
    moving, fixed, tumour = _pair_with_noise_in_tumour()
    ddf = torch.zeros(2, 3, *SHAPE)
    seg = _logits_for(tumour)
    packed = _packed(ddf, seg, seg)
    unlabelled = {"moving": moving, "fixed": fixed}
    labelled = dict(unlabelled, moving_tumour=tumour, fixed_tumour=tumour)
    auto = JointRegSegLoss(similarity="mse", mask_source="auto").terms(packed, unlabelled)
    assert set(auto) == {"similarity", "smoothness"}
    label = JointRegSegLoss(similarity="mse", mask_source="label").terms(packed, labelled)
    torch.testing.assert_close(auto["similarity"], label["similarity"], rtol=0, atol=0)
    torch.testing.assert_close(auto["similarity"], torch.tensor(0.0), rtol=0, atol=1e-10)
    # 'auto' prefers the labels over (wrong) predictions when both exist
    wrong = _packed(ddf, torch.zeros_like(seg), torch.zeros_like(seg))  # argmax 0 everywhere: no tumour
    auto_labelled = JointRegSegLoss(similarity="mse", mask_source="auto").terms(wrong, labelled)
    torch.testing.assert_close(auto_labelled["similarity"], torch.tensor(0.0), rtol=0, atol=1e-10)
    assert "segmentation" in auto_labelled
    assert float(JointRegSegLoss(similarity="mse", mask_source="prediction").terms(wrong, labelled)["similarity"]) > 1e-3


def test_label_errors():
    moving, fixed, tumour = _pair_with_noise_in_tumour()
    seg = torch.zeros(2, 2, *SHAPE)
    packed = _packed(torch.zeros(2, 3, *SHAPE), seg, seg)
    with pytest.raises(KeyError):
        JointRegSegLoss(mask_source="label")(packed, {"moving": moving, "fixed": fixed})
    # two classes: any label > 0 (e.g. BraTS 1, 2, 4) is tumour, so value 2 counts as value 1
    two = JointRegSegLoss(mask_source="none")(packed, {"moving": moving, "fixed": fixed, "moving_tumour": tumour * 2,
                                                       "fixed_tumour": tumour})
    one = JointRegSegLoss(mask_source="none")(packed, {"moving": moving, "fixed": fixed, "moving_tumour": tumour,
                                                       "fixed_tumour": tumour})
    torch.testing.assert_close(two, one)
    seg3 = torch.zeros(2, 3, *SHAPE)
    packed3 = _packed(torch.zeros(2, 3, *SHAPE), seg3, seg3)
    with pytest.raises(ValueError):  # three classes: label values are classes, 3 is out of range
        JointRegSegLoss(num_classes=3, mask_source="none")(
            packed3, {"moving": moving, "fixed": fixed, "moving_tumour": tumour * 3, "fixed_tumour": tumour}
        )
    with pytest.raises(ValueError):
        JointRegSegLoss(mask_source="labels")
    with pytest.raises(ValueError):
        JointRegSegLoss(seg_weight=-1.0)
    with pytest.raises(ValueError):
        JointRegSegLoss(num_classes=1)
    with pytest.raises(ValueError):  # packed output with the wrong channel count
        JointRegSegLoss(num_classes=3)(packed, {"moving": moving, "fixed": fixed})


@pytest.mark.parametrize("source", ["label", "prediction"])
def test_mask_carries_no_gradient(source):
    moving, fixed, tumour = _pair_with_noise_in_tumour()
    g = torch.Generator().manual_seed(24)
    ddf = (0.5 * torch.randn(2, 3, *SHAPE, generator=g)).requires_grad_(True)
    seg_moving = torch.randn(2, 2, *SHAPE, generator=g).requires_grad_(True)
    seg_fixed = torch.randn(2, 2, *SHAPE, generator=g).requires_grad_(True)
    loss = JointRegSegLoss(similarity="mse", mask_source=source)
    target = {"moving": moving, "fixed": fixed, "moving_tumour": tumour, "fixed_tumour": tumour}
    mask = loss.valid_mask(ddf, seg_moving, seg_fixed, target)
    assert not mask.requires_grad
    # outside the fixed tumour and outside the moving tumour warped by the DDF (bilinear, more than half inside)
    if source == "label":
        moving_tumour = fixed_tumour = tumour.float()
    else:
        moving_tumour, fixed_tumour = ((s.detach().argmax(1, keepdim=True) > 0).float() for s in (seg_moving, seg_fixed))
    warped_tumour = Warp(mode="bilinear", padding_mode="border")(moving_tumour, ddf.detach()) > 0.5
    expected = (1 - fixed_tumour) * (1 - warped_tumour.float())
    assert torch.equal(mask, expected) and 0.1 < float(expected.mean()) < 0.99
    # without tumour labels the segmentation logits only enter through the mask: they get no gradient
    packed = _packed(ddf, seg_moving, seg_fixed)
    unlabelled = {"moving": moving, "fixed": fixed}
    if source == "prediction":
        loss(packed, unlabelled).backward()
        assert ddf.grad is not None and ddf.grad.abs().sum() > 0
        assert seg_moving.grad is None or seg_moving.grad.abs().sum() == 0
        assert seg_fixed.grad is None or seg_fixed.grad.abs().sum() == 0


@pytest.mark.parametrize("labelled", [True, False])
def test_total_is_weighted_sum_of_terms(labelled):
    moving, fixed, tumour = _pair_with_noise_in_tumour()
    g = torch.Generator().manual_seed(25)
    ddf = 0.5 * torch.randn(2, 3, *SHAPE, generator=g)
    seg_moving, seg_fixed = torch.randn(2, 2, *SHAPE, generator=g), torch.randn(2, 2, *SHAPE, generator=g)
    target = {"moving": moving, "fixed": fixed}
    if labelled:
        target.update(moving_tumour=tumour, fixed_tumour=tumour)
    loss = JointRegSegLoss(similarity="lncc", smoothness_weight=0.3, seg_weight=0.7)
    packed = _packed(ddf, seg_moving, seg_fixed)
    terms = loss.terms(packed, target)
    torch.testing.assert_close(terms["smoothness"], DiffusionLoss()(ddf))
    expected = terms["similarity"] + 0.3 * terms["smoothness"]
    if labelled:
        seg = F.cross_entropy(seg_moving, tumour[:, 0]) + F.cross_entropy(seg_fixed, tumour[:, 0])
        torch.testing.assert_close(terms["segmentation"], seg)
        expected = expected + 0.7 * seg
    else:
        assert "segmentation" not in terms
    torch.testing.assert_close(loss(packed, target), expected)
    assert float(terms["smoothness"]) > 0


def test_dice_weight_adds_dice_to_each_segmentation():
    tumour = _tumour()
    g = torch.Generator().manual_seed(26)
    seg_moving, seg_fixed = torch.randn(2, 2, *SHAPE, generator=g), torch.randn(2, 2, *SHAPE, generator=g)
    image = _rand(2, 1, *SHAPE, seed=27)
    target = {"moving": image, "fixed": image, "moving_tumour": tumour, "fixed_tumour": tumour}
    packed = _packed(torch.zeros(2, 3, *SHAPE), seg_moving, seg_fixed)
    seg = JointRegSegLoss(dice_weight=0.5).terms(packed, target)["segmentation"]
    dice = DiceLoss(include_background=False, softmax=True, to_onehot_y=True)
    expected = sum(F.cross_entropy(s, tumour[:, 0]) + 0.5 * dice(s, tumour) for s in (seg_moving, seg_fixed))
    torch.testing.assert_close(seg, expected)


def test_multiclass_labels_mask_every_tumour_class():
    label = torch.zeros(1, 1, *SHAPE, dtype=torch.long)
    label[:, :, 2:5, 2:5, 2:5] = 1
    label[:, :, 9:12, 9:12, 9:12] = 3
    seg = torch.zeros(1, 4, *SHAPE)
    loss = JointRegSegLoss(num_classes=4, mask_source="label")
    target = {"moving": torch.rand(1, 1, *SHAPE), "fixed": torch.rand(1, 1, *SHAPE),
              "moving_tumour": label, "fixed_tumour": label}
    mask = loss.valid_mask(torch.zeros(1, 3, *SHAPE), seg, seg, target)
    assert torch.equal(mask, (label == 0).float())
    # equal logits over 4 classes: cross-entropy log 4 per segmentation; zero DDF: no smoothness term
    expected = MaskedSimilarityLoss("lncc")(target["moving"], target["fixed"], (label == 0).float()) + 2 * math.log(4)
    torch.testing.assert_close(loss(_packed(torch.zeros(1, 3, *SHAPE), seg, seg), target), expected)


def test_class_weights_weight_the_cross_entropy():
    moving, fixed, tumour = _pair_with_noise_in_tumour()
    seg = torch.randn(2, 2, *SHAPE, generator=torch.Generator().manual_seed(3))
    packed = _packed(torch.zeros(2, 3, *SHAPE), seg, seg)
    target = {"moving": moving, "fixed": fixed, "moving_tumour": tumour, "fixed_tumour": tumour}
    terms = JointRegSegLoss(mask_source="none", class_weights=[1.0, 10.0]).terms(packed, target)
    weight = torch.tensor([1.0, 10.0])
    expected = 2 * torch.nn.functional.cross_entropy(seg, tumour[:, 0].long(), weight=weight)
    torch.testing.assert_close(terms["segmentation"], expected)
    with pytest.raises(ValueError):
        JointRegSegLoss(num_classes=2, class_weights=[1.0, 2.0, 3.0])
