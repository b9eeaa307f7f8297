"""Test sets of the side-by-side evaluation (``benchmarks/compare_baselines.py``): IBSR, SynthSeg-synthesised,
OASIS, LPBA40.

Each dataset names its held-out test subjects (fixed splits in ``bundle/data/splits/*_split.json``), the labels scored, and
writes every test subject as a plain 3D NIfTI image + label map into a work folder (ANTs, elastix and greedy read
them from there). All of them read ``../shared/data`` and raise ``FileNotFoundError`` when it is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from bundle.data import SHARED_DATA as DATA
from bundle.data import SPLITS_DIR
from bundle.io.writers import write_atomic
from bundle.transforms.synthesis import FREESURFER_30



def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Array (a trailing singleton axis dropped, as IBSR stores (X, Y, Z, 1)) and affine of a NIfTI file."""
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    img = nib.load(path)
    return np.asarray(img.dataobj).reshape(img.shape[:3]), img.affine


def _write(subject: str, image: np.ndarray, label: np.ndarray, affine: np.ndarray, work: Path) -> dict:
    out = {"name": subject, "affine": affine, "image_array": image.astype(np.float32), "label_array": label.astype(np.int16)}
    for kind in ("image", "label"):
        path = work / f"{subject}_{kind}.nii.gz"
        if not path.exists():  # atomic: a half-written input is never reused
            image = nib.Nifti1Image(out[f"{kind}_array"], affine)
            write_atomic(path, ".nii.gz", lambda tmp, image=image: nib.save(image, tmp))
        out[kind] = path
    return out


_SECTION_WORDS = {"testing": "test", "validation": "validation (for choosing settings; not the test pairs)"}


