"""Tests for bundle.losses.registration."""

from __future__ import annotations

import math

import pytest
import torch

from bundle.losses.registration import RegistrationLoss, make_similarity, make_smoothness


def _smooth_image(shape=(16, 16, 16), batch: int = 1, seed: int = 0) -> torch.Tensor:
    """Smooth, non-constant (B, 1, *shape) image: a sum of low-frequency sinusoids plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    axes = torch.meshgrid(*[torch.linspace(0, 2 * math.pi, s) for s in shape], indexing="ij")
    img = sum(torch.sin((k + 1) * a + k) for k, a in enumerate(axes)) + 0.05 * torch.rand(shape, generator=g)
    return img.expand(batch, 1, *shape).clone()


@pytest.mark.parametrize("dims", (2, 3))
def test_lncc_of_identical_images_is_minus_one(dims):
    shape = (16,) * dims
    x = torch.rand(2, 1, *shape, generator=torch.Generator().manual_seed(1))
    loss = make_similarity("lncc", spatial_dims=dims)
    assert loss.kernel_size == 9
    assert loss(x, x).item() == pytest.approx(-1.0, abs=1e-4)
    # a different image correlates less
    y = torch.rand(2, 1, *shape, generator=torch.Generator().manual_seed(2))
    assert loss(x, y).item() > -0.5


def test_mse_of_identical_images_is_zero_and_matches_definition():
    x = torch.rand(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    loss = make_similarity("mse", spatial_dims=3)
    assert loss(x, x).item() == 0.0
    assert loss(x, x + 0.5).item() == pytest.approx(0.25, rel=1e-6)


def test_mi_identical_is_better_than_shuffled():
    x = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    shuffled = x.flatten()[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(1))].view_as(x)
    num_bins = 23
    loss = make_similarity("mi", spatial_dims=3)
    same, indep = loss(x, x).item(), loss(x, shuffled).item()
    # -MI: the MI of an image with itself is its (Parzen-smoothed) entropy, positive and <= log(num_bins)
    assert -math.log(num_bins) <= same < -1.0
    # an independent image shares (almost) no information
    assert abs(indep) < 0.1
    assert same < indep
    # MI is invariant to an inverted intensity mapping, unlike MSE
    assert loss(x, 1.0 - x).item() == pytest.approx(same, abs=1e-4)


@pytest.mark.parametrize("name", ("lncc", "mse"))
@pytest.mark.parametrize("dims", (2, 3))
def test_reduction_none_gives_voxel_maps(name, dims):
    shape = (12,) * dims
    x = torch.rand(2, 1, *shape, generator=torch.Generator().manual_seed(0))
    y = torch.rand(2, 1, *shape, generator=torch.Generator().manual_seed(1))
    voxel = make_similarity(name, spatial_dims=dims, reduction="none")(x, y)
    mean = make_similarity(name, spatial_dims=dims, reduction="mean")(x, y)
    assert voxel.shape == (2, 1, *shape)
    torch.testing.assert_close(voxel.mean(), mean, atol=1e-5, rtol=1e-5)
    if name == "mse":
        torch.testing.assert_close(voxel, (x - y) ** 2)


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="similarity"):
        make_similarity("ncc")
    with pytest.raises(ValueError, match="smoothness"):
        make_smoothness("l2")


def test_smoothness_of_constant_field_is_zero_and_of_linear_field_positive():
    ddf = torch.full((1, 3, 8, 8, 8), 2.5)
    assert make_smoothness("diffusion")(ddf).item() == 0.0
    assert make_smoothness("bending")(ddf).item() == 0.0
    ramp = torch.arange(8.0).view(1, 1, 8, 1, 1).expand(1, 3, 8, 8, 8).clone()
    assert make_smoothness("diffusion")(ramp).item() > 0
    # bending energy ignores affine (zero second derivative) fields
    assert make_smoothness("bending")(ramp).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("smoothness", ("diffusion", "bending"))
def test_registration_loss_identity(smoothness):
    fixed = _smooth_image(batch=2)
    target = {"moving": fixed.clone(), "fixed": fixed}
    ddf = torch.zeros(2, 3, 16, 16, 16)
    loss = RegistrationLoss(similarity="lncc", smoothness=smoothness, smoothness_weight=1.0)
    terms = loss.terms(ddf, target)
    assert set(terms) == {"similarity", "smoothness"}
    assert terms["similarity"].item() == pytest.approx(-1.0, abs=1e-4)
    assert terms["smoothness"].item() == 0.0
    assert loss(ddf, target).item() == pytest.approx(-1.0, abs=1e-4)


def test_registration_loss_weights_combine_terms():
    fixed = _smooth_image(batch=1)
    moving = _smooth_image(batch=1, seed=5).roll(1, dims=2)
    ddf = 0.3 * torch.randn(1, 3, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    target = {"moving": moving, "fixed": fixed}
    loss = RegistrationLoss(similarity="mse", smoothness_weight=0.7)
    terms = loss.terms(ddf, target)
    assert terms["smoothness"].item() > 0
    expected = terms["similarity"] + 0.7 * terms["smoothness"]
    torch.testing.assert_close(loss(ddf, target), expected)


def _labels(shape=(16, 16, 16), offset: int = 0) -> torch.Tensor:
    lab = torch.zeros(1, 1, *shape)
    lab[..., 4 + offset : 10 + offset, 4:10, 4:10] = 1
    lab[..., 2:5, 11:14, 11:14] = 2
    return lab


def test_label_dice_term():
    img = _smooth_image()
    ddf = torch.zeros(1, 3, 16, 16, 16)
    loss = RegistrationLoss(similarity="mse", smoothness_weight=0.0, label_weight=0.5, num_classes=3)
    same = loss.terms(ddf, {"moving": img, "fixed": img, "moving_label": _labels(), "fixed_label": _labels()})
    assert same["label_dice"].item() == pytest.approx(0.0, abs=1e-6)
    assert same["similarity"].item() == pytest.approx(0.0, abs=1e-10)
    diff = loss.terms(ddf, {"moving": img, "fixed": img, "moving_label": _labels(offset=3), "fixed_label": _labels()})
    assert diff["label_dice"].item() > 0.1
    total = loss(ddf, {"moving": img, "fixed": img, "moving_label": _labels(offset=3), "fixed_label": _labels()})
    torch.testing.assert_close(total, 0.5 * diff["label_dice"])
    # the Dice term is skipped when labels are absent or the weight is 0
    assert "label_dice" not in loss.terms(ddf, {"moving": img, "fixed": img, "moving_label": _labels()})
    no_weight = RegistrationLoss(similarity="mse", num_classes=3)
    assert "label_dice" not in no_weight.terms(
        ddf, {"moving": img, "fixed": img, "moving_label": _labels(offset=3), "fixed_label": _labels()}
    )


def test_label_dice_is_corrected_by_the_right_ddf():
    img = _smooth_image()
    loss = RegistrationLoss(similarity="mse", smoothness_weight=0.0, label_weight=1.0, num_classes=3)
    # moving label shifted by +3 along axis 0 for class 1 -> a pull-back DDF of +3 on that axis realigns it
    moving_label = torch.zeros(1, 1, 16, 16, 16)
    moving_label[..., 7:13, 4:10, 4:10] = 1
    fixed_label = torch.zeros(1, 1, 16, 16, 16)
    fixed_label[..., 4:10, 4:10, 4:10] = 1
    target = {"moving": img, "fixed": img, "moving_label": moving_label, "fixed_label": fixed_label}
    ddf = torch.zeros(1, 3, 16, 16, 16)
    before = loss.terms(ddf, target)["label_dice"].item()
    ddf[:, 0] = 3.0
    after = loss.terms(ddf, target)["label_dice"].item()
    assert before == pytest.approx(0.5, abs=0.02)  # class 1 overlaps by half (Dice 0.5); class 2, absent from both, is not counted
    assert after == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("dims", (2, 3))
def test_known_translation_lowers_the_loss(dims):
    shape = (16,) * dims
    fixed = _smooth_image(shape)
    # moving(y) = fixed(y - 2) along axis 0  =>  moving(x + 2) = fixed(x): pull-back DDF +2 on channel 0
    moving = fixed.roll(2, dims=2)
    target = {"moving": moving, "fixed": fixed}
    loss = RegistrationLoss(similarity="mse", smoothness_weight=0.0, spatial_dims=dims)
    zero = torch.zeros(1, dims, *shape)
    right = zero.clone()
    right[:, 0] = 2.0
    wrong = zero.clone()
    wrong[:, 0] = -2.0
    l_zero, l_right, l_wrong = (loss(d, target).item() for d in (zero, right, wrong))
    assert l_zero > 0.01
    assert l_right < 0.2 * l_zero  # only the 2 border slices sampled beyond the grid remain
    assert l_wrong > l_right
    # the interior is matched exactly (the last voxels are sampled beyond the border)
    warped = loss.warp(moving, right)
    torch.testing.assert_close(warped[:, :, :-2], fixed[:, :, :-2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"similarity": "ncc"}, "similarity"),
        ({"smoothness": "tv"}, "smoothness"),
        ({"label_weight": 1.0}, "num_classes"),
        ({"label_weight": 1.0, "num_classes": 1}, "num_classes"),
        ({"smoothness_weight": -0.1}, "weights"),
        ({"label_weight": -1.0, "num_classes": 3}, "weights"),
    ],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RegistrationLoss(**kwargs)


def test_shape_mismatch_raises():
    loss = RegistrationLoss(similarity="mse")
    img = torch.rand(1, 1, 8, 8, 8)
    with pytest.raises(ValueError, match="shape mismatch"):
        loss(torch.zeros(1, 3, 8, 8, 4), {"moving": img, "fixed": img})
    with pytest.raises(ValueError, match="shape mismatch"):
        loss(torch.zeros(1, 3, 8, 8, 8), {"moving": img, "fixed": torch.rand(1, 1, 8, 8, 4)})
    with pytest.raises(ValueError, match="shape mismatch"):
        loss(torch.zeros(1, 3, 8, 8, 8), {"moving": img, "fixed": torch.rand(1, 2, 8, 8, 8)})


def test_similarity_kwargs_are_passed_through():
    loss = RegistrationLoss(similarity="lncc", similarity_kwargs={"kernel_size": 5})
    assert loss.similarity.kernel_size == 5
    mi = RegistrationLoss(similarity="mi", similarity_kwargs={"num_bins": 11})
    assert mi.similarity.num_bins == 11


def _two_pairs():
    g = torch.Generator().manual_seed(3)
    fixed = torch.rand(2, 1, 12, 12, 12, generator=g)
    moving = torch.rand(2, 1, 12, 12, 12, generator=g)
    labels = torch.randint(0, 3, (2, 1, 12, 12, 12), generator=g).float()
    ddf = 0.5 * torch.rand(2, 3, 12, 12, 12, generator=g)
    return ddf, {"moving": moving, "fixed": fixed, "moving_label": labels, "fixed_label": labels.flip(2)}


@pytest.mark.parametrize("kind", ("registration", "joint", "masked"))
def test_reduction_honoured_per_pair(kind):
    """reduction='none' gives one value per pair, equal to that pair's loss alone; 'sum' and 'mean' reduce it."""
    from bundle.losses import JointRegSegLoss
    from bundle.losses.masked_similarity import MaskedSimilarityLoss

    ddf, target = _two_pairs()
    if kind == "registration":
        make = lambda r: RegistrationLoss(label_weight=0.5, num_classes=3, reduction=r)  # noqa: E731
        args = lambda i: (ddf[i], {k: v[i] for k, v in target.items()})  # noqa: E731
    elif kind == "joint":
        logits = torch.rand(2, 4, 12, 12, 12, generator=torch.Generator().manual_seed(4))
        packed = torch.cat([ddf, logits], 1)
        tumours = {"moving_tumour": (target["moving"] > 0.8).float(), "fixed_tumour": (target["fixed"] > 0.8).float()}
        full = {**target, **tumours}
        make = lambda r: JointRegSegLoss(class_weights=[1.0, 5.0], dice_weight=1.0, label_weight=0.5,  # noqa: E731
                                         label_weight_classes=3, reduction=r)
        args = lambda i: (packed[i], {k: v[i] for k, v in full.items()})  # noqa: E731
    else:
        mask = (target["fixed"] > 0.3).float()
        make = lambda r: MaskedSimilarityLoss("lncc", reduction=r)  # noqa: E731
        args = lambda i: (target["moving"][i], target["fixed"][i], mask[i])  # noqa: E731
    every = slice(None)
    per_pair = make("none")(*args(every))
    assert per_pair.shape == (2,)
    for i in range(2):
        alone = make("mean")(*args(slice(i, i + 1)))
        torch.testing.assert_close(per_pair[i], alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(make("mean")(*args(every)), per_pair.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(make("sum")(*args(every)), per_pair.sum(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        make("median")
