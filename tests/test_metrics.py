"""Tests for bundle.metrics and for the MONAI segmentation metrics used in evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.metrics import DiceMetric, HausdorffDistanceMetric

from bundle.metrics import (
    Folding,
    FoldingMetric,
    LogJacobianStd,
    LogJacobianStdMetric,
    TREMetric,
    jacobian_determinant,
    target_registration_error,
)

SHEAR_SCALE_2D = [[1.2, 0.3], [0.0, 0.8]]
SHEAR_SCALE_3D = [[1.1, 0.2, 0.0], [0.0, 0.9, 0.4], [0.1, 0.0, 1.3]]


def affine_ddf(matrix, shape: tuple[int, ...]) -> torch.Tensor:
    """Return the (1, ndim, *shape) voxel-unit DDF of x -> M x, i.e. ddf(x) = (M - I) x."""
    m = torch.as_tensor(matrix, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij"))
    ddf = torch.einsum("kj,j...->k...", m - torch.eye(len(shape), dtype=torch.float64), grid)
    return ddf[None]


def folded_ddf() -> torch.Tensor:
    """3D DDF (6, 5, 4) mapping x0 -> -x0 for x1 < 2 (det J = -1 there, 2/5 of voxels) and identity elsewhere."""
    shape = (6, 5, 4)
    ddf = torch.zeros(1, 3, *shape, dtype=torch.float64)
    x0 = torch.arange(shape[0], dtype=torch.float64)[:, None, None].expand(shape)
    ddf[0, 0, :, :2] = -2.0 * x0[:, :2]
    return ddf


def test_jacobian_zero_field_is_one():
    for shape in [(2, 2, 7, 9), (2, 3, 4, 5, 6)]:
        det = jacobian_determinant(torch.zeros(shape))
        assert det.shape == (shape[0], 1, *shape[2:])
        assert torch.allclose(det, torch.ones_like(det))


@pytest.mark.parametrize(
    "matrix,shape",
    [
        ([[1.5, 0.0], [0.0, 0.5]], (7, 9)),
        (SHEAR_SCALE_2D, (7, 9)),
        ([[1.0, 0.0, 0.0], [0.0, 1.0, 0.7], [0.0, 0.0, 1.0]], (5, 6, 7)),
        (SHEAR_SCALE_3D, (5, 6, 7)),
    ],
)
def test_jacobian_affine_field_equals_det_m(matrix, shape):
    det = jacobian_determinant(affine_ddf(matrix, shape))
    expected = torch.linalg.det(torch.as_tensor(matrix, dtype=torch.float64))
    assert torch.allclose(det, expected.expand_as(det))


def test_jacobian_is_differentiable():
    ddf = affine_ddf(SHEAR_SCALE_2D, (5, 5)).requires_grad_()
    jacobian_determinant(ddf).sum().backward()
    assert ddf.grad is not None and torch.isfinite(ddf.grad).all()


@pytest.mark.parametrize(
    "bad", [torch.zeros(1, 3, 8, 8), torch.zeros(1, 2, 8, 8, 8), torch.zeros(2, 8, 8), torch.zeros(1, 2, 1, 8)]
)
def test_jacobian_bad_input(bad):
    with pytest.raises(ValueError, match="ddf"):
        jacobian_determinant(bad)


def test_folding_metric():
    metric = FoldingMetric(reduction="none")
    ddf = torch.cat([folded_ddf(), torch.zeros_like(folded_ddf())])
    assert torch.allclose(metric(y_pred=ddf), torch.tensor([[40.0], [0.0]]))
    metric(y_pred=[folded_ddf()[0]])  # list of channel-first fields
    assert metric.aggregate().shape == (3, 1)
    assert metric.aggregate("mean").item() == pytest.approx(80.0 / 3)
    assert FoldingMetric()(y_pred=affine_ddf(SHEAR_SCALE_3D, (5, 6, 7))).item() == 0.0


def test_log_jacobian_std_metric():
    metric = LogJacobianStdMetric()
    assert metric(y_pred=affine_ddf(SHEAR_SCALE_3D, (5, 6, 7))).item() == pytest.approx(0.0, abs=1e-6)
    assert metric(y_pred=torch.zeros(1, 2, 6, 6)).item() == 0.0
    # folded field: det is -1 on 40% of voxels (clipped to 1e-9) and 1 elsewhere -> |log 1e-9| * sqrt(p (1 - p))
    expected = abs(math.log(1e-9)) * math.sqrt(0.4 * 0.6)
    assert LogJacobianStdMetric()(y_pred=folded_ddf()).item() == pytest.approx(expected, rel=1e-5)
    assert metric.aggregate().item() == 0.0


def test_tre_zero_field():
    points = np.array([[1.0, 2.0, 3.0], [4.5, 0.5, 2.0]])
    tre = target_registration_error(points, points, torch.zeros(3, 6, 6, 6), np.diag([1.5, 1.0, 1.0, 1.0]))
    assert torch.allclose(tre, torch.zeros(2, dtype=torch.float64))


def test_tre_translation_with_spacing():
    affine = np.diag([1.5, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-4.0, 2.0, 0.5]
    ddf = torch.zeros(3, 8, 6, 5)
    ddf[0] = 2.0  # 2 voxels along axis 0 = 3 mm along x
    fixed = np.array([[0.5, 3.0, 1.5], [2.2, 4.1, 3.3], [-1.0, 6.0, 4.0]])
    moving = fixed + [3.0, 0.0, 0.0]
    assert torch.allclose(target_registration_error(fixed, moving, ddf, affine), torch.zeros(3, dtype=torch.float64))
    mismatch = moving + [[3.0, 4.0, 0.0], [0.0, 0.0, -2.0], [1.0, 0.0, 0.0]]
    tre = target_registration_error(fixed, mismatch, ddf, affine)
    assert torch.allclose(tre, torch.tensor([5.0, 2.0, 1.0], dtype=torch.float64))


def test_tre_interpolates_affine_field_and_moving_affine():
    ddf = affine_ddf(SHEAR_SCALE_2D, (9, 9))[0]
    fixed = np.array([[1.3, 2.7], [6.25, 4.5]])
    mapped = fixed @ np.array(SHEAR_SCALE_2D).T  # identity affine: linear interpolation is exact
    assert torch.allclose(target_registration_error(fixed, mapped, ddf, np.eye(3)), torch.zeros(2, dtype=torch.float64))
    moving_affine = np.diag([2.0, 2.0, 1.0])
    tre = target_registration_error(fixed, 2.0 * mapped, ddf, np.eye(3), moving_affine)
    assert torch.allclose(tre, torch.zeros(2, dtype=torch.float64))


def test_tre_bad_input():
    ddf = torch.zeros(3, 4, 4, 4)
    with pytest.raises(ValueError, match="points"):
        target_registration_error(np.zeros((3, 3)), np.zeros((2, 3)), ddf, np.eye(4))
    with pytest.raises(ValueError, match="points"):
        target_registration_error(np.zeros((3, 2)), np.zeros((3, 2)), ddf, np.eye(4))
    with pytest.raises(ValueError, match="ddf"):
        target_registration_error(np.zeros((3, 3)), np.zeros((3, 3)), torch.zeros(2, 4, 4, 4), np.eye(4))
    with pytest.raises(ValueError, match="fixed_affine"):
        target_registration_error(np.zeros((3, 3)), np.zeros((3, 3)), ddf, np.eye(3))


def test_tre_metric():
    metric = TREMetric()
    ddf = torch.zeros(2, 3, 4, 4, 4)
    fixed = [np.zeros((2, 3)), np.ones((3, 3))]
    moving = [np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]]), np.ones((3, 3)) + [0.0, 0.0, 2.0]]
    out = metric(y_pred=ddf, fixed_points=fixed, moving_points=moving, fixed_affine=[np.eye(4), np.eye(4)])
    assert torch.allclose(out, torch.tensor([[2.5], [2.0]]))
    assert metric.aggregate().item() == pytest.approx(2.25)
    with pytest.raises(ValueError, match="items"):
        metric(y_pred=ddf, fixed_points=fixed[:1], moving_points=moving, fixed_affine=[np.eye(4), np.eye(4)])


def test_handlers_with_ignite_engine():
    batches = [[folded_ddf()[0], torch.zeros(3, 6, 5, 4)], [folded_ddf()[0]]]

    def step(engine, batch):
        return [{"pred": ddf, "other": 0} for ddf in batch]

    engine = Engine(step)
    Folding().attach(engine, "folding")
    LogJacobianStd().attach(engine, "sdlogj")
    Folding(output_transform=lambda out: ([d["pred"] for d in out], None), save_details=False).attach(engine, "f2")
    engine.run(batches, max_epochs=1)
    assert engine.state.metrics["folding"] == pytest.approx(80.0 / 3)
    assert engine.state.metrics["f2"] == pytest.approx(80.0 / 3)
    sdlogj = abs(math.log(1e-9)) * math.sqrt(0.4 * 0.6)
    assert engine.state.metrics["sdlogj"] == pytest.approx(2.0 / 3 * sdlogj, rel=1e-5)
    assert engine.state.metric_details["folding"].shape == (3, 1)


def test_handler_with_batch_dict_output():
    engine = Engine(lambda engine, batch: {"ddf": batch})
    Folding(ddf_key="ddf").attach(engine, "folding")
    engine.run([folded_ddf(), torch.zeros(2, 3, 6, 5, 4)], max_epochs=1)
    assert engine.state.metrics["folding"] == pytest.approx(40.0 / 3)


def shifted_cubes(size: int, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (1, 1, 24, 24, 24) binary cubes of side ``size``, the second shifted by ``shift`` voxels along axis 0."""
    a, b = torch.zeros(2, 1, 1, 24, 24, 24)
    a[..., 4 : 4 + size, 4 : 4 + size, 4 : 4 + size] = 1
    b[..., 4 + shift : 4 + shift + size, 4 : 4 + size, 4 : 4 + size] = 1
    return a, b


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("size,shift", [(10, 1), (10, 2), (8, 3)])
def test_monai_dice_and_hd95_on_shifted_cubes(size, shift):
    a, b = shifted_cubes(size, shift)
    dice = DiceMetric(include_background=True)(a, b)
    assert dice.item() == pytest.approx((size - shift) / size, rel=1e-6)
    # single-channel binary masks need include_background=True (MONAI's default drops channel 0)
    hd95 = HausdorffDistanceMetric(include_background=True, percentile=95)
    assert hd95(a, b).item() == pytest.approx(shift)
    assert hd95(a, b, spacing=(1.5, 1.0, 1.0)).item() == pytest.approx(1.5 * shift)


