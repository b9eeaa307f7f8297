"""Tests for bundle.spatial and bundle.transforms.{warping,spacing}."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, DivisiblePadd, EnsureChannelFirstd, LoadImaged, Orientationd

from bundle.spatial import ddf_source_points, index_grid, resample_ddf, sample_field, warp_through_world
from bundle.transforms import JacobianDeterminantd, PerKeySpacingd, ResampleDDFToOriginald, Warpd


def _rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- bundle.spatial


def test_index_grid_channels_are_axis_indices():
    grid = index_grid((3, 4, 5))
    assert grid.shape == (3, 3, 4, 5)
    assert grid[0, 2, 1, 3] == 2 and grid[1, 2, 1, 3] == 1 and grid[2, 2, 1, 3] == 3


def test_sample_field_at_grid_points_and_midpoints():
    field = _rand(2, 5, 6, 7)
    torch.testing.assert_close(sample_field(field, index_grid((5, 6, 7))), field, atol=1e-6, rtol=0)
    # a linear field is interpolated exactly between voxels
    lin = index_grid((5, 6, 7))[[0]] * 2.0 + 1.0
    pts = torch.tensor([1.5, 2.25, 3.0]).view(3, 1, 1, 1)
    assert sample_field(lin, pts).item() == pytest.approx(4.0, abs=1e-5)


@pytest.mark.parametrize("dims", (2, 3))
def test_resample_ddf_identical_affines_is_identity(dims):
    shape = (6, 7, 5)[:dims]
    ddf = torch.randn(dims, *shape, generator=torch.Generator().manual_seed(0))
    affine = torch.eye(dims + 1, dtype=torch.float64)
    affine[:dims, :dims] = torch.diag(torch.tensor([1.5, -2.0, 0.8][:dims], dtype=torch.float64))
    affine[:dims, dims] = torch.tensor([10.0, -3.0, 7.0][:dims])
    out = resample_ddf(ddf, affine, affine, shape)
    assert out.dtype == torch.float32 and out.shape == ddf.shape
    torch.testing.assert_close(out, ddf, atol=1e-5, rtol=1e-5)


def test_resample_ddf_flipped_axis_negates_the_component_and_mirrors_the_grid():
    n = 6
    shape = (n, 5, 4)
    src = torch.eye(4, dtype=torch.float64)
    src[0, 0], src[0, 3] = -1.0, n - 1.0  # src index j <-> world (n - 1 - j): dst grid flipped along axis 0
    dst = torch.eye(4, dtype=torch.float64)
    const = torch.zeros(3, *shape)
    const[0], const[1], const[2] = 1.0, 0.5, -0.25
    out = resample_ddf(const, src, dst, shape)
    assert out.shape == (3, *shape)
    torch.testing.assert_close(out[0], torch.full(shape, -1.0))
    torch.testing.assert_close(out[1], torch.full(shape, 0.5))
    torch.testing.assert_close(out[2], torch.full(shape, -0.25))
    # a non-constant field is mirrored along axis 0 as well
    ddf = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0))
    out = resample_ddf(ddf, src, dst, shape)
    torch.testing.assert_close(out[0], -ddf[0].flip(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1:], ddf[1:].flip(1), atol=1e-5, rtol=1e-5)


def test_resample_ddf_coarse_to_fine_rescales_vectors():
    src = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64))  # 8^3 voxels of 2 mm
    dst = torch.eye(4, dtype=torch.float64)  # 16^3 voxels of 1 mm, same extent
    ddf = torch.ones(3, 8, 8, 8)
    ddf[2] = -0.5
    out = resample_ddf(ddf, src, dst, (16, 16, 16))
    assert out.shape == (3, 16, 16, 16)
    torch.testing.assert_close(out[0], torch.full((16, 16, 16), 2.0))
    torch.testing.assert_close(out[1], torch.full((16, 16, 16), 2.0))
    torch.testing.assert_close(out[2], torch.full((16, 16, 16), -1.0))


def test_resample_ddf_linear_field_with_offset_grids():
    """A world-space affine displacement is reproduced on a shifted, anisotropic grid."""
    src = torch.diag(torch.tensor([2.0, 3.0, 1.0], dtype=torch.float64))
    src[:2, 2] = torch.tensor([-4.0, 5.0])
    dst = torch.diag(torch.tensor([1.0, 1.5, 1.0], dtype=torch.float64))
    dst[:2, 2] = torch.tensor([-2.0, 8.0])

    def world_disp(affine, shape):
        idx = index_grid(shape, dtype=torch.float64)
        world = torch.einsum("kl,l...->k...", affine[:2, :2], idx) + affine[:2, 2].view(2, 1, 1)
        disp = torch.stack([0.1 * world[1] + 1.0, -0.05 * world[0]])  # mm
        return torch.einsum("kl,l...->k...", torch.linalg.inv(affine[:2, :2]), disp)  # voxel units

    src_ddf = world_disp(src, (12, 10))
    out = resample_ddf(src_ddf.float(), src, dst, (16, 14))
    expected = world_disp(dst, (16, 14)).float()
    # dst points inside the src grid: world x in [-4, 18], y in [5, 32] -> dst indices x <= 20, y >= 0, y*1.5+8 <= 32
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_resample_ddf_bad_dimensions_raise():
    with pytest.raises(ValueError):
        resample_ddf(torch.zeros(3, 4, 4), torch.eye(4), torch.eye(4), (4, 4))
    with pytest.raises(ValueError):
        resample_ddf(torch.zeros(3, 4, 4, 4), torch.eye(4), torch.eye(4), (4, 4))
    with pytest.raises(ValueError):
        resample_ddf(torch.zeros(3, 4, 4, 4), torch.eye(3), torch.eye(4), (4, 4, 4))


# ---------------------------------------------------------------- Warpd / JacobianDeterminantd


def test_warpd_zero_field_is_identity():
    image = MetaTensor(_rand(2, 8, 9, 10), affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))
    label = torch.randint(0, 4, (1, 8, 9, 10), generator=torch.Generator().manual_seed(0))
    data = {"moving": image, "moving_label": label, "pred": torch.zeros(3, 8, 9, 10)}
    out = Warpd(["moving", "moving_label"], mode=["bilinear", "nearest"])(data)
    torch.testing.assert_close(out["warped_moving"].as_tensor(), image.as_tensor(), atol=1e-6, rtol=0)
    assert torch.equal(out["warped_moving_label"], label)
    assert out["warped_moving_label"].dtype == label.dtype
    assert isinstance(out["warped_moving"], MetaTensor)
    assert torch.equal(out["warped_moving"].affine, image.affine)
    assert out["moving"] is image  # inputs kept


@pytest.mark.parametrize("dims", (2, 3))
def test_warpd_integer_translation_is_exact_in_the_interior(dims):
    shape = (10, 11, 12)[:dims]
    shift = (2, -1, 3)[:dims]
    image = _rand(1, *shape)
    label = torch.randint(0, 5, (1, *shape), generator=torch.Generator().manual_seed(1))
    ddf = torch.zeros(dims, *shape)
    for k, s in enumerate(shift):
        ddf[k] = float(s)
    out = Warpd(["img", "lab"], ddf_key="ddf", names=["wi", "wl"], mode=["bilinear", "nearest"])(
        {"img": image, "lab": label, "ddf": ddf}
    )
    # warped(x) = moving(x + shift) wherever x + shift is inside the grid
    dst = tuple(slice(max(0, -s), n - max(0, s)) for s, n in zip(shift, shape))
    src = tuple(slice(max(0, s), n + min(0, s)) for s, n in zip(shift, shape))
    torch.testing.assert_close(out["wi"][(slice(None), *dst)], image[(slice(None), *src)], atol=1e-5, rtol=0)
    assert torch.equal(out["wl"][(slice(None), *dst)], label[(slice(None), *src)])


def test_warpd_options():
    with pytest.raises(ValueError):
        Warpd(["a", "b"], names=["x"])
    with pytest.raises(ValueError):
        Warpd(["a", "b"], mode=["nearest"])
    data = {"moving": torch.ones(1, 4, 4, 4), "pred": torch.zeros(3, 4, 4, 4)}
    out = Warpd(["moving", "moving_label"], allow_missing_keys=True)(data)
    assert "warped_moving_label" not in out and "warped_moving" in out
    with pytest.raises(KeyError):
        Warpd(["moving", "moving_label"])(data)


def test_jacobian_determinantd_of_zero_field_is_one_and_of_scaling_is_product():
    ddf = MetaTensor(torch.zeros(3, 6, 7, 8), affine=torch.diag(torch.tensor([1.5, 1.5, 1.5, 1.0])))
    out = JacobianDeterminantd()({"pred": ddf})
    det = out["jacobian_det"]
    assert det.shape == (1, 6, 7, 8)
    assert torch.equal(det.as_tensor(), torch.ones(1, 6, 7, 8))
    assert torch.equal(det.affine, ddf.affine)
    # x -> diag(1.2, 0.5, 2) x has det 1.2
    scale = index_grid((6, 7, 8)) * torch.tensor([0.2, -0.5, 1.0]).view(3, 1, 1, 1)
    det = JacobianDeterminantd(keys="f", names=["j"])({"f": scale})["j"]
    torch.testing.assert_close(det, torch.full((1, 6, 7, 8), 1.2 * 0.5 * 2.0))


# ---------------------------------------------------------------- NIfTI pipelines

ORIG_SHAPE = (20, 22, 14)
ORIG_SPACING = 1.5


def _lps_like_affine() -> np.ndarray:
    """RAS affine of an image stored with axes 0 and 1 pointing to L and P (as DICOM-derived NIfTIs)."""
    affine = np.diag([-ORIG_SPACING, -ORIG_SPACING, ORIG_SPACING, 1.0])
    affine[:3, 3] = [40.0, 25.0, -12.0]
    return affine


def _write(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


def _load_and_preprocess(paths: dict, keys, modes):
    return Compose(
        [
            LoadImaged(keys),
            EnsureChannelFirstd(keys),
            Orientationd(keys, axcodes="RAS"),
            PerKeySpacingd(keys, pixdim=3.0, mode=modes),
            DivisiblePadd(keys, k=16),
        ]
    )(paths)


def test_resample_ddf_to_original_end_to_end(tmp_path):
    affine = _lps_like_affine()
    image = np.random.default_rng(0).random(ORIG_SHAPE).astype(np.float32)
    data = _load_and_preprocess({"fixed": _write(tmp_path / "fixed.nii.gz", image, affine)}, ["fixed"], "bilinear")
    fixed = data["fixed"]
    assert all(s % 16 == 0 for s in fixed.shape[1:])
    net_affine = fixed.affine.to(torch.float64)
    torch.testing.assert_close(net_affine[:3, :3].diag(), torch.full((3,), 3.0, dtype=torch.float64))

    # pull-back displacement in world (RAS) mm: constant translation plus a small affine part
    t_world = torch.tensor([3.0, 1.5, -4.5], dtype=torch.float64)
    m_world = torch.tensor([[0.02, 0.0, 0.01], [0.0, -0.01, 0.0], [0.0, 0.015, 0.0]], dtype=torch.float64)

    def ddf_on(aff, shape, linear=True):
        aff = torch.as_tensor(aff, dtype=torch.float64)
        idx = index_grid(shape, dtype=torch.float64)
        world = torch.einsum("kl,l...->k...", aff[:3, :3], idx) + aff[:3, 3].view(3, 1, 1, 1)
        disp = t_world.view(3, 1, 1, 1) + (torch.einsum("kl,l...->k...", m_world, world) if linear else 0)
        return torch.einsum("kl,l...->k...", torch.linalg.inv(aff[:3, :3]), disp)

    # constant translation: +1, +0.5, -1.5 network voxels (3 mm, RAS axes)
    pred = ddf_on(net_affine, fixed.shape[1:], linear=False).float()
    torch.testing.assert_close(pred[:, 0, 0, 0], torch.tensor([1.0, 0.5, -1.5]))
    out = ResampleDDFToOriginald(keys="pred", ref_key="fixed")({"fixed": fixed, "pred": MetaTensor(pred)})["pred"]
    assert isinstance(out, MetaTensor)
    assert out.shape == (3, *ORIG_SHAPE)
    np.testing.assert_allclose(out.affine.numpy(), affine, atol=1e-5)
    # in original voxels: axes 0 and 1 point to L and P, so +3 mm R = -2 voxels, +1.5 mm A = -1 voxel
    interior = (slice(None), slice(2, -2), slice(2, -2), slice(2, -2))
    expected = torch.tensor([-2.0, -1.0, -3.0]).view(3, 1, 1, 1).expand(3, *ORIG_SHAPE)
    torch.testing.assert_close(out[interior].as_tensor(), expected[interior], atol=1e-4, rtol=0)

    # spatially varying field: checks that voxel positions (origin, flips, padding offset) are mapped too
    pred = ddf_on(net_affine, fixed.shape[1:]).float()
    out = ResampleDDFToOriginald()({"fixed": fixed, "pred": pred})["pred"]
    expected = ddf_on(affine, ORIG_SHAPE).float()
    torch.testing.assert_close(out[interior].as_tensor(), expected[interior], atol=1e-4, rtol=1e-4)


def test_resample_ddf_to_original_needs_loaded_reference():
    with pytest.raises(ValueError, match="original_affine"):
        ResampleDDFToOriginald()({"fixed": torch.zeros(1, 4, 4, 4), "pred": torch.zeros(3, 4, 4, 4)})


def test_per_key_spacingd_on_image_and_label_and_inverse(tmp_path):
    affine = _lps_like_affine()
    rng = np.random.default_rng(0)
    image = rng.random(ORIG_SHAPE).astype(np.float32)
    label = np.zeros(ORIG_SHAPE, dtype=np.uint8)
    label[4:12, 6:16, 3:9] = 1
    label[14:18, 2:8, 8:12] = 2
    paths = {
        "moving": _write(tmp_path / "moving.nii.gz", image, affine),
        "moving_label": _write(tmp_path / "moving_label.nii.gz", label, affine),
    }
    keys = ["moving", "moving_label"]
    loaded = Compose([LoadImaged(keys), EnsureChannelFirstd(keys)])(paths)
    assert all(isinstance(loaded[k], MetaTensor) for k in keys)

    spacing = PerKeySpacingd(keys, pixdim=3.0, mode=["bilinear", "nearest"])
    out = spacing(loaded)  # MONAI's Spacingd(keys) fails on this dict ('moving_label' is taken as meta of 'moving')
    assert out["moving"].shape == out["moving_label"].shape
    # the 1.5 mm grid resampled at 3 mm: about half as many voxels along each axis
    for n_new, n_old in zip(out["moving"].shape[1:], ORIG_SHAPE):
        assert abs(n_new - ((n_old - 1) * ORIG_SPACING / 3.0 + 1)) <= 0.5
    for k in keys:
        np.testing.assert_allclose(np.abs(np.diag(out[k].affine.numpy())[:3]), [3.0, 3.0, 3.0], atol=1e-6)
    # nearest interpolation keeps label values, and both classes survive
    assert set(torch.unique(out["moving_label"]).tolist()) == {0, 1, 2}
    assert out["moving"].min() >= 0 and out["moving"].max() <= 1

    restored = spacing.inverse(out)
    for k in keys:
        assert restored[k].shape == (1, *ORIG_SHAPE)
        np.testing.assert_allclose(restored[k].affine.numpy(), affine, atol=1e-5)
    # label values after the round trip are still the original classes, mostly at the original places
    restored_label = restored["moving_label"][0].numpy()
    assert set(np.unique(restored_label).tolist()) <= {0, 1, 2}
    assert (restored_label == label).mean() > 0.85


def test_per_key_spacingd_missing_keys():
    data = {"moving": MetaTensor(torch.rand(1, 8, 8, 8))}
    out = PerKeySpacingd(["moving", "moving_label"], pixdim=2.0, allow_missing_keys=True)(data)
    assert out["moving"].shape == (1, 4, 4, 4)
    assert "moving_label" not in out
    with pytest.raises(KeyError):
        PerKeySpacingd(["moving", "moving_label"], pixdim=2.0)(data)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_warp_through_world_matches_points_then_sample(dims, mode):
    """The fused warp samples what ``ddf_source_points`` + ``sample_field`` sample, across oblique grids."""
    shape, source_shape = (9, 11, 7)[:dims], (12, 8, 10)[:dims]
    ddf = (_rand(dims, *shape, seed=1) - 0.5) * 3
    ddf_affine, source_affine = torch.eye(dims + 1, dtype=torch.float64), torch.eye(dims + 1, dtype=torch.float64)
    ddf_affine[:dims, :dims] = torch.tensor([[0.9, 0.1, 0.0], [-0.1, 1.1, 0.05], [0.0, 0.02, 1.3]])[:dims, :dims]
    ddf_affine[:dims, dims] = torch.tensor([1.5, -2.0, 0.7])[:dims]
    source_affine[:dims, :dims] = torch.diag(torch.tensor([1.2, 0.8, 1.0])[:dims])
    source = _rand(2, *source_shape, seed=2)
    for padding_mode in ("zeros", "border"):
        expected = sample_field(source, ddf_source_points(ddf, ddf_affine, source_affine), padding_mode, mode)
        found = warp_through_world(source, ddf, ddf_affine, source_affine, padding_mode, mode)
        assert found.shape == (2, *shape) and found.dtype == torch.float32
        torch.testing.assert_close(found, expected, atol=1e-5, rtol=0)
    found64 = warp_through_world(source.double(), ddf.double(), ddf_affine, source_affine, mode=mode)
    expected64 = sample_field(source.double(), ddf_source_points(ddf.double(), ddf_affine, source_affine), "zeros", mode)
    assert found64.dtype == torch.float64
    torch.testing.assert_close(found64, expected64, atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="spatial axes"):
        warp_through_world(source[0], ddf, ddf_affine, source_affine)
