"""Refinement of the composed transform on the fixed native grid (refine_native, RefineNatived, the config ids)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from bundle.engines.native_refinement import (
    foreground_box,
    refine_native,
    robust_normalise,
)
from bundle.spatial import jacobian_determinant
from bundle.transforms import RefineNatived

REPO = Path(__file__).resolve().parents[1]


def _blobs(shape=(28, 28, 28)):
    """Three smooth blobs of different brightness (a structure that local NCC can lock on to) on a zero background."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij"))
    image = torch.zeros(shape)
    for centre, width, value in (((10, 12, 14), 12.0, 1.0), ((18, 15, 12), 8.0, 0.6), ((14, 9, 18), 6.0, 0.8)):
        c = torch.tensor(centre, dtype=torch.float32).view(3, 1, 1, 1)
        image += value * torch.exp(-((grid - c) ** 2).sum(0) / width)
    return image[None]


def _ncc(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def _warp_same_grid(moving, ddf):
    from bundle.spatial import sample_field
    from bundle.spatial.grid import index_grid

    return sample_field(moving, index_grid(ddf.shape[1:]) + ddf, padding_mode="zeros")


@pytest.mark.parametrize("residual", ["ddf", "svf"])
def test_a_known_shift_is_recovered_coarse_to_fine(residual):
    """moving(y) = fixed(y - 2 e0): the pull-back DDF that registers it is +2 voxels along axis 0."""
    torch.manual_seed(0)
    fixed = _blobs()
    moving = torch.roll(fixed, shifts=2, dims=1)
    ddf = torch.zeros(3, *fixed.shape[1:])
    refined = refine_native(moving, fixed, ddf, torch.eye(4), levels=[(2, 30), (1, 30)], learning_rate=0.2,
                            smoothness=1.0, residual=residual, kernel_size=5)
    assert refined.shape == ddf.shape and refined.dtype == ddf.dtype
    inside = fixed[0] > 0.3
    assert abs(float(refined[0][inside].mean()) - 2.0) < 0.5, float(refined[0][inside].mean())
    assert float(refined[1:][:, inside].mean(1).abs().max()) < 0.3  # no drift across the shift (the aperture
    assert float(refined[1:][:, inside].abs().mean()) < 0.6  # problem leaves some voxel-wise wobble along flat blobs)
    assert _ncc(_warp_same_grid(moving, refined), fixed) > _ncc(moving, fixed) + 0.05
    folded = float((jacobian_determinant(refined[None]) <= 0).float().mean())
    assert folded == 0.0 if residual == "svf" else folded < 0.005  # exp(v) is invertible; a free residual may fold


def test_the_moving_image_may_lie_on_another_grid():
    """The moving image at twice the fixed voxel size: the map between the grids is honoured, and the refined DDF is
    still in fixed voxels (a shift of 2 moving voxels is 4 fixed voxels)."""
    fixed = _blobs((32, 32, 32))
    coarse = fixed[:, ::2, ::2, ::2].clone()  # the same anatomy on a grid of 2x voxels: moving voxel = fixed voxel / 2
    moving = torch.roll(coarse, shifts=2, dims=1)
    index_map = torch.diag(torch.tensor([0.5, 0.5, 0.5, 1.0], dtype=torch.float64))
    refined = refine_native(moving, fixed, torch.zeros(3, 32, 32, 32), index_map, levels=[(2, 30), (1, 30)],
                            learning_rate=0.2, smoothness=1.0, residual="svf")
    inside = fixed[0] > 0.3
    assert abs(float(refined[0][inside].mean()) - 4.0) < 0.4, float(refined[0][inside].mean())


def test_outside_the_foreground_box_the_field_is_left_as_it_was():
    fixed = torch.zeros(1, 40, 24, 24)
    fixed[:, 10:22, 6:18, 6:18] = _blobs((12, 12, 12))
    moving = torch.roll(fixed, shifts=1, dims=1)
    start = torch.full((3, 40, 24, 24), 0.25)
    refined = refine_native(moving, fixed, start, torch.eye(4), levels=[(1, 5)], margin=2)
    box = foreground_box(robust_normalise(fixed), 2)
    outside = torch.ones(40, 24, 24, dtype=torch.bool)
    outside[box] = False
    assert outside.any()
    torch.testing.assert_close(refined[:, outside], start[:, outside])
    assert not torch.equal(refined[(slice(None), *box)], start[(slice(None), *box)])


def test_no_steps_is_the_identity_and_bad_options_are_refused():
    fixed = _blobs((12, 12, 12))
    ddf = torch.randn(3, 12, 12, 12)
    assert refine_native(fixed, fixed, ddf, torch.eye(4), levels=[(2, 0), (1, 0)]) is ddf
    for bad in ({"levels": [(0, 5)]}, {"levels": [(1, -1)]}, {"residual": "bspline"}, {"learning_rate": 0.0},
                {"smoothness": -1.0}, {"kernel_size": 4}):
        with pytest.raises(ValueError):
            refine_native(fixed, fixed, ddf, torch.eye(4), **{"levels": [(1, 1)], **bad})
    with pytest.raises(ValueError, match="grid"):
        refine_native(fixed, fixed[:, :10], ddf, torch.eye(4), levels=[(1, 1)])


def test_robust_normalise_is_invariant_to_intensity_scale_and_offset():
    image = _blobs((16, 16, 16))
    torch.testing.assert_close(robust_normalise(image), robust_normalise(300.0 * image + 40.0), atol=1e-4, rtol=0)
    out = robust_normalise(image)
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0


def _meta(values, affine):
    return MetaTensor(values, affine=torch.as_tensor(affine, dtype=torch.float64))


def test_the_transform_refines_the_composed_field_and_checks_its_grid():
    fixed = _blobs()
    moving = torch.roll(fixed, shifts=2, dims=1)
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    data = {"pred": _meta(torch.zeros(3, *fixed.shape[1:]), affine), "moving_native": _meta(moving, affine),
            "fixed_native": _meta(fixed, affine)}
    out = RefineNatived(levels=[(2, 30), (1, 30)], learning_rate=0.2, smoothness=1.0, residual="svf")(data)
    assert isinstance(out["pred"], MetaTensor) and np.allclose(out["pred"].affine, affine)
    assert float(out["pred"][0][fixed[0] > 0.3].mean()) > 1.5
    assert RefineNatived(levels=[])(data)["pred"] is data["pred"]  # disabled: the field as it was
    shifted = dict(data, fixed_native=_meta(fixed, np.diag([1.0, 1.0, 1.0, 1.0])))
    with pytest.raises(ValueError, match="not on the grid"):
        RefineNatived(levels=[(1, 1)])(shifted)
    with pytest.raises(ValueError):
        RefineNatived(levels=[(1, 1)], residual="spline")


def _dice(a, b, labels=(1, 2)):
    return float(np.mean([2 * ((a == c) & (b == c)).sum() / max((a == c).sum() + (b == c).sum(), 1) for c in labels]))


def test_the_inference_config_refines_on_the_native_grid(tmp_path):
    """The bundle's own inference config on a demo pair: with native_refinement_levels the warped labels overlap the
    fixed labels more than without, every output is on the fixed grid, and the field does not fold."""
    from bundle.configs import read_config
    from bundle.data.demo import build_demo_dataset

    build_demo_dataset(str(tmp_path / "demo"), spacing=3.0)
    pair = next(p for p in json.loads((tmp_path / "demo" / "datalist.json").read_text())["testing"]
                if "lesion" not in p["name"])
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"testing": [{k: str(tmp_path / "demo" / v) if k != "name" else v
                                                 for k, v in pair.items() if k in ("moving", "fixed", "moving_label", "name")}]}))
    fixed_label = np.asarray(nib.load(tmp_path / "demo" / pair["fixed_label"]).dataobj)
    dice = {}
    for name, levels in (("plain", []), ("refined", [[2, 20], [1, 10]])):
        parser = read_config(REPO, ["inference.json"], {
            "datalist": str(datalist), "output_dir": str(tmp_path / name), "device": "$torch.device('cpu')",
            "prealign": "none", "native_refinement_levels": levels, "outputs": ["warped", "ddf", "jacobian", "labels"]})
        parser.get_parsed_content("evaluator").run()
        folder = tmp_path / name / pair["name"]
        warped = np.asarray(nib.load(folder / "warped_label.nii.gz").dataobj)
        assert warped.shape == fixed_label.shape
        dice[name] = _dice(warped, fixed_label)
        jacobian = np.asarray(nib.load(folder / "jacobian_det.nii.gz").dataobj)
        assert (jacobian <= 0).mean() < 0.001
    assert dice["refined"] > dice["plain"] + 0.005, dice


