"""Per-channel (per-sequence) random transforms: sequence dropout, and a contrast change drawn for each sequence."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandAdjustContrast, RandomizableTransform

__all__ = ["RandAdjustContrastPerChanneld", "RandDropChanneld"]


class RandDropChanneld(RandomizableTransform, MapTransform):
    """Set some channels of an image to zero at random, each key drawn independently (modality dropout, as in
    HeMIS / Havaei et al. 2016). MONAI's dropouts drop voxels or boxes, not whole channels (hence our own).

    A model trained so sees e.g. T1c alone (FLAIR all zeros) in a fraction of the pairs, and at inference a missing
    sequence can be given as an all-zero channel. The first channel is never dropped by default.

    Args:
        keys: channel-first images, e.g. ``["moving", "fixed"]``.
        channels: indices of the channels that may be dropped (all of them together), default all but the first.
        prob: probability, per key, of dropping them.
    """

    def __init__(self, keys: KeysCollection, channels: Sequence[int] | None = None, prob: float = 0.25,
                 allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}.")
        self.channels = None if channels is None else [int(c) for c in channels]

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            self.randomize(None)
            image = d[key]
            channels = self.channels if self.channels is not None else list(range(1, image.shape[0]))
            if not self._do_transform or not channels:
                continue
            if max(channels) >= image.shape[0] or min(channels) < -image.shape[0]:
                raise ValueError(f"{key}: channels {channels} out of range for {image.shape[0]} channel(s).")
            image = image.clone()
            image[channels] = 0
            d[key] = image
        return d


class RandAdjustContrastPerChanneld(RandomizableTransform, MapTransform):
    """MONAI's gamma contrast change (``RandAdjustContrast``) drawn independently for every channel of every key.

    ``RandAdjustContrastd`` draws one gamma for all channels of an image; sequences of one scan vary independently
    between scanners and protocols (e.g. how bright the brain is relative to the tumour in FLAIR), hence our own.

    Args:
        keys: channel-first images, e.g. ``["moving", "fixed"]``.
        prob: probability, per channel, of a change.
        gamma: range the exponent is drawn from (``RandAdjustContrast``'s ``gamma``).
    """

    def __init__(self, keys: KeysCollection, prob: float = 0.1, gamma: tuple[float, float] | float = (0.7, 1.5),
                 allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, 1.0)  # the per-channel transform draws ``prob`` itself
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}.")
        self.contrast = RandAdjustContrast(prob=prob, gamma=gamma)

    def set_random_state(self, seed: int | None = None, state=None) -> "RandAdjustContrastPerChanneld":
        super().set_random_state(seed, state)
        self.contrast.set_random_state(state=self.R)
        return self

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            d[key] = torch.cat([torch.as_tensor(self.contrast(image[c : c + 1])) for c in range(image.shape[0])])
        return d
