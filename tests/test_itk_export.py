"""ITK/ANTs export of DDFs (``bundle.io.itk_export``), checked by applying the written files with ITK and ANTs.

- Synthetic grids with an oblique, axis-flipped, anisotropic fixed grid and a differently oriented moving
  grid: the exported transform maps every fixed voxel centre to exactly where our DDF sends it, and ITK's
  resampling of an analytic image agrees with our ``Warpd`` and with the analytic truth.
- A real pair (IBSR, Center for Morphometric Analysis, MGH; downsampled to 64^3) with a smooth synthetic DDF
  and the moving image stored in another orientation: ITK (and ANTs when ``antspyx`` is installed) applied
  to the written files reproduce the warped image of our inference transforms.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import EnsureChannelFirstd, LoadImaged

from bundle.io.itk_export import (
    SaveITKTransformd,
    affine_from_itk_grid,
    ddf_to_itk_field,
    ddf_to_itk_transform,
    export_ddf_file,
    itk_grid_from_affine,
    read_ddf_nifti,
    read_itk_displacement_field,
    write_itk_displacement_field,
    write_itk_transform,
)
from bundle.io.writers import write_nifti
from bundle.spatial import resample_to_grid
from bundle.transforms import Warpd
from conftest import SHARED_DATA, save_nifti

itk = pytest.importorskip("itk")

IBSR = SHARED_DATA / "ibsr"
LPS = np.diag([-1.0, -1.0, 1.0])


def _rotation(angles_deg) -> np.ndarray:
    rot = np.eye(3)
    for axis, angle in enumerate(np.deg2rad(angles_deg)):
        c, s = np.cos(angle), np.sin(angle)
        r = np.eye(3)
        i, j = [a for a in range(3) if a != axis]
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rot = rot @ r
    return rot


def _affine(angles_deg, spacing, origin) -> np.ndarray:
    """Voxel-to-world RAS affine with rotated axes; a negative spacing flips that axis."""
    affine = np.eye(4)
    affine[:3, :3] = _rotation(angles_deg) @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def _smooth_ddf(shape, amplitude, seed=0) -> np.ndarray:
    """``(3, *shape)`` smooth DDF in voxels: a sum of low-frequency sines, at most ``amplitude`` per axis."""
    rng = np.random.default_rng(seed)
    idx = np.indices(shape, dtype=np.float64) / np.reshape(shape, (3, 1, 1, 1))
    ddf = np.zeros((3, *shape))
    for k in range(3):
        for _ in range(2):
            freq, phase = rng.uniform(0.5, 1.5, size=3), rng.uniform(0, 2 * np.pi)
            ddf[k] += 0.5 * amplitude * np.sin(2 * np.pi * np.tensordot(freq, idx, axes=1) + phase)
    return ddf.astype(np.float32)


def _world(affine, points) -> np.ndarray:
    """RAS world coordinates ``(3, ...)`` of voxel index points ``(3, ...)``."""
    return np.tensordot(affine[:3, :3], points, axes=1) + affine[:3, 3].reshape(3, *([1] * (points.ndim - 1)))


def _analytic(world) -> np.ndarray:
    """A smooth test image as a function of RAS world coordinates (mm)."""
    x, y, z = world
    return np.sin(x / 9.0) * np.cos(y / 11.0) + 0.5 * np.sin((z + 0.5 * x) / 7.0)


def _itk_image(array: np.ndarray, affine: np.ndarray):
    """An ``itk.Image[itk.F, 3]`` of ``array`` (indexed like our arrays) on the grid of a RAS affine."""
    image = itk.image_from_array(np.ascontiguousarray(np.transpose(array, (2, 1, 0)), dtype=np.float32))
    origin, spacing, direction = itk_grid_from_affine(affine)
    image.SetOrigin(origin.tolist())
    image.SetSpacing(spacing.tolist())
    image.SetDirection(itk.matrix_from_array(np.ascontiguousarray(direction)))
    return image


def _itk_resample(moving, fixed, transform):
    """Linear ITK resampling of ``moving`` onto ``fixed``'s grid with ``transform``; our axis order."""
    out = itk.resample_image_filter(moving, transform=transform, use_reference_image=True, reference_image=fixed)
    return np.transpose(itk.array_from_image(out), (2, 1, 0)).astype(np.float64)


