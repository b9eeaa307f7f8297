"""The command-line tool (``python -m bundle`` / ``brainreg``, :mod:`bundle.cli`).

In-process: ``--help`` of every command, clear errors for bad input. Subprocesses (on the session's job
graph): ``demo`` builds the embedded demo data; ``register`` (with ``--itk``), ``segment`` and ``evaluate``
run on it at 4 mm with a joint checkpoint whose flow layer is random (a non-zero DDF). The ITK transform
written by ``register --itk`` is applied with ITK to the moving image and must give ``warped.nii.gz``.
"""

from __future__ import annotations

import json
import os
from importlib.metadata import entry_points
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser  # imported here, not in the job threads: concurrent first imports race

from bundle import cli
from bundle.configs import is_registration_only
from bundle.io.itk_export import read_ddf_nifti, read_itk_displacement_field
from conftest import CONFIGS, PIXDIM, JobGraph, check_outputs_on_grid, run

TEST_PAIR = 0  # the demo's first test pair: a tumour-to-healthy pair with labels


def _write_checkpoint(path: Path, *overlays: str) -> Path:
    """A fresh network of ``inference.json`` (+ ``overlays``, e.g. ``joint.json`` for the joint model) with a random
    flow layer, saved as training saves ``model.pt``."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / name) for name in ("inference.json", *overlays)])
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def", instantiate=True)
    head = net.reg_head if hasattr(net, "reg_head") else net.head
    with torch.no_grad():
        torch.nn.init.normal_(head.conv.weight, std=1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"network": net.state_dict(), "checkpointer": {}}, path)
    return path


def _write_conditioned_checkpoint(path: Path) -> Path:
    """The joint model conditioned on λ (``joint.json`` + ``joint_conditioned.json``) with a random flow layer and
    random FiLM layers (so that λ changes the field)."""
    _write_checkpoint(path, "joint.json", "joint_conditioned.json")
    state = torch.load(path, weights_only=False)
    torch.manual_seed(1)
    for key, value in state["network"].items():
        if key.startswith("film_") and key.endswith("weight"):
            value.normal_(std=0.5)
    torch.save(state, path)
    return path


def register_jobs(graph: JobGraph, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cli")
    ctx = {"root": root, "ckpt": root / "model.pt"}

    def pair():
        datalist = json.loads((root / "demo_data" / "datalist.json").read_text())
        return {k: str(root / "demo_data" / v) for k, v in datalist["testing"][TEST_PAIR].items() if k != "name"}

    _write_checkpoint(ctx["ckpt"], "joint.json")  # in the main thread: ConfigParser in a job thread races with imports
    ctx["conditioned"] = _write_conditioned_checkpoint(root / "conditioned.pt")

    def demo():
        return run(["demo", "--root", root, "--notrain", "--noinfer"], module="bundle", timeout=300,
                   log=root / "demo.log")

    def register():
        graph.result("cli_demo").check()
        p = pair()
        args = ["register", p["moving"], p["fixed"], "--out", root / "registered", "--moving-label", p["moving_label"],
                "--model", ctx["ckpt"], "--device", "cpu", "--prealign", "none", "--itk", "--pixdim", PIXDIM]
        return run(args, module="bundle", timeout=300, log=root / "register.log"), p

    def register_fast():  # pre-alignment on a 2 mm network grid, only the warped image and the DDF, uncompressed
        graph.result("cli_demo").check()
        p = pair()
        args = ["register", p["moving"], p["fixed"], "--out", root / "fast", "--moving-label", p["moving_label"],
                "--model", ctx["ckpt"], "--device", "cpu", "--prealign", "affine", "--itk", "--pixdim", "[2.0,2.0,2.0]",
                "--outputs", "['warped','ddf']", "--output_extension", ".nii"]
        return run(args, module="bundle", timeout=300, log=root / "register_fast.log"), p

    def register_refined():  # --refine (instance optimisation overlay); the network as in register(), 4 mm, 15 steps
        graph.result("cli_demo").check()
        p = pair()
        args = ["register", p["moving"], p["fixed"], "--out", root / "refined", "--moving-label", p["moving_label"],
                "--model", ctx["ckpt"], "--device", "cpu",
                "--prealign", "none", "--refine", "--pixdim", PIXDIM, "--network_downsample", "1",
                "--instance_optimisation_steps", "15"]
        return run(args, module="bundle", timeout=300, log=root / "refine.log"), p

    def register_refined_native():  # --refine_native (native-grid refinement overlay), few steps to stay small
        graph.result("cli_demo").check()
        p = pair()
        args = ["register", p["moving"], p["fixed"], "--out", root / "refined_native", "--moving-label", p["moving_label"],
                "--model", ctx["ckpt"], "--device", "cpu", "--prealign", "none", "--refine_native", "--pixdim", PIXDIM,
                "--native_refinement_levels", "[[2,15],[1,10]]"]
        return run(args, module="bundle", timeout=300, log=root / "refine_native.log"), p

    def segment():
        graph.result("cli_demo").check()
        args = ["segment", pair()["fixed"], "--out", root / "segmented", "--model", ctx["ckpt"], "--pixdim", PIXDIM]
        return run(args, module="bundle", timeout=300, log=root / "segment.log")

    def register_conditioned(weight):  # the λ-conditioned joint model at the user's λ: field and segmentations
        graph.result("cli_demo").check()
        p = pair()
        args = ["register", p["moving"], p["fixed"], "--out", root / f"conditioned_{weight}", "--model", ctx["conditioned"],
                "--device", "cpu", "--prealign", "none", "--pixdim", PIXDIM, "--regularisation_weight", weight,
                "--outputs", "['ddf','segmentations']"]
        return run(args, module="bundle", timeout=300, log=root / f"conditioned_{weight}.log")

    def segment_conditioned():
        graph.result("cli_demo").check()
        args = ["segment", pair()["fixed"], "--out", root / "segmented_conditioned", "--model", ctx["conditioned"],
                "--pixdim", PIXDIM]
        return run(args, module="bundle", timeout=300, log=root / "segment_conditioned.log")

    def brain_masked(name: str) -> tuple[str, str]:
        """A brain mask of the demo's ``name`` image (its half with the lower first index) and the image stripped
        by hand with it (outside: the image's minimum), both on the image's grid."""
        image = nib.load(pair()[name])
        data = np.asarray(image.dataobj, dtype=np.float32)
        mask = np.zeros(data.shape, np.uint8)
        mask[: data.shape[0] // 2] = 1
        stripped = np.where(mask > 0, data, data.min()).astype(np.float32)
        paths = (root / f"{name}_brain_mask.nii.gz", root / f"{name}_stripped.nii.gz")
        nib.save(nib.Nifti1Image(mask, image.affine), str(paths[0]))
        nib.save(nib.Nifti1Image(stripped, image.affine), str(paths[1]))
        return str(paths[0]), str(paths[1])

    def masks():
        graph.result("cli_demo").check()
        return {name: brain_masked(name) for name in ("moving", "fixed")}

    def segment_masked(how):  # --brain_mask, or the image stripped by hand: the same segmentation expected
        masked = graph.result("cli_brain_masks")
        image = masked["fixed"][1] if how == "stripped" else pair()["fixed"]
        args = ["segment", image, "--out", root / f"segmented_{how}", "--model", ctx["ckpt"], "--pixdim", PIXDIM]
        if how == "flag":
            args += ["--brain_mask", masked["fixed"][0]]
        return run(args, module="bundle", timeout=300, log=root / f"segment_{how}.log")

    def register_masked(how):  # --moving_brain_mask / --fixed_brain_mask, or both images stripped by hand
        masked = graph.result("cli_brain_masks")
        p = pair()
        images = [masked[n][1] for n in ("moving", "fixed")] if how == "stripped" else [p["moving"], p["fixed"]]
        args = ["register", *images, "--out", root / f"registered_{how}", "--model", ctx["ckpt"], "--device", "cpu",
                "--prealign", "none", "--pixdim", PIXDIM, "--outputs", "['warped','ddf','segmentations']"]
        if how == "flag":
            args += ["--moving_brain_mask", masked["moving"][0], "--fixed_brain_mask", masked["fixed"][0]]
        return run(args, module="bundle", timeout=300, log=root / f"register_{how}.log")

    def segment_bad_mask():  # a mask on another grid: refused, naming the file, as the last line
        graph.result("cli_demo").check()
        image = nib.load(pair()["fixed"])
        bad = root / "bad_brain_mask.nii.gz"
        nib.save(nib.Nifti1Image(np.ones([n - 2 for n in image.shape[:3]], np.uint8), image.affine), str(bad))
        args = ["segment", pair()["fixed"], "--out", root / "segmented_bad", "--model", ctx["ckpt"], "--pixdim", PIXDIM,
                "--brain_mask", bad]
        return run(args, module="bundle", timeout=300, log=root / "segment_bad.log")

    def evaluate():
        graph.result("cli_demo").check()
        args = ["evaluate", root / "demo_data" / "datalist.json", "--out", root / "eval", "--model", ctx["ckpt"],
                "--pixdim", PIXDIM, "--num_workers", "0"]
        return run(args, module="bundle", timeout=300, log=root / "evaluate.log")

    graph.add("cli_demo", demo, priority=1)
    graph.add("cli_register", register, deps=["cli_demo"], priority=1)
    graph.add("cli_register_fast", register_fast, deps=["cli_demo"])
    graph.add("cli_register_refined", register_refined, deps=["cli_demo"])
    graph.add("cli_register_refined_native", register_refined_native, deps=["cli_demo"])
    graph.add("cli_segment", segment, deps=["cli_demo"])
    graph.add("cli_evaluate", evaluate, deps=["cli_demo"])
    for weight in ("0.1", "10.0"):
        graph.add(f"cli_register_conditioned_{weight}", lambda w=weight: register_conditioned(w), deps=["cli_demo"])
    graph.add("cli_segment_conditioned", segment_conditioned, deps=["cli_demo"])
    graph.add("cli_brain_masks", masks, deps=["cli_demo"])
    for how in ("flag", "stripped"):
        graph.add(f"cli_segment_masked_{how}", lambda h=how: segment_masked(h), deps=["cli_brain_masks"])
        graph.add(f"cli_register_masked_{how}", lambda h=how: register_masked(h), deps=["cli_brain_masks"])
    graph.add("cli_segment_bad_mask", segment_bad_mask, deps=["cli_demo"])
    return ctx


@pytest.fixture(scope="module")
def jobs(job_graph):
    return job_graph, job_graph.context[__name__]


def _main(*argv) -> int:
    """Run ``brainreg *argv`` in-process; its exit status (0 when it returns)."""
    try:
        cli.main([str(a) for a in argv])
    except SystemExit as e:  # fire's FireExit is a SystemExit too
        return e.code if isinstance(e.code, int) else 1
    return 0


# ------------------------------------------------------------------------------------------- help and errors


@pytest.mark.parametrize(
    "command, expected",
    (
        ((), ["register", "segment", "evaluate", "export", "demo"]),
        (("register",), ["MOVING", "FIXED", "OUT", "--moving_label", "--model", "--device", "--prealign", "--itk", "--refine", "--refine_native"]),
        (("segment",), ["IMAGE", "OUT", "--model"]),
        (("evaluate",), ["--datalist", "--out", "--section", "--model"]),
        (("export",), ["torchscript", "itk"]),
        (("export", "torchscript"), ["--out", "--model", "--input_shape"]),
        (("export", "itk"), ["DDF", "--field", "--transform"]),
        (("demo",), ["--root", "--train", "--infer"]),
    ),
)
def test_help_of_every_command(capfd, command, expected):
    assert _main(*command, "--help") == 0
    text = "".join(capfd.readouterr())  # fire writes help to stdout in a terminal, to stderr here
    missing = [e for e in expected if e not in text]
    assert not missing, f"help of {command} lacks {missing}:\n{text}"


def test_console_script_is_installed():
    """``python -m bundle`` itself runs in the jobs below; the ``brainreg`` script is the same ``main``."""
    scripts = entry_points(group="console_scripts", name="brainreg")
    assert scripts, "no `brainreg` console script: reinstall the package (pip install -e .)"
    assert next(iter(scripts)).load() is cli.main


@pytest.fixture(scope="module")
def small_image(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_inputs")
    path = folder / "image.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((16, 16, 16), dtype=np.float32), np.eye(4)), str(path))
    (folder / "corrupt.pt").write_bytes(b"not a checkpoint")
    return path


def _fails(capsys, *argv) -> str:
    assert _main(*argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("brainreg: error: "), err
    return err


def test_blank_image_is_an_error_without_prealignment(capsys, small_image, tmp_path):
    """An all-zero moving image with ``--prealign none`` ends in one error line naming it; nothing is written."""
    blank = tmp_path / "blank.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.float32), np.eye(4)), str(blank))
    err = _fails(capsys, "register", blank, small_image, "--out", tmp_path / "out", "--prealign", "none", "--device", "cpu")
    assert "blank.nii.gz" in err and "constant" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_misspelled_options_are_rejected_with_suggestions(capsys, small_image, tmp_path):
    """``--moving-lable`` is not taken as a new config id: one error line with the valid spelling."""
    err = _fails(capsys, "register", small_image, small_image, "--out", tmp_path / "out", "--moving-lable", small_image)
    assert "unknown option(s) --moving_lable (did you mean --moving_label" in err, err
    err = _fails(capsys, "register", small_image, small_image, "--out", tmp_path / "out", "--pixdimm", "[2.0,2.0,2.0]")
    assert "--pixdimm (did you mean --pixdim" in err, err
    assert "--max_epochz (did you mean --max_epochs" in _fails(capsys, "demo", "--root", tmp_path, "--max_epochz", "1")
    assert not (tmp_path / "out").exists() and not (tmp_path / "demo_data").exists()


def test_unusable_output_folder_is_named_before_any_computation(capsys, small_image, tmp_path):
    err = _fails(capsys, "register", small_image, small_image, "--out", small_image.parent / "image.nii.gz" / "out")
    assert "output folder" in err and "image.nii.gz is not a folder" in err, err
    err = _fails(capsys, "segment", small_image, "--out", small_image / "seg")
    assert "is not a folder" in err, err


def test_work_folders_of_killed_runs_are_removed(tmp_path, monkeypatch):
    """A ``kill -9`` leaves ``brainreg_<pid>_*`` in the temporary folder; the next command removes it (its pid is
    gone) and keeps the folders of running commands."""
    import subprocess
    import sys

    monkeypatch.setattr(cli.tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"brainreg_{int(dead.stdout)}_abc"
    (stale / "datalist.json").parent.mkdir()
    (stale / "datalist.json").write_text("{}")
    alive = tmp_path / f"brainreg_{os.getppid()}_def"
    alive.mkdir()
    with cli._work_folder() as work:
        assert Path(work).name.startswith(f"brainreg_{os.getpid()}_") and Path(work).is_dir()
        assert not stale.exists() and alive.exists()
    assert not Path(work).exists()


def test_missing_inputs_are_named(capsys, small_image, tmp_path):
    assert "moving image not found: absent.nii.gz" in _fails(capsys, "register", "absent.nii.gz", small_image, "--out", tmp_path)
    assert "fixed image not found: absent.nii.gz" in _fails(capsys, "register", small_image, "absent.nii.gz", "--out", tmp_path)
    err = _fails(capsys, "register", small_image, small_image, "--out", tmp_path, "--moving-label", "absent_seg.nii.gz")
    assert "moving label map not found: absent_seg.nii.gz" in err
    assert "image not found: absent.nii.gz" in _fails(capsys, "segment", "absent.nii.gz", "--out", tmp_path)
    assert "datalist not found: absent.json" in _fails(capsys, "evaluate", "absent.json", "--model", small_image.parent / "corrupt.pt")
    assert "DDF file not found: absent.nii.gz" in _fails(capsys, "export", "itk", "absent.nii.gz")


def test_bad_checkpoints_and_options_are_explained(capsys, small_image, tmp_path):
    pair = ["register", small_image, small_image, "--out", tmp_path]
    assert "checkpoint not found" in _fails(capsys, *pair, "--model", tmp_path / "absent.pt")
    assert "is unreadable" in _fails(capsys, *pair, "--model", small_image.parent / "corrupt.pt")
    ckpt = _write_checkpoint(tmp_path / "joint.pt", "joint.json")
    assert "--prealign must be one of" in _fails(capsys, *pair, "--model", ckpt, "--prealign", "bspline")
    assert "--device must be 'cpu', 'cuda' or 'cuda:N'" in _fails(capsys, *pair, "--model", ckpt, "--device", "gpu")
    reg_only = _write_checkpoint(tmp_path / "reg.pt", "registration_only.json")
    err = _fails(capsys, "segment", small_image, "--out", tmp_path, "--model", reg_only)
    assert "registration-only model" in err
    assert "must end with one of" in _fails(capsys, "export", "itk", small_image, "--field", tmp_path / "f.png")


def test_prealign_passes_only_when_the_config_has_it():
    with_id, without_id = ConfigParser({"prealign": "affine"}), ConfigParser({"pixdim": [3.0, 3.0, 3.0]})
    assert cli._prealign_override("rigid", with_id) == {"prealign": "rigid"}
    assert cli._prealign_override(None, with_id) == {}
    assert cli._prealign_override("none", without_id) == {}  # older configs: nothing to switch off
    with pytest.raises(ValueError, match="no pre-alignment stage"):
        cli._prealign_override("affine", without_id)


def test_registration_only_checkpoints_are_detected(tmp_path):
    joint = torch.load(_write_checkpoint(tmp_path / "j.pt", "joint.json"), weights_only=True)["network"]
    reg = torch.load(_write_checkpoint(tmp_path / "r.pt", "registration_only.json"), weights_only=True)["network"]
    assert not is_registration_only(joint) and is_registration_only(reg)
    assert is_registration_only({f"module.{k}": v for k, v in reg.items()})  # DDP prefix


# ------------------------------------------------------------------------------------------- real runs


def test_demo_builds_the_data(jobs):
    graph, ctx = jobs
    graph.result("cli_demo").check()
    datalist = json.loads((ctx["root"] / "demo_data" / "datalist.json").read_text())
    assert datalist["testing"] and not (ctx["root"] / "models").exists()  # --notrain: nothing trained


def test_register_writes_outputs_and_itk_files_that_itk_applies(jobs):
    graph, ctx = jobs
    result, pair = graph.result("cli_register")
    result.check()
    folder = ctx["root"] / "registered"
    fixed = nib.load(pair["fixed"])
    arrays = check_outputs_on_grid(folder, fixed.shape, fixed.affine)
    assert {"seg_moving.nii.gz", "seg_fixed.nii.gz", "itk_displacement.nii.gz", "itk_transform.h5"} <= {
        p.name for p in folder.iterdir()
    }
    assert str(folder / "warped.nii.gz") in result.output  # the written files are listed
    ddf, affine = read_ddf_nifti(folder / "ddf.nii.gz")
    assert np.abs(ddf).max() > 0.2, "the random flow layer should give a non-zero DDF"
    _check_itk_files_reproduce_warped(folder, pair, ddf, affine, arrays["warped"], "register --itk")


def _check_itk_files_reproduce_warped(folder, pair, ddf, affine, ours, what, field="itk_displacement.nii.gz"):
    """The ITK files hold our DDF, and ITK applying the transform to the moving image as loaded gives ``ours``."""
    import itk

    back, back_affine = read_itk_displacement_field(folder / field)
    np.testing.assert_allclose(back, ddf, atol=1e-4)
    np.testing.assert_allclose(back_affine, affine, atol=1e-4)
    moving, reference = itk.imread(pair["moving"], itk.F), itk.imread(pair["fixed"], itk.F)
    transform = itk.transformread(str(folder / "itk_transform.h5"))[0]
    warped = itk.resample_image_filter(moving, transform=transform, use_reference_image=True, reference_image=reference)
    warped = np.transpose(itk.array_from_image(warped), (2, 1, 0)).reshape(ours.shape)
    diff = np.abs(warped - ours)
    print(f"{what}: |ITK - warped| max {diff.max():.2e}, mean {diff.mean():.2e} (intensity max {ours.max():.2f})")
    assert diff.max() < 1e-4 * max(1.0, float(np.abs(ours).max()))


def test_register_writes_only_the_outputs_asked_for_with_prealignment_on_the_network_grid(jobs):
    """--outputs / --output_extension: exactly warped.nii and ddf.nii (plus the ITK files of --itk); at 2 mm the
    affine pre-alignment runs on the network grid (prealign_grid 'network'), and the composed DDF still
    reproduces the warped image through ITK."""
    graph, ctx = jobs
    result, pair = graph.result("cli_register_fast")
    result.check()
    folder = ctx["root"] / "fast"
    written = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))  # not the hidden manifest
    assert written == ["ddf.nii", "itk_displacement.nii.gz", "itk_transform.h5", "warped.nii"]
    fixed = nib.load(pair["fixed"])
    warped = nib.load(folder / "warped.nii")
    assert warped.shape[:3] == fixed.shape[:3] and np.allclose(warped.affine, fixed.affine, atol=1e-4)
    ddf, affine = read_ddf_nifti(folder / "ddf.nii")
    ours = np.asarray(warped.dataobj, dtype=np.float32)
    _check_itk_files_reproduce_warped(folder, pair, ddf, affine, ours, "register --outputs")


def test_register_refine_improves_the_random_network_field_without_folding(jobs):
    """--refine adds configs/instance_optimisation.json: svf residual on the network's field, which it improves."""
    graph, ctx = jobs
    plain, pair = graph.result("cli_register")
    refined, _ = graph.result("cli_register_refined")
    plain.check(), refined.check()
    fixed = nib.load(pair["fixed"])
    arrays = {name: check_outputs_on_grid(ctx["root"] / name, fixed.shape, fixed.affine) for name in ("registered", "refined")}
    target = np.asarray(fixed.dataobj, dtype=np.float32)
    target = target.reshape(arrays["refined"]["warped"].shape)
    error = {name: float(np.mean((a["warped"] - target) ** 2)) for name, a in arrays.items()}
    print(f"register --refine: MSE to the fixed image {error['registered']:.4f} (network) -> {error['refined']:.4f}")
    assert error["refined"] < error["registered"]
    # the residual is diffeomorphic: it adds no folding to the network's (random) field
    folding = {name: float((a["jacobian_det"] <= 0).mean()) for name, a in arrays.items()}
    assert folding["refined"] <= folding["registered"] + 1e-4, folding


def test_register_refine_native_improves_the_field_on_the_native_grid(jobs):
    """--refine_native adds configs/native_refinement.json: the composed transform refined on the fixed native grid
    (2 then 1 voxel levels here), which brings the warped image closer to the fixed one and does not fold."""
    graph, ctx = jobs
    plain, pair = graph.result("cli_register")
    refined, _ = graph.result("cli_register_refined_native")
    plain.check(), refined.check()
    fixed = nib.load(pair["fixed"])
    arrays = {name: check_outputs_on_grid(ctx["root"] / name, fixed.shape, fixed.affine)
              for name in ("registered", "refined_native")}
    target = np.asarray(fixed.dataobj, dtype=np.float32).reshape(arrays["refined_native"]["warped"].shape)
    error = {name: float(np.mean((a["warped"] - target) ** 2)) for name, a in arrays.items()}
    assert error["refined_native"] < error["registered"], error
    assert "native refinement level 1: step 10/10" in refined.output, refined.tail()
    assert float((arrays["refined_native"]["jacobian_det"] <= 0).mean()) <= float(
        (arrays["registered"]["jacobian_det"] <= 0).mean()) + 1e-3


def test_segment_writes_a_label_map_on_the_image_grid(jobs):
    graph, ctx = jobs
    graph.result("cli_segment").check()
    seg = nib.load(str(ctx["root"] / "segmented" / "seg.nii.gz"))
    fixed_path = json.loads((ctx["root"] / "demo_data" / "datalist.json").read_text())["testing"][TEST_PAIR]["fixed"]
    image = nib.load(str(ctx["root"] / "demo_data" / fixed_path))
    assert seg.shape == image.shape
    np.testing.assert_allclose(seg.affine, image.affine, atol=1e-4)
    assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1}


