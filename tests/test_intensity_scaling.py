"""``ScaleIntensityInBraind``: the tumour model's normalisation (percentiles inside the brain -> [0, 1], 0 outside),
``ApplyBrainMaskd`` (skull-stripping with a given mask) and ``CheckChannelsd``."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from bundle.transforms import ApplyBrainMaskd, CheckChannelsd, ScaleIntensityInBraind


def _brain(shape=(2, 12, 14, 10), seed=0):
    """A 2-channel image: a box of random intensities (the brain) in a constant background."""
    rng = np.random.default_rng(seed)
    inside = np.zeros(shape[1:], bool)
    inside[2:10, 3:11, 2:8] = True
    image = rng.normal(3.0, 2.0, shape).astype(np.float32)
    return image, inside


def _expected(image, inside, lower=0.5, upper=99.5):
    """The campaign's preparation (benchmarks/tumour_ablation.py ``prepare``), channel by channel."""
    out = np.zeros_like(image)
    for c in range(image.shape[0]):
        low, high = np.percentile(image[c][inside], [lower, upper])
        out[c] = np.where(inside, np.clip((image[c] - low) / (high - low), 0, 1), 0)
    return out


@pytest.mark.parametrize("background", [0.0, -4.5])
def test_brain_found_above_the_background_and_scaled_like_the_campaign_data(background):
    """Zero background (skull-stripped) and a z-scored image's negative constant background give the same result:
    the brain is every voxel above the minimum in any channel."""
    image, inside = _brain()
    image[:, ~inside] = background
    image[:, inside] = np.maximum(image[:, inside], background + 0.01)  # no brain voxel at the background value
    meta = MetaTensor(torch.as_tensor(image), meta={"filename_or_obj": "t1c.nii.gz"})
    out = ScaleIntensityInBraind("image")({"image": meta})["image"]
    np.testing.assert_allclose(out.numpy(), _expected(image, inside), atol=1e-6)
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "t1c.nii.gz" and out.dtype == torch.float32
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0


def test_a_brain_mask_key_is_used_where_given():
    image, inside = _brain(seed=1)
    mask = torch.as_tensor(inside)[None].to(torch.uint8)
    out = ScaleIntensityInBraind("image", mask_key="mask", lower=2, upper=98)({"image": torch.as_tensor(image), "mask": mask})
    np.testing.assert_allclose(out["image"].numpy(), _expected(image, inside, 2, 98), atol=1e-6)


def test_a_channel_without_background_still_counts_the_other_channels_brain():
    """FLAIR of BraTS 2013 is z-scored over the whole brain box: the union of the channels' brains is the brain."""
    image, inside = _brain(seed=2)
    image[0, ~inside] = image[0].min() - 1  # T1c: constant background
    wider = inside.copy()
    wider[1:11] = True
    image[1, ~wider] = image[1].min() - 1
    out = ScaleIntensityInBraind("image", head_fraction=None)({"image": torch.as_tensor(image)})["image"]  # a tiny grid, mostly brain
    np.testing.assert_allclose(out.numpy(), _expected(image, wider), atol=1e-6)


def test_unusable_inputs_are_named():
    with pytest.raises(ValueError, match=r"image \(flat.nii.gz\): no brain voxel .*constant"):
        ScaleIntensityInBraind("image")({"image": MetaTensor(torch.ones(2, 4, 4, 4), meta={"filename_or_obj": "flat.nii.gz"})})
    image, inside = _brain()
    image[0, ~inside] = image[0].min() - 1
    image[1, inside] = 7.0
    image[1, ~inside] = 0.0
    with pytest.raises(ValueError, match="channel 1 is constant inside the brain"):
        ScaleIntensityInBraind("image")({"image": torch.as_tensor(image)})
    data = {"image": torch.as_tensor(_brain()[0]), "mask": torch.ones(1, 3, 3, 3)}
    with pytest.raises(ValueError, match=r"brain mask 'mask' has shape \(3, 3, 3\)"):
        ScaleIntensityInBraind("image", mask_key="mask")(data)
    with pytest.raises(ValueError, match="mask 'mask' is empty"):
        ScaleIntensityInBraind("image", mask_key="mask")({**data, "mask": torch.zeros(1, 12, 14, 10)})
    with pytest.raises(ValueError, match="0 <= lower < upper <= 100"):
        ScaleIntensityInBraind("image", lower=50, upper=10)


def test_channel_count_is_checked_with_the_sequences_named():
    check = CheckChannelsd("image", num_channels=2, channel_names=["T1c", "FLAIR"])
    ok = {"image": torch.zeros(2, 3, 3, 3)}
    assert check(ok) is not ok and check(ok)["image"] is ok["image"]
    one = {"image": MetaTensor(torch.zeros(1, 3, 3, 3), meta={"filename_or_obj": "t1c.nii.gz"})}
    with pytest.raises(ValueError, match=r"image \(t1c.nii.gz\) has 1 channel\(s\), expected 2 \(T1c, FLAIR: a list of files"):
        check(one)
    with pytest.raises(ValueError, match=r"expected 2 \(a 4-D image is read as channels\)"):
        CheckChannelsd("image", num_channels=2)(one)


