"""Longitudinal tumour pairs (time point 0 -> 1 of one patient): rigid pre-alignment, then the joint model.

    python benchmarks/longitudinal.py [--ckpt CKPT] [--out runs/longitudinal] [--brain-masks DIR]

Data: ``../shared/data/tumor_progression`` (TCIA Brain-Tumor-Progression, CC BY 3.0): glioblastoma patients
scanned twice, T1 post-contrast and FLAIR (co-registered within a time point) with 6.5 mm slices, not
skull-stripped, expert tumour masks per time point. The joint model gets the channels its checkpoint takes: T1post
and FLAIR for the shipped tumour model (``configs/tumour.json``), T1post alone for a one-channel T1 joint model;
its configs are chosen from the checkpoint's parameters. None of these images is in the tumour model's training.
The time points lie in different grids and positions, so the pair needs a rigid pre-alignment
(``prealign: rigid``; the patient's anatomy is the same) before the deformable network.

Per pair, on the fixed (time point 1) native grid: local NCC and MSE (intensities scaled to [0, 1] by the
99.5th percentile) inside the tumour (expert tp1 mask united with the warped tp0 mask), in a 0-10 mm band
around it and elsewhere; % folding; the Dice of the warped tp0 tumour with the tp1 tumour (it should NOT go
to 1: the tumour changed); the joint model's tumour segmentation Dice against the expert masks.
Methods: ``identity`` (world coordinates only), ``rigid`` (ITK alone), ``rigid+joint`` (the bundle's
inference command with ``--prealign rigid``). ``--ckpt`` defaults to the shipped tumour model (``configs/tumour.json``);
for its 3 classes ``seg_core_dice_fixed`` scores the tumour core, the region the expert masks mark.

``--brain-masks DIR`` (``<patient>_tp0_brain_mask.nii.gz`` ... as ``benchmarks/progression_brain_masks.py`` writes
them): the time points skull-stripped, the tumour model's input contract. The joint model gets them as
``moving_brain_mask`` / ``fixed_brain_mask``; every method is scored on the stripped T1post images (written to
``--out``) and inside the tp1 brain mask.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "tumor_progression"


def pairs(channels: int = 1, brain_masks: Path | None = None, stripped: Path | None = None) -> list[dict]:
    """Each patient's tp0 -> tp1 pair; ``channels`` 2: T1post and FLAIR stacked (the image keys hold both files),
    the similarity scores use T1post alone either way (``t1_moving`` / ``t1_fixed``). With ``brain_masks`` the
    pair gets ``moving_brain_mask`` / ``fixed_brain_mask`` and its T1post images for scoring are the stripped copies
    written to ``stripped`` (outside the brain: 0)."""
    if channels not in (1, 2):
        raise ValueError(f"the time points have T1post and FLAIR: a model of {channels} channels does not fit.")
    out = []
    for patient in sorted(p for p in DATA.glob("PGBM-*") if p.is_dir()):
        tp0, tp1 = (next(patient.glob(f"{tp}_*")) for tp in ("tp0", "tp1"))
        files = [lambda tp: str(tp / "T1post.nii.gz"), lambda tp: [str(tp / "T1post.nii.gz"), str(tp / "FLAIRreg.nii.gz")]][channels - 1]
        pair = {"name": f"{patient.name}_tp0_to_tp1", "moving": files(tp0), "fixed": files(tp1),
                "t1_moving": str(tp0 / "T1post.nii.gz"), "t1_fixed": str(tp1 / "T1post.nii.gz"),
                "moving_label": str(tp0 / "MaskTumor.nii.gz"), "fixed_tumour": str(tp1 / "MaskTumor.nii.gz")}
        if brain_masks is not None:
            for side, tp in (("moving", "tp0"), ("fixed", "tp1")):
                mask = Path(brain_masks).resolve() / f"{patient.name}_{tp}_brain_mask.nii.gz"
                if not mask.is_file():
                    raise FileNotFoundError(f"{mask}: no brain mask for {patient.name} {tp} (benchmarks/progression_brain_masks.py)")
                pair[f"{side}_brain_mask"] = str(mask)
                pair[f"t1_{side}"] = _stripped(pair[f"t1_{side}"], mask, Path(stripped) / f"{patient.name}_{tp}_T1post_stripped.nii.gz")
        out.append(pair)
    return out


def _stripped(image: str, mask: Path, target: Path) -> str:
    """``image`` with 0 outside ``mask`` (same grid), written to ``target``."""
    loaded = nib.load(image)
    data, inside = _load(image)[0], _load(str(mask))[0] > 0
    if inside.shape != data.shape:
        raise ValueError(f"{mask}: brain mask of shape {inside.shape}, its image {image} {data.shape}.")
    target.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.where(inside, data, 0).astype(np.float32), loaded.affine), str(target))
    return str(target)


def _load(path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(path)
    return np.asarray(img.dataobj, dtype=np.float32).reshape(img.shape[:3]), img.affine


def _scaled(a: np.ndarray) -> np.ndarray:
    return np.clip(a / max(np.percentile(a, 99.5), 1e-6), 0, 1)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else float("nan")


def _baseline(pair: dict, transform: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Warped image, warped tumour and DDF of a pre-alignment alone, on the fixed native grid."""
    from bundle.alignment import itk_affine_register
    from bundle.spatial import ddf_source_points, index_grid, resample_to_grid

    moving, m_affine = _load(pair["t1_moving"])
    fixed, f_affine = _load(pair["t1_fixed"])
    mask, _ = _load(pair["moving_label"])
    matrix = itk_affine_register(moving, m_affine, fixed, f_affine, transform)
    dst = torch.as_tensor(matrix @ f_affine)
    warp = lambda a, mode: resample_to_grid(torch.as_tensor(a)[None], torch.as_tensor(m_affine), dst, fixed.shape, mode=mode)[0].numpy()  # noqa: E731
    ddf = ddf_source_points(torch.zeros(3, *fixed.shape), dst, torch.as_tensor(f_affine)) - index_grid(fixed.shape, torch.float64)
    return warp(moving, "bilinear"), warp(mask, "nearest") > 0, ddf.numpy().astype(np.float32)