def test_the_conditioned_joint_model_takes_the_weight_from_the_command_line(jobs):
    """``--regularisation_weight`` reaches a λ-conditioned joint checkpoint (its overlay found from its parameters):
    the field changes with λ, the segmentations do not; ``segment`` runs the same checkpoint's segmentation path."""
    graph, ctx = jobs
    outputs = {}
    for weight in ("0.1", "10.0"):
        graph.result(f"cli_register_conditioned_{weight}").check()
        folder = ctx["root"] / f"conditioned_{weight}"
        outputs[weight] = {n: np.asarray(nib.load(str(folder / f"{n}.nii.gz")).dataobj) for n in ("ddf", "seg_fixed", "seg_moving")}
    assert np.abs(outputs["0.1"]["ddf"] - outputs["10.0"]["ddf"]).max() > 1e-3
    for name in ("seg_fixed", "seg_moving"):
        np.testing.assert_array_equal(outputs["0.1"][name], outputs["10.0"][name])
    graph.result("cli_segment_conditioned").check()
    seg = np.asarray(nib.load(str(ctx["root"] / "segmented_conditioned" / "seg.nii.gz")).dataobj)
    assert seg.shape == outputs["0.1"]["seg_fixed"].shape and set(np.unique(seg)) <= {0, 1}