def _head(shape=(2, 12, 14, 10), seed=1):
    """A 'head': a brain box inside a bright scalp shell and a dark (0) surround; z-scored-like negatives inside."""
    image, inside = _brain(shape, seed)
    image[:, ~inside] = 9.0  # scalp and skull: bright, not background
    image[:, 0] = 0.0
    return image, inside


def test_brain_mask_makes_a_head_look_skull_stripped():
    """Outside the mask every channel takes its own minimum (the background a skull-stripped image has), the brain is
    untouched, the mask item is dropped, and the tumour normalisation then equals the one on the stripped image."""
    image, inside = _head()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    d = {"image": MetaTensor(torch.as_tensor(image), affine=affine, meta={"filename_or_obj": "head.nii.gz"}),
         "brain_mask": MetaTensor(torch.as_tensor(inside[None].astype(np.uint8)), affine=affine)}
    out = ApplyBrainMaskd("image", "brain_mask")(d)
    assert "brain_mask" not in out and isinstance(out["image"], MetaTensor)
    assert out["image"].meta["filename_or_obj"] == "head.nii.gz"
    got = out["image"].numpy()
    for c in range(2):
        assert np.array_equal(got[c][inside], image[c][inside])
        assert np.all(got[c][~inside] == image[c].min())
    stripped = image.copy()
    for c in range(2):
        stripped[c][~inside] = image[c].min()
    scaled = ScaleIntensityInBraind("image", mask_key="m")({"image": torch.as_tensor(got), "m": inside})["image"]
    np.testing.assert_allclose(scaled.numpy(), _expected(stripped, inside), atol=1e-6)


def test_brain_masks_are_optional_per_image_and_apply_to_their_own_image():
    image, inside = _head()
    other = inside.copy()
    other[2:5] = False
    t = ApplyBrainMaskd(["moving", "fixed"], ["moving_brain_mask", "fixed_brain_mask"])
    out = t({"moving": torch.as_tensor(image), "fixed": torch.as_tensor(image.copy()), "fixed_brain_mask": torch.as_tensor(other)})
    assert np.array_equal(out["moving"].numpy(), image)  # no mask: as given
    assert np.all(out["fixed"].numpy()[:, ~other] == image.min(axis=(1, 2, 3))[:, None])
    assert np.array_equal(out["fixed"].numpy()[:, other], image[:, other])
    assert set(out) == {"moving", "fixed"}


def test_brain_mask_on_another_grid_or_empty_is_named():
    image, inside = _head()
    meta = lambda a, aff, name: MetaTensor(torch.as_tensor(a), affine=aff, meta={"filename_or_obj": name})  # noqa: E731
    eye = np.eye(4)
    t = ApplyBrainMaskd("image", "brain_mask")
    with pytest.raises(ValueError, match=r"mask.nii.gz.*shape \(12, 14, 9\).*head.nii.gz"):
        t({"image": meta(image, eye, "head.nii.gz"), "brain_mask": meta(inside[None, :, :, :9], eye, "mask.nii.gz")})
    shifted = eye.copy()
    shifted[0, 3] = 5.0
    with pytest.raises(ValueError, match=r"mask.nii.gz.*another grid.*head.nii.gz"):
        t({"image": meta(image, eye, "head.nii.gz"), "brain_mask": meta(inside[None], shifted, "mask.nii.gz")})
    with pytest.raises(ValueError, match=r"mask.nii.gz.*empty"):
        t({"image": meta(image, eye, "head.nii.gz"), "brain_mask": meta(np.zeros_like(inside[None]), eye, "mask.nii.gz")})


def test_a_whole_head_without_a_mask_is_warned_about_naming_the_file():
    """A raw head (its air noise, not one value) fills the grid: warned; a skull-stripped image, or the head with its
    brain mask applied first, is not."""
    image, inside = _head()
    image[:, ~inside] = np.abs(np.random.default_rng(2).normal(0.3, 0.1, image[:, ~inside].shape)) + 5.0
    meta = MetaTensor(torch.as_tensor(image), meta={"filename_or_obj": "raw_head.nii.gz"})
    with pytest.warns(UserWarning, match=r"raw_head.nii.gz.*does not look like a skull-stripped image.*brain_mask"):
        ScaleIntensityInBraind("image")({"image": meta})
    stripped = ApplyBrainMaskd("image", "brain_mask")({"image": meta, "brain_mask": torch.as_tensor(inside[None])})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ScaleIntensityInBraind("image")(stripped)
        ScaleIntensityInBraind("image", head_fraction=None)({"image": meta})
