"""What counts as foreground when the pair is cropped to the fixed image's brain box (``CropForegroundd``)."""

from __future__ import annotations

import torch

__all__ = ["above_minimum"]


def above_minimum(image: torch.Tensor) -> torch.Tensor:
    """``image > image.min()``: every voxel brighter than the image's background value.

    MONAI's default (``image > 0``) finds nothing in an image whose values are all negative or whose background is
    not zero (z-scored MRI, CT in Hounsfield units, an inverted scale), and the crop is then empty; the minimum is
    the background of any of those, and is 0 where the default already worked (the same box). A constant image has
    no foreground at all, but never reaches the crop (``CheckFinited`` rejects it first).
    """
    return image > image.min()
