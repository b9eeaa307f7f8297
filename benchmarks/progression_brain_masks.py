"""Brain masks of the TCIA progression time points (not skull-stripped) for ``tumour_campaign.py evaluate-progression
--brain-masks``, made with an external brain-extraction tool as a user would: deepbet (Fisch et al., Comput. Biol.
Med. 2024; MIT; its weights ship in its wheel, nothing is downloaded), installed in an environment of its own
(not a dependency of the bundle):

    python3 -m venv --system-site-packages /tmp/bet && /tmp/bet/bin/pip install deepbet==1.0.2
    /tmp/bet/bin/python benchmarks/progression_brain_masks.py [--out runs/tumour_campaign/progression_brain_masks]

deepbet works on voxel arrays of about 1 mm (it interpolates each volume to 256^3 voxels, whatever their size), so
each T1 post-contrast image (0.43-0.69 mm in plane, 6.5 mm slices) is resampled to 1 mm isotropic first and the
mask brought back to the image's own grid (linear, > 0.5). One ``<time point>_brain_mask.nii.gz`` per time point,
written to a temporary name then renamed; a summary line per mask (volume, share of the expert tumour mask inside).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to, resample_to_output

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from tumour_campaign import RUNS, progression_sources  # noqa: E402

OUT = RUNS / "progression_brain_masks"


def mask_name(time_point: str) -> str:
    return f"{time_point}_brain_mask.nii.gz"


def brain_mask(image: nib.Nifti1Image, extract) -> np.ndarray:
    """``extract`` (a 1 mm isotropic NIfTI -> its brain mask NIfTI on that grid) run on ``image`` resampled to 1 mm;
    the mask back on ``image``'s grid (uint8, 0/1)."""
    data = np.squeeze(np.asarray(image.dataobj, dtype=np.float32))
    image = nib.Nifti1Image(data, image.affine)
    iso = resample_to_output(image, voxel_sizes=(1.0, 1.0, 1.0), order=1)
    mask = extract(iso)
    mask = nib.Nifti1Image(np.squeeze(np.asarray(mask.dataobj, dtype=np.float32)), mask.affine)
    back = resample_from_to(mask, image, order=1)
    return (np.asarray(back.dataobj) > 0.5).astype(np.uint8)


def write_masks(out: Path, extract, sources: dict | None = None) -> list[Path]:
    sources = sources or progression_sources()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, case in sources.items():
        image = nib.load(str(case["t1c"]))
        mask = brain_mask(image, extract)
        if not mask.any():
            raise ValueError(f"{case['t1c']}: the brain extraction found no brain.")
        target = out / mask_name(name)
        tmp = target.with_name(f".{target.name}.tmp.nii.gz")
        nib.save(nib.Nifti1Image(mask, image.affine), str(tmp))
        os.replace(tmp, target)
        truth = np.squeeze(np.asarray(nib.load(str(case["tumour"])).dataobj)) > 0
        ml = float(mask.sum()) * float(np.prod(image.header.get_zooms()[:3])) / 1000.0
        print(f"{name}: brain mask {ml:.0f} ml, expert tumour inside {float(mask[truth].mean()):.3f} -> {target}")
        written.append(target)
    return written


def deepbet_extractor():
    """deepbet's network on CPU (one thread): a 1 mm NIfTI -> its brain mask."""
    import torch
    from deepbet.bet import BrainExtraction

    torch.set_num_threads(1)
    bet = BrainExtraction(no_gpu=True)
    return lambda iso: bet.run(iso)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT, help="folder for the masks")
    a = parser.parse_args()
    try:
        extract = deepbet_extractor()
    except ImportError as e:
        raise SystemExit(f"deepbet is not installed in this environment ({e}); see this script's docstring.")
    write_masks(a.out, extract)


if __name__ == "__main__":
    main()