def test_registration_objective_is_minus_similarity_plus_weighted_smoothness_per_pair():
    from monai.losses import DiffusionLoss

    from bundle.metrics import RegistrationObjective, RegistrationObjectiveMetric

    torch.manual_seed(0)
    fixed = torch.rand(2, 1, 8, 8, 8)
    warped = torch.stack([fixed[0], torch.rand(1, 8, 8, 8)])  # pair 0 aligned, pair 1 not
    ddf = torch.stack([torch.zeros(3, 8, 8, 8), torch.randn(3, 8, 8, 8)])
    metric = RegistrationObjectiveMetric(2.0, 3, "mse")
    values = metric(ddf, torch.cat([warped, fixed], 1)).flatten()
    assert values[0] == pytest.approx(0.0, abs=1e-6)  # identical images, zero field: the best possible
    expected = torch.mean((warped[1] - fixed[1]) ** 2) + 2.0 * DiffusionLoss()(ddf[1:])
    assert values[1] == pytest.approx(-float(expected), rel=1e-5)
    rougher = RegistrationObjectiveMetric(20.0, 3, "mse")(ddf, torch.cat([warped, fixed], 1)).flatten()
    assert rougher[1] < values[1]  # a larger λ penalises the same field more
    with pytest.raises(ValueError, match="cat\\(\\[warped, fixed\\]\\)"):
        metric(ddf, fixed)
    with pytest.raises(ValueError, match="smoothness_weight"):
        RegistrationObjectiveMetric(-1.0)

    def step(engine, batch):  # a decollated evaluator output: one dict per pair
        return [{"pred": ddf[i], "warped": warped[i], "fixed_image": fixed[i]} for i in range(2)]

    engine = Engine(step)
    RegistrationObjective(2.0, 3, "mse").attach(engine, "objective")
    engine.run([0], max_epochs=1)
    assert engine.state.metrics["objective"] == pytest.approx(float(values.mean()), rel=1e-5)
