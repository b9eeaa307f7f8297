"""The longitudinal tumour benchmark (benchmarks/longitudinal.py): pair list, intensity scaling, the pre-alignment
baselines (warped image, warped tumour, DDF) and the per-pair scores; tiny synthetic scans with known answers, plus
the real time points of ``../shared/data/tumor_progression`` (skipped when absent).
Data: TCIA Brain-Tumor-Progression (Schmainda & Prah 2018), CC BY 3.0."""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import REPO_ROOT, SHARED_DATA

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import longitudinal  # noqa: E402

SHAPE = (40, 30, 6)
# thick-slice scans like the real ones: 0.5 mm in-plane, 6.5 mm slices; a 10 mm band is 20 voxels in-plane, 1 slice
FIXED_AFFINE = np.array([[0.5, 0, 0, -10.0], [0, 0.5, 0, -7.0], [0, 0, 6.5, -20.0], [0, 0, 0, 1]])


def _save(array, affine, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return str(path)


def test_pairs_list_each_patient_tp0_to_tp1(tmp_path, monkeypatch):
    for patient in ("PGBM-007", "PGBM-002"):
        for tp in ("tp0_2001-01-01", "tp1_2001-06-01"):
            (tmp_path / patient / tp).mkdir(parents=True)
    (tmp_path / "README.txt").write_text("not a patient")
    monkeypatch.setattr(longitudinal, "DATA", tmp_path)
    pairs = longitudinal.pairs()
    assert [p["name"] for p in pairs] == ["PGBM-002_tp0_to_tp1", "PGBM-007_tp0_to_tp1"]
    tp0, tp1 = tmp_path / "PGBM-002" / "tp0_2001-01-01", tmp_path / "PGBM-002" / "tp1_2001-06-01"
    t1 = {"t1_moving": str(tp0 / "T1post.nii.gz"), "t1_fixed": str(tp1 / "T1post.nii.gz"),
          "moving_label": str(tp0 / "MaskTumor.nii.gz"), "fixed_tumour": str(tp1 / "MaskTumor.nii.gz")}
    assert pairs[0] == {"name": "PGBM-002_tp0_to_tp1", "moving": str(tp0 / "T1post.nii.gz"),
                        "fixed": str(tp1 / "T1post.nii.gz"), **t1}
    # the tumour model's two channels: T1post then FLAIR, the scores still on T1post
    assert longitudinal.pairs(channels=2)[0] == {
        "name": "PGBM-002_tp0_to_tp1", "moving": [str(tp0 / "T1post.nii.gz"), str(tp0 / "FLAIRreg.nii.gz")],
        "fixed": [str(tp1 / "T1post.nii.gz"), str(tp1 / "FLAIRreg.nii.gz")], **t1}
    with pytest.raises(ValueError, match="a model of 3 channels does not fit"):
        longitudinal.pairs(channels=3)


def test_scaling_dice_and_loading():
    a = np.arange(1001, dtype=np.float32)  # 99.5th percentile: 995
    scaled = longitudinal._scaled(a)
    assert scaled[995] == pytest.approx(1.0) and scaled[500] == pytest.approx(500 / 995) and scaled[1000] == 1.0
    assert np.all(longitudinal._scaled(np.zeros(5)) == 0)  # no division by zero on an empty image
    x, y = np.array([1, 1, 1, 0], bool), np.array([1, 0, 0, 0], bool)
    assert longitudinal._dice(x, y) == pytest.approx(0.5)
    assert np.isnan(longitudinal._dice(np.zeros(4, bool), np.zeros(4, bool)))  # both empty: no score


def test_load_drops_a_trailing_singleton_axis(tmp_path):
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4, 1)
    array, affine = longitudinal._load(_save(data, FIXED_AFFINE, tmp_path / "a.nii.gz"))
    assert array.shape == (2, 3, 4) and array.dtype == np.float32
    np.testing.assert_array_equal(array, data[..., 0])
    np.testing.assert_allclose(affine, FIXED_AFFINE)


def _scan_pair(tmp_path: Path, offset_voxels: int = 4) -> dict:
    """tp1 (fixed) on FIXED_AFFINE; tp0 (moving) on the same grid shifted by ``offset_voxels`` along the first axis
    in world space, so the fixed voxel ``i`` shows the moving voxel ``i - offset`` (world coordinates alone)."""
    rng = np.random.default_rng(1)
    moving = rng.random(SHAPE).astype(np.float32) + 1.0
    tumour = np.zeros(SHAPE, np.uint8)
    tumour[10:14, 8:12, 2:4] = 1
    moving_affine = FIXED_AFFINE.copy()
    moving_affine[0, 3] += 0.5 * offset_voxels
    fixed = np.zeros(SHAPE, np.float32)
    fixed[offset_voxels:] = moving[:-offset_voxels]
    fixed_tumour = np.zeros(SHAPE, np.uint8)
    fixed_tumour[20:22, 8:12, 2:4] = 1
    return {"name": "P_tp0_to_tp1",
            "t1_moving": _save(moving, moving_affine, tmp_path / "tp0" / "T1post.nii.gz"),
            "moving_label": _save(tumour, moving_affine, tmp_path / "tp0" / "MaskTumor.nii.gz"),
            "t1_fixed": _save(fixed, FIXED_AFFINE, tmp_path / "tp1" / "T1post.nii.gz"),
            "fixed_tumour": _save(fixed_tumour, FIXED_AFFINE, tmp_path / "tp1" / "MaskTumor.nii.gz")}


