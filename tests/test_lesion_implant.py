"""Tests for bundle.transforms.lesion (RandLesionImplantd: synthetic tumour with mass effect)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor

from bundle.transforms import RandLesionImplantd

SIZE = 40
SPACING = 2.0  # mm
BRAIN_VALUE = 0.7


def _brain(dims: int = 3, spacing=(SPACING,) * 3, texture: float = 0.0, seed: int = 0):
    """Ellipsoid 'brain' of intensity 0.7 (optionally with uniform texture) and a striped label map (values 0..3)."""
    spatial = (SIZE,) * dims
    axes = torch.meshgrid(*[torch.arange(SIZE, dtype=torch.float32)] * dims, indexing="ij")
    semi = (17.0, 15.0, 13.0)[:dims]
    inside = sum(((a - (SIZE - 1) / 2) / s) ** 2 for a, s in zip(axes, semi)) <= 1.0
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(spatial, generator=g)
    image = torch.where(inside, BRAIN_VALUE + texture * (noise - 0.5), 0.04 * noise * (texture > 0))
    label = torch.where(inside, (axes[0].long() // 3) % 3 + 1, torch.zeros(spatial, dtype=torch.long))
    affine = torch.diag(torch.tensor([*spacing[:dims], 1.0], dtype=torch.float64))
    return {
        "image": MetaTensor(image[None], affine=affine),
        "label": MetaTensor(label[None], affine=affine),
    }, inside


def _run(seed: int = 0, data=None, **kwargs):
    kwargs.setdefault("label_keys", "label")
    transform = RandLesionImplantd(keys="image", mask_key="image_tumour", **kwargs)
    transform.set_random_state(seed=seed)
    if data is None:
        data, _ = _brain()
    return transform({k: v.clone() for k, v in data.items()})


def _centroid(mask: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(mask).float().mean(0)


# --------------------------------------------------------------------------------------------- basics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_is_written_and_lies_in_the_brain(seed):
    data, brain = _brain()
    out = _run(seed, data, radius_mm=(4.0, 8.0), intensity=(0.05, 0.2))
    mask = out["image_tumour"]
    assert mask.dtype == torch.int64
    assert mask.shape == (1, SIZE, SIZE, SIZE)
    assert set(mask.unique().tolist()) == {0, 1}
    assert (mask[0].bool() & ~brain).sum() == 0  # within the brain
    # inside the mask the intensity is the lesion's: clamp(value + texture) with value in [0.05, 0.2], texture +-0.08
    inside = out["image"][mask.bool()]
    assert inside.max() <= 0.2 + 0.08 + 1e-6
    assert (inside - data["image"][mask.bool()]).abs().min() > 0.3  # the brain was 0.7 there
    assert torch.isfinite(out["image"]).all()
    assert out["image"].min() >= 0 and out["image"].max() <= 1


def test_image_unchanged_far_from_the_lesion():
    """Mass-effect sigma = 1.5 * mean radius = 7.5 mm here; farther than ~3 sigma the displacement is < 0.1 voxel."""
    data, _ = _brain(texture=0.1)
    for seed in range(3):
        out = _run(seed, data, radius_mm=(5.0, 5.0), mass_effect=(0.6, 0.6))
        centre = _centroid(out["image_tumour"][0])
        index = torch.stack(torch.meshgrid(*[torch.arange(SIZE, dtype=torch.float32)] * 3, indexing="ij"), -1)
        dist_mm = (index - centre).norm(dim=-1) * SPACING
        far = dist_mm > 3 * 7.5 + 10.0  # 10 mm margin for the centroid of a (possibly clipped) lesion
        near = (dist_mm > 8.0) & (dist_mm < 16.0)  # outside the lesion, inside the mass effect
        diff = (out["image"][0] - data["image"][0]).abs()
        assert far.sum() > 1000
        assert diff[far].max() < 5e-3
        assert diff[near].max() > 1e-2  # the mass effect did move the tissue there


def test_no_mass_effect_changes_only_the_lesion_and_its_rim():
    data, _ = _brain(texture=0.1)
    out = _run(3, data, radius_mm=(6.0, 6.0), mass_effect=(0.0, 0.0))
    mask = out["image_tumour"][0].bool()
    changed = (out["image"][0] - data["image"][0]).abs() > 1e-5
    assert changed[mask].all() or changed[mask].float().mean() > 0.95
    # changes stay within lesion radius * (1 + noise + rim) of the lesion; rim = 2 mm
    centre = _centroid(mask)
    index = torch.stack(torch.meshgrid(*[torch.arange(SIZE, dtype=torch.float32)] * 3, indexing="ij"), -1)
    dist_mm = (index - centre).norm(dim=-1) * SPACING
    assert (changed & (dist_mm > 6.0 * 1.15 + 2.0 + 2 * SPACING + 6.0)).sum() == 0
    assert torch.equal(out["label"], data["label"])  # no displacement: labels untouched


def test_labels_are_moved_with_nearest_neighbour():
    data, _ = _brain()
    out = _run(4, data, radius_mm=(6.0, 8.0), mass_effect=(0.5, 0.6))
    label = out["label"]
    assert label.dtype == torch.int64 and label.shape == data["label"].shape
    assert set(label.unique().tolist()) <= set(data["label"].unique().tolist())
    assert not torch.equal(label, data["label"])  # the mass effect moved the stripes


def test_no_label_is_teleported():
    """The pull-back displacement is |ddf| = k r exp(-r^2 / 2 s^2) <= k s exp(-1/2) (s = 1.5 * mean radius): every
    voxel's new label exists in the original label map within that distance. This also bounds the mass effect."""
    data, _ = _brain()
    radius, k = 8.0, 0.9
    max_disp_vox = k * 1.5 * radius * math.exp(-0.5) / SPACING
    reach = math.ceil(max_disp_vox) + 1
    for seed in range(3):
        out = _run(seed, data, radius_mm=(radius, radius), mass_effect=(k, k))
        before, after = data["label"].as_tensor(), out["label"].as_tensor()
        for value in before.unique().tolist():
            present = (before == value).float()[None]
            for axis in range(3):  # separable dilation by a (2 reach + 1)^3 cube
                kernel = [1, 1, 1]
                kernel[axis] = 2 * reach + 1
                pad = [0, 0, 0]
                pad[axis] = reach
                present = F.max_pool3d(present, kernel, stride=1, padding=pad)
            present = present[0] > 0
            assert not ((after == value) & ~present).any(), f"label {value} teleported (seed {seed})"
        assert not torch.equal(before, after)


