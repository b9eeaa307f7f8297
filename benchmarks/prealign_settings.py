"""Choose the affine pre-alignment settings on validation pairs: Dice after the affine alone vs its CPU time.

    python benchmarks/prealign_settings.py [--datasets ibsr,lpba40] [--out runs/prealign_settings] [--threads 1]

For every ordered validation pair (``compare_baselines.split_pairs(..., "validation")``; the test split is never
read) and every candidate in :data:`CANDIDATES`, registers the moving image to the fixed one with
:func:`bundle.alignment.itk_affine_register`, warps the moving labels onto the fixed native grid through the
matrix (nearest neighbour) and scores them (``compare_baselines.score``: mean Dice over the labels present).
A candidate is a set of registration options (``method``: ``itk``, the default, or ``torch``; the rest go to that
method's function) plus the fixed grid it registers to:

- ``native``: the fixed image as loaded (the pipeline's order until now: pre-alignment before the network grid);
- ``grid2mm`` / ``grid4mm``: the fixed image on a network grid: cropped to its foreground (margin 8 voxels,
  as ``configs/campaign.json``) for 2 mm, not cropped for 4 mm (``configs/inference.json``), RAS, resampled
  to 2 or 4 mm; the pipeline can then resample the moving image once, onto the network grid.

Writes ``<out>/prealign_settings.csv`` (dataset, pair, candidate, dice_mean, cpu_seconds, wall_seconds, hardware,
load at start) and prints the mean per dataset and candidate. CPU seconds are the process's (all threads).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import compare_baselines  # noqa: E402

BASE = {}  # itk_affine_register's defaults
COARSE = {"working_spacing_mm": 4.0, "shrink_factors": (2, 1), "smoothing_sigmas_mm": (4.0, 2.0)}
CANDIDATES = {
    "native_default": ("native", BASE),
    "grid2mm_default": ("grid2mm", BASE),
    "grid4mm_default": ("grid4mm", BASE),
    "native_coarse": ("native", COARSE),
    "grid2mm_coarse": ("grid2mm", COARSE),
    "grid4mm_coarse": ("grid4mm", COARSE),
    "grid2mm_coarse_it50": ("grid2mm", {**COARSE, "iterations": 50}),
    "grid2mm_coarse_20k": ("grid2mm", {**COARSE, "max_samples": 20_000}),
    "grid2mm_coarse_it50_20k": ("grid2mm", {**COARSE, "iterations": 50, "max_samples": 20_000}),
    "grid2mm_torch": ("grid2mm", {"method": "torch"}),  # bundle.alignment.torch_affine_register, its defaults
    "native_torch": ("native", {"method": "torch"}),
    # fewer / coarser torch levels (spacing mm, Adam iterations, random points per iteration or None for all)
    "grid2mm_torch_8_4": ("grid2mm", {"method": "torch", "levels": ((8.0, 100, None), (4.0, 40, None))}),
    "grid2mm_torch_light": ("grid2mm", {"method": "torch", "levels": ((8.0, 60, None), (4.0, 30, 20_000))}),
    "grid2mm_torch_mi": ("grid2mm", {"method": "torch", "similarity": "mi"}),  # MI_LEVELS
    "grid2mm_torch_mi_light": ("grid2mm", {"method": "torch", "similarity": "mi",
                                           "levels": ((8.0, 100, 3000), (4.0, 40, 3000), (2.0, 20, 5000))}),
    "grid2mm_torch_mi_8_4": ("grid2mm", {"method": "torch", "similarity": "mi",
                                         "levels": ((8.0, 100, 5000), (4.0, 40, 5000))}),
    # the default's Adam rates falling to zero along a half cosine per level (``schedule``), and seed spreads
    **{f"grid2mm_torch_mi_8_4{suffix}_seed{seed}": ("grid2mm", {"method": "torch", "similarity": "mi", "seed": seed,
                                                               "levels": ((8.0, 100, 5000), (4.0, 40, points)),
                                                               "schedule": schedule})
       for suffix, schedule, points in (("", "constant", 5000), ("_cosine", "cosine", 5000),
                                        ("_cosine_20k", "cosine", 20_000))
       for seed in (0, 1, 2)},
    "grid2mm_torch_fine_light": ("grid2mm", {"method": "torch",
                                             "levels": ((8.0, 60, None), (4.0, 20, 20_000), (2.0, 10, 20_000))}),
}


def fixed_on_grid(fixed: dict, grid: str) -> tuple[np.ndarray, np.ndarray]:
    """The fixed image (array, RAS affine) on the named grid (see the module docstring)."""
    from monai.data import MetaTensor
    from monai.transforms import CropForeground, Orientation, Spacing

    if grid == "native":
        return fixed["image_array"], fixed["affine"]
    spacing = {"grid2mm": 2.0, "grid4mm": 4.0}[grid]
    image = MetaTensor(torch.as_tensor(fixed["image_array"], dtype=torch.float32)[None],
                       affine=torch.as_tensor(fixed["affine"], dtype=torch.float64))
    if grid == "grid2mm":
        image = CropForeground(margin=8)(image)
    image = Spacing(pixdim=(spacing,) * 3, mode="bilinear")(Orientation(axcodes="RAS")(image))
    return image[0].numpy(), image.affine.numpy().astype(np.float64)


def run(datasets: list[str], out: Path, candidates: dict) -> list[dict]:
    from bundle.alignment import METHODS
    from bundle.data.evaluation import DATASETS
    from bundle.spatial import resample_to_grid

    out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = []
    for name in datasets:
        dataset = DATASETS[name]()
        pairs = compare_baselines.split_pairs(dataset, "validation", out / "inputs" / name)
        for moving, fixed in pairs:
            for candidate, (grid, options) in candidates.items():
                fixed_array, fixed_affine = fixed_on_grid(fixed, grid)
                wall, cpu = time.perf_counter(), time.process_time()
                options = dict(options)
                register = METHODS[options.pop("method", "itk")]
                matrix = register(moving["image_array"], moving["affine"], fixed_array, fixed_affine, **options)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                warped = resample_to_grid(torch.as_tensor(moving["label_array"])[None], torch.as_tensor(moving["affine"]),
                                          torch.as_tensor(matrix @ fixed["affine"]), fixed["label_array"].shape,
                                          mode="nearest")[0].numpy()
                scores = compare_baselines.score(warped, fixed, None, dataset.labels)
                rows.append({"dataset": name, "pair": f"{moving['name']}_to_{fixed['name']}", "candidate": candidate,
                             "dice_mean": round(scores["dice_mean"], 5), "cpu_seconds": round(cpu, 3),
                             "wall_seconds": round(wall, 3), "hardware": compare_baselines.hardware(),
                             "load_at_start": round(load, 2)})
                print(f"{name} {rows[-1]['pair']:28s} {candidate:26s} Dice {scores['dice_mean']:.4f}  {cpu:6.2f} s CPU",
                      flush=True)
    with open(out / "prealign_settings.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Mean Dice and median CPU seconds per dataset and candidate."""
    keys = list(dict.fromkeys((r["dataset"], r["candidate"]) for r in rows))
    summary = []
    for dataset, candidate in keys:
        mine = [r for r in rows if r["dataset"] == dataset and r["candidate"] == candidate]
        summary.append({"dataset": dataset, "candidate": candidate, "pairs": len(mine),
                        "dice_mean": round(statistics.mean(float(r["dice_mean"]) for r in mine), 4),
                        "median_cpu_seconds": round(statistics.median(float(r["cpu_seconds"]) for r in mine), 3)})
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="ibsr,lpba40")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "prealign_settings")
    parser.add_argument("--candidates", default=",".join(CANDIDATES), help="comma separated names from CANDIDATES")
    parser.add_argument("--threads", type=int, default=1, help="ITK and torch threads")
    a = parser.parse_args()
    import itk

    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(a.threads)
    torch.set_num_threads(a.threads)
    chosen = {c: CANDIDATES[c] for c in a.candidates.split(",")}
    rows = run(a.datasets.split(","), a.out, chosen)
    for row in summarise(rows):
        print(f"{row['dataset']:8s} {row['candidate']:26s} {row['pairs']} pairs  Dice {row['dice_mean']:.4f}  "
              f"{row['median_cpu_seconds']:6.2f} s CPU (median)")


if __name__ == "__main__":
    main()