def test_identity_baseline_resamples_by_world_coordinates(tmp_path):
    """``identity``: no transform, so a zero DDF, and the moving scan and tumour land ``offset`` voxels further on."""
    pair = _scan_pair(tmp_path)
    warped, warped_tumour, ddf = longitudinal._baseline(pair, "none")
    fixed, _ = longitudinal._load(pair["t1_fixed"])
    assert warped.shape == warped_tumour.shape == SHAPE and ddf.shape == (3, *SHAPE)
    np.testing.assert_allclose(warped[4:], fixed[4:], atol=1e-5)
    assert np.all(warped[:4] == 0)  # beyond the moving grid
    expected_tumour = np.zeros(SHAPE, bool)
    expected_tumour[14:18, 8:12, 2:4] = True
    np.testing.assert_array_equal(warped_tumour, expected_tumour)
    np.testing.assert_allclose(ddf, 0.0, atol=1e-9)


def test_rigid_baseline_ddf_is_the_transform_in_fixed_voxels(tmp_path, monkeypatch):
    """A pre-alignment that moves each fixed point 3 mm along world x (faked: the registration itself is tested in
    test_prealign.py) gives a DDF of 3 / 0.5 = 6 voxels along the first axis, and the warped scan is the moving one
    read at the fixed voxel 6 further on (the moving voxel 6 - 4 = 2 further on)."""
    import bundle.alignment

    calls = []

    def fake_register(moving, moving_affine, fixed, fixed_affine, transform):
        calls.append(transform)
        matrix = np.eye(4)
        matrix[0, 3] = 3.0
        return matrix

    monkeypatch.setattr(bundle.alignment, "itk_affine_register", fake_register)
    pair = _scan_pair(tmp_path)
    warped, warped_tumour, ddf = longitudinal._baseline(pair, "rigid")
    assert calls == ["rigid"]
    np.testing.assert_allclose(ddf[0], 6.0, atol=1e-5)
    np.testing.assert_allclose(ddf[1:], 0.0, atol=1e-5)
    fixed, _ = longitudinal._load(pair["t1_fixed"])
    np.testing.assert_allclose(warped[:-6], fixed[6:], atol=1e-5)
    assert warped_tumour.sum() == 32 and np.argwhere(warped_tumour)[:, 0].min() == 8  # tp0 tumour at 10 - 2


def test_score_regions_use_the_fixed_affine_spacing(tmp_path):
    """A perfect registration except for a few darker voxels: 20 voxels in-plane from the tumour (10 mm at 0.5 mm,
    band) and two slices above it (13 mm at 6.5 mm, outside). Squared error of the [0, 1]-scaled images: 0.25 there."""
    fixed = np.full(SHAPE, 100.0, np.float32)  # scaled to 1 everywhere
    tumour = np.zeros(SHAPE, bool)
    tumour[10:12, 10:12, 2] = True
    pair = {"t1_fixed": _save(fixed, FIXED_AFFINE, tmp_path / "f.nii.gz"),
            "fixed_tumour": _save(tumour.astype(np.uint8), FIXED_AFFINE, tmp_path / "t.nii.gz")}
    warped = fixed.copy()
    warped[31, 10, 2] = 50.0  # 20 voxels = 10 mm along x0: band
    warped[10, 10, 4] = 50.0  # 2 slices = 13 mm: outside
    warped_tumour = np.zeros(SHAPE, bool)
    warped_tumour[10:12, 10:13, 2] = True  # 6 voxels against 4: Dice 2 * 4 / 10
    row = longitudinal.score(pair, warped, warped_tumour, np.zeros((3, *SHAPE), np.float32))
    union = tumour | warped_tumour
    idx = np.indices(SHAPE).reshape(3, -1).T
    # the band by brute force: within 10 mm of the union of both tumours
    dist = np.min([np.sqrt((((idx - t) * [0.5, 0.5, 6.5]) ** 2).sum(1)) for t in np.argwhere(union)], axis=0)
    dist = dist.reshape(SHAPE)
    band = (dist <= 10) & ~union
    assert band[31, 10, 2] and not band[10, 10, 4] and not band[32, 10, 2]
    assert row["mse_tumour"] == 0.0
    assert row["mse_band"] == pytest.approx(0.25 / band.sum(), rel=1e-5)
    assert row["mse_outside"] == pytest.approx(0.25 / (~union & ~band).sum(), rel=1e-5)
    assert row["folding_pct_tumour"] == row["folding_pct_band"] == row["folding_pct_outside"] == 0.0
    assert row["tumour_overlap_tp0_tp1"] == pytest.approx(0.8)


