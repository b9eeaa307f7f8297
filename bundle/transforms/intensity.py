"""Intensity scaling inside the brain: the normalisation the tumour model was trained with."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from .checks import source_name

__all__ = ["ScaleIntensityInBraind"]


class ScaleIntensityInBraind(MapTransform):
    """Per channel, map the ``lower``-``upper`` percentiles of the voxels inside the brain to [0, 1] (clipped), and
    set every voxel outside the brain to 0.

    The brain is ``mask_key`` (> 0) where given, else the voxels where any channel is above its minimum:
    skull-stripped images as BraTS distributes them, whose background is one constant value (0, or the lowest
    value of a z-scored image; on the BraTS 2013 and TCGA cases this is exactly their brain mask). MONAI's
    percentile scaling has no mask (hence our own): it counts the background, and a z-scored image's
    background, not its darkest brain voxels, would become 0.

    Args:
        keys: channel-first images (e.g. T1c and FLAIR stacked as 2 channels).
        mask_key: a brain mask of the same spatial shape; ``None``: non-zero voxels.
        lower, upper: percentiles (0-100) of the brain voxels mapped to 0 and 1.

    Raises:
        ValueError: no brain voxel, a channel constant inside the brain, or a mask of another shape.
    """

    def __init__(self, keys: KeysCollection, mask_key: Hashable | None = None, lower: float = 0.5,
                 upper: float = 99.5, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if not 0 <= lower < upper <= 100:
            raise ValueError(f"ScaleIntensityInBraind needs 0 <= lower < upper <= 100, got {lower}, {upper}.")
        self.mask_key, self.lower, self.upper = mask_key, float(lower), float(upper)

    def _mask(self, d: Mapping, key: Hashable, image: torch.Tensor) -> torch.Tensor:
        if self.mask_key is None:
            flat = torch.as_tensor(image).flatten(1)
            return (flat > flat.min(1, keepdim=True).values).any(0).reshape(image.shape[1:])
        mask = torch.as_tensor(d[self.mask_key])
        mask = mask[0] if mask.ndim == image.ndim else mask
        if tuple(mask.shape) != tuple(image.shape[1:]):
            raise ValueError(f"{source_name(d, key)}: brain mask {self.mask_key!r} has shape {tuple(mask.shape)}, the "
                             f"image {tuple(image.shape[1:])}.")
        return mask > 0

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            mask = self._mask(d, key, image)
            if not bool(mask.any()):
                what = f"mask {self.mask_key!r} is empty" if self.mask_key is not None else "the image is constant"
                raise ValueError(f"{source_name(d, key)}: no brain voxel to scale the intensities on ({what}).")
            out = torch.zeros_like(image, dtype=torch.float32)
            inside = mask.numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
            for c in range(image.shape[0]):
                values = torch.as_tensor(image[c]).float().numpy()[inside]
                low, high = np.percentile(values, [self.lower, self.upper])
                if not high > low:
                    raise ValueError(f"{source_name(d, key)}: channel {c} is constant inside the brain ({low:g}); "
                                     "is a sequence missing or empty?")
                scaled = ((torch.as_tensor(image[c]).float() - float(low)) / float(high - low)).clamp(0, 1)
                out[c] = torch.where(torch.as_tensor(inside), scaled, torch.zeros(()))
            d[key] = out
        return d
