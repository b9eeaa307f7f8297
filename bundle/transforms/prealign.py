"""Rigid / affine pre-alignment of a pair (pre-processing) and its composition with the DDF (post-processing)."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from bundle.alignment import METHODS, TRANSFORMS
from bundle.spatial import compose_affine_ddf, resample_to_grid
from bundle.transforms.checks import source_name

__all__ = ["PreAlignd", "ComposePreAlignmentd", "GRID_SOURCE"]

# the arguments PreAlignd itself passes to the registration function
_REGISTER_ARGS = ("moving", "moving_affine", "fixed", "fixed_affine", "transform")
GRID_SOURCE = "grid_source"  # meta key of the pre-aligned items: the file of the grid they were resampled onto


def _affine_of(item, key: str) -> torch.Tensor:
    if not isinstance(item, MetaTensor):
        raise ValueError(f"{key!r} must be a MetaTensor with its voxel-to-world affine (load it with LoadImaged).")
    return item.affine.to(torch.float64)


class PreAlignd(MapTransform):
    """Align the moving items to the fixed image (ITK, mutual information) and resample them onto its grid.

    Takes the place of ``ResampleToMatchd`` in the pre-processing: with ``transform="none"`` it is the same
    world-coordinate resampling; with ``"rigid"``/``"affine"`` the moving image is first registered to the
    fixed one (:func:`bundle.alignment.itk_affine_register`, on the first channel of each image) and
    resampled through that transform. The world pull-back matrix is stored under ``matrix_key`` so that
    :class:`ComposePreAlignmentd` can fold it into the network's DDF, giving one transform in the fixed grid.

    Args:
        keys: moving items; the first is the image that is registered, the others (labels, tumour masks)
            follow it.
        fixed_key: the fixed image (a MetaTensor; its grid and meta data are given to the outputs).
        transform: ``"none"``, ``"rigid"`` or ``"affine"``.
        method: ``"itk"`` (mutual information, :func:`bundle.alignment.itk_affine_register`) or ``"torch"``
            (normalised cross-correlation, same-contrast pairs, faster: :func:`bundle.alignment.torch_affine_register`).
        mode: interpolation per key (``"bilinear"`` images, ``"nearest"`` label maps).
        padding_mode: ``grid_sample`` padding outside the moving image.
        matrix_key: where the ``(4, 4)`` RAS pull-back matrix (fixed world -> moving world) is stored.
        register_kwargs: further options of the registration function of ``method``.
        allow_missing_keys: skip absent moving items (the image itself must be present).
    """

    def __init__(
        self,
        keys: KeysCollection,
        fixed_key: str = "fixed",
        transform: str = "affine",
        mode: str | Sequence[str] = "bilinear",
        padding_mode: str = "zeros",
        matrix_key: str = "prealign_matrix",
        register_kwargs: Mapping | None = None,
        allow_missing_keys: bool = False,
        method: str = "itk",
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}.")
        if method not in METHODS:
            raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}.")
        self.register = METHODS[method]
        modes = [mode] * len(self.keys) if isinstance(mode, str) else list(mode)
        if len(modes) != len(self.keys):
            raise ValueError(f"mode must have one entry per key {self.keys}, got {modes}.")
        self.modes = dict(zip(self.keys, modes))
        self.fixed_key, self.transform, self.padding_mode = fixed_key, transform, padding_mode
        self.matrix_key = matrix_key
        self.register_kwargs = dict(register_kwargs or {})
        # an option the method does not take is an error here, not a TypeError in the middle of a cohort
        options = [n for n, p in inspect.signature(self.register).parameters.items()
                   if p.kind == p.KEYWORD_ONLY or (p.kind == p.POSITIONAL_OR_KEYWORD and n not in _REGISTER_ARGS)]
        unknown = sorted(set(self.register_kwargs) - set(options))
        if unknown:
            raise ValueError(f"pre-alignment option(s) {unknown} are not options of method {method!r} "
                             f"(its options: {', '.join(options)}).")

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        image_key = self.keys[0]
        if image_key not in d:
            raise KeyError(f"the moving image {image_key!r} is missing.")
        fixed, moving = d[self.fixed_key], d[image_key]
        fixed_affine, moving_affine = _affine_of(fixed, self.fixed_key), _affine_of(moving, image_key)
        if fixed.ndim != 4 or moving.ndim != 4:
            raise ValueError(f"pre-alignment is 3D: got {source_name(d, self.fixed_key)} {tuple(fixed.shape)}, "
                             f"{source_name(d, image_key)} {tuple(moving.shape)}.")
        try:
            matrix = self.register(
                moving[0].numpy(), moving_affine.numpy(), fixed[0].numpy(), fixed_affine.numpy(),
                transform=self.transform, **self.register_kwargs,
            )
        except ValueError as e:
            names = [d[k].meta.get("filename_or_obj", k) for k in (image_key, self.fixed_key)]
            raise ValueError(f"pre-alignment of {names[0]} to {names[1]}: {e}") from e
        matrix = torch.as_tensor(matrix, dtype=torch.float64)
        for key in self.key_iterator(d):
            item = d[key]
            src_affine = _affine_of(item, key)
            # sample the moving grid at T @ (fixed voxel -> world): resample_to_grid's "destination" is the
            # fixed grid seen through T
            values = resample_to_grid(
                item.as_tensor().float(), src_affine, matrix @ fixed_affine, fixed.shape[1:],
                mode=self.modes[key], padding_mode=self.padding_mode,
            )
            meta = copy.deepcopy(dict(fixed.meta))
            meta["filename_or_obj"] = item.meta.get("filename_or_obj", "")
            meta[GRID_SOURCE] = fixed.meta.get("filename_or_obj", "")  # where the grid comes from, for errors
            d[key] = MetaTensor(values.to(item.dtype), affine=fixed.affine.clone(), meta=meta)
        d[self.matrix_key] = matrix
        return d


class ComposePreAlignmentd(MapTransform):
    """Fold the pre-alignment matrix into the DDF: one pull-back DDF from the fixed grid to the moving world.

    The network's DDF ``u`` (on the fixed native grid, voxel units, after ``ResampleDDFToOriginald``) maps a
    fixed voxel ``x`` to ``x + u(x)`` in the pre-aligned moving image; the pre-alignment maps that to the
    moving world by ``T``. The composite is ``ddf(x) = A^-1 T A (x + u(x)) - x`` with ``A`` the DDF's own
    voxel-to-world affine, so ``warped(x) = moving(A (x + ddf(x)))`` keeps the bundle's DDF convention.

    Args:
        keys: DDF keys (MetaTensors ``(3, *spatial)`` with the affine of their grid).
        matrix_key: the matrix stored by :class:`PreAlignd`.
    """

    def __init__(self, keys: KeysCollection = "pred", matrix_key: str = "prealign_matrix") -> None:
        super().__init__(keys)
        self.matrix_key = matrix_key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        matrix = torch.as_tensor(np.asarray(d[self.matrix_key]), dtype=torch.float64).reshape(4, 4)
        for key in self.key_iterator(d):
            ddf = d[key]
            composite = compose_affine_ddf(matrix, ddf.as_tensor(), _affine_of(ddf, key))
            d[key] = MetaTensor(composite, affine=ddf.affine.clone(), meta=dict(ddf.meta))
        return d
