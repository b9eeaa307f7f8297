"""Registration pairs with a known deformation, built from a real tumour image (issue 14: the masking effect
measured against a truth).

The moving image is the real image, unchanged. The fixed image is the real image with its tumour region
changed (``"growth"``: the tumour dilated by a few millimetres, the new rim given tumour intensities;
``"resection"``: the tumour replaced by a dark, CSF-like cavity) and then deformed by a smooth known field ``u``:
``fixed(x) = changed(x + u(x))``. Outside the changed region ``changed == moving``, so ``u`` is exactly the
pull-back DDF that registers the pair (``moving(x + u(x)) == fixed(x)`` up to interpolation) and no field has to
be inverted. Inside the changed region nothing in the moving image corresponds: that is where a similarity
loss is misled and where a masked similarity should help.

Conventions (see :mod:`bundle.spatial`): images are channel-first ``(C, *spatial)``; the true DDF is
``(ndim, *spatial)`` on the fixed grid (the same grid as the moving image here), in voxel units, pull-back.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.networks.blocks import Warp
from monai.transforms.utils import distance_transform_edt
from scipy import ndimage

from bundle.spatial import resize_field
from bundle.transforms.lesion import radial_push_ddf

__all__ = ["CHANGES", "brain_mask", "known_deformation_pair", "mass_effect_ddf", "smooth_random_ddf"]

CHANGES = ("growth", "resection")

_LINEAR = Warp(mode="bilinear", padding_mode="zeros")  # images are 0 outside the brain


def brain_mask(image: torch.Tensor) -> torch.Tensor:
    """``(1, *spatial)`` bool: voxels where any channel is > 0, holes filled (images are 0 outside the brain)."""
    inside = (torch.as_tensor(image) > 0).any(0).numpy()
    return torch.as_tensor(ndimage.binary_fill_holes(inside))[None]


def mass_effect_ddf(
    shape: Sequence[int], centre: Sequence[float], spacing: Sequence[float], amplitude_mm: float, sigma_mm: float
) -> torch.Tensor:
    """Pull-back DDF of a radial push away from ``centre`` (a tumour's mass effect), voxel units ``(ndim, *shape)``.

    In millimetres ``u(x) = -k (x - c) exp(-|x - c|^2 / (2 s^2))`` with ``k = amplitude e^(1/2) / s``: the push is
    largest (``amplitude_mm``) at distance ``s = sigma_mm`` from the centre, falls linearly to 0 towards the centre
    and like a Gaussian away from it; the form of :class:`bundle.transforms.RandLesionImplantd`'s mass effect,
    parameterised by its peak (:func:`bundle.transforms.lesion.radial_push_ddf`). The map is invertible when ``k < 1``, i.e. ``amplitude_mm < 0.607 sigma_mm``.

    Raises:
        ValueError: ``k >= 1`` (the map would fold).
    """
    k = amplitude_mm * np.exp(0.5) / sigma_mm
    if k >= 1:
        raise ValueError(f"amplitude_mm {amplitude_mm} is too large for sigma_mm {sigma_mm}: the map folds (k = {k:.2f} >= 1).")
    return radial_push_ddf(shape, centre, spacing, k, sigma_mm)


def smooth_random_ddf(
    shape: Sequence[int], spacing: Sequence[float], sigma_mm: float, rms_mm: float, rng: np.random.Generator,
    region: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gaussian-smoothed white noise as a DDF in voxel units ``(ndim, *shape)``, scaled to a given RMS length.

    The noise is drawn on a grid of ``sigma_mm / 2`` millimetres, smoothed with a Gaussian of ``sigma_mm``
    (2 coarse voxels) and upsampled linearly (:func:`bundle.spatial.resize_field`), which is the same field as
    smoothing full-resolution noise but much cheaper. The RMS of the displacement length in millimetres over
    ``region`` (``(1, *shape)`` bool; default the whole grid) is ``rms_mm``.
    """
    ndim = len(shape)
    step = sigma_mm / 2.0
    coarse = [max(2, int(np.ceil(n * s / step))) for n, s in zip(shape, spacing)]
    noise = rng.standard_normal((ndim, *coarse))
    smooth = np.stack([ndimage.gaussian_filter(c, sigma=2.0, mode="reflect") for c in noise]).astype(np.float32)
    field_mm = resize_field(torch.as_tensor(smooth)[None], shape, scale_vectors=False)[0]
    inside = torch.ones((1, *shape), dtype=torch.bool) if region is None or not region.any() else region.bool()
    rms = torch.sqrt((field_mm**2).sum(0, keepdim=True)[inside].mean())
    field_mm = field_mm * (rms_mm / rms)
    return field_mm / torch.as_tensor(spacing, dtype=torch.float32).view(ndim, *([1] * ndim))


def _warp(values: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
    """``values(x + ddf(x))``, linear, zero outside the grid; ``(C, *spatial)`` in and out."""
    return _LINEAR(values.float()[None], ddf[None])[0]


def known_deformation_pair(
    image,
    tumour,
    spacing: Sequence[float],
    change: str = "growth",
    seed: int = 0,
    growth_mm: Sequence[float] = (3.0, 6.0),
    mass_effect_mm: Sequence[float] = (2.0, 5.0),
    smooth_sigma_mm: float = 12.0,
    smooth_rms_mm: float = 1.5,
    cavity_edge_mm: float = 1.0,
) -> dict:
    """A moving/fixed pair from one real image, with the true DDF and the masks of what changed.

    Construction (every random draw from ``seed``):

    1. ``changed`` = the image with the tumour region changed. ``"growth"``: the tumour is dilated by ``d`` mm
       (``d`` uniform in ``growth_mm``; Euclidean distance, inside the brain) and each channel of the new rim takes
       the tumour's median intensity plus Gaussian noise (half the tumour's standard deviation), clipped to
       [0, 1]. ``"resection"``: the tumour is blended (Gaussian edge of ``cavity_edge_mm``) into a cavity whose
       intensity per channel is the 2nd percentile of the brain (dark in T1c and FLAIR, like CSF) plus small
       noise; the cavity is where the blend weight is >= 0.5.
    2. ``u`` = :func:`mass_effect_ddf` about the tumour's centroid (peak ``A`` uniform in ``mass_effect_mm`` at
       ``s = max(R, 3 A)`` mm from it, ``R`` the radius of a ball of the tumour's volume, so ``k <= 0.55``) +
       :func:`smooth_random_ddf` (``smooth_sigma_mm``, RMS ``smooth_rms_mm`` over the brain).
    3. ``fixed = changed(x + u(x))`` (linear interpolation); masks are warped linearly too: the fixed tumour is
       where the new tumour extent (grown tumour or cavity) warps to >= 0.5, the non-corresponding region every
       fixed voxel whose interpolation touches a changed voxel (> 0), the brain where the brain warps to >= 0.5.

    Args:
        image: ``(C, *spatial)`` intensities in [0, 1], 0 outside the brain (numpy or torch).
        tumour: ``(1, *spatial)`` or ``spatial`` mask, non-zero = tumour.
        spacing: voxel size in mm per axis.
        change: ``"growth"`` or ``"resection"``.
        seed: seed of every random draw.
        growth_mm: range of the dilation (growth).
        mass_effect_mm: range of the mass effect's peak displacement.
        smooth_sigma_mm, smooth_rms_mm: the smooth random field.
        cavity_edge_mm: Gaussian width of the cavity's edge (resection).

    Returns:
        ``moving`` (the image, float32), ``fixed`` (float32 ``(C, *spatial)``), ``true_ddf`` (float32
        ``(ndim, *spatial)``, voxels, fixed grid), ``moving_tumour``, ``fixed_tumour``, ``non_corresponding``
        (on the fixed grid), ``brain`` (fixed grid) as bool ``(1, *spatial)``, and ``parameters`` (the drawn values).

    Raises:
        ValueError: unknown ``change``, shapes that do not match, an empty tumour.
    """
    if change not in CHANGES:
        raise ValueError(f"change must be one of {CHANGES}, got {change!r}.")
    moving = torch.as_tensor(np.asarray(image), dtype=torch.float32)
    spatial = tuple(moving.shape[1:])
    tumour_t = torch.as_tensor(np.asarray(tumour)) > 0
    tumour_t = tumour_t if tumour_t.ndim == len(spatial) + 1 else tumour_t[None]
    if tuple(tumour_t.shape) != (1, *spatial) or len(spacing) != len(spatial):
        raise ValueError(f"tumour {tuple(tumour_t.shape)} and spacing {tuple(spacing)} must match the image "
                         f"{tuple(moving.shape)}.")
    if not tumour_t.any():
        raise ValueError("the tumour mask is empty: a known-deformation pair needs a tumour to change.")
    rng = np.random.default_rng(seed)
    brain = brain_mask(moving) | tumour_t
    inside = moving[:, tumour_t[0]]  # (C, tumour voxels)
    params: dict = {"change": change, "seed": int(seed)}

    changed = moving.clone()
    if change == "growth":
        d = float(rng.uniform(*growth_mm))
        distance = torch.as_tensor(distance_transform_edt((~tumour_t).to(torch.uint8), sampling=list(spacing)))
        new_extent = (tumour_t | (distance <= d)) & brain
        rim = (new_extent & ~tumour_t)[0]
        median, std = inside.median(dim=1).values, inside.std(dim=1)
        for c in range(changed.shape[0]):
            noise = torch.as_tensor(rng.normal(0.0, 0.5 * float(std[c]), size=int(rim.sum())), dtype=torch.float32)
            changed[c][rim] = torch.clamp(median[c] + noise, 0.0, 1.0)
        non_corresponding = new_extent
        params["growth_mm"] = round(d, 3)
    else:
        sigma_vox = [cavity_edge_mm / s for s in spacing]
        weight = torch.as_tensor(ndimage.gaussian_filter(tumour_t[0].numpy().astype(np.float32), sigma=sigma_vox))[None]
        weight = torch.where(weight > 1e-3, weight, 0.0) * brain  # the edge ends: voxels beyond are untouched
        levels = [float(np.percentile(moving[c][brain[0]].numpy(), 2)) for c in range(moving.shape[0])]
        for c, level in enumerate(levels):
            cavity = torch.clamp(level + torch.as_tensor(rng.normal(0.0, 0.01, size=spatial), dtype=torch.float32), 0.0, 1.0)
            changed[c] = (1 - weight[0]) * moving[c] + weight[0] * cavity
        new_extent = weight >= 0.5
        non_corresponding = tumour_t | (weight > 0)
        params["cavity_intensity"] = [round(v, 4) for v in levels]

    spacing_np = np.asarray(spacing, dtype=np.float64)
    centre = ndimage.center_of_mass(tumour_t[0].numpy())
    radius = float((3 * float(tumour_t.sum()) * np.prod(spacing_np) / (4 * np.pi)) ** (1 / 3))
    amplitude = float(rng.uniform(*mass_effect_mm))
    sigma = max(radius, 3.0 * amplitude)
    mass = mass_effect_ddf(spatial, centre, spacing, amplitude, sigma)
    smooth = smooth_random_ddf(spatial, spacing, smooth_sigma_mm, smooth_rms_mm, rng, region=brain)
    true_ddf = mass + smooth
    params.update({"mass_effect_mm": round(amplitude, 3), "mass_effect_sigma_mm": round(sigma, 3),
                   "tumour_centroid_voxel": [round(float(c), 2) for c in centre], "smooth_sigma_mm": smooth_sigma_mm,
                   "smooth_rms_mm": smooth_rms_mm})

    masks = _warp(torch.cat([new_extent, non_corresponding, brain]).float(), true_ddf)
    return {
        "moving": moving,
        "fixed": _warp(changed, true_ddf),
        "true_ddf": true_ddf,
        "moving_tumour": tumour_t,
        "fixed_tumour": masks[0:1] >= 0.5,
        "non_corresponding": masks[1:2] > 0,
        "brain": masks[2:3] >= 0.5,
        "parameters": params,
    }
