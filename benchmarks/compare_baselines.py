"""Side-by-side evaluation on held-out test subjects: the bundle's models vs identity, affine, ANTs SyN, elastix, greedy.

    python benchmarks/compare_baselines.py run [--dataset ibsr|synthseg|oasis|lpba40] \
        [--methods identity,affine,ours,ants_syn,ants_syn_full,elastix,greedy] [--io-steps 0,50] \
        [--ckpt models/pretrained/joint_t1_ibsr_4mm.pt] [--pairs N] [--out runs/compare] [--name ours] [--set ID=VALUE] \
        [--greedy-threads N]
    python benchmarks/compare_baselines.py report [--dataset ...] [--out ...]   # table + figures into docs/

``run`` registers every ordered pair of the dataset's test subjects (never trained on; see
``bundle/data/evaluation.py``: IBSR CSF/GM/WM, SynthSeg-synthesised images with 30 FreeSurfer structures, the
labelled OASIS-derived pair, LPBA40 with its 56 manually delineated structures) with each method and scores,
in the **fixed image's native grid**: Dice per label of the warped moving labels (nearest neighbour, or the
tool's own label interpolation where noted; the mean is over the labels present in the fixed map), HD95 in mm
(MONAI), % of voxels with det J <= 0 and SDlogJ of the full transform, and wall time per pair on this machine.
Rows are appended to ``OUT/results.csv`` as they come, so an interrupted run is resumed (pairs already scored
for a method are skipped).

Methods:
- ``identity``: the moving labels resampled onto the fixed grid by world coordinates.
- ``affine``: the bundle's ITK pre-alignment alone (``bundle.alignment.itk_affine_register``).
- ``ours`` / ``ours_io<N>``: the bundle's inference command (``configs/inference.json``: affine
  pre-alignment + network, composed; ``--io-steps`` adds instance-specific optimisation runs). Another
  model: ``--ckpt``, ``--configs inference.json,registration_only.json`` and ``--name ours_reg``.
- ``ants_syn``: ``ants.registration(type_of_transform="SyN", random_seed=0)`` of antspyx with all its
  defaults (as of antspyx 0.6.3): an ``Affine[0.25]`` stage (Mattes MI, 2100x1200x1200x0 iterations,
  shrink 4x2x2x1) then ``SyN[0.2,3,0]`` with Mattes MI and ``reg_iterations=(40, 20, 0)`` at shrink 4x2x1
  (smoothing 2x1x0 voxels): **no** SyN iterations at full resolution. Labels: ``genericLabel`` interpolation.
- ``ants_syn_full``: the same call with ``reg_iterations=(100, 70, 50, 20)``, ``syn_metric="CC"``,
  ``syn_sampling=4`` (CC radius 4, shrink 8x4x2x1, smoothing 3x2x1x0 voxels): the usual
  antsRegistrationSyN-like brain setting, 20 SyN iterations at full resolution (gradient step 0.2 as
  antspyx's default, where antsRegistrationSyN.sh uses 0.1; affine stage unchanged).
- ``elastix``: itk-elastix with its default ``affine`` then ``bspline`` parameter maps.
- ``greedy``: PICSL greedy (``picsl-greedy``, in-process) with its documented brain MRI usage: 12-dof affine
  (NCC 2x2x2, 100x50x10, from matched image centres), then greedy diffeomorphic registration (NCC 2x2x2,
  100x50x10, ``-s 2.0vox 0.5vox``) initialised with it, then the moving labels resliced with
  ``-ri LABEL 0.2vox``; ``-threads`` from ``--greedy-threads`` (default: all cores; recorded in the
  ``hardware`` column). The command lines are :func:`greedy_commands`; det J is that of greedy's composed
  (affine + deformable) field.
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from functools import partial
from itertools import permutations
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bundle.data.evaluation import DATASETS, load

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CKPT = REPO / "models" / "pretrained" / "registration_t1_conditioned_2mm.pt"  # configs/inference.json's
BASE_FIELDS = ["method", "pair", "moving", "fixed", "dice_mean", "hd95_mm", "folding_pct", "sd_log_jacobian",
               "seconds", "hardware"]


def fields(labels: dict) -> list[str]:
    return BASE_FIELDS[:4] + [f"dice_{n}" for n in labels.values()] + BASE_FIELDS[4:]


def hardware() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__} (CPU)"


def score(warped_label: np.ndarray, fixed: dict, jacobian: np.ndarray | None, labels: dict) -> dict:
    """Dice per label, HD95 (mm) and Jacobian statistics on the fixed native grid.

    A label absent from the fixed map scores NaN (left out of the means); HD95 is averaged over the labels
    present in both maps."""
    from monai.metrics import compute_hausdorff_distance

    fixed_label = fixed["label_array"]
    row, both = {}, []
    for value, name in labels.items():
        a, b = warped_label == value, fixed_label == value
        row[f"dice_{name}"] = 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()) if b.any() else float("nan")
        if a.any() and b.any():
            both.append(value)
    row["dice_mean"] = float(np.nanmean([row[f"dice_{n}"] for n in labels.values()]))
    spacing = np.linalg.norm(fixed["affine"][:3, :3], axis=0)
    one_hot = lambda x: torch.stack([torch.as_tensor(x == v) for v in both])[None]
    if both:
        hd = compute_hausdorff_distance(one_hot(warped_label), one_hot(fixed_label), percentile=95, spacing=spacing.tolist())
        row["hd95_mm"] = float(hd.nanmean())
    else:  # no label in both maps (a failed registration): no surface distance, and no crash of the whole run
        row["hd95_mm"] = float("nan")
    if jacobian is None:  # a global affine (or identity): det J constant and positive
        row["folding_pct"], row["sd_log_jacobian"] = 0.0, 0.0
    else:
        row["folding_pct"] = float((jacobian <= 0).mean() * 100)
        row["sd_log_jacobian"] = float(np.log(np.clip(jacobian, 1e-9, None)).std())
    return row


def jacobian_of_itk_field(field) -> np.ndarray:
    from bundle.io.itk_export import itk_field_to_ddf
    from bundle.metrics import jacobian_determinant

    ddf, _ = itk_field_to_ddf(field)
    return jacobian_determinant(torch.as_tensor(ddf)[None])[0, 0].numpy()


def run_identity(moving: dict, fixed: dict, work: Path):
    from bundle.spatial import resample_to_grid

    start = time.perf_counter()
    warped = resample_to_grid(torch.as_tensor(moving["label_array"])[None], torch.as_tensor(moving["affine"]),
                              torch.as_tensor(fixed["affine"]), fixed["label_array"].shape, mode="nearest")[0]
    return warped.numpy(), None, time.perf_counter() - start


def run_affine(moving: dict, fixed: dict, work: Path):
    from bundle.alignment import itk_affine_register
    from bundle.spatial import resample_to_grid

    start = time.perf_counter()
    matrix = itk_affine_register(moving["image_array"], moving["affine"], fixed["image_array"], fixed["affine"])
    warped = resample_to_grid(torch.as_tensor(moving["label_array"])[None], torch.as_tensor(moving["affine"]),
                              torch.as_tensor(matrix @ fixed["affine"]), fixed["label_array"].shape, mode="nearest")[0]
    return warped.numpy(), None, time.perf_counter() - start


# ``ants_syn_full``: antsRegistrationSyN-like SyN stage (see the module docstring); ``ants_syn`` passes none of these.
ANTS_SYN_FULL = {"reg_iterations": (100, 70, 50, 20), "syn_metric": "CC", "syn_sampling": 4}


def run_ants(moving: dict, fixed: dict, work: Path, **options):
    """``ants.registration(type_of_transform="SyN", random_seed=0, **options)`` (no options: antspyx defaults),
    labels with ``genericLabel``; timed from reading the images to the warped labels. The Jacobian is that of
    the whole transform (affine + SyN composed into one field on the fixed grid, not timed)."""
    import ants

    from bundle.io.itk_export import read_itk_displacement_field
    from bundle.metrics import jacobian_determinant

    start = time.perf_counter()
    f, m = ants.image_read(str(fixed["image"])), ants.image_read(str(moving["image"]))
    reg = ants.registration(fixed=f, moving=m, type_of_transform="SyN", random_seed=0, **options)
    labels = ants.apply_transforms(f, ants.image_read(str(moving["label"])), reg["fwdtransforms"], interpolator="genericLabel")
    seconds = time.perf_counter() - start
    ddf, _ = read_itk_displacement_field(ants.apply_transforms(f, m, reg["fwdtransforms"], compose=str(work / "ants_")))
    jacobian = jacobian_determinant(torch.as_tensor(ddf)[None])[0, 0].numpy()
    return labels.numpy().astype(np.int16), jacobian, seconds


def run_ants_full(moving: dict, fixed: dict, work: Path):
    """``ants_syn_full``: :func:`run_ants` with :data:`ANTS_SYN_FULL`."""
    return run_ants(moving, fixed, work, **ANTS_SYN_FULL)


def run_elastix(moving: dict, fixed: dict, work: Path):
    import itk

    start = time.perf_counter()
    f, m = itk.imread(str(fixed["image"]), itk.F), itk.imread(str(moving["image"]), itk.F)
    params = itk.ParameterObject.New()
    for name in ("affine", "bspline"):
        params.AddParameterMap(params.GetDefaultParameterMap(name))
    _, result = itk.elastix_registration_method(f, m, parameter_object=params, log_to_console=False, output_directory=str(work))
    for i in range(result.GetNumberOfParameterMaps()):
        result.SetParameter(i, "FinalBSplineInterpolationOrder", "0")  # nearest neighbour for labels
    labels = itk.transformix_filter(itk.imread(str(moving["label"]), itk.F), result, log_to_console=False, output_directory=str(work))
    seconds = time.perf_counter() - start
    field = itk.transformix_deformation_field(m, result, log_to_console=False, output_directory=str(work))
    return np.round(itk.array_from_image(labels).transpose(2, 1, 0)).astype(np.int16), jacobian_of_itk_field(field), seconds


# Greedy's documented brain MRI settings (greedy.readthedocs.io; picsl-greedy README).
GREEDY_METRIC = "NCC 2x2x2"
GREEDY_ITERATIONS = "100x50x10"
GREEDY_SMOOTHING = "2.0vox 0.5vox"
GREEDY_LABEL_INTERPOLATION = "LABEL 0.2vox"
GREEDY_FILES = {"affine": "greedy_affine.mat", "warp": "greedy_warp.nii.gz", "warped_label": "greedy_warped_label.nii.gz",
                "composed": "greedy_composed.nii.gz", "log": "greedy.log"}


def greedy_commands(fixed_image: Path, moving_image: Path, moving_label: Path, work: Path, threads: int) -> dict[str, str]:
    """The greedy command lines of one pair (arguments of ``Greedy3D.execute``), in the order run.

    ``affine``, ``deformable`` and ``reslice`` are the documented three steps (timed together); ``compose``
    writes the whole transform (deformable warp then affine) as one displacement field on the fixed grid, for
    the Jacobian (not timed). Each starts with ``-d 3 -threads N -V 0`` (output files in ``work``, the
    optimiser's trace silenced); the registrations also get ``-seed 1`` (greedy's default seed 0 means
    stochastic sampling) and the written fields ``-wp 0`` (full precision instead of greedy's default 0.1-voxel
    compression, which would add quantisation noise to det J).

    Raises:
        ValueError: ``threads`` < 1, or a path with whitespace (``execute`` splits the command on it).
    """
    if int(threads) != threads or threads < 1:
        raise ValueError(f"greedy needs a positive whole number of threads, got {threads!r}.")
    out = {k: Path(work) / name for k, name in GREEDY_FILES.items()}
    for path in (fixed_image, moving_image, moving_label, *out.values()):
        if any(c.isspace() for c in str(path)):
            raise ValueError(f"greedy command lines are split on whitespace; this path has some: {str(path)!r}.")
    common = f"-d 3 -threads {int(threads)} -V 0"
    pair = f"-i {fixed_image} {moving_image}"
    return {
        "affine": (f"{common} -seed 1 -a -dof 12 -m {GREEDY_METRIC} -n {GREEDY_ITERATIONS} -ia-image-centers {pair} "
                   f"-o {out['affine']}"),
        "deformable": (f"{common} -seed 1 -m {GREEDY_METRIC} -n {GREEDY_ITERATIONS} -s {GREEDY_SMOOTHING} -wp 0 {pair} "
                       f"-it {out['affine']} -o {out['warp']}"),
        "reslice": (f"{common} -rf {fixed_image} -ri {GREEDY_LABEL_INTERPOLATION} -rm {moving_label} {out['warped_label']} "
                    f"-r {out['warp']} {out['affine']}"),
        "compose": f"{common} -wp 0 -rf {fixed_image} -rc {out['composed']} -r {out['warp']} {out['affine']}",
    }


def _greedy(greedy, stage: str, command: str, log) -> None:
    try:
        greedy.execute(command, out=log, err=log)
    except RuntimeError as error:
        raise RuntimeError(f"greedy {stage} step failed ({error}); command: greedy {command}") from error


def run_greedy(moving: dict, fixed: dict, work: Path, threads: int | None = None):
    """``greedy``: affine + deformable + label reslicing (:func:`greedy_commands`), timed together, in-process.

    The Jacobian is that of the **whole** transform: greedy composes the deformable warp and the affine into
    one displacement field on the fixed grid (``-rc``), which greedy writes like ITK (physical LPS millimetres,
    ``T(x) = x + u(x)`` from fixed to moving points, i.e. a pull-back), read with
    :func:`bundle.io.itk_export.read_itk_displacement_field`. ``threads``: greedy's ``-threads`` (default: all cores).
    """
    from picsl_greedy import Greedy3D

    from bundle.io.itk_export import read_itk_displacement_field
    from bundle.metrics import jacobian_determinant

    commands = greedy_commands(fixed["image"], moving["image"], moving["label"], work,
                               (os.cpu_count() or 1) if threads is None else threads)
    with open(work / GREEDY_FILES["log"], "w") as log:
        start = time.perf_counter()
        greedy = Greedy3D()
        for stage in ("affine", "deformable", "reslice"):
            _greedy(greedy, stage, commands[stage], log)
        seconds = time.perf_counter() - start
        _greedy(greedy, "compose", commands["compose"], log)
    warped, _ = load(work / GREEDY_FILES["warped_label"])
    composed = work / GREEDY_FILES["composed"]
    ddf, affine = read_itk_displacement_field(composed)
    shape = fixed["label_array"].shape
    if ddf.shape[1:] != shape or warped.shape != shape or not np.allclose(affine, fixed["affine"], atol=1e-3):
        raise ValueError(f"greedy output {composed} (shape {ddf.shape[1:]}, affine {affine.tolist()}) is not on the fixed "
                         f"grid of {fixed['image']} (shape {shape}, affine {np.asarray(fixed['affine']).tolist()}).")
    jacobian = jacobian_determinant(torch.as_tensor(ddf)[None])[0, 0].numpy()
    return np.rint(warped).astype(np.int16), jacobian, seconds


def run_ours(pairs: list[tuple[dict, dict]], work: Path, ckpt: Path, io_steps: int, configs: list[str], label: str = "ours",
             overrides: dict | None = None) -> dict:
    """The bundle's inference command, in-process, timed per pair (loading to writing, pre-alignment included)."""
    from ignite.engine import Events
    from bundle.configs import read_config

    datalist = {"testing": [{"moving": str(m["image"]), "fixed": str(f["image"]), "moving_label": str(m["label"]),
                             "name": f"{m['name']}_to_{f['name']}"} for m, f in pairs]}
    (work / "datalist.json").write_text(json.dumps(datalist))
    parser = read_config(REPO, configs, {"datalist": str(work / "datalist.json"), "ckpt_path": str(ckpt), "output_dir": str(work / "out"),
                                         "instance_optimisation_steps": io_steps, **(overrides or {})})
    evaluator = parser.get_parsed_content("evaluator")
    times, started = [], {}
    evaluator.add_event_handler(Events.GET_BATCH_STARTED, lambda e: started.update(t=time.perf_counter()))
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: times.append(time.perf_counter() - started["t"]))
    evaluator.run()
    results = {}
    for (m, f), seconds in zip(pairs, times):
        folder = work / "out" / f"{m['name']}_to_{f['name']}"
        warped = np.asarray(nib.load(folder / "warped_label.nii.gz").dataobj).astype(np.int16)
        jacobian = np.asarray(nib.load(folder / "jacobian_det.nii.gz").dataobj)
        results[(m["name"], f["name"])] = (warped.reshape(f["label_array"].shape), jacobian.reshape(f["label_array"].shape), seconds)
        if (m, f) == pairs[0]:  # the whole transform, for the deformation-grid figure
            ddf = np.asarray(nib.load(folder / "ddf.nii.gz").dataobj)[..., 0, :]
            np.save(work.parent / f"ddf_{m['name']}_to_{f['name']}_{label}.npy", np.moveaxis(ddf, -1, 0).astype(np.float32))
    return results