PATIENT = SHARED_DATA / "tumor_progression" / "PGBM-001"


@pytest.mark.skipif(not PATIENT.is_dir(), reason="../shared/data/tumor_progression absent")
def test_real_pairs_and_a_perfect_registration_score(monkeypatch):
    """The real data: one tp0 -> tp1 pair per patient with its files present; the tp1 scan and tumour scored against
    themselves (a perfect registration): no error, NCC 1 and no folding in every region, tumour overlap 1."""
    monkeypatch.setattr(longitudinal, "DATA", SHARED_DATA / "tumor_progression")
    pairs = longitudinal.pairs()
    assert [p["name"] for p in pairs][:1] == ["PGBM-001_tp0_to_tp1"] and len(pairs) >= 2
    assert all(Path(p[k]).is_file() for p in pairs for k in ("t1_moving", "t1_fixed", "moving_label", "fixed_tumour"))
    assert all(Path(f).is_file() for p in longitudinal.pairs(channels=2) for f in [*p["moving"], *p["fixed"]])
    pair = pairs[0]
    fixed, affine = longitudinal._load(pair["t1_fixed"])
    tumour = longitudinal._load(pair["fixed_tumour"])[0] > 0
    assert tumour.sum() > 100 and np.linalg.norm(affine[:3, 2]) == pytest.approx(6.5, abs=0.01)
    row = longitudinal.score(pair, fixed, tumour, np.zeros((3, *fixed.shape), np.float32))
    for region in ("tumour", "band", "outside"):
        assert row[f"mse_{region}"] == 0.0 and row[f"folding_pct_{region}"] == 0.0
        assert row[f"ncc_{region}"] == pytest.approx(1.0, abs=1e-3)
    assert row["tumour_overlap_tp0_tp1"] == 1.0


def test_brain_masks_strip_the_scored_images_and_reach_the_pair(tmp_path, monkeypatch):
    """``--brain-masks``: each time point's mask becomes the pair's moving/fixed_brain_mask, the T1post images that
    are scored are stripped copies (0 outside the mask), and the scores are restricted to the tp1 brain."""
    rng = np.random.default_rng(0)
    data, masks = tmp_path / "data", tmp_path / "masks"
    inside = np.zeros(SHAPE, np.uint8)
    inside[5:35, 5:25] = 1
    for tp in ("tp0_2001-01-01", "tp1_2001-06-01"):
        _save(rng.random(SHAPE).astype(np.float32) + 1.0, FIXED_AFFINE, data / "PGBM-002" / tp / "T1post.nii.gz")
        tumour = np.zeros(SHAPE, np.uint8)
        tumour[15:20, 10:15, 2:4] = 1
        _save(tumour, FIXED_AFFINE, data / "PGBM-002" / tp / "MaskTumor.nii.gz")
    monkeypatch.setattr(longitudinal, "DATA", data)
    _save(inside, FIXED_AFFINE, masks / "PGBM-002_tp0_brain_mask.nii.gz")
    with pytest.raises(FileNotFoundError, match="PGBM-002_tp1_brain_mask.nii.gz"):
        longitudinal.pairs(2, masks, tmp_path / "stripped")
    _save(inside, FIXED_AFFINE, masks / "PGBM-002_tp1_brain_mask.nii.gz")
    (pair,) = longitudinal.pairs(2, masks, tmp_path / "stripped")
    assert Path(pair["fixed_brain_mask"]).name == "PGBM-002_tp1_brain_mask.nii.gz"
    assert Path(pair["moving_brain_mask"]).name == "PGBM-002_tp0_brain_mask.nii.gz"
    assert pair["fixed"][0].endswith("T1post.nii.gz") and "stripped" in pair["t1_fixed"]
    stripped, _ = longitudinal._load(pair["t1_fixed"])
    raw, _ = longitudinal._load(str(data / "PGBM-002" / "tp1_2001-06-01" / "T1post.nii.gz"))
    assert np.all(stripped[inside == 0] == 0) and np.array_equal(stripped[inside > 0], raw[inside > 0])
    # an error outside the brain is not scored
    warped = stripped.copy()
    warped[0:3] = 1.0  # outside the brain (stripped: 0), below the 99.5th percentile: the scaling is unchanged
    scores = longitudinal.score(pair, warped, np.zeros(SHAPE, bool), np.zeros((3, *SHAPE), np.float32))
    assert scores["mse_outside"] == 0.0
    unmasked = {k: v for k, v in pair.items() if k != "fixed_brain_mask"}
    assert longitudinal.score(unmasked, warped, np.zeros(SHAPE, bool), np.zeros((3, *SHAPE), np.float32))["mse_outside"] > 0
