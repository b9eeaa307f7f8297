"""Tests for bundle.metrics.regions: the tumour / 0-10 mm band / elsewhere split and the per-region metrics that the
tumour benchmarks (benchmarks/tumour_ablation.py, benchmarks/longitudinal.py) publish."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from bundle.metrics import REGIONS, region_registration_metrics, tumour_regions

SPACING = (2.0, 1.0, 0.5)  # anisotropic and in no sorted order: an axis-order slip changes the band


def _brute_force_band(tumour: np.ndarray, spacing, band_mm: float) -> np.ndarray:
    """Voxels outside the tumour whose Euclidean distance (mm) to the nearest tumour voxel is at most ``band_mm``."""
    idx = np.indices(tumour.shape).reshape(3, -1).T.astype(float)
    distance = np.full(len(idx), np.inf)
    for t in np.argwhere(tumour):
        distance = np.minimum(distance, np.sqrt((((idx - t) * spacing) ** 2).sum(1)))
    return (distance.reshape(tumour.shape) <= band_mm) & ~tumour


def test_band_is_measured_in_millimetres_per_axis():
    """One tumour voxel on a 2 x 1 x 0.5 mm grid: the 10 mm band reaches 5, 10 and 20 voxels along the three axes,
    the boundary included, and a diagonal voxel at exactly sqrt(6^2 + 8^2) = 10 mm is in it."""
    tumour = torch.zeros(1, 12, 24, 41, dtype=torch.bool)
    tumour[0, 5, 12, 20] = True
    regions = tumour_regions(tumour, SPACING)
    assert set(regions) == set(REGIONS)
    band = regions["band"][0]
    inside = [(0, 12, 20), (10, 12, 20), (5, 2, 20), (5, 22, 20), (5, 12, 0), (5, 12, 40), (8, 20, 20)]
    beyond = [(11, 12, 20), (5, 1, 20), (5, 23, 20), (8, 21, 20), (9, 20, 20)]
    assert all(band[p] for p in inside), [p for p in inside if not band[p]]
    assert not any(band[p] for p in beyond), [p for p in beyond if band[p]]
    assert regions["tumour"][0, 5, 12, 20] and not band[5, 12, 20]
    assert regions["outside"][0, 11, 12, 20] and not regions["outside"][0, 8, 20, 20]


def test_regions_partition_the_grid_and_match_brute_force_distances():
    """An irregular two-part tumour with a 4 mm band: every voxel is in exactly one region, and the band is the set
    of voxels within 4 mm computed by brute force over the tumour voxels."""
    tumour = np.zeros((12, 24, 41), bool)
    tumour[3:5, 4:7, 10:13] = True
    tumour[8, 15, 30] = True
    regions = tumour_regions(torch.as_tensor(tumour)[None], SPACING, band_mm=4.0)
    masks = [regions[r][0].numpy() for r in REGIONS]
    assert all(m.shape == tumour.shape and m.dtype == bool for m in masks)
    np.testing.assert_array_equal(sum(m.astype(int) for m in masks), np.ones(tumour.shape, int))
    np.testing.assert_array_equal(masks[0], tumour)
    expected = _brute_force_band(tumour, SPACING, 4.0)
    assert 100 < expected.sum() < tumour.size // 2  # the check is not trivially all or nothing
    np.testing.assert_array_equal(masks[1], expected)


def test_empty_tumour_leaves_everything_outside():
    regions = tumour_regions(torch.zeros(1, 6, 7, 8), SPACING)
    assert not regions["tumour"].any() and not regions["band"].any() and regions["outside"].all()


def _slab_case():
    """16 x 16 x 8 voxels of 1 x 2 x 1 mm; tumour: the slab x1 in {0, 1}, so the 10 mm band is x1 = 2..6 (distance
    2 (x1 - 1) mm) and the rest (x1 = 7..15) is outside. Two random channels."""
    shape = (16, 16, 8)
    fixed = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))
    tumour = torch.zeros(1, *shape, dtype=torch.bool)
    tumour[:, :, :2] = True
    return shape, fixed, tumour, (1.0, 2.0, 1.0)


def test_region_metrics_known_errors_folding_and_dice():
    """Exact per-region answers: an intensity error only in the tumour (one channel of two), folding in x1 < 4 only
    (det J = -1 there), and label maps that agree in the tumour and band but are shifted by one voxel elsewhere."""
    shape, fixed, tumour, spacing = _slab_case()
    warped = fixed.clone()
    warped[0, :, :2] += 0.5  # squared error 0.25 in channel 0 of the tumour: channel mean 0.125
    x0 = torch.arange(shape[0], dtype=torch.float32)[:, None, None].expand(shape)
    ddf = torch.zeros(3, *shape)
    ddf[0, :, :4] = -2.0 * x0[:, :4]  # x0 -> -x0 for x1 < 4: det J = -1 there, 1 elsewhere
    fixed_label = torch.zeros(1, *shape, dtype=torch.long)
    fixed_label[:, 2:8], fixed_label[:, 8:14] = 1, 2
    fixed_label[:, 14:, :2] = 3  # class 3 only in the fixed tumour, missed by the warped labels
    warped_label = fixed_label.clone()
    warped_label[:, 14:, :2] = 0
    warped_label[:, :, 7:] = torch.roll(fixed_label[:, :, 7:], 1, dims=1)  # one voxel off outside: Dice 5/6 per class

    m = region_registration_metrics(warped, fixed, ddf, tumour, spacing, warped_label=warped_label,
                                    fixed_label=fixed_label, num_classes=4)
    assert m["mse_tumour"] == pytest.approx(0.125, abs=1e-6)
    assert m["mse_band"] == 0.0 and m["mse_outside"] == 0.0
    assert m["folding_pct_tumour"] == pytest.approx(100.0)
    assert m["folding_pct_band"] == pytest.approx(100.0 * 2 / 5)  # x1 = 2, 3 of 2..6
    assert m["folding_pct_outside"] == 0.0
    assert m["dice_tumour"] == pytest.approx((1 + 1 + 0) / 3)  # classes 1, 2 right, class 3 missed
    assert m["dice_band"] == pytest.approx(1.0)  # class 3 absent from the band: left out, not scored 0
    assert m["dice_outside"] == pytest.approx(5 / 6)
    # local NCC: windows (9 voxels) of the outside never reach the tumour, those of the band do
    assert m["ncc_outside"] == pytest.approx(1.0, abs=1e-4)
    assert m["ncc_band"] < 0.99 and m["ncc_tumour"] < 0.99


def test_region_metrics_without_tumour_and_without_num_classes():
    """No tumour: tumour and band metrics NaN, the outside is the whole grid; labels need ``num_classes``."""
    shape, fixed, tumour, spacing = _slab_case()
    warped = fixed.clone()
    warped[0, :, :2] += 0.5
    m = region_registration_metrics(warped, fixed, torch.zeros(3, *shape), torch.zeros_like(tumour), spacing)
    assert all(math.isnan(m[f"{k}_{r}"]) for k, r in itertools.product(("ncc", "mse", "folding_pct"), ("tumour", "band")))
    assert m["mse_outside"] == pytest.approx(0.125 * 2 / 16, abs=1e-6) and m["folding_pct_outside"] == 0.0
    assert "dice_outside" not in m
    label = torch.zeros(1, *shape, dtype=torch.long)
    with pytest.raises(ValueError, match="num_classes"):
        region_registration_metrics(warped, fixed, torch.zeros(3, *shape), tumour, spacing, warped_label=label,
                                    fixed_label=label)


def test_region_metrics_inside_a_brain_mask():
    """With a brain mask every region is restricted to it: an error outside the brain is not scored."""
    shape, fixed, tumour, spacing = _slab_case()
    warped = fixed.clone()
    warped[:, :, 12:] += 1.0  # error only in x1 >= 12 (outside the tumour and band)
    brain = torch.zeros(1, *shape, dtype=torch.bool)
    brain[:, :, :12] = True
    x0 = torch.arange(shape[0], dtype=torch.float32)[:, None, None].expand(shape)
    ddf = torch.zeros(3, *shape)
    ddf[0, :, 13:15] = -2.0 * x0[:, 13:15]  # folding only outside the brain
    whole = region_registration_metrics(warped, fixed, ddf, tumour, spacing)
    inside = region_registration_metrics(warped, fixed, ddf, tumour, spacing, brain_mask=brain)
    assert whole["mse_outside"] > 0.3 and whole["folding_pct_outside"] > 0
    assert inside["mse_outside"] == 0.0 and inside["folding_pct_outside"] == 0.0
    assert inside["mse_tumour"] == whole["mse_tumour"] == 0.0
