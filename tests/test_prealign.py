"""Rigid / affine pre-alignment (ITK), its dict transform, and its composition with the DDF."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from bundle.alignment import itk_affine_register
from bundle.spatial import index_grid
from bundle.transforms import ComposePreAlignmentd, PreAlignd, Warpd
from tests.conftest import SHARED_DATA


def _blob_image(shape=(40, 44, 36)):
    """An asymmetric smooth phantom (ellipsoid + off-centre ball), so rotations and shears are identifiable."""
    grid = index_grid(shape, dtype=torch.float64).numpy()
    c = np.array(shape, dtype=float).reshape(3, 1, 1, 1) / 2
    r = ((grid - c) / (np.array([14, 16, 11]).reshape(3, 1, 1, 1))) ** 2
    body = 1.0 / (1.0 + np.exp((np.sqrt(r.sum(0)) - 1.0) * 12))
    ball = np.exp(-(((grid - c - np.array([6, -5, 3]).reshape(3, 1, 1, 1)) ** 2).sum(0)) / 12.0)
    return (body + 1.5 * ball).astype(np.float32)


def _rotation(deg_z: float, deg_x: float) -> np.ndarray:
    a, b = np.deg2rad(deg_z), np.deg2rad(deg_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


@pytest.fixture(scope="module")
def phantom_pair():
    """The same phantom on two grids: the moving grid is rotated, shifted, flipped and anisotropic."""
    image = _blob_image()
    fixed_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    fixed_affine[:3, 3] = [-40, -44, -36]
    # world truth: moving world point = T fixed world point; store the moving image so that this holds
    truth = np.eye(4)
    truth[:3, :3] = _rotation(10, -6)
    truth[:3, 3] = [5.0, -4.0, 3.0]
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])  # the moving voxels are stored with the first axis reversed
    flip[0, 3] = image.shape[0] - 1
    moving_affine = truth @ fixed_affine @ flip  # so that moving(M^-1 T F v) = image(v)
    moving = image[::-1].copy()
    return image, fixed_affine, moving, moving_affine, truth


def test_register_recovers_rigid_and_flip(phantom_pair):
    fixed, fixed_affine, moving, moving_affine, truth = phantom_pair
    for transform, tolerance in (("rigid", 1.0), ("affine", 2.0)):  # mm; voxels are 2 mm, points up to 35 mm out
        matrix = itk_affine_register(moving, moving_affine, fixed, fixed_affine, transform, working_spacing_mm=None)
        pts = np.array([[0, 0, 0, 1], [20, -10, 15, 1], [-25, 20, -10, 1]], dtype=float).T
        err = np.linalg.norm((matrix @ pts - truth @ pts)[:3], axis=0)
        assert err.max() < tolerance, (transform, err)


def test_none_is_identity():
    a = np.random.rand(8, 8, 8).astype(np.float32)
    np.testing.assert_array_equal(itk_affine_register(a, np.eye(4), a, np.eye(4), "none"), np.eye(4))


def test_bad_arguments():
    a = np.zeros((8, 8, 8), np.float32)
    with pytest.raises(ValueError, match="transform must be one of"):
        itk_affine_register(a, np.eye(4), a, np.eye(4), "bspline")
    with pytest.raises(ValueError, match="differ in length"):
        itk_affine_register(a, np.eye(4), a, np.eye(4), "rigid", shrink_factors=(2, 1), smoothing_sigmas_mm=(1,))
    with pytest.raises(ValueError, match="singular"):
        r = np.random.rand(8, 8, 8).astype(np.float32)
        itk_affine_register(r, np.zeros((4, 4)), r, np.eye(4), "rigid")
    with pytest.raises(ValueError, match="transform must be one of"):
        PreAlignd("moving", transform="elastic")
    with pytest.raises(ValueError, match="fixed image is constant"):
        itk_affine_register(np.random.rand(8, 8, 8), np.eye(4), a, np.eye(4), "rigid")
    constant = MetaTensor(torch.zeros(1, 8, 8, 8), affine=torch.eye(4), meta={"filename_or_obj": "empty.nii.gz"})
    with pytest.raises(ValueError, match="pre-alignment of empty.nii.gz to .*constant"):
        PreAlignd("moving", transform="rigid")({"moving": constant, "fixed": MetaTensor(torch.rand(1, 8, 8, 8))})
    with pytest.raises(ValueError, match="MetaTensor"):
        PreAlignd("moving", transform="none")({"moving": torch.zeros(1, 4, 4, 4), "fixed": torch.zeros(1, 4, 4, 4)})


def test_prealignd_then_compose_warps_like_the_fixed(phantom_pair):
    """Pre-align, pretend the network predicts zero, compose: the raw moving warped through it ≈ fixed."""
    fixed, fixed_affine, moving, moving_affine, _ = phantom_pair
    data = {
        "fixed": MetaTensor(torch.as_tensor(fixed)[None], affine=torch.as_tensor(fixed_affine)),
        "moving": MetaTensor(torch.as_tensor(moving)[None], affine=torch.as_tensor(moving_affine)),
        "moving_label": MetaTensor(torch.as_tensor(moving > 0.5).to(torch.uint8)[None], affine=torch.as_tensor(moving_affine)),
    }
    data["moving_native"] = data["moving"]
    out = PreAlignd(["moving", "moving_label"], transform="rigid", mode=["bilinear", "nearest"],
                    register_kwargs={"working_spacing_mm": None})(data)
    assert out["moving"].shape == out["fixed"].shape and out["moving_label"].dtype == torch.uint8
    assert torch.allclose(out["moving"].affine, out["fixed"].affine)
    inner = slice(6, -6)
    err_aligned = (out["moving"][0] - out["fixed"][0])[inner, inner, inner].abs().mean()
    assert err_aligned < 0.05
    # a zero network DDF on the fixed grid, composed with the matrix, warps the raw moving image the same way
    out["pred"] = MetaTensor(torch.zeros(3, *fixed.shape), affine=torch.as_tensor(fixed_affine))
    out = ComposePreAlignmentd("pred")(out)
    out = Warpd(["moving_native"], names=["warped"], padding_mode="zeros")(out)
    assert torch.allclose(out["warped"].affine.double(), torch.as_tensor(fixed_affine))
    diff = (out["warped"][0] - out["moving"][0])[inner, inner, inner].abs().max()
    assert diff < 1e-3


def test_compose_adds_the_network_ddf():
    """With T = a pure shift of 3 mm along the first axis (2 mm voxels), ddf = u + 1.5 voxels on axis 0."""
    affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64))
    matrix = torch.eye(4, dtype=torch.float64)
    matrix[0, 3] = 3.0
    u = torch.randn(3, 5, 6, 7) * 0.3
    out = ComposePreAlignmentd("pred")({"pred": MetaTensor(u.clone(), affine=affine), "prealign_matrix": matrix})["pred"]
    expected = u.clone()
    expected[0] += 1.5
    assert torch.allclose(out.as_tensor(), expected, atol=1e-5)


def test_warpd_on_another_grid_matches_resample_then_warp():
    """World-coordinate warping of a source on another grid equals warping it after resampling it first."""
    from bundle.spatial import resample_to_grid

    src = torch.rand(1, 12, 10, 14)
    src_affine = torch.tensor([[0, -1.5, 0, 8], [1.0, 0, 0, -5], [0, 0, 1.2, 2], [0, 0, 0, 1]], dtype=torch.float64)
    ddf_affine = torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    ddf_affine[:3, 3] = torch.tensor([-2.0, 1.0, 3.0])
    ddf = torch.zeros(3, 6, 7, 8)
    ddf[0] = 0.7
    data = {"src": MetaTensor(src, affine=src_affine), "pred": MetaTensor(ddf, affine=ddf_affine)}
    direct = Warpd("src", names=["w"], padding_mode="zeros")(data)["w"]
    shifted = ddf_affine.clone()
    shifted[0, 3] += 0.7  # the constant DDF is a shift of the sampling grid
    expected = resample_to_grid(src, src_affine, shifted, (6, 7, 8), padding_mode="zeros")
    assert direct.shape == (1, 6, 7, 8)
    assert torch.allclose(direct.as_tensor(), expected, atol=1e-5)


@pytest.mark.skipif(not (SHARED_DATA / "ibsr" / "IBSR_01").is_dir(), reason="needs ../shared/data/ibsr")
@pytest.mark.parametrize("method", ["itk", "torch"])
def test_affine_improves_ibsr_overlap(method):
    """Real inter-subject pair in different native spaces: affine pre-alignment raises tissue Dice (ITK's mutual
    information and the torch NCC version)."""
    import nibabel as nib

    def load(i):
        img = nib.load(SHARED_DATA / "ibsr" / f"IBSR_{i}" / f"IBSR_{i}.nii.gz")
        seg = nib.load(SHARED_DATA / "ibsr" / f"IBSR_{i}" / f"IBSR_{i}_seg.nii.gz")
        return (MetaTensor(torch.as_tensor(np.asarray(img.dataobj)[..., 0], dtype=torch.float32)[None], affine=torch.as_tensor(img.affine)),
                MetaTensor(torch.as_tensor(np.asarray(seg.dataobj)[..., 0].astype(np.int16))[None], affine=torch.as_tensor(seg.affine)))

    (m, ml), (f, fl) = load("01"), load("03")

    def dice(a, b):
        return np.mean([2 * ((a == k) & (b == k)).sum() / ((a == k).sum() + (b == k).sum()) for k in (1, 2, 3)])

    scores = {}
    for transform in ("none", "affine"):
        out = PreAlignd(["moving", "moving_label"], transform=transform, mode=["bilinear", "nearest"], method=method)(
            {"moving": m, "moving_label": ml, "fixed": f}
        )
        scores[transform] = dice(out["moving_label"][0].numpy(), fl[0].numpy())
    print(f"{method}: Dice {scores}")
    assert scores["affine"] > scores["none"] + 0.04, scores


@pytest.mark.skipif(not (SHARED_DATA / "ibsr" / "IBSR_01").is_dir(), reason="needs ../shared/data/ibsr")
def test_affine_is_reproducible_with_several_threads():
    """Seeded sampling and a single-threaded metric: the same pair gives the same matrix on every call (with
    ITK's default multi-threaded Mattes metric, repeats on 2 threads differed by up to 0.13 mm)."""
    import itk
    import nibabel as nib

    def load(i):
        img = nib.load(SHARED_DATA / "ibsr" / f"IBSR_{i}" / f"IBSR_{i}.nii.gz")
        return np.asarray(img.dataobj)[..., 0].astype(np.float32), img.affine

    (m, ma), (f, fa) = load("01"), load("03")
    threads = itk.MultiThreaderBase.GetGlobalDefaultNumberOfThreads()
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(2)
    try:
        first, second = (itk_affine_register(m, ma, f, fa) for _ in range(2))
    finally:
        itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(threads)
    np.testing.assert_array_equal(first, second)


@pytest.mark.skipif(not (SHARED_DATA / "tumor_progression" / "PGBM-001").is_dir(), reason="needs ../shared/data/tumor_progression")
def test_rigid_aligns_longitudinal_tumour_scans():
    """Two time points of one glioblastoma patient (6.5 mm slices, not skull-stripped, different grids):
    the rigid pre-alignment raises the global correlation of the T1 post-contrast images."""
    from monai.transforms import EnsureChannelFirstd, LoadImaged

    patient = SHARED_DATA / "tumor_progression" / "PGBM-001"
    paths = {"moving": next(patient.glob("tp0_*")) / "T1post.nii.gz", "fixed": next(patient.glob("tp1_*")) / "T1post.nii.gz"}
    data = EnsureChannelFirstd(["moving", "fixed"])(LoadImaged(["moving", "fixed"])({k: str(v) for k, v in paths.items()}))

    def correlation(a, b):
        a, b = a.flatten().double(), b.flatten().double()
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

    scores = {}
    for transform in ("none", "rigid"):
        out = PreAlignd("moving", transform=transform)(dict(data))
        scores[transform] = correlation(out["moving"], out["fixed"])
        assert out["moving"].shape == data["fixed"].shape
    assert scores["rigid"] > scores["none"] + 0.05, scores


def _blob_volume(shape=(48, 44, 40)):
    """A head-sized phantom with asymmetric structure: a body and eight blobs of different sizes (seeded)."""
    rng = np.random.default_rng(0)
    i = np.stack(np.meshgrid(*[np.arange(float(s)) for s in shape], indexing="ij"))
    centre = (np.array(shape) - 1) / 2
    volume = np.exp(-sum(((i[k] - centre[k]) / (0.3 * shape[k])) ** 2 for k in range(3)))
    for _ in range(8):
        c = centre + rng.uniform(-0.25, 0.25, 3) * np.array(shape)
        width = rng.uniform(2.0, 5.0)
        volume += rng.uniform(0.5, 1.0) * np.exp(-sum(((i[k] - c[k]) / width) ** 2 for k in range(3)))
    return volume.astype(np.float32)


def _known_affine_pair(stretch: bool = True):
    """The phantom as the fixed image (2 mm grid) and as a moving image through a known world map (6 mm shift,
    6 degree rotation, with ``stretch`` a 6 % / 3 % scaling) on a 1.5 mm grid; a function that gives the
    largest error in mm of a found pull-back matrix at fixed points."""
    from bundle.spatial import resample_to_grid

    fixed = _blob_volume()
    fixed_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    fixed_affine[:3, 3] = [-40.0, -30.0, -20.0]
    angle = np.deg2rad(6.0)
    truth = np.eye(4)
    truth[:3, :3] = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    if stretch:
        truth[:3, :3] = truth[:3, :3] @ np.diag([1.06, 1.0, 0.97])
    truth[:3, 3] = [6.0, -3.0, 2.0]
    # moving(T_inv p) = fixed(p): the moving image on a 1.5 mm grid holds fixed(truth^-1 q) at world point q
    moving_affine = np.diag([1.5, 1.5, 1.5, 1.0])
    moving_affine[:3, 3] = [-45.0, -35.0, -25.0]
    moving = resample_to_grid(torch.as_tensor(fixed)[None], torch.as_tensor(fixed_affine),
                              torch.as_tensor(np.linalg.inv(truth) @ moving_affine), (64, 60, 52))[0].numpy()
    i = np.stack(np.meshgrid(*[np.arange(4.0, s - 4, 6.0) for s in fixed.shape], indexing="ij")).reshape(3, -1)
    world = fixed_affine[:3, :3] @ i + fixed_affine[:3, 3:]

    def max_error(found: np.ndarray) -> float:
        return float(np.linalg.norm((found[:3, :3] - truth[:3, :3]) @ world + (found[:3, 3:] - truth[:3, 3:]), axis=0).max())

    return moving, moving_affine, fixed, fixed_affine, max_error


@pytest.mark.parametrize("transform", ["affine", "rigid"])
def test_torch_affine_recovers_a_known_transform(transform):
    """The moving image is the fixed one through a known world map (6 mm shift, 6 degree rotation, and for
    'affine' 6 % stretch) on another grid: the recovered pull-back maps fixed points to within 1 mm of the truth."""
    from bundle.alignment import torch_affine_register

    moving, moving_affine, fixed, fixed_affine, max_error = _known_affine_pair(stretch=transform == "affine")
    found = torch_affine_register(moving, moving_affine, fixed, fixed_affine, transform=transform)
    again = torch_affine_register(moving, moving_affine, fixed, fixed_affine, transform=transform)
    np.testing.assert_array_equal(found, again)  # seeded: reproducible
    print(f"torch {transform}: max error {max_error(found):.3f} mm")
    assert max_error(found) < 1.0


def test_torch_affine_mutual_information_aligns_across_contrasts():
    """The moving image has another, non-monotonic contrast (bright tissue turns dark): NCC is misled, mutual
    information recovers the known affine map to within 2 mm."""
    from bundle.alignment import torch_affine_register

    moving, moving_affine, fixed, fixed_affine, max_error = _known_affine_pair()
    moving = moving * (2.2 - moving)  # another contrast: intensities above 1.1 (the blobs' cores) get darker
    errors = {similarity: max_error(torch_affine_register(moving, moving_affine, fixed, fixed_affine, similarity=similarity))
              for similarity in ("ncc", "mi")}
    print(f"max error across contrasts: {errors}")
    assert errors["mi"] < 2.0 and errors["ncc"] > 2 * errors["mi"], errors
    with pytest.raises(ValueError, match="similarity must be one of"):
        torch_affine_register(moving, moving_affine, fixed, fixed_affine, similarity="lncc")
    # through the transform: the option reaches the torch method, and a method that has no such option says so
    data = {"moving": MetaTensor(torch.as_tensor(moving)[None], affine=torch.as_tensor(moving_affine)),
            "fixed": MetaTensor(torch.as_tensor(fixed)[None], affine=torch.as_tensor(fixed_affine))}
    out = PreAlignd("moving", method="torch", register_kwargs={"similarity": "mi"})(data)
    np.testing.assert_allclose(out["prealign_matrix"].numpy(),
                               torch_affine_register(moving, moving_affine, fixed, fixed_affine, similarity="mi"))
    with pytest.raises(ValueError, match=r"\['similarity'\] are not options of method 'itk'"):
        PreAlignd("moving", method="itk", register_kwargs={"similarity": "mi"})


def test_torch_affine_refuses_what_it_cannot_align():
    from bundle.alignment import torch_affine_register

    image, affine = _blob_volume((8, 8, 8)), np.eye(4)
    with pytest.raises(ValueError, match="constant"):
        torch_affine_register(np.zeros((8, 8, 8)), affine, image, affine)
    with pytest.raises(ValueError, match="2 or more voxels"):
        torch_affine_register(image[:1], affine, image, affine)
    with pytest.raises(ValueError, match="transform must be"):
        torch_affine_register(image, affine, image, affine, transform="elastic")
    with pytest.raises(ValueError, match="levels"):
        torch_affine_register(image, affine, image, affine, levels=((0.0, 10, None),))
    np.testing.assert_array_equal(torch_affine_register(image, affine, image, affine, transform="none"), np.eye(4))
    with pytest.raises(ValueError, match="method must be one of"):
        PreAlignd("moving", method="ants")


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_torch_affine_schedule_and_memory_order(schedule):
    """Both learning-rate schedules recover the known map, also from Fortran-ordered inputs (nibabel's layout, which
    the stage pools without transposing); an unknown schedule is an error."""
    from bundle.alignment import torch_affine_register

    moving, moving_affine, fixed, fixed_affine, max_error = _known_affine_pair()
    found = torch_affine_register(moving, moving_affine, fixed, fixed_affine, similarity="mi", schedule=schedule)
    assert max_error(found) < 2.0, max_error(found)
    fortran = torch_affine_register(np.asfortranarray(moving), moving_affine, np.asfortranarray(fixed), fixed_affine,
                                    similarity="mi", schedule=schedule)
    print(f"{schedule}: max error {max_error(found):.3f} mm, Fortran-ordered {max_error(fortran):.3f} mm")
    assert max_error(fortran) < 2.0  # the same within float rounding: pooling sums in another order
    with pytest.raises(ValueError, match="schedule must be one of"):
        torch_affine_register(moving, moving_affine, fixed, fixed_affine, schedule="step")


def test_clamped_parzen_mutual_information_matches_monai():
    """The clamped Gaussian Parzen window changes neither MONAI's mutual information nor its gradient."""
    from monai.losses import GlobalMutualInformationLoss

    from bundle.alignment.torch_affine import _ClampedParzenMutualInformation

    generator = torch.Generator().manual_seed(0)
    pred = torch.rand(1, 1, 4000, generator=generator, requires_grad=True)
    target = (pred.detach() * 0.6 + 0.3 * torch.rand(1, 1, 4000, generator=generator)).clamp(0, 1)
    values, gradients = [], []
    for loss in (GlobalMutualInformationLoss(num_bins=32), _ClampedParzenMutualInformation(num_bins=32)):
        value = loss(pred, target)
        values.append(value.item())
        gradients.append(torch.autograd.grad(value, pred)[0])
    assert values[0] == pytest.approx(values[1], abs=1e-6)
    torch.testing.assert_close(gradients[1], gradients[0], atol=1e-8, rtol=1e-4)
