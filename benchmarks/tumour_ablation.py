"""Masked vs unmasked similarity and subtraction vs concatenation merge on real brain-tumour MRI.

Runs the bundle's own commands (``python -m monai.bundle run training/inference``) on BraTS 2013 (expert
labels) and TCGA/BraTS (silver labels) cases from ``../shared/data`` and scores the test pairs inside the
tumour, in a 0-10 mm band around it and elsewhere (Estienne et al. 2020, Front. Comput. Neurosci.).

    python benchmarks/tumour_ablation.py prepare   # normalised copies + datalist in --work_dir
    python benchmarks/tumour_ablation.py train     # four variants (resumable: reruns continue)
    python benchmarks/tumour_ablation.py evaluate  # inference + region metrics -> CSV, Markdown, PNG

Data: T1c and FLAIR (the sequences both sources share) stacked as 2 channels, intensities scaled to [0, 1]
inside each brain mask (BraTS 2013 is z-scored with a zero background), tumour = any tumour label > 0
(TCGA: ``fusion_simple`` automatic segmentation), all cropped to the common SRI24 brain bounding box.
Split by subject: training BraTS 2013 pat0003, 0005, 0006 and TCGA-DU-7294, TCGA-FG-6692; validation
pat0004; test pat0001 and pat0002 (every ordered pair with a test subject as moving or fixed).
Training (CPU-sized): 4 mm network grid, Adam 1e-3, cross-entropy + Dice for the segmentation, LNCC,
masks from the ground-truth tumours (``mask_source: label``) or none, ``--epochs`` x 20 pairs.
Scoring is on the fixed image's 1 mm grid; the tumour region is the fixed tumour united with the warped
moving tumour (ground truth), the band is 0-10 mm around it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from itertools import permutations
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bundle.configs import bundle_command  # noqa: E402

RESULTS = REPO / "docs" / "results"
from bundle.io.writers import write_atomic, write_csv, write_nifti  # noqa: E402
from bundle.metrics import region_registration_metrics  # noqa: E402

VARIANTS = {
    "masked_subtract": {"mask_source": "label", "merge": "subtract"},
    "unmasked_subtract": {"mask_source": "none", "merge": "subtract"},
    "masked_concat": {"mask_source": "label", "merge": "concat"},
    "unmasked_concat": {"mask_source": "none", "merge": "concat"},
}
SPLIT = {
    "train": ["brats_2013_pat0003_1", "brats_2013_pat0005_1", "brats_2013_pat0006_1", "TCGA-DU-7294", "TCGA-FG-6692"],
    "validation": ["brats_2013_pat0004_1"],
    "test": ["brats_2013_pat0001_1", "brats_2013_pat0002_1"],
}


# BraTS labels (1 necrosis, 2 oedema, 3 non-enhancing, 4 enhancing tumour; TCGA's fusions use 1, 2, 4 alike) ->
# the two regions a 3-class model learns: 1 oedema, 2 tumour core (1, 3, 4). The whole tumour is every region > 0.
BRATS_REGIONS = {1: 2, 2: 1, 3: 2, 4: 2}


def tumour_regions(labels: np.ndarray) -> np.ndarray:
    """BraTS label map -> 0 background, 1 oedema, 2 tumour core (uint8); an unknown label value is an error."""
    labels = np.rint(np.asarray(labels)).astype(np.int64)
    unknown = sorted(set(np.unique(labels).tolist()) - {0, *BRATS_REGIONS})
    if unknown:
        raise ValueError(f"label values {unknown} are not BraTS tumour labels (0, {', '.join(map(str, BRATS_REGIONS))})")
    regions = np.zeros(labels.shape, np.uint8)
    for label, region in BRATS_REGIONS.items():
        regions[labels == label] = region
    return regions


def _sources(data_root: Path) -> dict[str, dict[str, Path]]:
    cases = {}
    for case in sorted(data_root.glob("brats2013/*/brats_2013_pat*")):
        cases[case.name] = {
            "t1c": case / "T1c_subtrMeanDivStd.nii.gz",
            "flair": case / "Flair_subtrMeanDivStd.nii.gz",
            "mask": case / "brainmask.nii.gz",
            "tumour": case / "OTMultiClass.nii.gz",
        }
    for case in sorted(data_root.glob("tcga_brats/TCGA-*")):
        cases[case.name] = {
            "t1c": case / "t1c.nii.gz",
            "flair": case / "flair.nii.gz",
            "mask": case / "brain_mask.nii.gz",
            "tumour": case / "auto_segmentations" / "fusion_simple.nii.gz",
        }
    return cases


def prepare(data_root: Path, work_dir: Path) -> Path:
    """Write normalised, cropped copies of every case and the datalist; returns the datalist path."""
    cases = _sources(data_root)
    missing = [c for split in SPLIT.values() for c in split if c not in cases]
    if missing:
        raise FileNotFoundError(f"cases not found under {data_root}: {missing}")
    masks = {c: np.asarray(nib.load(p["mask"]).dataobj) > 0 for c, p in cases.items()}
    union = np.any(np.stack(list(masks.values())), axis=0)
    lo = np.maximum(np.argwhere(union).min(0) - 4, 0)
    hi = np.minimum(np.argwhere(union).max(0) + 5, union.shape)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    data_dir = work_dir / "data"
    for case, paths in cases.items():
        ref = nib.load(paths["t1c"])
        affine = ref.affine.copy()
        affine[:3, 3] = ref.affine[:3, :3] @ lo + ref.affine[:3, 3]
        mask = masks[case]
        for seq in ("t1c", "flair"):
            image = np.asarray(nib.load(paths[seq]).dataobj, dtype=np.float32)
            inside = image[mask]
            low, high = np.percentile(inside, [0.5, 99.5])
            scaled = np.where(mask, np.clip((image - low) / (high - low), 0, 1), 0).astype(np.float32)
            write_nifti(scaled[crop][None], affine, data_dir / case / f"{seq}.nii.gz")
        labels = np.asarray(nib.load(paths["tumour"]).dataobj)
        write_nifti((labels > 0).astype(np.uint8)[crop][None], affine, data_dir / case / "tumour.nii.gz")
        write_nifti(tumour_regions(labels)[crop][None], affine, data_dir / case / "regions.nii.gz")

    def pair(m: str, f: str) -> dict:
        return {
            "moving": [f"data/{m}/t1c.nii.gz", f"data/{m}/flair.nii.gz"],
            "fixed": [f"data/{f}/t1c.nii.gz", f"data/{f}/flair.nii.gz"],
            "moving_tumour": f"data/{m}/tumour.nii.gz",
            "fixed_tumour": f"data/{f}/tumour.nii.gz",
            # the tumour also as "label", so inference writes the warped moving tumour
            "moving_label": f"data/{m}/tumour.nii.gz",
            "name": f"{m}_to_{f}",
        }

    train = SPLIT["train"]
    everyone = train + SPLIT["validation"] + SPLIT["test"]
    datalist = {
        "training": [pair(m, f) for m, f in permutations(train, 2)],
        "validation": [pair(SPLIT["validation"][0], f) for f in train] + [pair(m, SPLIT["validation"][0]) for m in train],
        "testing": [pair(m, f) for m, f in permutations(everyone, 2) if m in SPLIT["test"] or f in SPLIT["test"]],
    }
    path = work_dir / "datalist.json"
    path.write_text(json.dumps(datalist, indent=2))
    print(f"wrote {path}: {', '.join(f'{k} {len(v)} pairs' for k, v in datalist.items())}; crop {lo} - {hi}")
    return path


def _bundle(run_id: str, configs: list[str], overrides: dict, log: Path) -> None:
    args = bundle_command(run_id, REPO, configs, overrides)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        subprocess.run(args, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, check=True)


def _common(work_dir: Path, variant: str) -> dict:
    return {
        "bundle_root": work_dir / variant,
        "datalist": work_dir / "datalist.json",
        "num_channels": 2,
        "pixdim": "[4.0,4.0,4.0]",
        "merge": VARIANTS[variant]["merge"],
        "progress_bar": False,
    }


def train(work_dir: Path, epochs: int, variants: list[str]) -> None:
    for variant in variants:
        overrides = {
            **_common(work_dir, variant),
            "mask_source": VARIANTS[variant]["mask_source"],
            "implant_lesions": False,
            "learning_rate": 1e-3,
            "dice_weight": 1.0,
            "max_epochs": epochs,
            "val_interval": 2,
            "num_workers": 0,
        }
        print(f"training {variant} ...", flush=True)
        _bundle("training", ["train.json"], overrides, work_dir / variant / "train.log")


def evaluate(work_dir: Path, variants: list[str], band_mm: float, results: Path = RESULTS) -> None:
    datalist = json.loads((work_dir / "datalist.json").read_text())
    rows = []
    for variant in variants:
        out_dir = work_dir / variant / "test_outputs"
        overrides = {**_common(work_dir, variant), "output_dir": out_dir, "ckpt_path": work_dir / variant / "models" / "model.pt"}
        _bundle("inference", ["inference.json", "joint.json"], overrides, work_dir / variant / "infer.log")
        for pair in datalist["testing"]:
            rows.append({"variant": variant, **_score(work_dir, pair, out_dir / pair["name"], band_mm)})
    identity = [{"variant": "identity", **_score(work_dir, p, None, band_mm)} for p in datalist["testing"]]
    rows = identity + rows
    _write_tables(rows, results)
    for pair in datalist["testing"][:2]:
        _figure(work_dir, pair, variants, REPO / "docs" / "figures" / f"tumour_ablation_{pair['name']}.png")


def _figure(work_dir: Path, pair: dict, variants: list[str], path: Path) -> None:
    """Axial slice through the moving tumour: fixed, moving, and per variant the warped image and det J."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fixed = _load(work_dir / pair["fixed"][0])
    moving = _load(work_dir / pair["moving"][0])
    fixed_tumour = _load(work_dir / pair["fixed_tumour"]) > 0
    moving_tumour = _load(work_dir / pair["moving_tumour"]) > 0
    z = int(np.argmax(moving_tumour.sum((0, 1)))) if moving_tumour.any() else fixed.shape[2] // 2

    def show(ax, image, title, contours=(), cmap="gray", vmin=0, vmax=1):
        shown = ax.imshow(np.rot90(image[:, :, z]), cmap=cmap, vmin=vmin, vmax=vmax)
        for mask, colour in contours:
            ax.contour(np.rot90(mask[:, :, z]), levels=[0.5], colors=colour, linewidths=1)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
        return shown

    fig, axes = plt.subplots(2, len(variants) + 2, figsize=(2.4 * (len(variants) + 2), 5))
    show(axes[0, 0], fixed, "fixed (T1c)\nred: fixed tumour", [(fixed_tumour, "r")])
    show(axes[0, 1], moving, "moving (T1c)\ngreen: moving tumour", [(moving_tumour, "g")])
    axes[1, 0].axis("off")
    axes[1, 1].axis("off")
    for col, variant in enumerate(variants, start=2):
        out = work_dir / variant / "test_outputs" / pair["name"]
        warped = _load(out / "warped.nii.gz")
        warped = warped[..., 0] if warped.ndim == 4 else warped
        warped_tumour = _load(out / "warped_label.nii.gz") > 0
        show(axes[0, col], warped, f"warped: {variant}", [(fixed_tumour, "r"), (warped_tumour, "g")])
        jac = show(axes[1, col], _load(out / "jacobian_det.nii.gz"), "Jacobian determinant", cmap="RdBu_r", vmin=0, vmax=2)
    fig.colorbar(jac, ax=axes[1, 2:].tolist(), shrink=0.8)
    fig.suptitle(f"{pair['name']} (axial slice {z})", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")


def _load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def _score(work_dir: Path, pair: dict, out: Path | None, band_mm: float) -> dict:
    """Region metrics of one test pair on the fixed grid (``out=None``: no registration)."""
    fixed = np.stack([_load(work_dir / p) for p in pair["fixed"]]).astype(np.float32)
    fixed_tumour = _load(work_dir / pair["fixed_tumour"])[None] > 0
    spacing = nib.load(str(work_dir / pair["fixed"][0])).header.get_zooms()[:3]
    if out is None:  # same SRI24 grid: the moving image as it is
        warped = np.stack([_load(work_dir / p) for p in pair["moving"]]).astype(np.float32)
        ddf = np.zeros((3, *fixed.shape[1:]), np.float32)
        warped_tumour = _load(work_dir / pair["moving_tumour"])[None] > 0
        seg = {}
    else:
        warped = np.moveaxis(_load(out / "warped.nii.gz"), -1, 0) if fixed.shape[0] > 1 else _load(out / "warped.nii.gz")[None]
        ddf = np.moveaxis(_load(out / "ddf.nii.gz")[..., 0, :], -1, 0)
        warped_tumour = _load(out / "warped_label.nii.gz")[None] > 0
        # segmentation scored on the held-out (test) subjects' images only: a pair's other image may be a training one
        seg = {}
        if _subject(pair["moving_tumour"]) in SPLIT["test"]:
            seg["tumour_dice_moving"] = _dice(_load(out / "seg_moving.nii.gz") > 0, _load(work_dir / pair["moving_tumour"]) > 0)
        if _subject(pair["fixed_tumour"]) in SPLIT["test"]:
            seg["tumour_dice_fixed"] = _dice(_load(out / "seg_fixed.nii.gz") > 0, fixed_tumour[0])
    tumour = torch.as_tensor(fixed_tumour | warped_tumour)
    metrics = region_registration_metrics(
        torch.as_tensor(warped), torch.as_tensor(fixed), torch.as_tensor(ddf), tumour, spacing, band_mm
    )
    return {"pair": pair["name"], **metrics, **seg}


def _subject(path: str) -> str:
    """``data/<subject>/tumour.nii.gz`` -> ``<subject>``."""
    return Path(path).parent.name


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else float("nan")


def _write_tables(rows: list[dict], folder: Path) -> None:
    """Per-pair rows to ``folder/tumour_ablation.csv``, per-variant means to ``folder/tumour_ablation.md``."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    write_csv(folder / "tumour_ablation.csv", [{k: r.get(k, "") for k in keys} for r in rows])
    columns = [k for k in keys if k not in ("variant", "pair")]
    lines = ["| variant | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        values = [[r[c] for r in rows if r["variant"] == variant and c in r and not np.isnan(r[c])] for c in columns]
        lines.append(f"| {variant} | " + " | ".join(f"{np.mean(v):.4f}" if v else "nan" for v in values) + " |")
    table = "\n".join(lines)
    write_atomic(folder / "tumour_ablation.md", ".md", lambda tmp: Path(tmp).write_text(table + "\n"))
    print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("prepare", "train", "evaluate", "all"))
    parser.add_argument("--data_root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--work_dir", type=Path, default=REPO / "runs" / "tumour_ablation")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--band_mm", type=float, default=10.0)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of tumour_ablation.{csv,md}")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    work_dir = args.work_dir.resolve()
    if args.step in ("prepare", "all"):
        prepare(args.data_root, work_dir)
    if args.step in ("train", "all"):
        train(work_dir, args.epochs, args.variants)
    if args.step in ("evaluate", "all"):
        evaluate(work_dir, args.variants, args.band_mm, args.results)


if __name__ == "__main__":
    main()
