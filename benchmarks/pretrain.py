"""Train the shipped weights on real T1 MRI (IBSR), with the fixed subject split of ``bundle/data/splits/ibsr_split.json``.

    python benchmarks/pretrain.py prepare          # affine-align train/validation subjects to the reference
    python benchmarks/pretrain.py train [--registration-only] [--label-weight W] [--max-epochs N] [--pixdim MM]
                                        [--init WEIGHTS] [--learning-rate LR]
    python benchmarks/pretrain.py ship  [--registration-only] [--label-weight W]   # best model -> models/pretrained/

``prepare`` registers every training and validation subject to the reference subject with the bundle's own
ITK affine stage (``bundle.alignment``) and writes them on the reference grid, so that training pairs differ
by the deformable residual only (as in VoxelMorph, whose data are affinely aligned). At inference the
bundle aligns each new pair itself (``prealign: affine``). ``train`` runs the bundle's training command
(``configs/train.json``, the joint model with synthetic lesions; ``--registration-only`` adds
``configs/registration_only.json``; ``--voxelmorph-package`` also ``configs/voxelmorph_package.json``: the
``voxelmorph`` package's own model trained identically, as a baseline) on every ordered pair of training subjects, unsupervised (no label
loss; ``--label-weight W > 0``: semi-supervised as in VoxelMorph TMI, on the pairs of labelled training subjects
with the auxiliary Dice loss on CSF/GM/WM weighted W), with validation Dice on the pairs between the validation subject and the labelled training
subjects. Interrupted training resumes from its last checkpoint when started again. Test subjects are
never read here.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from itertools import permutations
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from bundle.data import load_split

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "ibsr"
SPLIT = load_split("ibsr")
RUNS = REPO / "runs" / "pretrain"
SHIPPED = {False: "joint_t1_ibsr_4mm.pt", True: "registration_t1_ibsr_4mm.pt"}


def ibsr_files(subject: str) -> tuple[Path, Path | None]:
    """Image and label map (``None`` when the subject has none) of one IBSR subject."""
    image = DATA / subject / f"{subject}.nii.gz"
    label = DATA / subject / f"{subject}_seg.nii.gz"
    if not image.is_file():
        raise FileNotFoundError(f"IBSR image not found: {image}")
    return image, label if label.is_file() else None


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(path)
    return np.asarray(img.dataobj).reshape(img.shape[:3]), img.affine  # IBSR is stored (X, Y, Z, 1)


def prepare(out: Path) -> Path:
    """Align training/validation subjects to the reference; write them and the training datalist."""
    from bundle.alignment import itk_affine_register
    from bundle.io import write_nifti
    from bundle.spatial import resample_to_grid

    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    ref_image, ref_affine = _load(ibsr_files(SPLIT["reference"])[0])
    subjects = {}
    for subject in SPLIT["training"] + SPLIT["validation"]:
        image_path, label_path = ibsr_files(subject)
        image, affine = _load(image_path)
        start = time.perf_counter()
        matrix = itk_affine_register(image.astype(np.float32), affine, ref_image.astype(np.float32), ref_affine)
        entry = {"name": subject}
        for kind, path, mode in (("image", image_path, "bilinear"), ("label", label_path, "nearest")):
            if path is None:
                continue
            values, src_affine = _load(path)
            aligned = resample_to_grid(
                torch.as_tensor(values.astype(np.float32))[None], torch.as_tensor(src_affine),
                torch.as_tensor(matrix @ ref_affine), ref_image.shape, mode=mode,
            ).numpy()
            target = data_dir / f"{subject}_{kind}.nii.gz"
            write_nifti(aligned.astype(np.int16 if kind == "label" else np.float32), ref_affine, target)
            entry[kind] = str(target)
        subjects[subject] = entry
        print(f"{subject}: aligned to {SPLIT['reference']} in {time.perf_counter() - start:.1f} s", flush=True)

    def pair(m: str, f: str, labels: bool) -> dict:
        item = {"moving": subjects[m]["image"], "fixed": subjects[f]["image"], "name": f"{m}_to_{f}"}
        if labels:
            item.update(moving_label=subjects[m]["label"], fixed_label=subjects[f]["label"])
        return item

    labelled = [s for s in SPLIT["training"] if "label" in subjects[s]]
    val = SPLIT["validation"][0]
    datalist = {
        "training": [pair(m, f, False) for m, f in permutations(SPLIT["training"], 2)],
        "validation": [pair(val, s, True) for s in labelled[:4]] + [pair(s, val, True) for s in labelled[:4]],
    }
    datalist_path = out / "datalist.json"
    datalist_path.write_text(json.dumps(datalist, indent=1))
    print(f"{len(datalist['training'])} training pairs, {len(datalist['validation'])} validation pairs -> {datalist_path}")
    return datalist_path


def _configs(registration_only: bool, voxelmorph_package: bool = False) -> list[str]:
    names = ["train.json"] + (["registration_only.json"] if registration_only or voxelmorph_package else [])
    return names + (["voxelmorph_package.json"] if voxelmorph_package else [])


def run_dir(out: Path, registration_only: bool, label_weight: float, voxelmorph_package: bool = False) -> Path:
    model = "voxelmorph_package" if voxelmorph_package else "registration" if registration_only else "joint"
    return out / (model + ("_labels" if label_weight > 0 else ""))


def labelled_datalist(datalist: Path) -> Path:
    """The training pairs whose subjects both have labels, with their label maps (semi-supervised training)."""
    data = json.loads(datalist.read_text())
    pairs = []
    for item in data["training"]:
        labels = [item[k].replace("_image.nii.gz", "_label.nii.gz") for k in ("moving", "fixed")]
        if all(Path(p).is_file() for p in labels):
            pairs.append({**item, "moving_label": labels[0], "fixed_label": labels[1]})
    if not pairs:
        raise ValueError(f"no training pair of {datalist} has labels for both subjects.")
    target = datalist.with_name("datalist_labelled.json")
    target.write_text(json.dumps({"training": pairs, "validation": data["validation"]}, indent=1))
    return target


def train(out: Path, registration_only: bool, max_epochs: int, pixdim: float, val_interval: int,
          label_weight: float = 0.0, voxelmorph_package: bool = False, init: Path | None = None,
          learning_rate: float | None = None) -> None:
    """Run the bundle's training command; resumes from the newest checkpoint in ``out``."""
    datalist = out / "datalist.json"
    if not datalist.is_file():
        raise FileNotFoundError(f"{datalist} not found: run `python benchmarks/pretrain.py prepare` first.")
    if label_weight > 0:
        datalist = labelled_datalist(datalist)
    root = run_dir(out, registration_only, label_weight, voxelmorph_package)
    root.mkdir(parents=True, exist_ok=True)
    from bundle.configs import bundle_command

    args = bundle_command("training", REPO, _configs(registration_only, voxelmorph_package), {
        "bundle_root": root, "datalist": datalist, "max_epochs": max_epochs, "val_interval": val_interval,
        "pixdim": [pixdim] * 3, "progress_bar": False,
        "num_classes": 4,  # IBSR labels: background, CSF, GM, WM
        "label_weight": label_weight,
    })
    if init is not None:  # fine-tune from these weights (a resumed run restores its own checkpoint instead)
        init = init.resolve()  # the training command runs from the repository root
        if not init.is_file():
            raise FileNotFoundError(f"--init weights not found: {init}")
        args += ["--init_ckpt", str(init)]
    if learning_rate is not None:
        args += ["--learning_rate", str(learning_rate)]
    start = time.perf_counter()
    with open(root / "train.log", "a") as log:
        subprocess.run(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
    print(f"training finished in {time.perf_counter() - start:.0f} s; log: {root / 'train.log'}")


def ship(out: Path, registration_only: bool, label_weight: float = 0.0) -> Path:
    """Copy the best model's weights (a plain state dict) to ``models/pretrained/``."""
    from bundle.engines.checkpoints import network_state_dict
    from bundle.io.writers import write_atomic

    best = run_dir(out, registration_only, label_weight) / "models" / "model.pt"
    state = network_state_dict(best)
    target = REPO / "models" / "pretrained" / SHIPPED[registration_only]
    write_atomic(target, ".pt", lambda tmp: torch.save(state, tmp))
    print(f"{best} -> {target} ({target.stat().st_size / 1e6:.1f} MB)")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["prepare", "train", "ship"])
    parser.add_argument("--out", type=Path, default=RUNS)
    parser.add_argument("--registration-only", action="store_true")
    parser.add_argument("--voxelmorph-package", action="store_true",
                        help="train the voxelmorph package's VxmPairwise instead (baseline; configs/voxelmorph_package.json)")
    parser.add_argument("--max-epochs", type=int, default=20)
    parser.add_argument("--val-interval", type=int, default=2)
    parser.add_argument("--pixdim", type=float, default=4.0)
    parser.add_argument("--label-weight", type=float, default=0.0, help="auxiliary Dice loss weight (0: unsupervised)")
    parser.add_argument("--init", type=Path, default=None, help="start from these weights (e.g. the shipped ones)")
    parser.add_argument("--learning-rate", type=float, default=None, help="Adam step size (default: the config's)")
    a = parser.parse_args()
    if a.command == "prepare":
        prepare(a.out)
    elif a.command == "train":
        train(a.out, a.registration_only, a.max_epochs, a.pixdim, a.val_interval, a.label_weight, a.voxelmorph_package, a.init,
              a.learning_rate)
    else:
        ship(a.out, a.registration_only, a.label_weight)


if __name__ == "__main__":
    main()