def _field_transform(field):
    """An ITK displacement field transform of a field image as ``itk.imread`` returns it (float vectors)."""
    ndim = field.GetImageDimension()
    double = itk.Image[itk.Vector[itk.D, ndim], ndim].New()
    double.SetRegions(field.GetLargestPossibleRegion())
    double.CopyInformation(field)
    double.Allocate()
    itk.array_view_from_image(double)[...] = itk.array_from_image(field)
    transform = itk.DisplacementFieldTransform[itk.D, ndim].New()
    transform.SetDisplacementField(double)
    return transform


def _inside(points, shape, margin=1.0) -> np.ndarray:
    """Voxels whose sampling point (index units of a grid of ``shape``) is ``margin`` inside that grid."""
    bounds = np.reshape(shape, (3,) + (1,) * (points.ndim - 1)) - 1 - margin
    return np.all((points >= margin) & (points <= bounds), axis=0)


# ----------------------------------------------------------------------------------- synthetic grids

FIXED_AFFINE = _affine((20.0, -12.0, 35.0), (1.5, -0.8, 2.2), (10.0, -20.0, 5.0))  # oblique, flipped axis 1
FIXED_SHAPE = (20, 26, 14)


def test_grid_conversion_round_trip_and_lps():
    origin, spacing, direction = itk_grid_from_affine(FIXED_AFFINE)
    np.testing.assert_allclose(spacing, [1.5, 0.8, 2.2])
    np.testing.assert_allclose(origin, [-10.0, 20.0, 5.0])  # RAS (10, -20, 5) is LPS (-10, 20, 5)
    np.testing.assert_allclose(np.linalg.det(direction), -1.0, atol=1e-12)  # the flipped axis stays flipped
    field = ddf_to_itk_field(np.zeros((3, *FIXED_SHAPE)), FIXED_AFFINE)
    np.testing.assert_allclose(affine_from_itk_grid(field), FIXED_AFFINE, atol=1e-12)
    # ITK's own index -> physical point of a voxel is the LPS image of the RAS affine's world point
    index = (3, 7, 11)
    point = np.asarray(field.TransformIndexToPhysicalPoint(index))
    np.testing.assert_allclose(point, LPS @ _world(FIXED_AFFINE, np.array(index, float)), atol=1e-9)


def test_sheared_affine_and_bad_shapes_are_rejected():
    sheared = np.eye(4)
    sheared[0, 1] = 0.5
    with pytest.raises(ValueError, match="sheared"):
        itk_grid_from_affine(sheared)
    with pytest.raises(ValueError, match=r"ddf must be \(ndim, \*spatial\)"):
        ddf_to_itk_field(np.zeros((3, 4, 4)), np.eye(4))
    with pytest.raises(ValueError, match="affine must be 4x4"):
        ddf_to_itk_field(np.zeros((3, 4, 4, 4)), np.eye(3))


def test_exported_transform_maps_voxel_centres_where_our_ddf_does():
    ddf = _smooth_ddf(FIXED_SHAPE, amplitude=3.0)
    transform = ddf_to_itk_transform(ddf, FIXED_AFFINE)
    rng = np.random.default_rng(1)
    for index in rng.integers(0, FIXED_SHAPE, size=(40, 3)):
        fixed_point = LPS @ _world(FIXED_AFFINE, index.astype(float))
        expected = LPS @ _world(FIXED_AFFINE, index + ddf[(slice(None), *index)].astype(float))
        np.testing.assert_allclose(np.asarray(transform.TransformPoint(fixed_point.tolist())), expected, atol=1e-6)


@pytest.mark.parametrize("suffix", (".nii.gz", ".mha", ".h5"))
def test_written_files_read_back_exactly(tmp_path, suffix):
    ddf = _smooth_ddf(FIXED_SHAPE, amplitude=3.0)
    path = tmp_path / f"field{suffix}"
    writer = write_itk_transform if suffix == ".h5" else write_itk_displacement_field
    assert writer(ddf, FIXED_AFFINE, path) == path
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left behind
    back, affine = read_itk_displacement_field(path)
    np.testing.assert_allclose(back, ddf, atol=1e-5)
    np.testing.assert_allclose(affine, FIXED_AFFINE, atol=1e-5)