@pytest.mark.parametrize("spacing", [(2.0, 2.0, 2.0), (1.0, 2.0, 3.0)])
def test_lesion_radius_range_in_mm_is_honoured(spacing):
    """The mask is ``ellipsoid + noise < 1`` with semi-axes in mm and noise <= 0.15: extent < 2 * 1.15 * r_max mm."""
    data, _ = _brain(spacing=spacing)
    r_max = 8.0
    for seed in range(4):
        mask = _run(seed, data, radius_mm=(5.0, r_max))["image_tumour"][0]
        idx = torch.nonzero(mask)
        extent_vox = (idx.max(0).values - idx.min(0).values).float()
        for axis in range(3):
            assert extent_vox[axis] * spacing[axis] < 2 * r_max * 1.15, (seed, axis, extent_vox)
        assert mask.sum() >= 1


# ---------------------------------------------------------------------------------- randomness, prob


def test_deterministic_with_seed_and_different_between_seeds():
    a, b, c = _run(7), _run(7), _run(8)
    for key in ("image", "label", "image_tumour"):
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["image_tumour"], c["image_tumour"])
    assert not torch.equal(a["image"], c["image"])


def test_successive_calls_draw_new_lesions():
    data, _ = _brain()
    transform = RandLesionImplantd(keys="image", mask_key="image_tumour")
    transform.set_random_state(seed=0)
    first, second = transform(dict(data)), transform(dict(data))
    assert not torch.equal(first["image_tumour"], second["image_tumour"])