RUNNERS = {"identity": run_identity, "affine": run_affine, "ants_syn": run_ants, "ants_syn_full": run_ants_full,
           "elastix": run_elastix, "greedy": run_greedy}


def _done(results_csv: Path) -> set:
    if not results_csv.is_file():
        return set()
    with open(results_csv) as f:
        return {(r["method"], r["pair"]) for r in csv.DictReader(f)}


def _append(results_csv: Path, row: dict, labels: dict) -> None:
    new = not results_csv.is_file()
    with open(results_csv, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields(labels))
        if new:
            writer.writeheader()
        writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
        f.flush()


def _keep_for_figure(out: Path, method: str, pair: str, warped: np.ndarray, jacobian: np.ndarray | None) -> None:
    folder = out / "figure" / pair
    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(folder / f"{method}.npz", label=warped, jacobian=np.zeros(0) if jacobian is None else jacobian)


def split_pairs(dataset, section: str, work: Path, limit: int | None = None,
                only: list[str] | None = None) -> list[tuple[dict, dict]]:
    """The ordered pairs of a split section, each subject written once into ``work``.

    ``testing``: every ordered pair of the test subjects. ``validation`` (for choosing settings without touching
    the test split): every ordered pair of the validation subjects, or, with a single validation subject, that
    subject with the first two labelled training subjects, both ways.

    ``limit``: the first ``limit`` pairs only; ``only``: of those, the pairs named ``MOVING_to_FIXED``. Both are
    applied before any subject of a pair is written, so a bad name leaves ``work`` as it was (a single
    validation subject's partners excepted: finding them reads, and writes, training subjects).

    Raises:
        ValueError: unknown section, a dataset without a validation split, or a name in ``only`` that is not one of
            the pairs.
    """
    if section == "testing":
        names = list(permutations(dataset.testing, 2))
    elif section == "validation":
        split = getattr(dataset, "split", None) or {}
        validation = split.get("validation") or []
        if not validation:
            raise ValueError(f"dataset {dataset.name!r} has no validation subjects in its split file.")
        if len(validation) >= 2:
            names = list(permutations(validation, 2))
        else:
            partners = []
            work.mkdir(parents=True, exist_ok=True)  # the probe below writes the subjects it reads
            for s in split.get("training", []):
                if len(partners) == 2:
                    break
                try:
                    dataset.subject(s, work)
                    partners.append(s)
                except FileNotFoundError:  # an unlabelled training subject
                    continue
            names = [pair for s in partners for pair in ((validation[0], s), (s, validation[0]))]
    else:
        raise ValueError(f"section must be 'testing' or 'validation', got {section!r}.")
    names = names[:limit]
    if only:
        found = [f"{m}_to_{f}" for m, f in names]
        unknown = [n for n in only if n not in found]
        if unknown:
            raise ValueError(f"--pair {', '.join(unknown)}: not a {section} pair here; the pairs are {', '.join(found)}.")
        names = [pair for pair, n in zip(names, found) if n in only]
    work.mkdir(parents=True, exist_ok=True)
    subjects = {s: dataset.subject(s, work) for s in dict.fromkeys(n for pair in names for n in pair)}
    return [(subjects[m], subjects[f]) for m, f in names]


