"""Peak host memory of one registration (``brainreg register``, ``configs/inference.json``) against image size.

    python benchmarks/memory_peak.py [--sizes 96 192 256] [--pixdim 4 1.5] [--out CSV]

Each run registers a synthetic pair (an ellipsoid plus noise, 1 mm voxels, ``--prealign none``, the shipped weights)
in its own process and records that process's peak resident memory (``ru_maxrss``). The estimate that
``bundle.transforms.CheckMemoryd`` makes up front (``estimate_memory_bytes``) is printed beside each measurement;
its constants come from these runs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bundle.engines.training import hardware_description  # noqa: E402
from bundle.io.writers import write_csv  # noqa: E402
from bundle.transforms.checks import estimate_memory_bytes  # noqa: E402

SHAPES = {96: (96, 96, 96), 192: (192, 192, 160), 256: (256, 256, 200)}
MEASURE = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, "
           "stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def synthetic_image(shape, seed: int, path: Path) -> None:
    rng = np.random.default_rng(seed)
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    inside = sum(((g - n / 2) / (n / 3)) ** 2 for g, n in zip(grid, shape)) < 1
    nib.save(nib.Nifti1Image(inside.astype(np.float32) + 0.1 * rng.random(shape, dtype=np.float32), np.eye(4)), path)


def peak_bytes(moving: Path, fixed: Path, out: Path, pixdim: float) -> float:
    command = [sys.executable, "-m", "bundle", "register", str(moving), str(fixed), str(out), "--prealign", "none",
               "--pixdim", str([pixdim] * 3)]
    result = subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True, text=True, check=True, cwd=REPO)
    return float(result.stdout.split()[-1]) * 1024  # Linux reports kilobytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 192, 256], choices=sorted(SHAPES))
    parser.add_argument("--pixdim", type=float, nargs="+", default=[4.0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "memory_peak_cpu.csv")
    a = parser.parse_args()
    rows = []
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for size in a.sizes:
            shape = SHAPES[size]
            moving, fixed = Path(tmp) / f"m{size}.nii.gz", Path(tmp) / f"f{size}.nii.gz"
            synthetic_image(shape, 0, moving)
            synthetic_image(shape, 1, fixed)
            for pixdim in a.pixdim:
                peak = peak_bytes(moving, fixed, Path(tmp) / f"out{size}_{pixdim}", pixdim)
                voxels = float(np.prod(shape))
                estimate = estimate_memory_bytes(2 * voxels, voxels / pixdim**3)
                rows.append({"shape": "x".join(map(str, shape)), "pixdim_mm": pixdim, "peak_gib": round(peak / 2**30, 3),
                             "estimate_gib": round(estimate / 2**30, 3), "load_1min_at_start": round(load, 2),
                             "hardware": hardware_description("cpu")})
                print(f"{rows[-1]['shape']:>12s} at {pixdim} mm: peak {rows[-1]['peak_gib']:.2f} GiB, estimate "
                      f"{rows[-1]['estimate_gib']:.2f} GiB", flush=True)
    write_csv(a.out, rows)
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()