def test_double_precision_field_reads(tmp_path):
    """ANTs writes float64 vectors (no ITK Python reader is wrapped for them): they read all the same."""
    ddf = _smooth_ddf(FIXED_SHAPE, amplitude=3.0)
    single = nib.load(write_itk_displacement_field(ddf, FIXED_AFFINE, tmp_path / "field.nii.gz"))
    double = nib.Nifti1Image(np.asarray(single.dataobj, dtype=np.float64), single.affine, single.header)
    double.set_data_dtype(np.float64)
    nib.save(double, tmp_path / "double.nii.gz")
    back, affine = read_itk_displacement_field(tmp_path / "double.nii.gz")
    np.testing.assert_allclose(back, ddf, atol=1e-5)
    np.testing.assert_allclose(affine, FIXED_AFFINE, atol=1e-5)
    scalar = tmp_path / "scalar.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), scalar)
    with pytest.raises(ValueError, match="one component per dimension"):
        read_itk_displacement_field(scalar)


def test_2d_field_round_trip(tmp_path):
    affine = np.array([[0.0, -1.2, 30.0], [0.7, 0.0, -4.0], [0.0, 0.0, 1.0]])  # axes swapped and flipped
    ddf = np.random.default_rng(0).normal(size=(2, 9, 7)).astype(np.float32)
    field = ddf_to_itk_field(ddf, affine)
    index = (4, 2)
    moved = LPS[:2, :2] @ (affine[:2, :2] @ (np.array(index) + ddf[:, 4, 2]) + affine[:2, 2])
    transform = _field_transform(field)
    np.testing.assert_allclose(transform.TransformPoint(field.TransformIndexToPhysicalPoint(index)), moved, atol=1e-5)
    back, back_affine = read_itk_displacement_field(write_itk_displacement_field(ddf, affine, tmp_path / "f2.mha"))
    np.testing.assert_allclose(back, ddf, atol=1e-5)
    np.testing.assert_allclose(back_affine, affine, atol=1e-6)


def test_inference_post_transform_writes_both_files_from_the_in_memory_ddf(tmp_path):
    """``SaveITKTransformd`` (config id ``itk_export``) converts the DDF MetaTensor once, per pair folder."""
    ddf = _smooth_ddf(FIXED_SHAPE, amplitude=3.0)
    out = SaveITKTransformd("pred", output_dir=tmp_path)({"pred": MetaTensor(ddf, affine=FIXED_AFFINE), "name": "p1"})
    assert isinstance(out["pred"], MetaTensor)
    assert sorted(p.name for p in (tmp_path / "p1").iterdir()) == ["itk_displacement.nii.gz", "itk_transform.h5"]
    for name in ("itk_displacement.nii.gz", "itk_transform.h5"):
        back, affine = read_itk_displacement_field(tmp_path / "p1" / name)
        np.testing.assert_allclose(back, ddf, atol=1e-5)
        np.testing.assert_allclose(affine, FIXED_AFFINE, atol=1e-5)
    only = SaveITKTransformd("pred", output_dir=tmp_path, field_filename=None)
    only({"pred": MetaTensor(ddf, affine=FIXED_AFFINE), "name": "p2"})
    assert [p.name for p in (tmp_path / "p2").iterdir()] == ["itk_transform.h5"]
    with pytest.raises(ValueError, match="must end with one of"):
        SaveITKTransformd("pred", output_dir=tmp_path, transform_filename="t.txt")
    with pytest.raises(ValueError, match="MetaTensor"):
        SaveITKTransformd("pred", output_dir=tmp_path)({"pred": torch.as_tensor(ddf)})


