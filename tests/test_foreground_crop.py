"""``bundle.transforms.above_minimum``: the crop to the fixed image's brain box (``CropForegroundd``) finds the brain
whatever the intensity scale, and is MONAI's default box where that one works."""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import CropForegroundd

from bundle.transforms import above_minimum


def _head(background: float, scale: float = 1.0) -> torch.Tensor:
    """A 1-channel 20^3 image: a bright 8x6x4 'brain' at (5, 7, 9) on a flat background."""
    image = torch.full((1, 20, 20, 20), background)
    image[:, 5:13, 7:13, 9:13] = background + scale * torch.rand(8, 6, 4, generator=torch.Generator().manual_seed(0)) + 0.5
    return image


def _box(image: torch.Tensor, select_fn=None) -> tuple:
    kwargs = {} if select_fn is None else {"select_fn": select_fn}
    out = CropForegroundd(keys="fixed", source_key="fixed", margin=0, **kwargs)({"fixed": image})
    return tuple(np.asarray(out["foreground_start_coord"]).tolist()), tuple(out["fixed"].shape[1:])


def test_the_brain_box_is_found_on_any_intensity_scale():
    expected = ((5, 7, 9), (8, 6, 4))
    for background in (0.0, -1.0, -1000.0, 300.0):  # MRI, z-scored MRI, CT in HU, a raised background
        assert _box(_head(background), above_minimum) == expected, background
    assert _box(_head(0.0)) == expected  # where MONAI's default (> 0) works, the same box
    assert _box(_head(-1000.0, scale=-1.0))[1] != expected[1]  # all-negative: the default box is not the brain's


def test_a_constant_image_has_no_foreground():
    assert not above_minimum(torch.zeros(1, 4, 4, 4)).any()