def run(dataset, out: Path, methods: list[str], io_steps: list[int], ckpt: Path, pairs_limit: int | None,
        configs: list[str], name: str = "ours", overrides: dict | None = None, greedy_threads: int | None = None,
        section: str = "testing", pair_names: list[str] | None = None) -> None:
    """Register and score every ordered pair of ``section`` (:func:`split_pairs`) with each method (see the module
    docstring); ``greedy_threads``: greedy's ``-threads`` (default: all cores), appended to the ``hardware``
    column of its rows; ``pair_names``: only these pairs (``MOVING_to_FIXED``) of the first ``pairs_limit``, e.g. to
    run a slow method's pairs as separate processes side by side."""
    unknown = [m for m in methods if m != "ours" and m not in RUNNERS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: ours, {', '.join(RUNNERS)}.")
    greedy_threads = (os.cpu_count() or 1) if greedy_threads is None else greedy_threads
    if "greedy" in methods:  # a bad thread count, or an OUT path greedy cannot take, fails before any registration
        greedy_commands(out / "f", out / "m", out / "l", out, greedy_threads)
    runners = {**RUNNERS, "greedy": partial(run_greedy, threads=greedy_threads)}
    pairs = split_pairs(dataset, section, out / "inputs", limit=pairs_limit, only=pair_names)
    out.mkdir(parents=True, exist_ok=True)
    labels = dataset.labels
    results_csv, hw = out / "results.csv", hardware()
    done = _done(results_csv)
    fixed = {f["name"]: f for _, f in pairs}
    for method in methods:
        if method == "ours":
            for steps in io_steps:
                label = name if steps == 0 else f"{name}_io{steps}"
                todo = [(m, f) for m, f in pairs if (label, f"{m['name']}_to_{f['name']}") not in done]
                if not todo:
                    continue
                with tempfile.TemporaryDirectory(dir=out) as work:
                    for (mn, fn), (warped, jac, seconds) in run_ours(todo, Path(work), ckpt, steps, configs, label, overrides).items():
                        row = {"method": label, "pair": f"{mn}_to_{fn}", "moving": mn, "fixed": fn, "seconds": seconds, "hardware": hw}
                        row.update(score(warped, fixed[fn], jac, labels))
                        _append(results_csv, row, labels)
                        if (mn, fn) == (pairs[0][0]["name"], pairs[0][1]["name"]):
                            _keep_for_figure(out, label, row["pair"], warped, jac)
                        print(f"{label:10s} {mn}->{fn}: Dice {row['dice_mean']:.3f} ({seconds:.1f} s)", flush=True)
            continue
        for m, f in pairs:
            pair = f"{m['name']}_to_{f['name']}"
            if (method, pair) in done:
                continue
            with tempfile.TemporaryDirectory(dir=out) as work:
                warped, jac, seconds = runners[method](m, f, Path(work))
            row = {"method": method, "pair": pair, "moving": m["name"], "fixed": f["name"], "seconds": seconds,
                   "hardware": hw + _threads(method, greedy_threads)}
            row.update(score(warped, f, jac, labels))
            _append(results_csv, row, labels)
            if (m, f) == pairs[0]:
                _keep_for_figure(out, method, pair, warped, jac)
            print(f"{method:10s} {pair}: Dice {row['dice_mean']:.3f} folding {row['folding_pct']:.3f}% ({seconds:.1f} s)", flush=True)


def _threads(method: str, greedy_threads: int) -> str:
    """The thread count a classical tool ran with, for the ``hardware`` column."""
    if method == "greedy":
        return f"; greedy -threads {greedy_threads}"
    if method.startswith("ants"):
        return f"; ITK threads {os.environ.get('ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS', 'all cores')}"
    return ""


def _summary(rows: list[dict], labels: dict) -> list[dict]:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    ants = [float(r["seconds"]) for r in rows if r["method"] == "ants_syn"]
    per_label = [f"dice_{n}" for n in labels.values()] if len(labels) <= 4 else []  # many labels: own table
    out = []
    for method in methods:
        sel = [r for r in rows if r["method"] == method]
        col = lambda k: np.array([float(r[k]) for r in sel])
        summary = {"method": method, "pairs": len(sel)}
        for k in ("dice_mean", *per_label, "hd95_mm", "folding_pct", "sd_log_jacobian"):
            summary[k] = f"{np.nanmean(col(k)):.3f} ± {np.nanstd(col(k)):.3f}"
        summary["seconds (median)"] = f"{np.median(col('seconds')):.1f}"
        summary["× faster than ANTs SyN"] = f"{np.median(ants) / np.median(col('seconds')):.1f}" if ants else "–"
        out.append(summary)
    return out


def _markdown(summary: list[dict]) -> str:
    keys = list(summary[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(str(s[k]) for k in keys) + " |" for s in summary]) + "\n"


def _per_structure(rows: list[dict], labels: dict, methods: list[str]) -> list[dict]:
    """Mean Dice of each structure (rows) per method (columns)."""
    table = []
    for name in labels.values():
        entry = {"structure": name}
        for m in methods:
            values = [float(r[f"dice_{name}"]) for r in rows if r["method"] == m]
            entry[m] = f"{np.nanmean(values):.3f}" if values and not np.all(np.isnan(values)) else "–"
        if any(v != "–" for k, v in entry.items() if k != "structure"):  # absent from every fixed map: no row
            table.append(entry)
    return table


def _coronal_axis(affine: np.ndarray) -> int:
    return int(np.argmax(np.abs(affine[1, :3])))  # the array axis closest to world anterior-posterior


def read_rows(paths: list[Path]) -> list[dict]:
    """The per-pair rows of committed result CSVs of this harness, one row per (method, pair): a later file's row
    replaces an earlier one's (a method run on its own, e.g. ANTs SyN full on a subset, next to a whole run).

    Raises:
        FileNotFoundError / ValueError: a file is missing, or its columns are not the first file's.
    """
    rows, columns = {}, None
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such results CSV")
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if columns is None:
                columns = reader.fieldnames
            elif reader.fieldnames != columns:
                raise ValueError(f"{path}: its columns are not those of {paths[0]} (another data set or harness?)")
            for row in reader:
                rows[(row["method"], row["pair"])] = row
    return list(rows.values())


def report(dataset, out: Path, section: str = "testing", rows_from: list[Path] | None = None,
           stem: str | None = None) -> None:
    """Markdown table, per-pair CSV and figures (box plots, overlays, deformation grid, Jacobian) into docs/
    (validation runs: ``*_validation`` files, so a selection run never overwrites the test results).

    ``rows_from``: build the tables from these committed CSVs (:func:`read_rows`) instead of ``out``'s run, into
    ``docs/results/<stem>.{csv,md}``; no figures (they need the run's images). Its first table compares every method
    on the pairs they all ran."""
    import shutil

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results, figures = REPO / "docs" / "results", REPO / "docs" / "figures"
    results.mkdir(parents=True, exist_ok=True)
    if rows_from:
        if not stem:
            raise ValueError("a report from committed CSVs needs its own --stem (it must not replace a run's files)")
        rows = read_rows(rows_from)
        tmp = results / f".{stem}.csv.tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(results / f"{stem}.csv")
    else:
        with open(out / "results.csv") as f:
            rows = list(csv.DictReader(f))
        stem = stem or ("baselines" if dataset.name == "ibsr" else f"baselines_{dataset.name}")
        stem += "_validation" if section == "validation" else ""
        shutil.copyfile(out / "results.csv", results / f"{stem}.csv")
    labels = dataset.labels
    methods = list(dict.fromkeys(r["method"] for r in rows))
    common = set.intersection(*[{r["pair"] for r in rows if r["method"] == m} for m in methods])
    warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)

    hardware = "; ".join(f"{h} ({', '.join(dict.fromkeys(r['method'] for r in rows if r['hardware'] == h))})"
                         for h in dict.fromkeys(r["hardware"] for r in rows)) if rows_from else rows[0]["hardware"]
    sources = f"Rows from {', '.join(str(Path(p)) for p in rows_from)}. " if rows_from else ""
    text = (f"{dataset.describe(section)}; scored on the fixed image's native grid; mean ± standard deviation over pairs. "
            f"{sources}Hardware: {hardware}.\n\n"
            f"Pairs every method ran ({len(common)}: {', '.join(sorted(common))}):\n\n"
            + _markdown(_summary([r for r in rows if r["pair"] in common], labels)))
    if any(sum(r["method"] == m for r in rows) > len(common) for m in methods):
        text += "\nAll pairs each method ran:\n\n" + _markdown(_summary(rows, labels))
    if len(labels) > 4:
        per_structure = _per_structure(rows, labels, methods)
        text += (f"\nMean Dice per structure (all pairs each method ran; {len(per_structure)} of the {len(labels)} "
                 "structures occur in these maps):\n\n" + _markdown(per_structure))
    (results / f"{stem}.md").write_text(text)
    print(text)
    if rows_from:
        return
    figures.mkdir(parents=True, exist_ok=True)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, title in zip(axes, ("dice_mean", "hd95_mm", "seconds"), (f"mean Dice ({len(labels)} labels)", "HD95 (mm)", "seconds per pair")):
        ax.boxplot([[float(r[key]) for r in rows if r["method"] == m] for m in methods], tick_labels=methods)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
    axes[2].set_yscale("log")
    fig.tight_layout()
    fig.savefig(figures / f"{stem}_boxplots.png", dpi=110)
    plt.close(fig)

    if len(labels) > 4:  # per-structure box plots, left and right hemispheres pooled (as in VoxelMorph's figure)
        pooled = list(dict.fromkeys(n.removeprefix("L_").removeprefix("R_") for n in labels.values()))
        fig, ax = plt.subplots(figsize=(max(12, 0.9 * len(pooled) * len(methods) / 3), 4.5))
        for j, m in enumerate(methods):
            data = []
            for name in pooled:
                keys = [k for k in (name, f"L_{name}", f"R_{name}") if k in labels.values()]
                values = [float(r[f"dice_{k}"]) for r in rows if r["method"] == m for k in keys]
                data.append([v for v in values if not np.isnan(v)] or [np.nan])
            positions = np.arange(len(pooled)) * (len(methods) + 1) + j
            bp = ax.boxplot(data, positions=positions, widths=0.8, patch_artist=True, showfliers=False)
            for box in bp["boxes"]:
                box.set_facecolor(plt.cm.tab10(j))
            ax.plot([], [], color=plt.cm.tab10(j), lw=6, label=m)
        ax.set_xticks(np.arange(len(pooled)) * (len(methods) + 1) + (len(methods) - 1) / 2, pooled, rotation=45, ha="right")
        ax.set_ylabel("Dice")
        ax.legend(ncol=len(methods), fontsize=8)
        fig.tight_layout()
        fig.savefig(figures / f"{stem}_structures.png", dpi=110)
        plt.close(fig)

    for folder in sorted((out / "figure").glob("*_to_*")):
        moving_name, fixed_name = folder.name.split("_to_")
        fixed_image, affine = load(out / "inputs" / f"{fixed_name}_image.nii.gz")
        fixed_label, _ = load(out / "inputs" / f"{fixed_name}_label.nii.gz")
        kept = {m: np.load(folder / f"{m}.npz") for m in methods if (folder / f"{m}.npz").is_file()}
        axis = _coronal_axis(affine)
        index = fixed_image.shape[axis] // 2
        cut = lambda a: np.rot90(np.take(a, index, axis=axis))
        levels = [v - 0.5 for v in sorted(labels)[1 if len(labels) <= 4 else 0:]]  # borders between label values
        fig, axes = plt.subplots(2, len(kept) + 1, figsize=(3.2 * (len(kept) + 1), 6.6), squeeze=False)
        axes[0, 0].imshow(cut(fixed_image), cmap="gray")
        axes[0, 0].contour(cut(fixed_label), levels=levels, colors="lime", linewidths=0.5)
        axes[0, 0].set_title(f"fixed {fixed_name}")
        axes[1, 0].axis("off")
        im = None
        for i, (m, arrays) in enumerate(kept.items(), start=1):
            axes[0, i].imshow(cut(fixed_image), cmap="gray")
            axes[0, i].contour(cut(fixed_label), levels=levels, colors="lime", linewidths=0.5)
            axes[0, i].contour(cut(arrays["label"]), levels=levels, colors="red", linewidths=0.5)
            axes[0, i].set_title(m)
            if arrays["jacobian"].size:
                im = axes[1, i].imshow(cut(arrays["jacobian"]), cmap="RdBu_r", vmin=0, vmax=2)
                axes[1, i].set_title("det J")
            else:
                axes[1, i].text(0.5, 0.5, "global affine:\nconstant det J", ha="center", va="center")
        ddf_file = out / f"ddf_{folder.name}_ours.npy"
        if ddf_file.is_file() and "ours" in kept:  # deformation grid of the whole transform, in the last free panel
            ddf = np.load(ddf_file)
            grid = np.stack(np.meshgrid(*[np.arange(n) for n in ddf.shape[1:]], indexing="ij")) + ddf
            in_plane = [a for a in range(3) if a != axis]
            u, w = (np.rot90(np.take(grid[a], index, axis=axis)) for a in in_plane)
            ax = axes[1, 0]
            ax.axis("on")
            ax.contour(u, levels=np.arange(0, ddf.shape[1 + in_plane[0]], 8), colors="k", linewidths=0.4)
            ax.contour(w, levels=np.arange(0, ddf.shape[1 + in_plane[1]], 8), colors="k", linewidths=0.4)
            ax.set_aspect("equal")
            ax.set_title("ours: deformation grid")
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        if im is not None:
            fig.colorbar(im, ax=axes[1, :].tolist(), shrink=0.6, label="Jacobian determinant")
        fig.suptitle(f"{moving_name} → {fixed_name}: fixed label borders (green) and warped moving ones (red)")
        fig.savefig(figures / f"{stem}_{folder.name}.png", dpi=100)
        plt.close(fig)


