"""Random channel (sequence) dropout: trains a multi-sequence model to work when a sequence is missing."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform

__all__ = ["RandDropChanneld"]


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
