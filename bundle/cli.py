"""Command-line tool: ``python -m bundle <command>`` or ``brainreg <command>`` (python-fire).

Each command drives the bundle's configs through ``monai.bundle`` (``run`` / ``ckpt_export``) with a few
overrides (a one-pair datalist in a temporary folder, the output folder, the checkpoint, the device) instead
of re-implementing the pipeline. Any other config id can be overridden with ``--<id> VALUE`` (e.g.
``--pixdim "[2.0,2.0,2.0]"``). ``--help`` after any command lists its options.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import fire

from bundle.configs import (
    TUMOUR_SEGMENTATION_CONFIGS,
    checkpoint_overlays,
    config_paths,
    is_registration_only,
    read_config,
    run_config,
)
from bundle.errors import input_error
from bundle.io.readers import is_file
from bundle.io.writers import writable_folder

__all__ = ["find_bundle_root", "register", "segment", "evaluate", "export_torchscript", "export_itk", "demo", "COMMANDS", "main"]

PREALIGN_CHOICES = ("none", "rigid", "affine")


def find_bundle_root(root: str | os.PathLike | None = None) -> Path:
    """The bundle folder (holding ``configs/``): ``root`` if given, else the repository this package comes from,
    else the current folder.

    Raises:
        FileNotFoundError: no ``configs/inference.json`` there.
    """
    candidates = [Path(root)] if root is not None else [Path(__file__).resolve().parents[1], Path.cwd()]
    for folder in candidates:
        if (folder / "configs" / "inference.json").is_file():
            return folder.resolve()
    raise FileNotFoundError(
        f"no bundle found (configs/inference.json) in {', '.join(str(c) for c in candidates)}; "
        "run from the bundle folder or pass --bundle_root."
    )


def _existing(path, what: str) -> str | list[str]:
    """Absolute path of an existing file (or of each file of a list: channels of one image)."""
    if isinstance(path, (list, tuple)):
        return [_existing(p, what) for p in path]
    if path is None or not is_file(str(path)):
        raise FileNotFoundError(f"{what} not found: {path}")
    return str(Path(str(path)).resolve())


def _device_override(device: str | None) -> dict:
    """``{"device": "$torch.device(...)"}`` for ``cpu``/``cuda``/``cuda:N``, or nothing (config default)."""
    if device is None:
        return {}
    import torch

    device = str(device)
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"--device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine (use --device cpu).")
    try:
        torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device!r} is malformed: {e}") from e
    return {"device": f"$torch.device('{device}')"}


def _checkpoint(model, parser) -> tuple[str, dict]:
    """Path of the checkpoint (``--model``, else the config's ``ckpt_path``) and its loaded state dict.

    Raises:
        FileNotFoundError, ValueError: missing or unusable checkpoint (:func:`bundle.engines.checkpoints.network_state_dict`).
    """
    from bundle.engines.checkpoints import network_state_dict

    path = str(Path(str(model)).resolve()) if model is not None else str(parser.get_parsed_content("ckpt_path"))
    return path, network_state_dict(path)


def _model_configs(root: Path, base: Sequence[str], model, registration_only: bool | None) -> tuple[list[str], str]:
    """Config names for the checkpoint (``base`` + the overlays whose network takes it) and the checkpoint path."""
    names = list(base)
    path, state = _checkpoint(model, read_config(root, names))
    return [*names, *checkpoint_overlays(root, names, state, registration_only, path)], path


def _prealign_override(prealign: str | None, parser) -> dict:
    """``{"prealign": value}`` when the configs have that id; ``"none"`` is always accepted.

    Raises:
        ValueError: unknown value, or pre-alignment asked of a bundle version without that stage.
    """
    if prealign is None:
        return {}
    prealign = str(prealign).lower()
    if prealign not in PREALIGN_CHOICES:
        raise ValueError(f"--prealign must be one of {PREALIGN_CHOICES}, got {prealign!r}.")
    if "prealign" in parser:
        return {"prealign": prealign}
    if prealign == "none":
        return {}
    raise ValueError(f"--prealign {prealign}: this bundle's inference config has no pre-alignment stage ('prealign' id).")


def _check_overrides(overrides: Mapping, root: Path, files: Sequence[str], command: str, function=None) -> None:
    """Every ``--<id>`` that is not an option of the command must be an id of its configs (a misspelled option
    would otherwise become a new, unused config id).

    Raises:
        ValueError: unknown ids, with the closest valid ones.
    """
    import difflib

    if not overrides:
        return
    parser = read_config(root, files)
    unknown = [k for k in overrides if k not in parser]
    if unknown:
        import inspect

        options = [n for n, a in inspect.signature(function).parameters.items() if a.kind == a.KEYWORD_ONLY
                   or a.kind == a.POSITIONAL_OR_KEYWORD] if function is not None else []
        ids = options + [k for k in parser.get() if not k.startswith("_")]
        hints = {k: difflib.get_close_matches(k, ids, n=3) for k in unknown}
        said = "; ".join(f"--{k}" + (f" (did you mean {', '.join('--' + h for h in v)}?)" if v else "") for k, v in hints.items())
        raise ValueError(f"{command}: unknown option(s) {said}; see `brainreg {command} --help` "
                         f"and the ids of {', '.join(Path(f).name for f in files)}.")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _work_folder() -> tempfile.TemporaryDirectory:
    """A temporary folder ``brainreg_<pid>_*`` for the one-pair datalist; the folders of killed runs (their pid is
    gone) are removed first, so a ``kill -9`` leaves nothing behind for long."""
    root = Path(tempfile.gettempdir())
    for stale in root.glob("brainreg_*_*"):
        pid = stale.name.split("_")[1]
        if stale.is_dir() and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return tempfile.TemporaryDirectory(prefix=f"brainreg_{os.getpid()}_")


def _write_datalist(folder: str, entry: dict) -> str:
    path = os.path.join(folder, "datalist.json")
    with open(path, "w") as f:
        json.dump({"testing": [entry]}, f, indent=2)
    return path


def register(
    moving,
    fixed,
    out: str,
    moving_label: str | None = None,
    moving_brain_mask: str | None = None,
    fixed_brain_mask: str | None = None,
    model: str | None = None,
    device: str | None = None,
    prealign: str | None = None,
    itk: bool = False,
    refine: bool = False,
    refine_native: bool = False,
    registration_only: bool | None = None,
    bundle_root: str | None = None,
    **overrides,
) -> list[str]:
    """Register MOVING to FIXED with configs/inference.json; write the outputs to the folder OUT.

    Writes ``warped.nii.gz``, ``ddf.nii.gz`` (voxel units, pull-back), ``jacobian_det.nii.gz``,
    ``warped_label.nii.gz`` (with --moving_label) and, for the joint model, ``seg_moving.nii.gz`` /
    ``seg_fixed.nii.gz``, all on the fixed image's grid.

    Args:
        moving: moving image (NIfTI/NRRD/MHA), or a list of files stacked as channels.
        fixed: fixed image (same channels as the moving one).
        out: output folder (created; existing files of the same names are replaced).
        moving_label: label map of the moving image, warped with nearest neighbour.
        moving_brain_mask, fixed_brain_mask: brain masks (on their image's grid) for images that are not
            skull-stripped: every voxel outside becomes background before the registration (the tumour model was
            trained on skull-stripped brains and labels scalp and skull otherwise).
        model: checkpoint; default the config's ckpt_path (the shipped registration model,
            models/pretrained/registration_t1_conditioned_2mm.pt). Another checkpoint gets the configs whose network
            takes it (``configs/joint.json`` for the joint model, see :func:`bundle.configs.checkpoint_overlays`).
        device: cpu, cuda or cuda:N; default CUDA when available.
        prealign: none, rigid or affine pre-alignment before the deformable step (default: the config's).
        itk: also write itk_displacement.nii.gz and itk_transform.h5 (ITK/ANTs, physical LPS mm).
        refine: add configs/instance_optimisation.json: the network's field refined on the pair on the network's
            grid (2 mm for the shipped model; diffeomorphic residual, 30 steps).
        refine_native: add configs/native_refinement.json: the whole transform refined on the fixed image's native
            grid, levels of 4, 2 and 1 voxels (diffeomorphic residual; settings chosen on validation pairs, see
            docs/README.md; about 1 min per IBSR pair on 2 CPU cores). Combines with --refine.
        registration_only: the checkpoint must be a registration-only (True) or joint (False) model; default:
            either, detected from its parameters.
        bundle_root: the bundle folder; default the repository of this package, else the current folder.
        overrides: any other config id, e.g. --pixdim "[2.0,2.0,2.0]".

    Returns:
        the written files.

    Raises:
        FileNotFoundError: a missing input file or checkpoint.
        ValueError: bad option values or an unusable checkpoint.
    """
    root = find_bundle_root(bundle_root)
    entry = {"moving": _existing(moving, "moving image"), "fixed": _existing(fixed, "fixed image")}
    if moving_label is not None:
        entry["moving_label"] = _existing(moving_label, "moving label map")
    for key, mask in (("moving_brain_mask", moving_brain_mask), ("fixed_brain_mask", fixed_brain_mask)):
        if mask is not None:
            entry[key] = _existing(mask, key.replace("_", " "))
    out_dir = writable_folder(Path(str(out)).resolve(), "output folder")
    entry["name"] = out_dir.name
    files, ckpt_path = _model_configs(root, ["inference.json"], model, registration_only)
    if refine:
        files.append("instance_optimisation.json")
    if refine_native:
        files.append("native_refinement.json")
    settings = {
        **_device_override(device),
        **_prealign_override(prealign, read_config(root, files)),
        "ckpt_path": ckpt_path,
        "output_dir": str(out_dir.parent),
        "infer_section": "testing",
        "pairing": None,
        "itk_export": bool(itk),
    }
    _check_overrides(overrides, root, files, "register", register)
    with _work_folder() as tmp:
        run_config("inference", root, files, {**overrides, **settings, "datalist": _write_datalist(tmp, entry)})
    return sorted(str(p) for p in out_dir.iterdir() if p.is_file() and not p.name.startswith("."))


def segment(
    image,
    out: str,
    brain_mask: str | None = None,
    model: str | None = None,
    device: str | None = None,
    bundle_root: str | None = None,
    **overrides,
) -> list[str]:
    """Segment the tumour in IMAGE (joint model's segmentation path, configs/inference_segmentation.json).

    Args:
        image: the shipped tumour model takes two skull-stripped sequences stacked as channels, T1c then FLAIR
            (a list of two files, or one file with both), e.g. ``--image "['t1c.nii.gz','flair.nii.gz']"``;
            another model its own channels.
        out: output folder; gets seg.nii.gz on the image's grid (the shipped tumour model: 0 background, 1 oedema,
            2 tumour core; a one-class model: 1 tumour).
        brain_mask: a brain mask on the image's grid, for images that are not skull-stripped (every voxel outside
            becomes background first; the tumour model was trained on skull-stripped brains and labels scalp and
            skull otherwise).
        model: joint-model checkpoint; default the shipped tumour model (configs/tumour.json,
            models/pretrained/joint_tumour_regions_t1c_flair_2mm.pt). The configs that build its network are chosen
            from its parameters (``joint.json`` for a T1 joint model, ``joint.json`` + ``tumour.json`` [+
            ``tumour_whole.json`` for one tumour class]).
        device: cpu, cuda or cuda:N.
        bundle_root: the bundle folder (see register).
        overrides: any other config id of inference_segmentation.json.

    Returns:
        the written files.

    Raises:
        FileNotFoundError: a missing image or checkpoint.
        ValueError: bad options, or a registration-only checkpoint (it has no segmentation head).
    """
    root = find_bundle_root(bundle_root)
    entry = {"image": _existing(image, "image")}
    if brain_mask is not None:
        entry["brain_mask"] = _existing(brain_mask, "brain mask")
    out_dir = writable_folder(Path(str(out)).resolve(), "output folder")
    entry["name"] = out_dir.name
    ckpt_path, state = _checkpoint(model, read_config(root, TUMOUR_SEGMENTATION_CONFIGS))
    if is_registration_only(state):
        raise ValueError(f"checkpoint {ckpt_path} is a registration-only model: it has no tumour segmentation head.")
    overlays = checkpoint_overlays(root, ["inference.json"], state, registration_only=False, path=ckpt_path)
    files = ["inference.json", *overlays, "inference_segmentation.json"]
    settings = {**_device_override(device), "ckpt_path": ckpt_path, "output_dir": str(out_dir.parent)}
    _check_overrides(overrides, root, files, "segment", segment)
    with _work_folder() as tmp:
        run_config("inference", root, files, {**overrides, **settings, "infer_section": "testing",
                                         "datalist": _write_datalist(tmp, entry)})
    return sorted(str(p) for p in out_dir.iterdir() if p.is_file() and not p.name.startswith("."))


def evaluate(
    datalist: str | None = None,
    out: str | None = None,
    section: str = "testing",
    model: str | None = None,
    device: str | None = None,
    registration_only: bool | None = None,
    bundle_root: str | None = None,
    **overrides,
) -> list[str]:
    """Evaluate a checkpoint on the pairs of a datalist (configs/train.json + configs/evaluate.json).

    Writes per-pair and summary CSVs (Dice before/after, HD95 mm, folding %, SDlogJ; tumour Dice for the
    joint model) on the network grid.

    Args:
        datalist: datalist JSON (see docs/README.md); default the embedded demo (built if needed).
        out: folder for the CSVs; default eval/ of the bundle.
        section: datalist section to evaluate.
        model: checkpoint; default models/model.pt of the bundle.
        device: cpu, cuda or cuda:N.
        registration_only: the checkpoint is the registration-only model; default: detected from its keys.
        bundle_root: the bundle folder (see register).
        overrides: any other config id, e.g. --pixdim "[2.0,2.0,2.0]".

    Returns:
        the CSV files written.

    Raises:
        FileNotFoundError: a missing datalist or checkpoint.
        ValueError: bad options or an unusable checkpoint.
    """
    root = find_bundle_root(bundle_root)
    data = {} if datalist is None else {"datalist": _existing(datalist, "datalist")}
    files, ckpt_path = _model_configs(root, ["train.json", "evaluate.json"], model, registration_only)
    settings = {**_device_override(device), **data, "ckpt_path": ckpt_path, "eval_section": str(section)}
    out_dir = writable_folder(Path(str(out)).resolve() if out is not None else root / "eval", "output folder")
    settings["output_dir"] = str(out_dir)
    _check_overrides(overrides, root, files, "evaluate", evaluate)
    run_config("evaluating", root, files, {**overrides, **settings})
    return sorted(str(p) for p in out_dir.glob("*.csv"))


def export_torchscript(
    out: str | None = None,
    model: str | None = None,
    registration_only: bool | None = None,
    input_shape: Sequence[int] | None = None,
    bundle_root: str | None = None,
    **overrides,
) -> str:
    """Export a checkpoint to TorchScript with monai.bundle ckpt_export (traced; metadata and configs embedded).

    The networks are traced (torch.jit.script cannot compile them); the traced model runs on any input
    shape that is a multiple of 16 on each axis, with ``2 * num_channels`` input channels.

    Args:
        out: TorchScript file; default models/model.ts of the bundle.
        model: checkpoint; default models/model.pt of the bundle.
        registration_only: the checkpoint is the registration-only model; default: detected from its keys.
        input_shape: shape of the tracing input; default [1, 2 * num_channels, 64, 64, 64] (3D).
        bundle_root: the bundle folder (see register).
        overrides: any other config id of inference.json.

    Returns:
        the written file.

    Raises:
        FileNotFoundError, ValueError: a missing or unusable checkpoint.
    """
    from monai.bundle import ckpt_export

    from bundle.engines import load_checkpoint

    root = find_bundle_root(bundle_root)
    files, ckpt_path = _model_configs(root, ["inference.json"], model, registration_only)
    _check_overrides(overrides, root, files, "export torchscript", export_torchscript)
    parser = read_config(root, files, overrides)
    if input_shape is None:
        channels = 2 * int(parser.get_parsed_content("num_channels"))
        input_shape = [1, channels, *([64] * int(parser.get_parsed_content("spatial_dims")))]
    out_path = Path(str(out)).resolve() if out is not None else root / "models" / "model.ts"
    writable_folder(out_path.parent, "output folder of")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    key = "network" if isinstance(load_checkpoint(ckpt_path).get("network"), Mapping) else ""
    from bundle.networks import JointRegSegNet

    if isinstance(parser.get_parsed_content("network_def"), JointRegSegNet):
        meta = {}
    else:  # metadata.json describes the joint network's 7 output channels; the registration net has the DDF only
        ndim = int(parser.get_parsed_content("spatial_dims"))
        meta = {
            "_meta_#network_data_format#outputs#pred#num_channels": ndim,
            "_meta_#network_data_format#outputs#pred#type": "displacement field",
            "_meta_#network_data_format#outputs#pred#format": "ddf",
            "_meta_#network_data_format#outputs#pred#channel_def": {
                str(k): f"displacement along axis {k} (voxels)" for k in range(ndim)
            },
        }
    ckpt_export(
        "network_def",
        filepath=str(out_path),
        ckpt_file=ckpt_path,
        meta_file=str(root / "configs" / "metadata.json"),
        config_file=config_paths(root, files),
        key_in_ckpt=key,
        use_trace=True,
        input_shape=[int(s) for s in input_shape],
        bundle_root=str(root),
        **overrides,
        **meta,
    )
    return str(out_path)


def export_itk(ddf: str, field: str | None = None, transform: str | None = None) -> list[str]:
    """Convert an inference ddf.nii.gz into an ITK/ANTs displacement field and an ITK composite transform.

    Args:
        ddf: ddf.nii.gz written by register / inference (voxel units of the fixed grid).
        field: displacement field to write (.nii.gz, .nii, .mha, .nrrd; physical LPS mm);
            default itk_displacement.nii.gz next to DDF.
        transform: composite transform file to write (.h5); default itk_transform.h5 next to DDF.

    Returns:
        the written files.

    Raises:
        FileNotFoundError: DDF does not exist.
        ValueError: DDF is not a vector field as inference writes, or unsupported suffixes.
    """
    from bundle.io.itk_export import export_ddf_file

    written = export_ddf_file(_existing(ddf, "DDF file"), field, transform)
    return [str(written["field"]), str(written["transform"])]


def demo(
    root: str | None = None,
    train: bool = True,
    infer: bool = True,
    device: str | None = None,
    **overrides,
) -> list[str]:
    """Build the embedded demo data set, train the joint model on it and register its test pairs.

    Same as the README's two commands. Training shows a progress bar; on 2 CPU cores it takes about 11 minutes
    (docs/results/demo_timing.csv).

    Args:
        root: folder for demo_data/, models/, outputs/ and eval/; default the bundle folder.
        train: train (configs/train.json); --notrain only builds the data (and infers with an existing model).
        infer: register the test pairs with the trained model into outputs/.
        device: cpu, cuda or cuda:N.
        overrides: config ids for training and inference, e.g. --max_epochs 5 or --pixdim "[4.0,4.0,4.0]".

    Returns:
        the demo datalist, and the checkpoint and output folder when trained / inferred.

    Raises:
        FileNotFoundError: the nilearn template is missing, or --notrain --infer without a trained model.
    """
    from bundle.engines import load_checkpoint
    from bundle.data.demo import build_demo_dataset

    bundle = find_bundle_root()  # the configs; ``root`` is only where the demo's files go
    work = Path(str(root)).resolve() if root is not None else bundle
    inference_ids = read_config(bundle, ["inference.json"])
    _check_overrides({k: v for k, v in overrides.items() if k not in inference_ids}, bundle, ["train.json"], "demo", demo)
    results = [build_demo_dataset(str(work / "demo_data"))]
    common = {**_device_override(device), "bundle_root": str(work)}
    if train:
        run_config("training", bundle, ["train.json"], {**overrides, **common})
        results.append(str(work / "models" / "model.pt"))
    if infer:
        load_checkpoint(work / "models" / "model.pt")  # clear error before the pipeline starts
        run_config("inference", bundle, ["inference.json"], {**overrides, **common})
        results.append(str(work / "outputs"))
    return results


COMMANDS = {
    "register": register,
    "segment": segment,
    "evaluate": evaluate,
    "export": {"torchscript": export_torchscript, "itk": export_itk},
    "demo": demo,
}


def _help_last(argv: Sequence[str]) -> list[str]:
    """Move ``--help``/``-h`` behind fire's ``--`` separator: the commands accept any ``--<config id>`` flag, so
    fire would otherwise pass ``help=True`` to them as an override (and run them) instead of showing help."""
    argv = list(argv)
    end = argv.index("--") if "--" in argv else len(argv)
    if not any(a in ("--help", "-h") for a in argv[:end]):
        return argv
    command = [a for a in argv[:end] if a not in ("--help", "-h")]
    return [*command, "--", "--help", *[a for a in argv[end + 1 :] if a != "--help"]]


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``brainreg`` / ``python -m bundle``: run a command; bad input ends with one clear line."""
    argv = _help_last(sys.argv[1:] if argv is None else argv)
    try:
        fire.Fire(COMMANDS, command=argv, name="brainreg")
    except Exception as e:
        cause = input_error(e)
        if cause is None:
            raise
        print(f"brainreg: error: {cause}", file=sys.stderr)
        sys.exit(2)