def _override(item: str) -> tuple[str, object]:
    """``ID=VALUE`` -> ``(ID, value)``: a Python literal where it parses as one, else the string."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise SystemExit(f"--set expects ID=VALUE, got {item!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "report"])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="ibsr")
    parser.add_argument("--out", type=Path, default=None, help="default runs/compare (IBSR) or runs/compare_<dataset>")
    parser.add_argument("--methods", default="identity,affine,ours,ants_syn,elastix",
                        help="comma separated, from: identity, affine, ours, ants_syn, ants_syn_full, elastix, greedy")
    parser.add_argument("--io-steps", default="0", help="instance-optimisation steps for 'ours', comma separated")
    parser.add_argument("--ckpt", type=Path, default=DEFAULT_CKPT)
    parser.add_argument("--configs", default="inference.json", help="inference config list, comma separated")
    parser.add_argument("--pairs", type=int, default=None, help="only the first N test pairs")
    parser.add_argument("--pair", action="append", default=[], metavar="MOVING_to_FIXED",
                        help="run: only this pair (repeatable); rows go to OUT/results.csv as usual")
    parser.add_argument("--rows", default=None, metavar="CSV[,CSV...]",
                        help="report: tables from these committed result CSVs (rows of a later file replace an earlier "
                             "one's for the same method and pair) instead of --out's run; needs --stem; no figures")
    parser.add_argument("--stem", default=None, help="report: name of the docs/results files (default baselines[_DATASET])")
    parser.add_argument("--name", default="ours", help="method name of the bundle's rows (e.g. ours_reg for another model)")
    parser.add_argument("--set", action="append", default=[], metavar="ID=VALUE",
                        help="override a config id of 'ours' (Python literal or string), e.g. instance_optimisation_residual=svf")
    parser.add_argument("--greedy-threads", type=int, default=None, help="greedy's -threads (default: all cores)")
    parser.add_argument("--section", choices=["testing", "validation"], default="testing",
                        help="validation: choose settings on the validation pairs (default out: runs/compare_<dataset>_validation)")
    a = parser.parse_args()
    overrides = dict(_override(item) for item in a.set)
    dataset = DATASETS[a.dataset]()
    default = "compare" if a.dataset == "ibsr" and a.section == "testing" else f"compare_{a.dataset}"
    out = a.out or REPO / "runs" / (default + ("_validation" if a.section == "validation" else ""))
    out = out.resolve()  # the datalist written for the bundle names files relative to its own folder
    if a.command == "run":
        run(dataset, out, a.methods.split(","), [int(s) for s in a.io_steps.split(",")], a.ckpt, a.pairs,
            a.configs.split(","), a.name, overrides, a.greedy_threads, a.section, a.pair)
    else:
        report(dataset, out, a.section, [Path(p) for p in a.rows.split(",")] if a.rows else None, a.stem)


if __name__ == "__main__":
    main()