def _subjects(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


class IBSR:
    """IBSR T1 (skull-stripped, native spaces differ): CSF / GM / WM, test split of ``ibsr_split.json``."""

    name = "ibsr"
    labels = {1: "CSF", 2: "GM", 3: "WM"}
    split_file = SPLITS_DIR / "ibsr_split.json"

    def __init__(self) -> None:
        self.split = json.loads(self.split_file.read_text())
        self.testing = self.split["testing"]

    def subject(self, subject: str, work: Path) -> dict:
        image, affine = load(DATA / "ibsr" / subject / f"{subject}.nii.gz")
        label, _ = load(DATA / "ibsr" / subject / f"{subject}_seg.nii.gz")
        return _write(subject, image, label, affine, work)

    def describe(self, section: str = "testing") -> str:
        return (f"IBSR {_SECTION_WORDS[section]} split of `bundle/data/splits/ibsr_split.json` "
                f"({', '.join(_subjects(self.split[section]))}), CSF/GM/WM Dice")


class SynthSeg:
    """Images synthesised from the SynthSeg label maps (real anatomy, FreeSurfer labels): the 30 VoxelMorph
    structures. Each subject's image is drawn once with a fixed seed (``RandSynthesiseImaged``, T1-like
    contrast, skull-stripped), then cropped to the brain with a 4-voxel margin (1 mm grid, world affine kept).
    """

    name = "synthseg"
    labels = FREESURFER_30
    split_file = SPLITS_DIR / "synthseg_split.json"

    def __init__(self, contrast: str = "t1") -> None:
        self.split = json.loads(self.split_file.read_text())
        self.testing = self.split["testing"]
        self.contrast = contrast

    def subject(self, subject: str, work: Path) -> dict:
        import torch
        from monai.transforms import CropForeground

        from bundle.transforms import RandSynthesiseImaged

        path = work / f"{subject}_image.nii.gz"
        if path.exists():  # synthesised before: reuse the same draw
            image, affine = load(path)
            label, _ = load(work / f"{subject}_label.nii.gz")
            return _write(subject, image, label, affine, work)
        label, affine = load(DATA / "synthseg_label_maps" / f"training_seg_{subject}.nii.gz")
        synth = RandSynthesiseImaged("label", "image", contrast=self.contrast).set_random_state(int(subject))
        image, label = synth.synthesise(torch.as_tensor(label)[None], f"training_seg_{subject}")
        crop = CropForeground(select_fn=lambda x: x > 0, margin=4, allow_smaller=True)
        start, end = crop.compute_bounding_box(label)
        image, label = (a[0, start[0]:end[0], start[1]:end[1], start[2]:end[2]].numpy() for a in (image, label))
        shifted = affine.copy()
        shifted[:3, 3] = affine[:3, :3] @ np.asarray(start, dtype=float) + affine[:3, 3]
        return _write(subject, image, label, shifted, work)

    def describe(self, section: str = "testing") -> str:
        return (f"SynthSeg label maps {', '.join(_subjects(self.split[section]))} ({_SECTION_WORDS[section]} split of "
                "`bundle/data/splits/synthseg_split.json`), "
                f"images synthesised with `RandSynthesiseImaged` ({self.contrast} contrast, seed = subject number), "
                f"Dice on the {len(self.labels)} VoxelMorph structures (mean over those present in the fixed map)")


class OASIS:
    """The two labelled OASIS-derived T1 of ``oasis/lapirn`` (160x192x144, 1 mm, intensities in [0, 1]) and
    their two foreground labels. The label maps share the images' voxel grid; the image header is used for
    both because subject A's label header carries a different (0.98 x 0.97 mm, shifted) affine."""

    name = "oasis"
    labels = {1: "label1", 2: "label2"}
    testing = ["A", "B"]

    def subject(self, subject: str, work: Path) -> dict:
        folder = DATA / "oasis" / "lapirn" / "Data"
        image, affine = load(folder / f"image_{subject}_160x192x144.nii.gz")
        label, _ = load(folder / f"image_{subject}_160x192x144_seg.nii.gz")
        if label.shape != image.shape:
            raise ValueError(f"OASIS {subject}: label shape {label.shape} != image shape {image.shape}.")
        return _write(subject, image, label, affine, work)

    def describe(self, section: str = "testing") -> str:
        return "OASIS-derived `oasis/lapirn` volumes A and B (both ordered pairs), Dice of their labels 1 and 2"


class LPBA40:
    """LPBA40 T1 (skull-stripped, 160x192x160, 1 mm, all subjects on one affinely aligned grid) and its 56
    manually delineated structures, test split of ``lpba40_split.json`` (S01 is the set's usual atlas).

    The split's ``label_values`` are the structures scored, named ``L<value>`` (the data folder carries no
    structure names). Label maps are stored as uint8 and cast to integers; a value outside ``label_values``
    (and background 0) is an error naming the file."""

    name = "lpba40"
    split_file = SPLITS_DIR / "lpba40_split.json"

    def __init__(self) -> None:
        self.split = json.loads(self.split_file.read_text())
        missing = [k for k in ("testing", "label_values") if k not in self.split]
        if missing:
            raise ValueError(f"{self.split_file}: missing field(s) {missing}.")
        values = [int(v) for v in self.split["label_values"]]
        if len(set(values)) != len(values) or 0 in values:
            raise ValueError(f"{self.split_file}: label_values must be distinct and exclude background 0, got {values}.")
        self.testing = self.split["testing"]
        self.labels = {v: f"L{v}" for v in values}

    def subject(self, subject: str, work: Path) -> dict:
        folder = DATA / "lpba40" / subject
        label_file = folder / f"{subject}_label.nii.gz"
        image, affine = load(folder / f"{subject}.nii.gz")
        label, _ = load(label_file)
        if label.shape != image.shape:
            raise ValueError(f"{label_file}: label shape {label.shape} != image shape {image.shape}.")
        label = np.rint(label).astype(np.int16)
        unknown = sorted(set(np.unique(label).tolist()) - set(self.labels) - {0})
        if unknown:
            raise ValueError(f"{label_file}: label values {unknown} not in {self.split_file.name}.")
        return _write(subject, image, label, affine, work)

    def describe(self, section: str = "testing") -> str:
        return (f"LPBA40 {_SECTION_WORDS[section]} split of `bundle/data/splits/lpba40_split.json` "
                f"({', '.join(_subjects(self.split[section]))}; one affinely aligned "
                f"1 mm grid), Dice on the {len(self.labels)} manually delineated structures (LONI LPBA40, Shattuck et al., "
                "NeuroImage 2008)")


DATASETS = {"ibsr": IBSR, "synthseg": SynthSeg, "oasis": OASIS, "lpba40": LPBA40}