def test_bad_suffix_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="must end with one of"):
        write_itk_displacement_field(np.zeros((3, 4, 4, 4)), np.eye(4), tmp_path / "field.png")
    with pytest.raises(ValueError, match="must end with one of"):
        write_itk_transform(np.zeros((3, 4, 4, 4)), np.eye(4), tmp_path / "transform.txt")
    with pytest.raises(FileNotFoundError, match="not found"):
        read_itk_displacement_field(tmp_path / "absent.nii.gz")


def _oblique_moving() -> tuple[np.ndarray, np.ndarray]:
    """An analytic image on an oblique moving grid (other rotation, axis 0 flipped, finer voxels) that covers the
    fixed grid's field of view: (image, affine)."""
    moving_affine = _affine((-8.0, 25.0, 10.0), (-1.0, 1.1, 0.9), (0.0, 0.0, 0.0))
    corners = _world(FIXED_AFFINE, np.stack(np.meshgrid(*[[-4, s + 3] for s in FIXED_SHAPE], indexing="ij")).reshape(3, -1))
    corner_idx = np.linalg.solve(moving_affine[:3, :3], corners - moving_affine[:3, 3:])
    low, high = np.floor(corner_idx.min(1)), np.ceil(corner_idx.max(1))
    moving_affine[:3, 3] = moving_affine[:3, :3] @ low
    moving_shape = tuple(int(s) for s in high - low + 1)
    return _analytic(_world(moving_affine, np.indices(moving_shape, dtype=np.float64))), moving_affine


def test_itk_resampling_matches_our_warp_on_oblique_grids():
    """ITK resamples an analytic image stored on an oblique moving grid as our ``Warpd`` does."""
    ddf = _smooth_ddf(FIXED_SHAPE, amplitude=3.0)
    moving, moving_affine = _oblique_moving()

    sample_points = np.indices(FIXED_SHAPE, dtype=np.float64) + ddf
    truth = _analytic(_world(FIXED_AFFINE, sample_points))
    itk_warped = _itk_resample(_itk_image(moving, moving_affine), _itk_image(np.zeros(FIXED_SHAPE), FIXED_AFFINE),
                               ddf_to_itk_transform(ddf, FIXED_AFFINE))
    # ours, as inference does it: Warpd samples the moving image on its own grid through world coordinates
    data = {"moving": MetaTensor(moving[None], affine=moving_affine), "pred": MetaTensor(ddf, affine=FIXED_AFFINE)}
    ours = Warpd("moving", names=["warped"], padding_mode="zeros")(data)["warped"][0]
    ours = np.asarray(ours, dtype=np.float64)
    # and the two-step route (moving resampled onto the fixed grid, then warped there) that inference used
    # before pre-alignment: two interpolations, so it agrees less closely
    on_fixed = resample_to_grid(torch.as_tensor(moving[None]), torch.as_tensor(moving_affine),
                                torch.as_tensor(FIXED_AFFINE), FIXED_SHAPE)
    two_step = Warpd("moving", names=["warped"])({"moving": on_fixed.float(), "pred": torch.as_tensor(ddf)})["warped"][0]
    two_step = two_step.numpy().astype(np.float64)

    inside = _inside(sample_points, FIXED_SHAPE)
    assert inside.mean() > 0.5
    itk_error = np.abs(itk_warped - truth)[inside]
    ours_vs_itk = np.abs(ours - itk_warped)[inside]
    two_step_vs_itk = np.abs(two_step - itk_warped)[inside]
    print(f"oblique grids (image range 3): |ITK - analytic| max {itk_error.max():.2e}; |ours - ITK| max "
          f"{ours_vs_itk.max():.2e}, mean {ours_vs_itk.mean():.2e}; two-step route: max {two_step_vs_itk.max():.2e}")
    assert itk_error.max() < 0.02, f"ITK vs analytic: max {itk_error.max():.4f}"  # linear interpolation error
    assert ours_vs_itk.max() < 1e-4, f"|ours - ITK| max {ours_vs_itk.max():.2e}"  # the same single interpolation
    np.testing.assert_allclose(np.abs(ours - truth)[inside].max(), itk_error.max(), rtol=1e-3)
    assert two_step_vs_itk.max() < 0.03 and two_step_vs_itk.mean() < 0.005
    # a convention error (e.g. no LPS flip, or axes swapped) moves samples by millimetres: far above these bounds
    wrong = _itk_resample(_itk_image(moving, moving_affine), _itk_image(np.zeros(FIXED_SHAPE), FIXED_AFFINE),
                          ddf_to_itk_transform(ddf[[1, 0, 2]], FIXED_AFFINE))
    assert np.abs(wrong - truth)[inside].mean() > 10 * itk_error.mean()


