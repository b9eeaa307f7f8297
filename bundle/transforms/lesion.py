"""Random synthetic lesion (tumour) implant in a healthy brain image, with mass effect and its mask."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.networks.blocks import Warp
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import ensure_tuple

from bundle.spatial import index_grid

from .warping import copy_grid_meta

__all__ = ["RandLesionImplantd", "radial_push_ddf", "smooth_noise", "voxel_spacing"]


def voxel_spacing(image: torch.Tensor) -> np.ndarray:
    """Voxel size per spatial axis of a channel-first image (a MetaTensor's affine; 1 for a plain tensor)."""
    ndim = image.ndim - 1
    if isinstance(image, MetaTensor):
        affine = np.asarray(image.affine)[:ndim, :ndim]
        return np.sqrt((affine**2).sum(axis=0))
    return np.ones(ndim)


def smooth_noise(rng: np.random.RandomState, spatial: Sequence[int], scale: float) -> torch.Tensor:
    """Low-frequency noise in [-scale, scale]: a coarse random grid (1/8 of each size), linearly upsampled."""
    # ours, not MONAI's SmoothField: it resizes by a scale factor whose floor loses a voxel on some sizes (61 -> 60)
    coarse = torch.as_tensor(rng.uniform(-scale, scale, size=[max(2, s // 8) for s in spatial]), dtype=torch.float32)
    mode = "trilinear" if len(spatial) == 3 else "bilinear"
    return torch.nn.functional.interpolate(coarse[None, None], size=tuple(spatial), mode=mode, align_corners=True)[0, 0]


def radial_push_ddf(shape, centre, spacing, k: float, sigma_mm: float) -> torch.Tensor:
    """A lesion's mass effect: the pull-back DDF ``u(x) = -k (x - c) exp(-|x - c|^2 / (2 s^2))`` (millimetres), which
    pushes tissue away from ``centre`` (voxel indices); returned in voxel units, ``(ndim, *shape)``. The map is
    invertible for ``k < 1``."""
    ndim = len(shape)
    view = (ndim, *([1] * ndim))
    spacing_t = torch.as_tensor(spacing, dtype=torch.float32).view(view)
    offset_mm = (index_grid(shape) - torch.as_tensor(centre, dtype=torch.float32).view(view)) * spacing_t
    ddf_mm = -k * offset_mm * torch.exp(-(offset_mm**2).sum(0, keepdim=True) / (2 * sigma_mm**2))
    return ddf_mm / spacing_t


class RandLesionImplantd(RandomizableTransform, MapTransform):
    """Implant a random tumour-like lesion in a channel-first brain image and write its mask.

    A centre is drawn inside the brain (voxels above ``foreground_threshold`` in the first channel). The
    surrounding tissue is pushed outwards (mass effect: a smooth radial displacement, pull-back
    ``ddf(x) = -k (x - c) exp(-|x - c|^2 / (2 s^2))`` in millimetres, with ``k < 1`` so the map stays
    invertible), applied to the image and the label maps (nearest neighbour). Inside a random ellipsoid
    with a noisy boundary the intensity of each channel is replaced by a random lesion intensity with
    texture, blended over a soft rim. The lesion mask (0/1) is stored under ``mask_key``; when the
    transform does not fire (probability ``1 - prob``) the mask is all zeros, so batches always have it.
    An item that already has ``mask_key`` (a real tumour label) is left unchanged.

    Args:
        keys: image keys (all channels get the lesion), e.g. ``"moving"``.
        mask_key: output key of the lesion mask, e.g. ``"moving_tumour"``.
        label_keys: label maps moved by the mass effect with the image (e.g. ``"moving_label"``).
        prob: probability of implanting a lesion.
        radius_mm: range of the ellipsoid semi-axes in millimetres.
        mass_effect: range of ``k`` (0 = no displacement; must be < 1).
        intensity: range of the lesion's mean intensity (images are expected in [0, 1]).
        foreground_threshold: brain voxels for choosing the centre.

    Raises:
        ValueError: bad ranges.
    """

    def __init__(
        self,
        keys: KeysCollection,
        mask_key: str,
        label_keys: KeysCollection = (),
        prob: float = 1.0,
        radius_mm: Sequence[float] = (8.0, 20.0),
        mass_effect: Sequence[float] = (0.2, 0.6),
        intensity: Sequence[float] = (0.05, 0.95),
        foreground_threshold: float = 0.05,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if not 0 <= mass_effect[0] <= mass_effect[1] < 1:
            raise ValueError(f"mass_effect must be a range within [0, 1), got {mass_effect}.")
        if not 0 < radius_mm[0] <= radius_mm[1]:
            raise ValueError(f"radius_mm must be a positive range, got {radius_mm}.")
        if not 0 <= intensity[0] <= intensity[1] <= 1:
            raise ValueError(f"intensity must be a range within [0, 1], got {intensity}.")
        self.mask_key = mask_key
        self.label_keys = ensure_tuple(label_keys)
        self.radius_mm, self.mass_effect, self.intensity = radius_mm, mass_effect, intensity
        self.foreground_threshold = foreground_threshold
        self.warp_image = Warp(mode="bilinear", padding_mode="border")
        self.warp_label = Warp(mode="nearest", padding_mode="border")

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        keys = [k for k in self.key_iterator(d)]
        if not keys or self.mask_key in d:
            return d
        reference = d[keys[0]]
        spatial = reference.shape[1:]
        self.randomize(None)
        if not self._do_transform:
            d[self.mask_key] = copy_grid_meta(torch.zeros((1, *spatial), dtype=torch.int64), reference)
            return d

        spacing = torch.as_tensor(voxel_spacing(reference), dtype=torch.float32).view(-1, *([1] * len(spatial)))
        brain = torch.as_tensor(reference[0]) > self.foreground_threshold
        candidates = torch.nonzero(brain) if brain.any() else torch.nonzero(torch.ones_like(brain))
        centre = candidates[self.R.randint(len(candidates))].to(torch.float32).view(-1, *([1] * len(spatial)))
        offset_mm = (index_grid(spatial) - centre) * spacing  # (ndim, *spatial), mm from the centre
        radii = torch.as_tensor(self.R.uniform(*self.radius_mm, size=len(spatial)), dtype=torch.float32)

        # mass effect: pull-back displacement towards the centre pushes tissue outwards
        k = self.R.uniform(*self.mass_effect)
        sigma = float(radii.mean()) * 1.5
        ddf = radial_push_ddf(spatial, centre.flatten(), spacing.flatten(), k, sigma).unsqueeze(0)
        for key in keys:
            d[key] = copy_grid_meta(self.warp_image(torch.as_tensor(d[key]).float().unsqueeze(0), ddf)[0], d[key])
        for key in self.label_keys:
            if key in d:
                label = torch.as_tensor(d[key])
                warped = self.warp_label(label.float().unsqueeze(0), ddf)[0].round().to(label.dtype)
                d[key] = copy_grid_meta(warped, d[key])

        # lesion: ellipsoid with a smooth random boundary, soft rim of ~2 mm
        ellipsoid = torch.sqrt(((offset_mm / radii.view(-1, *([1] * len(spatial)))) ** 2).sum(0))
        angle_noise = smooth_noise(self.R, spatial, scale=0.15)
        level = ellipsoid + angle_noise
        mask = (level < 1.0) & brain
        rim = float(2.0 / radii.mean())
        weight = torch.clamp((1.0 + rim - level) / rim, 0.0, 1.0) * brain
        texture = smooth_noise(self.R, spatial, scale=0.08)
        for key in keys:
            image = torch.as_tensor(d[key]).clone()
            for c in range(image.shape[0]):
                value = float(self.R.uniform(*self.intensity))
                image[c] = (1 - weight) * image[c] + weight * torch.clamp(value + texture, 0.0, 1.0)
            d[key] = copy_grid_meta(image, d[key])
        d[self.mask_key] = copy_grid_meta(mask.unsqueeze(0).to(torch.int64), reference)
        return d