def score(pair: dict, warped: np.ndarray, warped_tumour: np.ndarray, ddf: np.ndarray) -> dict:
    from bundle.metrics import region_registration_metrics

    fixed, f_affine = _load(pair["t1_fixed"])
    fixed_tumour = _load(pair["fixed_tumour"])[0] > 0
    spacing = np.linalg.norm(f_affine[:3, :3], axis=0).tolist()
    brain = torch.as_tensor(_load(pair["fixed_brain_mask"])[0] > 0)[None] if "fixed_brain_mask" in pair else None
    metrics = region_registration_metrics(
        torch.as_tensor(_scaled(warped))[None], torch.as_tensor(_scaled(fixed))[None], torch.as_tensor(ddf),
        torch.as_tensor(fixed_tumour | warped_tumour)[None], spacing, band_mm=10.0, brain_mask=brain,
    )
    return {**metrics, "tumour_overlap_tp0_tp1": _dice(warped_tumour, fixed_tumour)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, default=None, help="joint checkpoint (default: the shipped tumour model)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "longitudinal")
    parser.add_argument("--brain-masks", type=Path, default=None, help="skull-strip the time points with these masks")
    a = parser.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    from bundle.configs import TUMOUR_CONFIGS, bundle_command, checkpoint_overlays, read_config
    from bundle.engines.checkpoints import network_state_dict

    a.ckpt = a.ckpt or Path(read_config(REPO, TUMOUR_CONFIGS).get_parsed_content("ckpt_path"))
    state = network_state_dict(a.ckpt)
    configs = ["inference.json", *checkpoint_overlays(REPO, ["inference.json"], state, registration_only=False, path=str(a.ckpt))]
    parsed = read_config(REPO, configs)
    items = pairs(int(parsed.get_parsed_content("num_channels")), a.brain_masks, a.out / "stripped")
    core = int(parsed.get_parsed_content("num_tumour_classes")) == 3
    (a.out / "datalist.json").write_text(json.dumps({"testing": items}))
    subprocess.run(bundle_command("inference", REPO, configs, {
        "datalist": a.out / "datalist.json", "ckpt_path": a.ckpt, "prealign": "rigid", "output_dir": a.out / "joint"}), check=True, cwd=REPO)
    rows = []
    for pair in items:
        for method in ("identity", "rigid"):
            rows.append({"method": method, "pair": pair["name"], **score(pair, *_baseline(pair, "none" if method == "identity" else "rigid"))})
        folder = a.out / "joint" / pair["name"]
        warped = np.asarray(nib.load(folder / "warped.nii.gz").dataobj, dtype=np.float32)
        warped = warped[..., 0] if warped.ndim == 4 else warped  # T1post, the first channel
        ddf = np.moveaxis(np.asarray(nib.load(folder / "ddf.nii.gz").dataobj)[..., 0, :], -1, 0)
        warped_tumour = _load(folder / "warped_label.nii.gz")[0] > 0
        row = {"method": "rigid+joint", "pair": pair["name"], **score(pair, warped, warped_tumour, ddf)}
        seg, truth = _load(folder / "seg_fixed.nii.gz")[0], _load(pair["fixed_tumour"])[0] > 0
        row["seg_dice_fixed"] = _dice(seg > 0, truth)
        if core:  # oedema 1, core 2: the expert masks mark the (enhancing) core
            row["seg_core_dice_fixed"] = _dice(seg == 2, truth)
        rows.append(row)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(a.out / "longitudinal.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    columns = [k for k in keys if k not in ("method", "pair")]
    print("| method | pair | " + " | ".join(columns) + " |\n|" + "---|" * (len(columns) + 2))
    for r in rows:
        print(f"| {r['method']} | {r['pair']} | " + " | ".join(f"{r.get(c, float('nan')):.4f}" for c in columns) + " |")


if __name__ == "__main__":
    main()
