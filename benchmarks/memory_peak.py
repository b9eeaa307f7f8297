"""Peak host memory of one registration (``brainreg register``, ``configs/inference.json``) against image size.

    python benchmarks/memory_peak.py [--sizes 96 192 256] [--pixdim 4 1.5] [--refine] [--refine-native] [--out CSV]
    python benchmarks/memory_peak.py --refresh-estimates     # the estimate column again, after changing its constants

Each run registers a synthetic pair (an ellipsoid plus noise, 1 mm voxels, ``--prealign none``, the shipped weights)
in its own process and records that process's peak resident memory (``ru_maxrss``). The estimate that
``bundle.transforms.CheckMemoryd`` makes up front (``estimate_memory_bytes``) is printed beside each measurement;
its constants come from these runs. ``--refine`` registers with ``brainreg register --refine`` (instance
optimisation, ``configs/instance_optimisation.json``) and adds rows with ``refine`` true to the CSV (rows of the
other setting already there are kept). ``--refine-native`` registers with ``brainreg register --refine_native``
(``configs/native_refinement.json``: the whole transform refined on the fixed native grid) and adds rows with
``native_refinement`` true; its levels are cut to 2 steps each (``NATIVE_LEVELS``): the peak is reached in a level's
first step and does not grow with the number of steps (the same tensors each step), so the full schedule would only
take longer.
"""

from __future__ import annotations

import argparse
import csv
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
NATIVE_LEVELS = "[[2, 2], [1, 2]]"  # the shipped schedule's levels (2 voxels, then 1), 2 steps each
MEASURE = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, "
           "stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def synthetic_image(shape, seed: int, path: Path) -> None:
    rng = np.random.default_rng(seed)
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    inside = sum(((g - n / 2) / (n / 3)) ** 2 for g, n in zip(grid, shape)) < 1
    nib.save(nib.Nifti1Image(inside.astype(np.float32) + 0.1 * rng.random(shape, dtype=np.float32), np.eye(4)), path)


def peak_bytes(moving: Path, fixed: Path, out: Path, pixdim: float, refine: bool = False,
               native_refinement: bool = False) -> float:
    command = [sys.executable, "-m", "bundle", "register", str(moving), str(fixed), str(out), "--prealign", "none",
               "--pixdim", str([pixdim] * 3), *(["--refine"] if refine else []),
               *(["--refine_native", "--native_refinement_levels", NATIVE_LEVELS] if native_refinement else [])]
    result = subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True, text=True, check=True, cwd=REPO)
    return float(result.stdout.split()[-1]) * 1024  # Linux reports kilobytes


def refresh_estimates(path: Path) -> None:
    """Recompute the estimate column of a CSV written by this script from its shapes and settings."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        voxels = float(np.prod([int(n) for n in r["shape"].split("x")]))
        native = voxels if r.get("native_refinement", "False") == "True" else 0.0
        estimate = estimate_memory_bytes(2 * voxels, voxels / float(r["pixdim_mm"]) ** 3, refinement=r["refine"] == "True",
                                         native_refined_voxels=native)
        r["estimate_gib"] = round(estimate / 2**30, 3)
        r.setdefault("native_refinement", "False")
        print(f"{r['shape']:>12s} at {r['pixdim_mm']} mm, refine {r['refine']}, native {r['native_refinement']}: "
              f"peak {r['peak_gib']} GiB, estimate {r['estimate_gib']} GiB")
    write_csv(path, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 192, 256], choices=sorted(SHAPES))
    parser.add_argument("--pixdim", type=float, nargs="+", default=[4.0])
    parser.add_argument("--refine", action="store_true", help="with instance optimisation (brainreg register --refine)")
    parser.add_argument("--refine-native", action="store_true",
                        help="with the native-grid refinement (brainreg register --refine_native, levels NATIVE_LEVELS)")
    parser.add_argument("--refresh-estimates", action="store_true",
                        help="recompute only the estimate column of --out (the measured peaks are kept)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "memory_peak_cpu.csv")
    a = parser.parse_args()
    if a.refresh_estimates:
        refresh_estimates(a.out)
        return
    rows = []
    if a.out.is_file():  # keep the rows of the other setting
        with open(a.out, newline="") as f:
            rows = [r for r in csv.DictReader(f) if ((r.get("refine", "False") == "True"),
                                                     (r.get("native_refinement", "False") == "True")) != (a.refine, a.refine_native)]
        for r in rows:
            r.setdefault("refine", "False")
            r.setdefault("native_refinement", "False")
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for size in a.sizes:
            shape = SHAPES[size]
            moving, fixed = Path(tmp) / f"m{size}.nii.gz", Path(tmp) / f"f{size}.nii.gz"
            synthetic_image(shape, 0, moving)
            synthetic_image(shape, 1, fixed)
            for pixdim in a.pixdim:
                peak = peak_bytes(moving, fixed, Path(tmp) / f"out{size}_{pixdim}", pixdim, a.refine, a.refine_native)
                voxels = float(np.prod(shape))
                estimate = estimate_memory_bytes(2 * voxels, voxels / pixdim**3, refinement=a.refine,
                                                 native_refined_voxels=voxels if a.refine_native else 0.0)
                rows.append({"shape": "x".join(map(str, shape)), "pixdim_mm": pixdim, "refine": a.refine,
                             "native_refinement": a.refine_native,
                             "peak_gib": round(peak / 2**30, 3),
                             "estimate_gib": round(estimate / 2**30, 3), "load_1min_at_start": round(load, 2),
                             "hardware": hardware_description("cpu")})
                print(f"{rows[-1]['shape']:>12s} at {pixdim} mm: peak {rows[-1]['peak_gib']:.2f} GiB, estimate "
                      f"{rows[-1]['estimate_gib']:.2f} GiB", flush=True)
    columns = ["shape", "pixdim_mm", "refine", "native_refinement", "peak_gib", "estimate_gib", "load_1min_at_start", "hardware"]
    write_csv(a.out, [{c: r.get(c, "") for c in columns} for r in rows])
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()
