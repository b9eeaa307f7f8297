"""Resampling to a target voxel spacing, one key at a time."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from monai.config import KeysCollection
from monai.transforms import InvertibleTransform, MapTransform, Spacingd
from monai.utils import ensure_tuple_rep

__all__ = ["PerKeySpacingd"]


class PerKeySpacingd(MapTransform, InvertibleTransform):
    """MONAI ``Spacingd`` applied to each key on its own (invertible, same arguments).

    Needed because MONAI's ``Spacingd`` treats every ``<key>_*`` item of a NIfTI-loaded dict as a meta
    dict of ``<key>``, so ``moving_label`` breaks the resampling of ``moving``.

    Args:
        keys: items to resample.
        pixdim: target spacing.
        mode: interpolation per key (``"bilinear"`` for images, ``"nearest"`` for labels).
        allow_missing_keys: skip absent keys.
        kwargs: other ``Spacingd`` arguments.
    """

    def __init__(
        self,
        keys: KeysCollection,
        pixdim: Sequence[float] | float,
        mode: str | Sequence[str] = "bilinear",
        allow_missing_keys: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        modes = ensure_tuple_rep(mode, len(self.keys))
        self.spacings = {k: Spacingd(k, pixdim=pixdim, mode=m, **kwargs) for k, m in zip(self.keys, modes)}

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.spacings[key]({key: d[key]})[key]
        return d

    def inverse(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.spacings[key].inverse({key: d[key]})[key]
        return d
