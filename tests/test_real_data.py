"""End-to-end tests on real images from ``../shared/data`` (skipped when that folder is absent).

- OASIS (``oasis/lapirn/Data``, two T1 with 0/1/2 tissue labels): a short training on both ordered pairs,
  then inference; the Dice in the fixed image's native grid must be higher than before registration
  (the same inference with a zero-initialised network, whose DDF is exactly 0).
- IBSR (4-D NIfTI with a trailing singleton axis, 0.94 x 1.5 x 0.94 mm) and a non-RAS, sub-voxel shifted
  copy of it: outputs on the fixed native grid, the moving label resampled by nearest neighbour in
  physical space; a network predicting a constant 1-voxel shift checks the DDF conversion between grids.
- NRRD input (TCGA-GBM via pyradiomics, 6.5 mm slices): outputs on the NRRD grid.

Data acknowledgements: OASIS (Marcus et al. 2007), IBSR (Center for Morphometric Analysis, MGH),
TCGA-GBM (TCIA, CC BY 3.0).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import (
    PIXDIM,
    SHARED_DATA,
    JobGraph,
    check_outputs_on_grid,
    config,
    dice,
    load_nifti,
    nearest_resample,
    run,
    save_nifti,
    write_datalist,
    write_zero_checkpoint,
)

OASIS = SHARED_DATA / "oasis" / "lapirn" / "Data"
IBSR = SHARED_DATA / "ibsr"
NRRD = SHARED_DATA / "tcga_gbm_pyradiomics"
OASIS_FILES = [OASIS / f"image_{s}_160x192x144{x}.nii.gz" for s in "AB" for x in ("", "_seg")]
IBSR_FILES = [IBSR / f"IBSR_{k}" / f"IBSR_{k}{x}.nii.gz" for k in ("01", "03") for x in ("", "_seg")]
NRRD_FILES = [NRRD / "brain1_image.nrrd", NRRD / "brain1_label.nrrd"]

pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real data folder {SHARED_DATA} not available")

# short OASIS training: both ordered pairs, validated (best model kept) only at the last epoch
OASIS_EPOCHS, OASIS_LR = 15, 1e-3
SHIFT = (1.0, 0.0, 0.0)  # constant DDF of the "shift" network, network voxels (RAS axes, PIXDIM mm)
SUBVOXEL = (0.3, -0.2, 0.25)  # offset of the non-RAS IBSR grid, its voxels (avoids nearest-neighbour ties)


def _needs(*paths):
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        pytest.skip(f"missing real data: {missing}")


def _oasis_files(folder):
    """``{subject: (image, label on the image's grid, original label)}`` of the two OASIS subjects.

    ``image_A``'s label has its own header (0.98 x 0.97 mm voxels, 3-6 mm offset) and matches its image
    only through physical coordinates (checked: brain mask agreement 98% that way, 95% voxel by voxel).
    The labels resampled onto their images' grids (nearest neighbour) give the reference for Dice on the
    fixed native grid.
    """
    files = {}
    for s in "AB":
        image, label = (str(OASIS / f"image_{s}_160x192x144{x}.nii.gz") for x in ("", "_seg"))
        on_grid, _, affine = _on_grid(label, image)
        files[s] = (image, save_nifti(on_grid.astype(np.uint8), affine, folder / f"seg_{s}.nii.gz"), label)
    return files


def _on_grid(label_path, image_path):
    """A label map resampled (nearest neighbour, physical coordinates) onto its image's grid."""
    image, affine = load_nifti(image_path)
    label, label_affine = load_nifti(label_path)
    return nearest_resample(label, label_affine, affine, image.shape), image.shape, affine


def _reoriented(image_path, folder, name):
    """A non-RAS ("SLA") crop of a 3-D image (axes permuted and flipped) on a grid shifted by ``SUBVOXEL``.

    The crop (160 x 128 x 128 of 256 x 256 x 128) keeps the outputs small; the moving image is resampled
    into this field of view.
    """
    data, affine = load_nifti(image_path)
    n0 = data.shape[0]
    new = data.transpose(2, 0, 1)[:, ::-1, :]  # new[i, j, k] = old[n0 - 1 - j, k, i]
    index_map = np.array([[0, -1, 0, n0 - 1], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
    start = (48, 64, 0)
    new = np.ascontiguousarray(new[start[0] : start[0] + 160, start[1] : start[1] + 128, :]).astype(np.float32)
    crop = np.eye(4)
    crop[:3, 3] = start
    new_affine = affine @ index_map @ crop
    new_affine[:3, 3] += new_affine[:3, :3] @ np.array(SUBVOXEL)
    return save_nifti(new, new_affine, folder / name)


def _zero_inference(graph, root, logs, name, pairs, ckpt_key="zero"):
    """Job: inference with the checkpoint ``ckpt_key`` of the ``real_prep`` job on ``pairs(files)``."""

    def job():
        files = graph.result("real_prep")
        datalist = write_datalist(root / f"datalist_{name}.json", pairs(files))
        result = run(
            ["run", "inference", "--config_file", config("inference.json", "joint.json"), "--bundle_root", root,
             "--datalist", datalist, "--ckpt_path", files[ckpt_key], "--output_dir", root / name,
             "--pixdim", PIXDIM, "--prealign", "none"],  # the network's own DDF, in world coordinates
            log=logs / f"{name}.log", timeout=300,
        )
        return result, root / name

    return job


def register_jobs(graph: JobGraph, tmp_path_factory) -> JobGraph | None:
    """Add this module's commands to the session's job graph (see ``conftest.job_graph``)."""
    if not SHARED_DATA.is_dir():
        return None
    root = tmp_path_factory.mktemp("real")
    logs = root / "logs"
    have_oasis, have_ibsr, have_nrrd = (all(p.is_file() for p in f) for f in (OASIS_FILES, IBSR_FILES, NRRD_FILES))
    ibsr = {k: IBSR / f"IBSR_{k}" / f"IBSR_{k}.nii.gz" for k in ("01", "03")}
    ibsr_labels = {k: IBSR / f"IBSR_{k}" / f"IBSR_{k}_seg.nii.gz" for k in ("01", "03")}

    def oasis_pairs(files):
        return [
            {"moving": files["oasis"][m][0], "fixed": files["oasis"][f][0], "moving_label": files["oasis"][m][1],
             "fixed_label": files["oasis"][f][1], "name": f"{m}_to_{f}"}
            for m, f in ("AB", "BA")
        ]

    def oasis_zero_pairs(files):
        a, b = files["oasis"]["A"], files["oasis"]["B"]
        own_header = {"moving": a[0], "fixed": b[0], "moving_label": a[2], "name": "A_to_B_own_label_header"}
        return oasis_pairs(files) + [own_header]

    def oasis_prep():
        return _oasis_files(root / "oasis_data") if have_oasis else None

    def oasis_train():
        oasis = graph.result("oasis_prep")
        datalist = write_datalist(
            root / "datalist_oasis_train.json", oasis_pairs({"oasis": oasis}), ("training", "validation", "testing")
        )
        bundle_root = root / "oasis_train"
        result = run(
            ["run", "training", "--config_file", config("train.json"), "--bundle_root", bundle_root,
             "--datalist", datalist, "--max_epochs", OASIS_EPOCHS, "--val_interval", OASIS_EPOCHS,
             "--learning_rate", OASIS_LR, "--num_workers", "0", "--pixdim", PIXDIM,
             "--aug_prob", "0.0", "--implant_lesions", "False"],  # 30 iterations on one pair: does it learn it
            # (random intensity augmentation and synthetic lesions off: their seg loss and masks are noise here)
            log=logs / "oasis_train.log", timeout=400,
        )
        return result, bundle_root, datalist

    def oasis_trained():
        trained, bundle_root, datalist = graph.result("oasis_train")
        trained.check()
        out = root / "oasis_trained"
        # the last epoch's checkpoint: the only validation is at the last epoch, so model.pt has the same weights
        ckpt = bundle_root / "models" / f"checkpoint_epoch={OASIS_EPOCHS}.pt"
        result = run(
            ["run", "inference", "--config_file", config("inference.json", "joint.json"), "--bundle_root", bundle_root,
             "--datalist", datalist, "--output_dir", out, "--ckpt_path", ckpt, "--pixdim", PIXDIM,
             "--prealign", "none"],  # as trained (the pair is already aligned) and as the zero network ran
            log=logs / "oasis_trained.log", timeout=300,
        )
        return result, out

    # written here, in the main thread: ConfigParser in a job thread races with imports in other threads
    checkpoints = {"zero": str(write_zero_checkpoint(root / "zero.pt")),
                   "shift": str(write_zero_checkpoint(root / "shift.pt", flow_bias=SHIFT))}

    def prep():
        files = {"oasis": graph.result("oasis_prep"), **checkpoints}
        if have_ibsr:
            files["ibsr_fixed"] = _reoriented(ibsr["01"], root / "ibsr_data", "IBSR_01_SLA.nii.gz")
        return files

    def ibsr_pairs(files):
        return [
            {"moving": str(ibsr["01"]), "fixed": str(ibsr["01"]), "moving_label": str(ibsr_labels["01"]),
             "name": "01_to_01"},
            {"moving": str(ibsr["03"]), "fixed": files["ibsr_fixed"], "moving_label": str(ibsr_labels["03"]),
             "name": "03_to_01sla"},
        ]

    def shift_pairs(files):
        return [{"moving": str(ibsr["01"]), "fixed": files["ibsr_fixed"], "moving_label": str(ibsr_labels["01"]),
                 "name": "01_to_01sla"}]

    def nrrd_pairs(files):
        image, label = str(NRRD / "brain1_image.nrrd"), str(NRRD / "brain1_label.nrrd")
        return [{"moving": image, "fixed": image, "moving_label": label, "name": "brain1"}]

    # priorities: the OASIS training (the longest chain) first, then the biggest inference runs
    graph.add("oasis_prep", oasis_prep, priority=100)
    graph.add("real_prep", prep, ["oasis_prep"], priority=55)
    if have_oasis:
        graph.add("oasis_train", oasis_train, ["oasis_prep"], priority=90)
        graph.add("oasis_trained", oasis_trained, ["oasis_train"], priority=75)
        graph.add("oasis_zero", _zero_inference(graph, root, logs, "oasis_zero", oasis_zero_pairs), ["real_prep"], 50)
    if have_ibsr:
        graph.add("ibsr_zero", _zero_inference(graph, root, logs, "ibsr_zero", ibsr_pairs), ["real_prep"], 50)
        shift_job = _zero_inference(graph, root, logs, "ibsr_shift", shift_pairs, "shift")
        graph.add("ibsr_shift", shift_job, ["real_prep"], 30)
    if have_nrrd:
        graph.add("nrrd_zero", _zero_inference(graph, root, logs, "nrrd_zero", nrrd_pairs), ["real_prep"], 30)
    return graph


@pytest.fixture(scope="module")
def real(job_graph):
    graph = job_graph.context.get(__name__)
    if graph is None:
        pytest.skip(f"real data folder {SHARED_DATA} not available")
    return graph


def _check_zero_outputs(out, moving_label, fixed_shape, fixed_affine):
    """Outputs of the zero network: on the fixed grid, DDF exactly 0, Jacobian 1, label unchanged."""
    arrays = check_outputs_on_grid(out, fixed_shape, fixed_affine)
    assert np.count_nonzero(arrays["ddf"]) == 0, f"{out}: zero network, non-zero DDF"
    assert np.all(arrays["jacobian_det"] == 1.0), f"{out}: zero DDF, Jacobian != 1"
    mismatch = int((arrays["warped_label"] != moving_label).sum())
    assert mismatch == 0, f"{out}: {mismatch} voxels of warped_label differ from the resampled moving label"
    return arrays


# ------------------------------------------------------------------------------------------------- OASIS


def test_oasis_zero_network_is_identity(real):
    _needs(*OASIS_FILES)
    result, out = real.result("oasis_zero")
    result.check()
    files = real.result("real_prep")["oasis"]
    # label index 1: resampled onto its image's grid; 2: the original file with its own header
    cases = [("A", "B", "A_to_B", 1), ("B", "A", "B_to_A", 1), ("A", "B", "A_to_B_own_label_header", 2)]
    for m, f, name, label in cases:
        expected, shape, affine = _on_grid(files[m][label], files[f][0])
        _check_zero_outputs(out / name, expected, shape, affine)


def test_oasis_training_improves_dice(real):
    _needs(*OASIS_FILES)
    result, out = real.result("oasis_trained")
    result.check()
    zero_result, zero_out = real.result("oasis_zero")
    zero_result.check()
    files = real.result("real_prep")["oasis"]
    before, after = {}, {}
    for m, f in ("AB", "BA"):
        name = f"{m}_to_{f}"
        fixed_label, shape, affine = _on_grid(files[f][1], files[f][0])
        arrays = check_outputs_on_grid(out / name, shape, affine)
        jac = arrays["jacobian_det"]
        assert np.isfinite(jac).all() and (jac > 0).mean() > 0.99
        zero_label, _ = load_nifti(zero_out / name / "warped_label.nii.gz")
        before[name] = dice(zero_label, fixed_label, (1, 2))
        after[name] = dice(arrays["warped_label"], fixed_label, (1, 2))
    mean_before, mean_after = np.mean(list(before.values())), np.mean(list(after.values()))
    print(f"OASIS Dice (labels 1-2, fixed native grid): before {before}, after {after}")
    assert mean_after > mean_before, f"Dice (labels 1-2, fixed native grid) before {before}, after {after}"


# -------------------------------------------------------------------------------------------------- IBSR


def test_ibsr_outputs_on_native_grids(real):
    _needs(*IBSR_FILES)
    result, out = real.result("ibsr_zero")
    result.check()
    # a 4-D file with a trailing singleton axis, registered to itself: the identity on its own grid
    fixed, affine = load_nifti(IBSR / "IBSR_01" / "IBSR_01.nii.gz")
    label01, _ = load_nifti(IBSR / "IBSR_01" / "IBSR_01_seg.nii.gz")
    arrays = _check_zero_outputs(out / "01_to_01", label01, fixed.shape, affine)
    np.testing.assert_allclose(arrays["warped"], fixed, atol=1e-3 * float(np.abs(fixed).max()))
    # a non-RAS, shifted fixed grid: the moving label resampled by nearest neighbour in physical space
    files = real.result("real_prep")
    fixed, affine = load_nifti(files["ibsr_fixed"])
    label03, affine03 = load_nifti(IBSR / "IBSR_03" / "IBSR_03_seg.nii.gz")
    expected = nearest_resample(label03, affine03, affine, fixed.shape)
    assert expected.any()
    _check_zero_outputs(out / "03_to_01sla", expected, fixed.shape, affine)


def test_ibsr_constant_shift_on_non_ras_grid(real):
    _needs(*IBSR_FILES)
    files = real.result("real_prep")
    result, out = real.result("ibsr_shift")
    result.check()
    fixed, affine = load_nifti(files["ibsr_fixed"])
    arrays = check_outputs_on_grid(out / "01_to_01sla", fixed.shape, affine)
    # the network grid is RAS with PIXDIM mm voxels: a shift of SHIFT voxels is this many mm along x, y, z
    world = np.diag(json.loads(PIXDIM)) @ np.array(SHIFT)
    expected = np.linalg.solve(affine[:3, :3], world)  # in the fixed grid's voxels
    ddf = arrays["ddf"][..., 0, :]
    np.testing.assert_allclose(ddf.reshape(-1, 3).min(0), expected, atol=1e-3)
    np.testing.assert_allclose(ddf.reshape(-1, 3).max(0), expected, atol=1e-3)
    np.testing.assert_allclose(arrays["jacobian_det"], 1.0, atol=1e-4)
    # warped(i) = moving(world(i + ddf)), nearest neighbour, sampled in the moving image's own (larger) grid:
    # the moving label resampled onto the fixed grid moved by the (rounded) shift
    label01, affine01 = load_nifti(IBSR / "IBSR_01" / "IBSR_01_seg.nii.gz")
    shifted_affine = affine.copy()
    shifted_affine[:3, 3] += affine[:3, :3] @ np.rint(expected)
    shifted = nearest_resample(label01, affine01, shifted_affine, fixed.shape)
    mismatch = (arrays["warped_label"] != shifted).mean()
    assert mismatch < 1e-4, f"{mismatch:.3%} of warped_label differs from the label shifted by {world} mm"


# -------------------------------------------------------------------------------------------------- NRRD


def test_nrrd_input(real):
    _needs(*NRRD_FILES)
    itk = pytest.importorskip("itk")
    result, out = real.result("nrrd_zero")
    result.check()
    image = itk.imread(str(NRRD / "brain1_image.nrrd"))
    shape = tuple(int(s) for s in itk.size(image))
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection()) @ np.diag(np.asarray(itk.spacing(image), float))
    lps[:3, 3] = np.asarray(itk.origin(image), float)
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    label = itk.GetArrayFromImage(itk.imread(str(NRRD / "brain1_label.nrrd"))).transpose(2, 1, 0)
    _check_zero_outputs(out / "brain1", label, shape, ras)