def test_ants_applies_the_export_like_our_warp_on_oblique_grids(tmp_path):
    """ANTs (``antspyx``; CI installs it in an environment of its own) reads both exported files and resamples an
    analytic image stored on an oblique grid as our ``Warpd`` does, as NIfTI files on disk."""
    ants = pytest.importorskip("ants")
    ddf = _smooth_ddf(FIXED_SHAPE, amplitude=3.0)
    moving, moving_affine = _oblique_moving()
    moving_path = save_nifti(moving.astype(np.float32), moving_affine, tmp_path / "moving.nii.gz")
    fixed_path = save_nifti(np.zeros(FIXED_SHAPE, np.float32), FIXED_AFFINE, tmp_path / "fixed.nii.gz")
    data = {"moving": MetaTensor(moving[None], affine=moving_affine), "pred": MetaTensor(ddf, affine=FIXED_AFFINE)}
    ours = np.asarray(Warpd("moving", names=["warped"], padding_mode="zeros")(data)["warped"][0], dtype=np.float64)
    truth = _analytic(_world(FIXED_AFFINE, np.indices(FIXED_SHAPE, dtype=np.float64) + ddf))
    inside = _inside(np.indices(FIXED_SHAPE, dtype=np.float64) + ddf, FIXED_SHAPE)
    fixed, moving_image = ants.image_read(str(fixed_path)), ants.image_read(str(moving_path))
    for path in (write_itk_displacement_field(ddf, FIXED_AFFINE, tmp_path / "warp.nii.gz"),
                 write_itk_transform(ddf, FIXED_AFFINE, tmp_path / "warp.h5")):
        warped = ants.apply_transforms(fixed, moving_image, transformlist=[str(path)], interpolator="linear").numpy()
        diff = np.abs(warped.astype(np.float64) - ours)[inside]
        print(f"ANTs {path.name} on oblique grids (image range 3): |ANTs - ours| max {diff.max():.2e}")
        assert diff.max() < 1e-3, f"ANTs with {path.name}: max |ANTs - ours| = {diff.max():.2e}"
        assert np.abs(warped.astype(np.float64) - truth)[inside].max() < 0.02  # linear interpolation error only
    # without the transform ANTs' output is far from ours: the check can tell a wrong export
    identity = ants.resample_image_to_target(moving_image, fixed, interp_type="linear").numpy()
    assert np.abs(identity.astype(np.float64) - ours)[inside].max() > 0.1


# ----------------------------------------------------------------------------------- real pair (IBSR)


@pytest.fixture(scope="module")
def ibsr_pair(tmp_path_factory):
    """IBSR_01 (fixed) and IBSR_03 (moving) downsampled to 64^3 (3.75 x 3 x 3.75 mm); the moving one stored
    with axis 0 flipped and axes 1 and 2 swapped (same voxel centres, another orientation)."""
    files = [IBSR / f"IBSR_{k}" / f"IBSR_{k}.nii.gz" for k in ("01", "03")]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        pytest.skip(f"missing real data: {missing}")
    folder = tmp_path_factory.mktemp("ibsr")
    paths = {}
    for role, path in zip(("fixed", "moving"), files):
        image = nib.load(str(path))
        data = np.asarray(image.dataobj, dtype=np.float32)[::4, ::2, ::4, 0]
        affine = image.affine @ np.diag([4.0, 2.0, 4.0, 1.0])
        if role == "moving":
            flip = np.eye(4)
            flip[0, 0], flip[0, 3] = -1.0, data.shape[0] - 1  # new index i' = n-1-i
            swap = np.eye(4)[[0, 2, 1, 3]]  # new index (i, k, j)
            data = np.transpose(data[::-1], (0, 2, 1))
            affine = affine @ np.linalg.inv(swap @ flip)
        paths[role] = save_nifti(data, affine, folder / f"{role}.nii.gz")
    return paths


