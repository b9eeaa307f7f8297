"""Time the native refinement alone on one LPBA40 pair, and a 3-D grid_sample warp with its gradient at 1 and 2 threads.

    python benchmarks/refinement_speed.py [--threads 2] [--out docs/results/native_refinement_speed.csv] [--label NAME]

The refinement (``configs/native_refinement.json``'s levels, lr, smoothness, residual and kernel) registers LPBA40 S23
onto S01 (both on the data set's common 1 mm grid) from a zero field, so it measures the refinement's own cost, not
the network's. ``grid_sample``: a 1-channel 160x192x160 volume sampled at a near-identity 135x171x130 grid (the size of
that pair's foreground box), forward and backward, by torch's ``F.grid_sample`` and by
``bundle.spatial.sampling.grid_sample`` when the checkout has it. Run it from another checkout with ``PYTHONPATH=.``
to time older code. Appends one row per timing to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "lpba40"


def _image(name: str) -> torch.Tensor:
    return torch.from_numpy(nib.load(DATA / name / f"{name}.nii.gz").get_fdata(dtype=np.float32))[None]


def time_refinement() -> float:
    from bundle.engines.native_refinement import refine_native

    settings = json.loads((REPO / "configs" / "native_refinement.json").read_text())
    moving, fixed = _image("S23"), _image("S01")
    started = time.perf_counter()
    refine_native(moving, fixed, torch.zeros(3, *fixed.shape[1:]), torch.eye(4),
                  levels=settings["native_refinement_levels"], learning_rate=settings["native_refinement_lr"],
                  smoothness=settings["native_refinement_smoothness"], residual=settings["native_refinement_residual"],
                  kernel_size=settings["native_refinement_kernel_size"])
    return time.perf_counter() - started


def time_grid_sample(sample, repeats: int = 3) -> float:
    torch.manual_seed(0)
    image = torch.rand(1, 1, 160, 192, 160)
    shape = [135, 171, 130]
    grid = F.affine_grid(torch.eye(3, 4)[None], [1, 1, *shape], align_corners=True) + 0.01 * torch.randn(1, *shape, 3)
    seconds = []
    for _ in range(repeats + 1):  # the first is a warm-up
        g = grid.clone().requires_grad_(True)
        started = time.perf_counter()
        out = sample(image, g)
        (out * out).sum().backward()
        seconds.append(time.perf_counter() - started)
    return float(np.median(seconds[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "docs" / "results" / "native_refinement_speed.csv"))
    parser.add_argument("--label", default="this checkout")
    args = parser.parse_args()
    import bundle

    rows = []
    for threads in sorted({1, args.threads}):
        torch.set_num_threads(threads)
        rows.append(("grid_sample torch", threads, time_grid_sample(
            lambda x, g: F.grid_sample(x, g, mode="bilinear", padding_mode="zeros", align_corners=True))))
        try:
            from bundle.spatial.sampling import grid_sample
        except ImportError:
            continue
        rows.append(("grid_sample bundle", threads, time_grid_sample(lambda x, g: grid_sample(x, g))))
    torch.set_num_threads(args.threads)
    rows.append(("native refinement LPBA40 S23->S01", args.threads, time_refinement()))
    load = os.getloadavg()[0]
    new = not Path(args.out).is_file()
    with open(args.out, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["code", "bundle_path", "what", "threads", "seconds", "load_at_end", "torch"])
        for what, threads, seconds in rows:
            writer.writerow([args.label, str(Path(bundle.__file__).parent.parent), what, threads, f"{seconds:.3f}",
                             f"{load:.2f}", torch.__version__])
            print(f"{args.label}: {what}, {threads} thread(s): {seconds:.3f} s")


if __name__ == "__main__":
    main()