def test_brain_masks_skull_strip_the_inputs_of_segment_and_register(jobs):
    """``--brain_mask`` (segment) and ``--moving_brain_mask`` / ``--fixed_brain_mask`` (register) give exactly the
    outputs of the same images stripped by hand with those masks, and differ from the unmasked run."""
    graph, ctx = jobs
    root = ctx["root"]
    load = lambda folder, name: np.asarray(nib.load(str(root / folder / f"{name}.nii.gz")).dataobj)  # noqa: E731
    for how in ("flag", "stripped"):
        graph.result(f"cli_segment_masked_{how}").check()
        graph.result(f"cli_register_masked_{how}").check()
    np.testing.assert_array_equal(load("segmented_flag", "seg"), load("segmented_stripped", "seg"))
    for name in ("warped", "ddf", "seg_moving", "seg_fixed"):
        np.testing.assert_allclose(load("registered_flag", name), load("registered_stripped", name), atol=1e-5)
    graph.result("cli_register")[0].check()
    assert np.abs(load("registered_flag", "ddf") - load("registered", "ddf")).max() > 1e-3  # the masks did something


def test_a_brain_mask_on_another_grid_is_refused_naming_it(jobs):
    graph, ctx = jobs
    result = graph.result("cli_segment_bad_mask").check_fails("bad_brain_mask.nii.gz")
    last = result.output.strip().splitlines()[-1]
    assert "bad_brain_mask.nii.gz" in last and "grid" in last, result.tail()
    assert not (ctx["root"] / "segmented_bad" / "seg.nii.gz").exists()


