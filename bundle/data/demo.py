"""Embedded demo data set: synthetic registration subjects made at run time from a real brain MRI template.

The template is the MNI ICBM152 2009a nonlinear symmetric T1 (skull-stripped) with its grey and white
matter probability maps, as shipped inside the ``nilearn`` wheel (see ``docs/data_license.txt``). Nothing
is downloaded and no image data is stored in this project: :func:`build_demo_dataset` resamples the
template, derives a 3-class tissue label map and makes each "subject" by warping it with a random smooth
deformation and random intensity changes.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from itertools import permutations

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    MaskIntensityd,
    Rand3DElasticd,
    RandAdjustContrastd,
    RandBiasFieldd,
    RandGaussianNoised,
    ScaleIntensityd,
    ScaleIntensityRanged,
    Spacingd,
)

from bundle.io.writers import write_atomic, write_nifti
from bundle.transforms.lesion import RandLesionImplantd

__all__ = ["DEMO_VERSION", "build_demo_dataset", "template_paths"]

logger = logging.getLogger(__name__)

# bump when the generated data changes, so that cached data sets are rebuilt
DEMO_VERSION = 3  # 3: separate validation and test subjects

_TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
_PARAMS_FILE = "demo_params.json"
_DATALIST_FILE = "datalist.json"
_MARGIN_VOXELS = 2
_SIZE_DIVISOR = 16  # every axis a multiple of 16, as a 4-level registration U-Net needs
_SIGMA_MM = 12.0  # smoothness of the random displacement field
_DISPLACEMENT_RMS_MM = (1.5, 3.0)  # per-axis RMS displacement range


def template_paths() -> dict[str, str]:
    """Locate the MNI ICBM152 2009a template files inside the installed ``nilearn`` package.

    ``nilearn`` is not imported (only its package folder is looked up).

    Returns:
        a dict with keys ``"t1"``, ``"gm"`` and ``"wm"`` mapping to the file paths.

    Raises:
        FileNotFoundError: when nilearn or one of the files is missing.
    """
    spec = importlib.util.find_spec("nilearn")
    hint = "the demo data set is derived from the MNI ICBM152 template shipped with nilearn: `pip install nilearn`"
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"nilearn is not installed; {hint}.")
    data_dir = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data")
    paths = {key: os.path.join(data_dir, name) for key, name in _TEMPLATE_FILES.items()}
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"template file(s) not found: {missing}; {hint}.")
    return paths


def _load_template(spacing: float) -> dict[str, MetaTensor]:
    """Load the template at isotropic ``spacing`` mm, cropped to the brain, with image, label and brain mask."""
    paths = template_paths()
    nii = {key: nib.load(path) for key, path in paths.items()}
    affine = nii["t1"].affine
    t1 = np.asarray(nii["t1"].dataobj, dtype=np.float32)
    probs = np.stack([np.asarray(nii[k].dataobj, dtype=np.float32) / 255.0 for k in ("gm", "wm")])
    label = np.where(probs.max(0) >= 0.5, probs.argmax(0) + 1, 0).astype(np.float32)
    data = {
        "image": MetaTensor(torch.from_numpy(t1[None]), affine=torch.as_tensor(affine)),
        "label": MetaTensor(torch.from_numpy(label[None]), affine=torch.as_tensor(affine)),
    }
    prepare = Compose(
        [
            Spacingd(keys=("image", "label"), pixdim=(spacing,) * 3, mode=("bilinear", "nearest")),
            CropForegroundd(
                keys=("image", "label"), source_key="image", margin=_MARGIN_VOXELS, k_divisible=_SIZE_DIVISOR
            ),
            ScaleIntensityd(keys="image", minv=0.0, maxv=1.0),
        ]
    )
    data = prepare(data)
    return {"image": data["image"], "label": data["label"], "mask": (data["image"] > 0).float()}


def _subject_transform(spacing: float, seed: int) -> Compose:
    """Random smooth deformation (same field for image, label and mask) followed by intensity changes."""
    sigma = _SIGMA_MM / spacing
    # RMS of uniform(-1, 1) noise smoothed by a normalised 3D Gaussian of std ``sigma`` voxels
    field_rms = np.sqrt(1.0 / 3.0) / ((2.0 * np.sqrt(np.pi) * sigma) ** 1.5)
    magnitude = tuple(rms / spacing / field_rms for rms in _DISPLACEMENT_RMS_MM)
    keys = ("image", "label", "mask")
    transform = Compose(
        [
            Rand3DElasticd(
                keys=keys,
                sigma_range=(sigma, sigma),
                magnitude_range=magnitude,
                prob=1.0,
                mode=("bilinear", "nearest", "nearest"),
                padding_mode="zeros",
            ),
            RandBiasFieldd(keys="image", degree=3, coeff_range=(0.0, 0.1), prob=1.0),
            ScaleIntensityd(keys="image", minv=0.0, maxv=1.0),
            RandAdjustContrastd(keys="image", gamma=(0.7, 1.5), prob=1.0),
            RandGaussianNoised(keys="image", mean=0.0, std=0.02, prob=1.0),
            ScaleIntensityRanged(keys="image", a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True),
            MaskIntensityd(keys="image", mask_key="mask"),
        ]
    )
    transform.set_random_state(seed=seed)
    return transform


def _write(subject: dict, output_dir: str, stem: str, keys: tuple[str, ...]) -> None:
    """Write the image (float32) and label maps (uint8) of one subject as ``<stem>[_seg|_tumour].nii.gz``."""
    suffixes = {"image": "", "label": "_seg", "tumour": "_tumour"}
    for key in keys:
        array = subject[key].numpy()
        array = array.astype(np.float32) if key == "image" else array.round().astype(np.uint8)
        write_nifti(array, subject[key].affine.numpy(), os.path.join(output_dir, f"{stem}{suffixes[key]}.nii.gz"))


def _save_json(obj: dict, path: str) -> None:
    """Write JSON atomically."""

    def dump(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)

    write_atomic(path, ".json", dump)


def _lesion_pairs(indices: list[int]) -> list[dict[str, str]]:
    """Tumour-to-healthy pairs: the lesion version of each subject registered to each other healthy subject."""
    return [
        {
            "moving": f"subject_{i:02d}_lesion.nii.gz",
            "fixed": f"subject_{j:02d}.nii.gz",
            "moving_label": f"subject_{i:02d}_lesion_seg.nii.gz",
            "fixed_label": f"subject_{j:02d}_seg.nii.gz",
            "moving_tumour": f"subject_{i:02d}_lesion_tumour.nii.gz",
            "fixed_tumour": f"subject_{j:02d}_tumour.nii.gz",
            "name": f"s{i:02d}lesion_to_s{j:02d}",
        }
        for i, j in permutations(indices, 2)
    ]


def _pairs(indices: list[int], tumour: bool = False) -> list[dict[str, str]]:
    """Datalist entries for all ordered pairs of the given subjects (with their empty tumour masks)."""
    pairs = []
    for i, j in permutations(indices, 2):
        pair = {
            "moving": f"subject_{i:02d}.nii.gz",
            "fixed": f"subject_{j:02d}.nii.gz",
            "moving_label": f"subject_{i:02d}_seg.nii.gz",
            "fixed_label": f"subject_{j:02d}_seg.nii.gz",
            "name": f"s{i:02d}_to_s{j:02d}",
        }
        if tumour:
            pair.update(moving_tumour=f"subject_{i:02d}_tumour.nii.gz", fixed_tumour=f"subject_{j:02d}_tumour.nii.gz")
        pairs.append(pair)
    return pairs


def _is_complete(output_dir: str, params: dict) -> bool:
    """Whether ``output_dir`` holds a complete data set made with ``params``."""
    try:
        with open(os.path.join(output_dir, _PARAMS_FILE)) as f:
            if json.load(f) != params:
                return False
        with open(os.path.join(output_dir, _DATALIST_FILE)) as f:
            datalist = json.load(f)
    except (OSError, ValueError):
        return False
    names = {
        item[key]
        for section in ("training", "validation", "testing")
        for item in datalist.get(section, [])
        for key in ("moving", "fixed", "moving_label", "fixed_label", "moving_tumour", "fixed_tumour")
        if key in item
    }
    expected = params["num_subjects"] * 2 + 4 * 4  # + lesion image, label, tumour and empty tumour of 4 subjects
    return len(names) == expected and all(os.path.isfile(os.path.join(output_dir, n)) for n in names)


def build_demo_dataset(
    output_dir: str, num_subjects: int = 8, spacing: float = 3.0, seed: int = 0, overwrite: bool = False
) -> str:
    """Build the embedded demo registration data set from the MNI ICBM152 2009a template shipped with nilearn.

    The T1 template is resampled (linear) to isotropic ``spacing`` mm in RAS, with a tissue label map
    (0 background, 1 grey matter, 2 white matter: the most probable tissue where its probability is at
    least 0.5) resampled with nearest neighbour; both are cropped to the brain with a small margin (every
    axis a multiple of 16) and the image is scaled to [0, 1]. Each synthetic subject is the template warped
    by a random smooth displacement field (Gaussian-smoothed noise, sigma 12 mm, per-axis RMS 1.5-3 mm;
    bilinear for the image, nearest for the label) with a random bias field, gamma and Gaussian noise
    (inside the brain). Everything is drawn from ``seed``, so the result is deterministic.

    The last four subjects are held out: two for validation, two for testing (never the same subjects, so the
    test pairs score weights that were not selected on them). Each also gets a version with a synthetic tumour
    (:class:`RandLesionImplantd`: mass effect, lesion intensity, mask) and an empty tumour mask for its healthy
    version.

    Files written to ``output_dir``: ``subject_XX.nii.gz`` (float32), ``subject_XX_seg.nii.gz`` (uint8),
    for the held-out subjects ``subject_XX_tumour.nii.gz`` (empty) and ``subject_XX_lesion[_seg|_tumour].nii.gz``,
    ``datalist.json`` and ``demo_params.json``. The datalist has ``"training"`` (all ordered healthy pairs
    of the first ``num_subjects - 4`` subjects), ``"validation"`` (between subjects ``num_subjects - 4`` and
    ``num_subjects - 3``) and ``"testing"`` (between the last two): tumour-to-healthy pairs, then healthy pairs,
    all with ``moving_tumour``/``fixed_tumour``, with paths relative to ``output_dir``. A complete data set already made with the
    same parameters is reused unless ``overwrite`` is True.

    Args:
        output_dir: folder to write the data set to (created if needed).
        num_subjects: number of synthetic subjects, at least 6.
        spacing: isotropic voxel size in mm.
        seed: random seed.
        overwrite: rebuild even if a complete data set with the same parameters exists.

    Returns:
        the path of ``datalist.json``.

    Raises:
        ValueError: when ``num_subjects < 6`` or ``spacing <= 0``.
        FileNotFoundError: when the nilearn template files are missing.
    """
    num_subjects, spacing, seed = int(num_subjects), float(spacing), int(seed)
    if num_subjects < 6:
        raise ValueError(f"num_subjects must be at least 6 (2 training + 2 validation + 2 test), got {num_subjects}.")
    if spacing <= 0:
        raise ValueError(f"spacing must be positive, got {spacing}.")
    output_dir = os.path.abspath(os.path.expanduser(str(output_dir)))
    datalist_path = os.path.join(output_dir, _DATALIST_FILE)
    params = {"version": DEMO_VERSION, "num_subjects": num_subjects, "spacing": spacing, "seed": seed}
    if not overwrite and _is_complete(output_dir, params):
        logger.debug("reusing demo data set in %s", output_dir)
        return datalist_path

    template = _load_template(spacing)
    os.makedirs(output_dir, exist_ok=True)
    params_path = os.path.join(output_dir, _PARAMS_FILE)
    if os.path.exists(params_path):
        os.remove(params_path)
    transform = _subject_transform(spacing, seed)
    lesion = RandLesionImplantd("image", mask_key="tumour", label_keys="label", prob=1.0)
    lesion.set_random_state(seed=seed)
    validation, testing = [num_subjects - 4, num_subjects - 3], [num_subjects - 2, num_subjects - 1]
    held_out = validation + testing
    for i in range(num_subjects):
        subject = transform({key: value.clone() for key, value in template.items()})
        _write(subject, output_dir, f"subject_{i:02d}", ("image", "label"))
        if i in held_out:
            tumour = {"tumour": torch.zeros_like(subject["label"])}
            _write({**subject, **tumour}, output_dir, f"subject_{i:02d}", ("tumour",))
            _write(lesion(dict(subject)), output_dir, f"subject_{i:02d}_lesion", ("image", "label", "tumour"))

    datalist = {
        "training": _pairs(list(range(num_subjects - 4))),
        "validation": _lesion_pairs(validation) + _pairs(validation, tumour=True),
        "testing": _lesion_pairs(testing) + _pairs(testing, tumour=True),
    }
    _save_json(datalist, datalist_path)
    _save_json(params, params_path)
    logger.info("built demo data set (%d subjects, %s mm) in %s", num_subjects, spacing, output_dir)
    return datalist_path