def _ours(pair: dict, ddf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Our warped moving image on the fixed native grid, as inference makes it: ``Warpd`` of the moving image
    as loaded (its own grid, sampled through world coordinates) with the DDF on the fixed grid."""
    keys = ["moving", "fixed"]
    data = EnsureChannelFirstd(keys)(LoadImaged(keys)(dict(pair)))
    affine = data["fixed"].affine
    data["pred"] = MetaTensor(torch.as_tensor(ddf), affine=affine)
    warped = Warpd("moving", names=["warped"], padding_mode="zeros")(data)["warped"][0]
    return np.asarray(warped, dtype=np.float64), np.asarray(affine, dtype=np.float64)


def test_itk_and_ants_apply_the_export_like_our_warp_on_a_real_pair(ibsr_pair, tmp_path):
    fixed_image = nib.load(ibsr_pair["fixed"])
    shape = fixed_image.shape
    ddf = _smooth_ddf(shape, amplitude=3.0, seed=3)  # up to ~10 mm
    ours, affine = _ours(ibsr_pair, ddf)
    np.testing.assert_allclose(affine, fixed_image.affine, atol=1e-5)

    # our inference file, converted by the export entry point
    write_nifti(ddf, affine, tmp_path / "ddf.nii.gz", vector=True)
    written = export_ddf_file(tmp_path / "ddf.nii.gz")
    assert {p.name for p in written.values()} == {"itk_displacement.nii.gz", "itk_transform.h5"}
    np.testing.assert_allclose(read_ddf_nifti(tmp_path / "ddf.nii.gz")[0], ddf)

    moving = itk.imread(ibsr_pair["moving"], itk.F)
    fixed = itk.imread(ibsr_pair["fixed"], itk.F)
    inside = _inside(np.indices(shape, dtype=np.float64) + ddf, shape)
    scale = float(np.percentile(ours, 99))
    results = {}
    transform = itk.transformread(str(written["transform"]))[0]
    results["itk h5"] = _itk_resample(moving, fixed, transform)
    results["itk field"] = _itk_resample(moving, fixed, _field_transform(itk.imread(str(written["field"]))))
    for name, warped in results.items():
        diff = np.abs(warped - ours)[inside] / scale
        print(f"{name}: |ITK - ours| / intensity range: max {diff.max():.2e}, mean {diff.mean():.2e}")
        assert diff.max() < 1e-3, f"{name}: max |ITK - ours| = {diff.max():.2e} of the intensity range"
    # the DDF does matter: without it ITK's output differs from ours far more
    identity = _itk_resample(moving, fixed, itk.IdentityTransform[itk.D, 3].New())
    assert (np.abs(identity - ours)[inside] / scale).max() > 0.5


def test_ants_applies_the_export_like_our_warp_on_a_real_pair(ibsr_pair, tmp_path):
    ants = pytest.importorskip("ants")
    shape = nib.load(ibsr_pair["fixed"]).shape
    ddf = _smooth_ddf(shape, amplitude=3.0, seed=3)
    ours, affine = _ours(ibsr_pair, ddf)
    field = write_itk_displacement_field(ddf, affine, tmp_path / "warp.nii.gz")
    transform = write_itk_transform(ddf, affine, tmp_path / "warp.h5")
    fixed, moving = ants.image_read(ibsr_pair["fixed"]), ants.image_read(ibsr_pair["moving"])
    inside = _inside(np.indices(shape, dtype=np.float64) + ddf, shape)
    scale = float(np.percentile(ours, 99))
    for path in (field, transform):
        warped = ants.apply_transforms(fixed, moving, transformlist=[str(path)], interpolator="linear").numpy()
        diff = np.abs(warped.astype(np.float64) - ours)[inside] / scale
        print(f"ANTs {path.name}: |ANTs - ours| / intensity range: max {diff.max():.2e}, mean {diff.mean():.2e}")
        assert diff.max() < 1e-3, f"ANTs with {path.name}: max |ANTs - ours| = {diff.max():.2e} of the intensity range"