def test_evaluate_writes_metrics(jobs):
    graph, ctx = jobs
    result = graph.result("cli_evaluate").check()
    csvs = sorted(p.name for p in (ctx["root"] / "eval").glob("*.csv"))
    assert "metrics.csv" in csvs and any("mean_dice" in n for n in csvs), (csvs, result.tail())


def test_export_itk_to_other_formats(jobs, tmp_path, capsys):
    graph, ctx = jobs
    graph.result("cli_register")[0].check()
    ddf_path = ctx["root"] / "registered" / "ddf.nii.gz"
    assert _main("export", "itk", ddf_path, "--field", tmp_path / "field.mha", "--transform", tmp_path / "t.h5") == 0
    assert str(tmp_path / "field.mha") in capsys.readouterr().out
    np.testing.assert_allclose(read_itk_displacement_field(tmp_path / "t.h5")[0], read_ddf_nifti(ddf_path)[0], atol=1e-5)


def test_export_torchscript_of_a_registration_only_checkpoint(tmp_path):
    ckpt = _write_checkpoint(tmp_path / "reg.pt", "registration_only.json")
    out = cli.export_torchscript(out=str(tmp_path / "reg.ts"), model=str(ckpt), input_shape=[1, 2, 32, 32, 32])
    extra = {"metadata.json": ""}
    scripted = torch.jit.load(out, _extra_files=extra)
    meta = json.loads(extra["metadata.json"])
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 3  # not the joint net's 7
    x = torch.rand(1, 2, 48, 32, 32)
    assert scripted(x).shape == (1, 3, 48, 32, 32)
