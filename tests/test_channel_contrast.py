"""Per-sequence gamma contrast and the tumour campaign's spatial + per-sequence augmentation."""

from __future__ import annotations

import pytest
import torch
from monai.bundle import ConfigParser

from bundle.transforms import RandAdjustContrastPerChanneld
from conftest import CONFIGS


def _image():
    torch.manual_seed(0)
    image = torch.rand(2, 6, 6, 6) * 0.8 + 0.1
    image[:, 0] = 0  # background stays background under a gamma change
    image[:, -1] = 1
    return image


def test_each_channel_gets_its_own_gamma():
    contrast = RandAdjustContrastPerChanneld(["moving", "fixed"], prob=1.0, gamma=(0.5, 2.0))
    contrast.set_random_state(0)
    image = _image()
    out = contrast({"moving": image, "fixed": image.clone()})
    gammas = []
    for key in ("moving", "fixed"):
        assert out[key].shape == image.shape
        for c in range(2):
            inside = (image[c] > 0) & (image[c] < 1)
            # min 0 and max 1 kept: out = in ** gamma, so log(out) / log(in) is the channel's one gamma
            ratio = torch.log(out[key][c][inside]) / torch.log(image[c][inside])
            assert torch.allclose(ratio, ratio.mean().expand_as(ratio), atol=1e-3)
            assert 0.5 <= ratio.mean() <= 2.0
            assert out[key][c][0].abs().max() == 0 and torch.allclose(out[key][c][-1], torch.ones(6, 6))
            gammas.append(float(ratio.mean()))
    assert len({round(g, 3) for g in gammas}) == 4  # four independent draws, not one per image


def test_probability_seed_and_bad_values():
    image = _image()
    never = RandAdjustContrastPerChanneld("moving", prob=0.0)
    assert torch.equal(never({"moving": image})["moving"], image)
    first, second = (RandAdjustContrastPerChanneld("moving", prob=0.5).set_random_state(3) for _ in range(2))
    for _ in range(5):
        assert torch.equal(first({"moving": image})["moving"], second({"moving": image})["moving"])
    changed = RandAdjustContrastPerChanneld("moving", prob=0.5).set_random_state(1)
    hits = sum(not torch.equal(changed({"moving": image})["moving"][c], image[c]) for _ in range(200) for c in range(1))
    assert 70 < hits < 130  # each channel changed with probability 0.5
    with pytest.raises(ValueError, match="prob"):
        RandAdjustContrastPerChanneld("moving", prob=2.0)


def _augmentation(*files):
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in files])
    return parser.get_parsed_content("train#augmentation")


def test_off_by_default_on_in_the_augmented_tumour_recipe():
    names = [type(t).__name__ for t in _augmentation("train.json")]
    assert not {"RandFlipd", "RandAffined", "RandAdjustContrastPerChanneld"} & set(names)
    names = [type(t).__name__ for t in _augmentation("train.json", "tumour_campaign.json")]
    assert not {"RandFlipd", "RandAffined", "RandAdjustContrastPerChanneld"} & set(names)  # the shipped model's recipe
    names = [type(t).__name__ for t in _augmentation("train.json", "tumour_campaign.json", "tumour_augmentation.json")]
    assert {"RandFlipd", "RandAffined", "RandAdjustContrastPerChanneld", "RandDropChanneld"} <= set(names)
    assert names.index("RandAffined") < names.index("RandAdjustContrastPerChanneld") < names.index("RandDropChanneld")


def test_spatial_augmentation_moves_images_and_labels_together():
    """Flips and affines are drawn once per pair: both images and all their labels move alike (a mirrored or
    rotated pair is still a correct registration problem, also with left/right labels), labels stay labels."""
    from monai.transforms import Compose

    transforms = [t for t in _augmentation("train.json", "tumour_campaign.json", "tumour_augmentation.json")
                  if type(t).__name__ in ("RandFlipd", "RandAffined")]
    for t in transforms:
        t.prob = 1.0
    pipeline = Compose(transforms).set_random_state(0)
    image = torch.zeros(2, 24, 20, 16)
    image[:, 3:12, 5:15, 4:12] = 1.0
    tumour = (image[:1] > 0).float()
    item = {"moving": image, "fixed": image.clone(), "moving_tumour": tumour, "fixed_tumour": tumour.clone(),
            "moving_label": tumour.clone() * 3}
    out = pipeline(item)
    assert out["moving"].shape == image.shape and not torch.equal(out["moving"], image)
    assert torch.allclose(out["moving"], out["fixed"]) and torch.equal(out["moving_tumour"], out["fixed_tumour"])
    assert set(out["moving_label"].unique().tolist()) <= {0.0, 3.0} and set(out["fixed_tumour"].unique().tolist()) == {0.0, 1.0}
    # the flip is left-right (axis 0 after RAS orientation): the object now sits on the other side
    assert out["fixed_tumour"][0, :12].sum() < out["fixed_tumour"][0, 12:].sum()