def test_prob_zero_leaves_the_image_and_writes_an_empty_mask():
    data, _ = _brain(texture=0.1)
    out = _run(0, data, prob=0.0)
    assert torch.equal(out["image"], data["image"])
    assert torch.equal(out["label"], data["label"])
    mask = out["image_tumour"]
    assert mask.dtype == torch.int64 and mask.shape == (1, SIZE, SIZE, SIZE)
    assert mask.sum() == 0
    assert isinstance(mask, MetaTensor)
    np.testing.assert_allclose(np.asarray(mask.affine), np.asarray(data["image"].affine))


def test_metatensors_keep_their_affine():
    data, _ = _brain()
    affine = torch.tensor([[-2.0, 0, 0, 10], [0, -2.0, 0, 20], [0, 0, 2.0, -30], [0, 0, 0, 1]], dtype=torch.float64)
    data = {k: MetaTensor(v.as_tensor(), affine=affine) for k, v in data.items()}
    out = _run(1, data)
    for key in ("image", "label", "image_tumour"):
        assert isinstance(out[key], MetaTensor), key
        np.testing.assert_allclose(np.asarray(out[key].affine), affine.numpy(), err_msg=key)
    assert out["image_tumour"].sum() > 0


def test_plain_tensor_and_multichannel_input():
    data, _ = _brain()
    image = torch.cat([data["image"].as_tensor(), 0.5 * data["image"].as_tensor()])  # 2 channels
    out = _run(2, {"image": image, "label": data["label"].as_tensor()}, intensity=(0.05, 0.2))
    mask = out["image_tumour"]
    assert mask.shape == (1, SIZE, SIZE, SIZE) and mask.sum() > 0
    assert out["image"].shape == (2, SIZE, SIZE, SIZE)
    for c in range(2):
        assert out["image"][c][mask[0].bool()].max() <= 0.28 + 1e-6  # every channel gets the lesion


def test_missing_keys():
    transform = RandLesionImplantd(keys="image", mask_key="image_tumour", allow_missing_keys=True)
    assert transform({"other": 1}) == {"other": 1}
    with pytest.raises(KeyError):
        RandLesionImplantd(keys="image", mask_key="image_tumour")({"other": 1})


# ------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mass_effect": (0.2, 1.0)},
        {"mass_effect": (0.6, 0.2)},
        {"mass_effect": (-0.1, 0.2)},
        {"radius_mm": (0.0, 5.0)},
        {"radius_mm": (10.0, 5.0)},
    ],
)
def test_bad_ranges_raise(kwargs):
    with pytest.raises(ValueError):
        RandLesionImplantd(keys="image", mask_key="image_tumour", **kwargs)


def test_bad_intensity_range_raises():
    with pytest.raises(ValueError):
        RandLesionImplantd(keys="image", mask_key="image_tumour", intensity=(0.9, 0.1))


def test_empty_brain_does_not_crash():
    zeros = MetaTensor(torch.zeros(1, 16, 16, 16), affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))
    transform = RandLesionImplantd(keys="image", mask_key="image_tumour")
    transform.set_random_state(seed=0)
    out = transform({"image": zeros})
    assert out["image_tumour"].shape == (1, 16, 16, 16) and out["image_tumour"].dtype == torch.int64
    assert torch.isfinite(out["image"]).all()


def test_2d_input():
    data, brain = _brain(dims=2, texture=0.1)
    out = _run(5, data, radius_mm=(5.0, 8.0), intensity=(0.05, 0.2))
    mask = out["image_tumour"]
    assert mask.shape == (1, SIZE, SIZE) and mask.dtype == torch.int64
    assert mask.sum() > 0 and (mask[0].bool() & ~brain).sum() == 0
    assert out["image"].shape == (1, SIZE, SIZE)
    assert out["image"][mask.bool()].max() <= 0.28 + 1e-6
    assert set(out["label"].unique().tolist()) <= set(data["label"].unique().tolist())
    idx = torch.nonzero(mask[0])
    assert ((idx.max(0).values - idx.min(0).values).float() * SPACING < 2 * 8.0 * 1.15).all()
    np.testing.assert_allclose(np.asarray(mask.affine), np.asarray(data["image"].affine))
