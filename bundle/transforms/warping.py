"""Dict transforms that apply a predicted DDF to items and express it on other grids (post-processing)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.networks.blocks import Warp
from monai.transforms import MapTransform

from bundle.spatial import (
    jacobian_determinant,
    resample_ddf,
    resample_to_grid,
    warp_through_world,
)

__all__ = ["Warpd", "JacobianDeterminantd", "ResampleDDFToOriginald", "ResampleToOriginald", "copy_grid_meta"]


def copy_grid_meta(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Carry the grid metadata (affine) of ``like`` over to ``values``."""
    if isinstance(like, MetaTensor):
        return MetaTensor(values, affine=like.affine, meta=dict(like.meta))
    return values


def _on_other_grid(item, ddf) -> bool:
    """Whether ``item`` and ``ddf`` are MetaTensors on different grids (then warp through world coordinates)."""
    if not (isinstance(item, MetaTensor) and isinstance(ddf, MetaTensor)):
        return False
    return item.shape[1:] != ddf.shape[1:] or not torch.allclose(
        item.affine.to(torch.float64), ddf.affine.to(torch.float64), atol=1e-5
    )


class Warpd(MapTransform):
    """Warp channel-first items ``(C, *spatial)`` with the DDF ``(ndim, *spatial)`` at ``ddf_key``.

    An item on the DDF's grid is warped with MONAI's ``Warp``. An item that is a MetaTensor on another grid
    than the DDF (a MetaTensor too; e.g. the moving image as loaded) is sampled through world coordinates
    (:func:`bundle.spatial.warp_through_world`): one interpolation, and nothing is lost outside the fixed
    image's field of view. The output is on the DDF's grid.

    Args:
        keys: items to warp (e.g. ``moving``, ``moving_label``).
        ddf_key: key of the DDF (the network prediction, ``pred``).
        names: output keys, one per key (default ``warped_<key>``).
        mode: interpolation per key, ``"bilinear"`` for images, ``"nearest"`` for label maps.
        padding_mode: ``grid_sample`` padding.
        allow_missing_keys: skip absent keys (pairs without labels).
    """

    def __init__(
        self,
        keys: KeysCollection,
        ddf_key: str = "pred",
        names: Sequence[str] | None = None,
        mode: str | Sequence[str] = "bilinear",
        padding_mode: str = "border",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.ddf_key = ddf_key
        self.names = list(names) if names is not None else [f"warped_{k}" for k in self.keys]
        modes = [mode] * len(self.keys) if isinstance(mode, str) else list(mode)
        if len(self.names) != len(self.keys) or len(modes) != len(self.keys):
            raise ValueError(f"names and mode must have one entry per key {self.keys}.")
        self.padding_mode = padding_mode
        self.warps = {m: Warp(mode=m, padding_mode=padding_mode) for m in set(modes)}
        self.modes = dict(zip(self.keys, modes))

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        ddf_item = d[self.ddf_key]
        ddf = torch.as_tensor(ddf_item)
        for key, name in zip(self.keys, self.names):
            if key not in d:
                if self.allow_missing_keys:
                    continue
                raise KeyError(f"key {key!r} to warp is missing.")
            item = d[key]
            source = torch.as_tensor(item).to(device=ddf.device, dtype=ddf.dtype)
            if _on_other_grid(item, ddf_item):
                warped = warp_through_world(source, ddf, ddf_item.affine, item.affine, self.padding_mode,
                                            self.modes[key]).to(ddf.dtype)
                like = ddf_item
            else:
                warped = self.warps[self.modes[key]](source.unsqueeze(0), ddf.unsqueeze(0))[0]
                like = item
            if self.modes[key] == "nearest":
                warped = warped.round().to(torch.as_tensor(item).dtype)
            d[name] = copy_grid_meta(warped, like)
        return d


class JacobianDeterminantd(MapTransform):
    """Jacobian determinant map ``(1, *spatial)`` of the DDF at each key, stored under ``names``."""

    def __init__(self, keys: KeysCollection = "pred", names: Sequence[str] = ("jacobian_det",)) -> None:
        super().__init__(keys)
        self.names = list(names)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key, name in zip(self.keys, self.names):
            ddf = torch.as_tensor(d[key])
            d[name] = copy_grid_meta(jacobian_determinant(ddf.unsqueeze(0))[0], d[key])
        return d


def _original_grid(data: Mapping, ref_key: str) -> tuple[torch.Tensor, list[int]]:
    """Original (as-loaded) affine and spatial shape of the preprocessed reference image."""
    ref = data[ref_key]
    if not isinstance(ref, MetaTensor) or "original_affine" not in ref.meta:
        raise ValueError(f"{ref_key!r} must be a MetaTensor loaded by LoadImaged (needs 'original_affine').")
    shape = [int(s) for s in torch.as_tensor(ref.meta["spatial_shape"]).flatten()]
    return torch.as_tensor(ref.meta["original_affine"]), shape


class ResampleDDFToOriginald(MapTransform):
    """Express the DDF at ``keys`` on the original (as-loaded) grid of the reference image.

    The reference (the preprocessed fixed image, a MetaTensor) gives the network grid (its ``affine``) and
    its original grid (``original_affine`` and ``spatial_shape`` meta that MONAI's loaders record). The
    moving image must have been resampled onto the fixed image's original grid before the network
    preprocessing (``PreAlignd`` or ``ResampleToMatchd``), so the result is a DDF on the fixed native grid in its voxel units.

    Args:
        keys: DDF keys (``(ndim, *spatial)``, network grid, voxel units).
        ref_key: the preprocessed fixed image.
    """

    def __init__(self, keys: KeysCollection = "pred", ref_key: str = "fixed") -> None:
        super().__init__(keys)
        self.ref_key = ref_key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        dst_affine, dst_shape = _original_grid(d, self.ref_key)
        for key in self.key_iterator(d):
            ddf = resample_ddf(torch.as_tensor(d[key]), d[self.ref_key].affine, dst_affine, dst_shape)
            d[key] = MetaTensor(ddf, affine=dst_affine)
        return d


class ResampleToOriginald(MapTransform):
    """Resample items on the network grid onto the original (as-loaded) grid of the reference image.

    Ours, not MONAI's ``Invertd``: one resampling by affines, the same rule as the DDF's
    (:class:`ResampleDDFToOriginald`, which ``Invertd`` cannot do: vectors must be re-expressed), whatever
    spatial transforms (crop, orientation, spacing, padding) made the network grid.

    Args:
        keys: channel-first items on the network grid (e.g. segmentation logits or label maps).
        ref_key: the preprocessed fixed image (a MetaTensor with ``original_affine``/``spatial_shape``).
        mode: ``"bilinear"`` (logits, intensities) or ``"nearest"`` (label maps), one or per key.
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        ref_key: str = "fixed",
        mode: str | Sequence[str] = "nearest",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.ref_key = ref_key
        self.modes = dict(zip(self.keys, [mode] * len(self.keys) if isinstance(mode, str) else mode))

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        dst_affine, dst_shape = _original_grid(d, self.ref_key)
        src_affine = d[self.ref_key].affine
        for key in self.key_iterator(d):
            values = torch.as_tensor(d[key])
            resampled = resample_to_grid(values, src_affine, dst_affine, dst_shape, mode=self.modes[key])
            d[key] = MetaTensor(resampled, affine=dst_affine)
        return d
