"""Short CPU training and evaluation of the registration model on real labelled brain MRI pairs.

Runs the bundle's own commands (``configs/train.json`` + ``configs/registration_only.json``, then
``configs/evaluate.json``) on data from ``../shared/data`` and prints Dice before/after, HD95, folding and
SDlogJ from the evaluation's ``metrics.csv`` (computed on the network grid, ``--pixdim`` mm).

    python benchmarks/real_pairs.py lapirn   # OASIS-derived A<->B, 3 classes; trained and tested on the pair
    python benchmarks/real_pairs.py ibsr     # IBSR: train on 6 subjects, test on pairs of 4 held-out ones

IBSR subjects are in different native spaces and this spine has no affine pre-alignment yet: the moving
image is resampled onto the fixed grid by its own world coordinates only.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import time
from itertools import permutations
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

IBSR_TRAIN = ["IBSR_04", "IBSR_05", "IBSR_06", "IBSR_07", "IBSR_08", "IBSR_09"]
IBSR_TEST = ["IBSR_01", "IBSR_03", "IBSR_16", "IBSR_17"]


def _lapirn(data_root: Path) -> tuple[dict, int]:
    folder = data_root / "oasis" / "lapirn" / "Data"
    subject = {s: {"image": str(folder / f"image_{s}_160x192x144.nii.gz"), "label": str(folder / f"image_{s}_160x192x144_seg.nii.gz"), "name": s} for s in "AB"}
    pairs = [
        {"moving": subject[m]["image"], "fixed": subject[f]["image"], "moving_label": subject[m]["label"], "fixed_label": subject[f]["label"], "name": f"{m}_to_{f}"}
        for m, f in permutations("AB", 2)
    ]
    return {"training": pairs, "validation": pairs, "testing": pairs}, 3


def _ibsr(data_root: Path) -> tuple[dict, int]:
    def pair(m: str, f: str) -> dict:
        return {
            "moving": str(data_root / "ibsr" / m / f"{m}.nii.gz"),
            "fixed": str(data_root / "ibsr" / f / f"{f}.nii.gz"),
            "moving_label": str(data_root / "ibsr" / m / f"{m}_seg.nii.gz"),
            "fixed_label": str(data_root / "ibsr" / f / f"{f}_seg.nii.gz"),
            "name": f"{m}_to_{f}",
        }

    test = [pair(m, f) for m, f in permutations(IBSR_TEST, 2)]
    return {"training": [pair(m, f) for m, f in permutations(IBSR_TRAIN, 2)], "validation": test[:4], "testing": test}, 4


def _run(run_id: str, configs: list[str], overrides: dict, log: Path) -> float:
    from bundle.configs import bundle_command

    args = bundle_command(run_id, REPO, configs, overrides)
    start = time.perf_counter()
    with open(log, "a") as f:
        subprocess.run(args, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=("lapirn", "ibsr"))
    parser.add_argument("--data_root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--work_dir", type=Path, default=None)
    parser.add_argument("--epochs", type=int, default=None, help="default: 60 (lapirn, 2 pairs) or 4 (ibsr, 30 pairs)")
    parser.add_argument("--pixdim", type=float, default=3.0)
    parser.add_argument("--label_weight", type=float, default=0.0, help="auxiliary Dice loss weight (0: unsupervised)")
    args = parser.parse_args()
    work_dir = (args.work_dir or REPO / "runs" / f"real_pairs_{args.dataset}").resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    datalist, num_classes = (_lapirn if args.dataset == "lapirn" else _ibsr)(args.data_root)
    (work_dir / "datalist.json").write_text(json.dumps(datalist, indent=2))
    epochs = args.epochs or (60 if args.dataset == "lapirn" else 4)
    common = {
        "bundle_root": work_dir,
        "datalist": work_dir / "datalist.json",
        "pixdim": f"[{args.pixdim},{args.pixdim},{args.pixdim}]",
        "num_classes": num_classes,
        "label_weight": args.label_weight,
    }
    train_s = _run(
        "training",
        ["train.json", "registration_only.json"],
        {**common, "max_epochs": epochs, "val_interval": max(1, epochs // 4), "progress_bar": False, "num_workers": 0},
        work_dir / "train.log",
    )
    _run("evaluating", ["train.json", "registration_only.json", "evaluate.json"], common, work_dir / "eval.log")
    with open(work_dir / "eval" / "metrics.csv") as f:
        metrics = dict(csv.reader(f))
    print(f"{args.dataset}: {len(datalist['training'])} training pairs x {epochs} epochs at {args.pixdim} mm, training {train_s:.0f} s")
    for key in ("dice_before", "val_mean_dice", "hd95_mm", "val_folding_pct", "sd_log_jacobian"):
        print(f"  {key}: {float(metrics[key]):.4f}")


if __name__ == "__main__":
    main()
