"""Refinement of the composed transform on the fixed image's native grid (post-processing, after the network)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from bundle.engines.native_refinement import check_options, refine_native
from bundle.spatial.grid import _index_map

__all__ = ["RefineNatived"]


class RefineNatived(MapTransform):
    """Refine the pull-back DDF at ``keys`` (fixed native grid, pre-alignment composed in) by local NCC between the
    moving image as loaded and the fixed image as loaded, coarse to fine, the last level at native resolution
    (:func:`bundle.engines.native_refinement.refine_native`).

    Goes after :class:`~bundle.transforms.ComposePreAlignmentd` and before the warping: every output (warped image,
    labels, DDF, Jacobian, ITK export) then uses the refined transform. The similarity is not masked (use it on
    tumour-free pairs, or accept that a tumour pulls on it).

    Args:
        keys: DDF keys (MetaTensors ``(ndim, *fixed_shape)`` in fixed voxels, with the fixed grid's affine).
        moving_key, fixed_key: the images as loaded (MetaTensors with their affines); the fixed one on the DDF's grid.
        levels: ``(factor, steps)`` pairs, coarse to fine; empty (or no steps) leaves the DDF as it is.
        learning_rate, smoothness, residual, kernel_size, margin: see :func:`refine_native`.
        progress_every: print the loss every this many steps of a level (0: silent).

    Raises:
        ValueError: bad options (at construction), or images that are not on the grids the DDF expects.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        moving_key: str = "moving_native",
        fixed_key: str = "fixed_native",
        levels: Sequence[Sequence[int]] = (),
        learning_rate: float = 0.25,
        smoothness: float = 0.1,
        residual: str = "svf",
        kernel_size: int = 5,
        margin: int = 4,
        progress_every: int = 0,
    ) -> None:
        super().__init__(keys)
        self.levels = check_options(levels, learning_rate, smoothness, residual, kernel_size)
        self.moving_key, self.fixed_key = moving_key, fixed_key
        self.options = {"learning_rate": float(learning_rate), "smoothness": float(smoothness), "residual": residual,
                        "kernel_size": int(kernel_size), "margin": int(margin), "progress_every": int(progress_every)}

    @property
    def enabled(self) -> bool:
        return sum(s for _, s in self.levels) > 0

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        if not self.enabled:
            return d
        moving, fixed = d[self.moving_key], d[self.fixed_key]
        for key in self.key_iterator(d):
            ddf = d[key]
            if not all(isinstance(x, MetaTensor) for x in (ddf, moving, fixed)):
                raise ValueError(f"{key!r}, {self.moving_key!r} and {self.fixed_key!r} must be MetaTensors with their affines.")
            if tuple(fixed.shape[1:]) != tuple(ddf.shape[1:]) or not torch.allclose(
                    fixed.affine.double(), ddf.affine.double(), atol=1e-4):
                raise ValueError(f"{self.fixed_key!r} (shape {tuple(fixed.shape[1:])}) is not on the grid of the DDF "
                                 f"{key!r} (shape {tuple(ddf.shape[1:])}); put RefineNatived after ComposePreAlignmentd.")
            index_map = _index_map(moving.affine, ddf.affine, ddf.shape[0])
            refined = refine_native(moving.as_tensor(), fixed.as_tensor(), ddf.as_tensor(), index_map, self.levels,
                                    **self.options)
            d[key] = MetaTensor(refined, affine=ddf.affine.clone(), meta=dict(ddf.meta))
        return d