def test_two_dimensional_pairs_and_several_channels():
    """2D images (a shift recovered) and 2-channel images (each channel normalised, the NCC over both)."""
    blob = _blobs((28, 28, 28))[:, :, :, 14]  # (1, 28, 28)
    moving = torch.roll(blob, shifts=2, dims=1)
    refined = refine_native(moving, blob, torch.zeros(2, 28, 28), torch.eye(3), levels=[(2, 30), (1, 30)],
                            learning_rate=0.2, smoothness=1.0, residual="svf")
    assert refined.shape == (2, 28, 28)
    assert abs(float(refined[0][blob[0] > 0.3].mean()) - 2.0) < 0.5
    fixed = torch.cat([_blobs((20, 20, 20)), 1.0 - _blobs((20, 20, 20))])
    out = refine_native(torch.roll(fixed, 1, dims=1), fixed, torch.zeros(3, 20, 20, 20), torch.eye(4), levels=[(1, 5)])
    assert out.shape == (3, 20, 20, 20) and torch.isfinite(out).all()


@pytest.mark.parametrize("residual", ["ddf", "svf"])
def test_a_step_samples_where_the_moved_field_points(residual):
    """The per-step grid (constant terms computed once per level) equals the moving grid of the level's field
    ``_moved(parameter, ...)``, written out term by term, on a level coarser than the native grid."""
    from bundle.engines.native_refinement import _Exponential, _moved, _MovingGrid, _StepGrid

    torch.manual_seed(0)
    shape, moving_shape = [9, 7, 8], [12, 10, 11]
    level_map = torch.tensor([[1.9, 0.1, 0.0, 0.5], [0.0, 2.1, -0.2, 1.0], [0.1, 0.0, 2.0, -0.3], [0, 0, 0, 1]],
                             dtype=torch.float64)
    linear = torch.tensor([[0.95, 0.05, 0.0], [0.0, 1.05, -0.1], [0.05, 0.0, 1.0]])
    vectors = torch.tensor([2.1, 1.8, 1.95]).view(1, 3, 1, 1, 1)
    start, taper = torch.randn(1, 3, *shape), torch.rand(1, 1, *shape)
    integrate = None if residual == "ddf" else _Exponential([5, 4, 4], shape, 7)
    parameter = 0.5 * torch.randn(1, 3, *(shape if residual == "ddf" else [5, 4, 4]))
    moving_grid = _MovingGrid(level_map, shape, moving_shape, linear)

    expected = moving_grid(_moved(parameter, start, taper, vectors, integrate))
    assert torch.allclose(_StepGrid(moving_grid, start, taper, vectors, integrate)(parameter), expected, atol=1e-5)
