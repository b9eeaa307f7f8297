"""Resampling to a target voxel spacing, one key at a time."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from monai.config import KeysCollection
from monai.transforms import InvertibleTransform, MapTransform, Spacingd
from monai.utils import ensure_tuple, ensure_tuple_rep

from bundle.transforms.checks import source_name
from bundle.transforms.prealign import GRID_SOURCE

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
        max_voxels: the largest resampled grid (voxels per channel); a larger one is an error, not an attempt
            to allocate it (a header whose voxel sizes are off by orders of magnitude).
        kwargs: other ``Spacingd`` arguments.

    Raises:
        ValueError: the resampled grid of an item would exceed ``max_voxels``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        pixdim: Sequence[float] | float,
        mode: str | Sequence[str] = "bilinear",
        allow_missing_keys: bool = False,
        max_voxels: int = 2**28,
        **kwargs,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        modes = ensure_tuple_rep(mode, len(self.keys))
        self.pixdim, self.max_voxels = ensure_tuple(pixdim), max_voxels
        self.spacings = {k: Spacingd(k, pixdim=pixdim, mode=m, **kwargs) for k, m in zip(self.keys, modes)}

    def _check_size(self, data: Mapping, key) -> None:
        item = data[key]
        affine, shape = getattr(item, "affine", None), item.shape[1:]
        if affine is None:
            return
        spacing = np.linalg.norm(np.asarray(affine, dtype=np.float64)[: len(shape), : len(shape)], axis=0)
        pixdim = [float(p) for p in self.pixdim[: len(shape)]]
        pixdim += pixdim[-1:] * (len(shape) - len(pixdim))  # MONAI repeats the last value
        pixdim = [p if p > 0 else s for p, s in zip(pixdim, spacing)]  # <= 0: that axis keeps its spacing
        with np.errstate(all="ignore"):
            voxels = float(np.prod([n * s / p for n, s, p in zip(shape, spacing, pixdim)]))
        if not voxels <= self.max_voxels:
            grid = (getattr(item, "meta", None) or {}).get(GRID_SOURCE)  # pre-aligned onto another image's grid
            raise ValueError(
                f"{source_name(data, key)}{f' on the grid of {grid}' if grid else ''}: resampling {tuple(shape)} voxels "
                f"of {np.round(spacing, 4).tolist()} mm to pixdim {pixdim} would give about {voxels:.3g} voxels "
                f"(max_voxels={self.max_voxels}); check the voxel sizes in the header of {grid or 'the image'}."
            )

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            self._check_size(d, key)
            d[key] = self.spacings[key]({key: d[key]})[key]
        return d

    def inverse(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.spacings[key].inverse({key: d[key]})[key]
        return d
