"""Intensity scaling inside the brain (the normalisation the tumour model was trained with) and brain masking of images
that are not skull-stripped."""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import ensure_tuple_rep

from .checks import source_name

__all__ = ["ApplyBrainMaskd", "ScaleIntensityInBraind"]


class ApplyBrainMaskd(MapTransform):
    """Skull-strip images with a given brain mask: each channel's voxels outside the mask (> 0) become that channel's
    minimum (the constant background of a skull-stripped image, which :class:`ScaleIntensityInBraind` and
    ``above_minimum`` cropping read as "not brain"); the mask items are then removed.

    For images that are not skull-stripped (the tumour model was trained on skull-stripped brains as BraTS
    distributes them; on whole heads it labels scalp and skull). MONAI's ``MaskIntensityd`` writes 0 (not the
    background of a z-scored image), needs the mask on every item and checks only its shape, hence our own.

    Args:
        keys: channel-first images.
        mask_keys: one mask key per image key (e.g. ``moving_brain_mask``, ``fixed_brain_mask``); an item without
            the mask is left as it is (masks are optional, per image).

    Raises:
        ValueError: a mask whose grid (shape or voxel-to-world affine) is not its image's, or an empty mask.
    """

    def __init__(self, keys: KeysCollection, mask_keys: Hashable | Sequence[Hashable], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_keys = ensure_tuple_rep(mask_keys, len(self.keys))

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key, mask_key in self.key_iterator(d, self.mask_keys):
            if mask_key not in d:
                continue
            image, mask = d[key], d[mask_key]
            inside = torch.as_tensor(mask)
            inside = (inside[0] if inside.ndim == image.ndim else inside) > 0
            _check_same_grid(d, key, mask_key)
            if not bool(inside.any()):
                raise ValueError(f"{source_name(d, mask_key)}: the brain mask of {key!r} is empty.")
            flat = torch.as_tensor(image).flatten(1)
            background = flat.min(1).values.reshape(-1, *([1] * (image.ndim - 1)))
            out = torch.where(inside, torch.as_tensor(image), background.to(flat.dtype))
            d[key] = image.clone().copy_(out) if hasattr(image, "meta") else out
        for mask_key in self.mask_keys:
            d.pop(mask_key, None)
        return d


def _check_same_grid(d: Mapping, key: Hashable, mask_key: Hashable) -> None:
    """A mask must lie on its image's voxel grid: same spatial shape and, where both carry one, the same affine."""
    image, mask = d[key], d[mask_key]
    shape = tuple(mask.shape[1:] if mask.ndim == image.ndim else mask.shape)
    if shape != tuple(image.shape[1:]):
        raise ValueError(f"{source_name(d, mask_key)}: brain mask of shape {shape}, its image {source_name(d, key)} "
                         f"{tuple(image.shape[1:])}: a brain mask must be on its image's grid.")
    a, b = getattr(image, "affine", None), getattr(mask, "affine", None)
    if a is not None and b is not None and not np.allclose(np.asarray(a), np.asarray(b), atol=1e-3):
        raise ValueError(f"{source_name(d, mask_key)}: brain mask on another grid than its image {source_name(d, key)} "
                         "(voxel-to-world affines differ): a brain mask must be on its image's grid.")


class ScaleIntensityInBraind(MapTransform):
    """Per channel, map the ``lower``-``upper`` percentiles of the voxels inside the brain to [0, 1] (clipped), and
    set every voxel outside the brain to 0.

    The brain is ``mask_key`` (> 0) where given, else the voxels where any channel is above its minimum:
    skull-stripped images as BraTS distributes them, whose background is one constant value (0, or the lowest
    value of a z-scored image; on the BraTS 2013 and TCGA cases this is exactly their brain mask). MONAI's
    percentile scaling has no mask (hence our own): it counts the background, and a z-scored image's
    background, not its darkest brain voxels, would become 0.

    Without a mask, an image whose "brain" (voxels above the background) fills more than ``head_fraction`` of its
    field of view is most likely a whole head, not skull-stripped (skull-stripped brain MRI: 14-22 % of the grid on
    BraTS, LPBA40, IBSR; raw clinical heads: 95-97 %, their air is noise, not one value): a ``UserWarning`` names
    the file and asks for a brain mask. The tumour model labels scalp and skull on such input.

    Args:
        keys: channel-first images (e.g. T1c and FLAIR stacked as 2 channels).
        mask_key: a brain mask of the same spatial shape; ``None``: non-zero voxels.
        lower, upper: percentiles (0-100) of the brain voxels mapped to 0 and 1.
        head_fraction: the share of the grid above which the warning is given (``None``: never).

    Raises:
        ValueError: no brain voxel, a channel constant inside the brain, or a mask of another shape.
    """

    def __init__(self, keys: KeysCollection, mask_key: Hashable | None = None, lower: float = 0.5,
                 upper: float = 99.5, allow_missing_keys: bool = False, head_fraction: float | None = 0.6) -> None:
        super().__init__(keys, allow_missing_keys)
        if not 0 <= lower < upper <= 100:
            raise ValueError(f"ScaleIntensityInBraind needs 0 <= lower < upper <= 100, got {lower}, {upper}.")
        self.mask_key, self.lower, self.upper = mask_key, float(lower), float(upper)
        self.head_fraction = head_fraction

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
            share = float(torch.as_tensor(mask).float().mean())
            if self.mask_key is None and self.head_fraction is not None and share > self.head_fraction:
                warnings.warn(f"{source_name(d, key)}: {100 * share:.0f}% of the grid is above the background value: "
                              "this does not look like a skull-stripped image; the tumour model expects one (give a "
                              "brain mask: datalist brain_mask / *_brain_mask, brainreg --brain_mask).", stacklevel=2)
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
