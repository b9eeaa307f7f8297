"""The CPU training campaign of the joint registration + tumour segmentation model, cross-validated by subject.

    python benchmarks/tumour_campaign.py prepare                          # normalised copies + one datalist per fold
    python benchmarks/tumour_campaign.py train [--minutes M] [--threads T] # folds in turn; resumes where it stopped
    python benchmarks/tumour_campaign.py status                           # per fold: iterations, best validation
    python benchmarks/tumour_campaign.py evaluate                         # held-out tumour Dice per fold -> CSV
    python benchmarks/tumour_campaign.py evaluate-segment                 # the same through `brainreg segment`'s configs
    python benchmarks/tumour_campaign.py evaluate-progression             # fold `all` on the TCIA time points -> CSV
    python benchmarks/tumour_campaign.py evaluate-progression --brain-masks runs/tumour_campaign/progression_brain_masks
                                                                          # ... skull-stripped (progression_brain_masks.py)
    python benchmarks/tumour_campaign.py evaluate-regularisation --run tumour_conditioned  # the λ trade-off -> CSV
    python benchmarks/tumour_campaign.py prepare-v4 --brain-masks runs/tumour_campaign/progression_brain_masks
                                                                          # the progression time points for tumour_v4

Every command takes ``--run``: ``tumour`` (default; the recipe of the shipped model: one whole-tumour class) or
``tumour_v2``: three classes, background / oedema / tumour core (BraTS labels 2 and 1, 3, 4; whole tumour = both;
``configs/tumour_regions.json``, datalists ``datalist_regions.json``), trained with ``configs/tumour_augmentation.json``
(left-right flips and rotations/scalings shared by both images of a pair, a gamma contrast change drawn for each
sequence separately, 25 epochs). Its results report the whole tumour and the core. ``tumour_v3``: v2's recipe with
28 ordered pairs of synthetic tumour subjects (``prepare_synthetic``: tumours implanted in SynthSeg label maps, T1c
and FLAIR drawn from them) added to every fold's training pairs (datalists ``datalist_regions_synthetic.json``).
``tumour_conditioned``: the joint model conditioned on the smoothness weight λ (``configs/joint_conditioned.json``:
FiLM on the registration decoder, λ drawn log-uniformly in [0.1, 10] per pair), fine-tuned from the finished folds
of ``tumour`` with the segmentation path frozen (``configs/joint_conditioned_finetune.json``: only the registration
decoder, its head and the FiLM layers train, 600 iterations at learning rate 5e-4, selection on the registration
objective at λ = 1 of the validation pairs); ``evaluate-regularisation`` scores it on the fold's test
pairs at λ = 0.1 ... 10 beside the plain fold (similarity outside the tumours, folding, log-Jacobian spread).
``tumour_v4``: v3's fold ``all`` fine-tuned (600 iterations at 5e-4, ``configs/tumour_partial.json``) with the TCIA
progression time points added as partially labelled training pairs (``prepare-v4``: expert mask = core, the rest of
the brain "background or oedema"); its folds ``prog_<patient>`` hold one progression patient out and are scored on
it (``evaluate-progression --fold prog_<patient> --brain-masks ...``); fold ``all`` trains on both; folds
``fold0``-``fold3`` fine-tune v3's fold of that name likewise with both patients (their BraTS/TCGA test subjects
held out as in v3: ``evaluate`` / ``evaluate-segment --run tumour_v4``).

Data: the real tumour cases of ``../shared/data`` (BraTS 2013 with expert labels, TCGA/BraTS with automatic
``fusion_simple`` labels), T1c and FLAIR stacked as 2 channels, scaled to [0, 1] inside each brain mask, tumour =
any tumour label > 0, cropped to the common SRI24 brain box (``benchmarks/tumour_ablation.py prepare``). Folds are
committed in ``bundle/data/splits/tumour_split.json``: each fold holds out 2 subjects for testing, picks 1 of the
others for validation (best weights, learning-rate schedule, early stop) and trains on every ordered pair of the
rest. Fold ``all`` is the model to ship (trained on every case but its validation subject).

Recipe: ``configs/train.json`` + ``configs/tumour_campaign.json`` (the accuracy campaign's: foreground crop, 2 mm
grid, Adam 1e-3 with gradient clipping and a plateau schedule, epochs of 100 iterations, validation every epoch),
the joint model with its shared encoder and subtractive merge, cross-entropy + Dice on both images' tumours, LNCC
masked inside the tumours; the validation key metric is the fixed image's tumour Dice. Each fold lives in
``models/campaign/tumour_<fold>/`` like the registration run (checkpoint, ``model.pt``, ``training_log.csv``) and
gets a ``finished.json`` when its training ends on its own (epoch budget or early stop).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from itertools import permutations
from pathlib import Path

import nibabel as nib
import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import campaign  # noqa: E402  (the resumable, time-limited training wrapper)
from bundle.data import load_split  # noqa: E402
from bundle.io.writers import write_csv  # noqa: E402

DATA = REPO.parent / "shared" / "data"
RUNS = REPO / "runs" / "tumour_campaign"
CAMPAIGNS = REPO / "models" / "campaign"
RESULTS = REPO / "docs" / "results" / "tumour_cv.csv"
SEGMENT_RESULTS = REPO / "docs" / "results" / "tumour_cv_segment.csv"
CONFIGS = ["train.json", "tumour_campaign.json"]
# run name -> training configs; each run has its own folds (models/campaign/<run>_<fold>/) and results
RECIPES = {"tumour": CONFIGS, "tumour_v2": [*CONFIGS, "tumour_augmentation.json", "tumour_regions.json"],
           "tumour_v3": [*CONFIGS, "tumour_augmentation.json", "tumour_regions.json"],
           "tumour_conditioned": [*CONFIGS, "joint_conditioned.json", "joint_conditioned_finetune.json"],
           "tumour_v4": [*CONFIGS, "tumour_augmentation.json", "tumour_regions.json", "tumour_partial.json"]}
# run name -> its datalists' name (one whole-tumour label, or the 3 regions of tumour_ablation.tumour_regions; v3
# adds pairs of synthetic tumour subjects to every fold's training pairs)
DATALISTS = {"tumour": "datalist.json", "tumour_v2": "datalist_regions.json",
             "tumour_v3": "datalist_regions_synthetic.json", "tumour_conditioned": "datalist.json",
             "tumour_v4": "datalist_progression_training.json"}
# run name -> the run whose fold weights start it (fine-tunes; the new layers missing from them start at zero) and
# its validation key: tumour_conditioned adds FiLM on λ to the recipe's finished folds and trains only the registration
# path (configs/joint_conditioned_finetune.json), so it selects on the registration objective at the validation λ
STARTS_FROM = {"tumour_conditioned": "tumour", "tumour_v4": "tumour_v3"}
# run -> {fold: the source run's fold it starts from} (default: the fold of the same name)
START_FOLD = {"tumour_v4": {"prog_PGBM-001": "all", "prog_PGBM-003": "all"}}
# run -> its folds, where they are not the tumour split's: tumour_v4 holds out one progression patient per fold
# (the BraTS/TCGA cases train as in v3's fold all), trains on every progression patient in fold all, and has the
# tumour split's folds too (v3's fold + every progression patient) for its BraTS/TCGA cross-validation
PROGRESSION_FOLDS = {"tumour_v4": ["prog_PGBM-001", "prog_PGBM-003"]}
RUN_FOLDS = {"tumour_v4": [*PROGRESSION_FOLDS["tumour_v4"], "all", "fold0", "fold1", "fold2", "fold3"]}
PROGRESSION_REPEAT = 4  # each training patient's two time-point pairs appear this often among the training pairs
KEYS = {"tumour_conditioned": "val_objective"}
REGULARISATION_WEIGHTS = (0.1, 0.3, 1.0, 3.0, 10.0)  # λ grid of evaluate-regularisation (the conditioned range)
REGULARISATION_RESULTS = REPO / "docs" / "results" / "regularisation" / "tumour_conditioned_test.csv"
SYNTHETIC_SUBJECTS = 28  # synthetic tumour subjects (2 per SynthSeg training map) ...
SYNTHETIC_PAIRS = 28  # ... and ordered pairs of them added to each fold's training pairs (seeded sample)
PROGRESSION_RESULTS = REPO / "docs" / "results" / "tumour_progression.csv"
STRIPPED_PROGRESSION_RESULTS = REPO / "docs" / "results" / "tumour_progression_stripped.csv"
SHIPPED_TUMOUR = REPO / "models" / "pretrained" / "joint_tumour_regions_t1c_flair_2mm.pt"  # fold all of run "tumour_v3"
SHIPPED_RUN = "tumour_v3"


def regions(run: str) -> bool:
    """Whether the run's model segments oedema and tumour core (3 classes) instead of the whole tumour."""
    return "tumour_regions.json" in RECIPES[run]
# the validation pairs hold no anatomical labels: select on the tumour Dice of the fixed image
TRAINING_OVERRIDES = [
    "--validate#key_metric", "$({'val_tumour_dice_fixed': @metrics#tumour_dice_fixed})",
    "--validate#base_metrics", "$({'val_folding_pct': @metrics#folding_pct, 'val_tumour_dice_moving': @metrics#tumour_dice_moving})",
]


def fold_root(fold: str, run: str = "tumour") -> Path:
    if run not in RECIPES:
        raise ValueError(f"unknown run {run!r}: expected one of {', '.join(RECIPES)}")
    return CAMPAIGNS / f"{run}_{fold}"


def outputs_dir(out: Path, fold: str, name: str, run: str = "tumour") -> Path:
    """Where a run writes a fold's evaluation outputs (the default run keeps its historical places)."""
    return out / fold / name if run == "tumour" else out / fold / run / name


def results_path(default: Path, run: str) -> Path:
    """``docs/results/tumour_cv.csv`` -> ``tumour_v2_cv.csv`` for run ``tumour_v2``."""
    return default if run == "tumour" else default.with_name(default.name.replace("tumour_", f"{run}_", 1))


def _pair(data: Path, m: str, f: str, tumour: str = "tumour.nii.gz") -> dict:
    def files(case: str) -> list[str]:
        return [str(data / case / "t1c.nii.gz"), str(data / case / "flair.nii.gz")]

    return {"moving": files(m), "fixed": files(f), "moving_tumour": str(data / m / tumour),
            "fixed_tumour": str(data / f / tumour), "moving_label": str(data / m / tumour),
            "name": f"{m}_to_{f}"}


def fold_datalist(split: dict, fold: str, data: Path, tumour: str = "tumour.nii.gz") -> dict:
    """Training, validation and testing pairs of one fold (no test subject in the first two)."""
    spec = split["folds"][fold]
    test, val = spec["testing"], spec["validation"]
    train = [s for s in split["subjects"] if s not in test and s != val]
    if val in test or not train:
        raise ValueError(f"fold {fold}: validation subject {val} is a test subject or nothing is left to train on")
    partners = train[:2]
    return {
        "training": [_pair(data, m, f, tumour) for m, f in permutations(train, 2)],
        # the validation subject is the FIXED image of every validation pair: the key metric (the fixed image's
        # tumour Dice) is then measured on it alone, never on a training image
        "validation": [_pair(data, t, val, tumour) for t in partners],
        "testing": [_pair(data, m, f, tumour) for m, f in permutations(test, 2)],
    }


def scale_in_brain(image: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """The real cases' scaling (``tumour_ablation.prepare``): the 0.5-99.5 percentiles inside the brain to [0, 1],
    0 outside."""
    low, high = np.percentile(image[brain], [0.5, 99.5])
    return np.where(brain, np.clip((image - low) / max(high - low, 1e-6), 0, 1), 0).astype(np.float32)


def prepare_synthetic(out: Path, count: int = SYNTHETIC_SUBJECTS, seed: int = 0) -> list[str]:
    """Synthetic tumour subjects from the SynthSeg training label maps (healthy brains, aligned affinely to one
    another by the registration campaign's prepare step, which this reuses): a tumour implanted in each map
    (``RandTumourImplantd``: necrosis / enhancing rim / oedema, mass effect), then T1c and FLAIR drawn from it
    (``RandSynthesiseTumourImaged``), scaled like the real cases; written once to ``out/<name>/`` as
    ``t1c.nii.gz``, ``flair.nii.gz``, ``tumour.nii.gz`` (whole tumour) and ``regions.nii.gz`` (1 oedema, 2 core).
    Subject ``i`` uses training map ``i mod 14`` and seed ``seed + i``; returns the subject names."""
    import torch
    from monai.data import MetaTensor

    from bundle.io import write_nifti
    from bundle.transforms import RandSynthesiseTumourImaged, RandTumourImplantd

    maps = campaign.synthseg_subjects(load_split("synthseg"), campaign.RUNS / "synthseg")
    names = []
    for i in range(count):
        subject = sorted(maps)[i % len(maps)]
        name = f"synthetic_{i:02d}_synthseg_{subject}"
        names.append(name)
        target = out / name
        if (target / "regions.nii.gz").is_file():
            continue
        image = nib.load(maps[subject])
        label = MetaTensor(torch.as_tensor(np.asarray(image.dataobj).astype(np.int16))[None],
                           affine=torch.as_tensor(image.affine))
        item = RandTumourImplantd("label").set_random_state(seed + i)({"label": label})
        item = RandSynthesiseTumourImaged("label", "image", "regions").set_random_state(seed + i)(item)
        regions = item["regions"][0].numpy().astype(np.uint8)
        brain = np.asarray(item["label"][0]) > 0
        tmp = out / f".{name}.tmp"
        for c, sequence in enumerate(("t1c", "flair")):
            write_nifti(scale_in_brain(item["image"][c].numpy(), brain)[None], image.affine, tmp / f"{sequence}.nii.gz")
        write_nifti((regions > 0).astype(np.uint8)[None], image.affine, tmp / "tumour.nii.gz")
        write_nifti(regions[None], image.affine, tmp / "regions.nii.gz")
        if target.exists():
            import shutil

            shutil.rmtree(target)
        tmp.rename(target)
        print(f"synthetic tumour subject {name}: {int((regions == 1).sum()) / 1000:.1f} ml oedema, "
              f"{int((regions == 2).sum()) / 1000:.1f} ml core", flush=True)
    return names


def synthetic_pairs(names: list[str], data: Path, count: int = SYNTHETIC_PAIRS, seed: int = 0) -> list[dict]:
    """``count`` ordered pairs of synthetic subjects made from different label maps (seeded sample)."""
    import random

    source = {n: n.rsplit("_", 1)[1] for n in names}
    candidates = sorted((m, f) for m, f in permutations(names, 2) if source[m] != source[f])
    chosen = random.Random(seed).sample(candidates, min(count, len(candidates)))
    return [_pair(data, m, f, "regions.nii.gz") for m, f in chosen]


def prepare(out: Path = RUNS, synthetic: bool = True) -> list[Path]:
    import tumour_ablation  # the normalised, cropped T1c/FLAIR/tumour copies

    split = load_split("tumour")
    if not all((out / "data" / s / "regions.nii.gz").is_file() for s in split["subjects"]):
        tumour_ablation.prepare(DATA, out)  # deterministic: rewrites the same images, adds the region labels
    extra = synthetic_pairs(prepare_synthetic(out / "synthetic"), out / "synthetic") if synthetic else None
    paths = []
    for fold in split["folds"]:
        lists = [("datalist.json", "tumour.nii.gz", []), ("datalist_regions.json", "regions.nii.gz", [])]
        if extra is not None:
            lists.append(("datalist_regions_synthetic.json", "regions.nii.gz", extra))
        for name, tumour, added in lists:
            datalist = fold_datalist(split, fold, out / "data", tumour)
            datalist["training"] += added
            paths.append(write_datalist(datalist, out / fold / name, fold))
    return paths


def write_datalist(datalist: dict, path: Path, fold: str) -> Path:
    """``datalist`` to ``path`` (a temporary name, then renamed), with a summary line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(datalist, indent=1))
    tmp.replace(path)
    print(f"{fold}: {', '.join(f'{k} {len(v)} pairs' for k, v in datalist.items())} -> {path}")
    return path


PARTIAL_VALUE = 3  # regions value of a progression image outside its expert mask: background or oedema (tumour_partial.json)


def prepare_progression(out: Path, masks: Path, data: Path | None = None) -> dict[str, list[str]]:
    """The TCIA progression time points as partially labelled training subjects for run ``tumour_v4``.

    Per patient: both time points skull-stripped with ``masks`` (``progression_brain_masks.py``), tp0 rigidly aligned
    to tp1 (ITK, mutual information, on the stripped T1post) and both resampled onto one 1 mm grid around tp1's brain
    (10 mm margin); T1c and FLAIR scaled inside the brain like the real cases (:func:`scale_in_brain`);
    ``regions.nii.gz``: 2 in the expert mask (the enhancing core), ``PARTIAL_VALUE`` elsewhere in the brain
    (background or oedema: the mask does not say), 0 outside. Written once (temporary folder, then renamed) to
    ``out/<patient>_tp{0,1}/``; returns ``{patient: [tp0 name, tp1 name]}``."""
    import shutil

    import torch

    from bundle.alignment import itk_affine_register
    from bundle.io import write_nifti
    from bundle.spatial import resample_to_grid

    sources = progression_sources(data)
    patients: dict[str, list[str]] = {}
    for name in sources:
        patients.setdefault(name.rsplit("_", 1)[0], []).append(name)
    for patient, names in patients.items():
        if all((out / n / "regions.nii.gz").is_file() for n in names):
            continue
        if sorted(n.rsplit("_", 1)[1] for n in names) != ["tp0", "tp1"]:
            raise ValueError(f"{patient}: expected time points tp0 and tp1, found {names}")
        loaded = {}
        for n in names:
            mask_path = Path(masks) / f"{n}_brain_mask.nii.gz"
            if not mask_path.is_file():
                raise FileNotFoundError(f"{mask_path}: no brain mask for {n} (benchmarks/progression_brain_masks.py)")
            image = nib.load(str(sources[n]["t1c"]))
            brain = np.squeeze(np.asarray(nib.load(str(mask_path)).dataobj)) > 0
            loaded[n] = {"affine": image.affine, "brain": brain,
                         **{k: np.squeeze(np.asarray(nib.load(str(sources[n][k])).dataobj, dtype=np.float32))
                            for k in ("t1c", "flair", "tumour")}}
        tp0, tp1 = (loaded[f"{patient}_{tp}"] for tp in ("tp0", "tp1"))
        matrix = itk_affine_register(np.where(tp0["brain"], tp0["t1c"], 0), tp0["affine"],
                                     np.where(tp1["brain"], tp1["t1c"], 0), tp1["affine"], "rigid")
        corners = tp1["affine"] @ np.vstack([np.argwhere(tp1["brain"]).T, np.ones((1, int(tp1["brain"].sum())))])
        low, high = corners[:3].min(1) - 10.0, corners[:3].max(1) + 10.0
        grid = np.eye(4)
        grid[:3, 3] = low
        shape = tuple(int(np.ceil(h - lo)) + 1 for lo, h in zip(low, high))
        for n, pull in ((f"{patient}_tp0", matrix), (f"{patient}_tp1", np.eye(4))):
            item = loaded[n]
            src, dst = torch.as_tensor(item["affine"]), torch.as_tensor(pull @ grid)

            def on_grid(a, mode):
                return resample_to_grid(torch.as_tensor(a, dtype=torch.float32)[None], src, dst, shape, mode=mode)[0].numpy()

            brain = on_grid(item["brain"], "nearest") > 0.5
            core = (on_grid(item["tumour"], "nearest") > 0.5) & brain
            regions = np.where(core, 2, np.where(brain, PARTIAL_VALUE, 0)).astype(np.uint8)
            tmp = out / f".{n}.tmp"
            for sequence in ("t1c", "flair"):
                write_nifti(scale_in_brain(on_grid(item[sequence], "bilinear"), brain)[None], grid, tmp / f"{sequence}.nii.gz")
            write_nifti(regions[None], grid, tmp / "regions.nii.gz")
            if (out / n).exists():
                shutil.rmtree(out / n)
            tmp.rename(out / n)
            print(f"progression subject {n}: brain {brain.sum() / 1000:.0f} ml, expert core {core.sum() / 1000:.1f} ml "
                  f"on {shape} voxels of 1 mm", flush=True)
    return patients


def progression_training_pairs(patients: dict[str, list[str]], data: Path, held_out: str | None) -> list[dict]:
    """Both directions of each training patient's time-point pair (all but ``held_out``), ``PROGRESSION_REPEAT``
    times each; partially labelled ``regions.nii.gz`` as the tumours, no anatomical label."""
    pairs = []
    for patient, (tp0, tp1) in sorted(patients.items()):
        if patient == held_out:
            continue
        for m, f in ((tp0, tp1), (tp1, tp0)):
            pair = _pair(data, m, f, "regions.nii.gz")
            pair.pop("moving_label")
            pairs += [{**pair, "name": f"{pair['name']}_{k}"} for k in range(PROGRESSION_REPEAT)]
    return pairs


def prepare_v4(out: Path = RUNS, masks: Path | None = None) -> list[Path]:
    """Datalists of run ``tumour_v4``: v3's datalist of the fold (``prog_<patient>``: of fold ``all``) - its training,
    validation and testing pairs - plus the progression pairs of every patient but a ``prog_<patient>`` fold's
    held-out one."""
    if masks is None:
        raise ValueError("prepare-v4 needs --brain-masks (benchmarks/progression_brain_masks.py)")
    bases = {fold: out / source_fold("tumour_v4", fold) / DATALISTS["tumour_v3"] for fold in run_folds("tumour_v4")}
    for base in bases.values():
        if not base.is_file():
            raise FileNotFoundError(f"{base}: run `tumour_campaign.py prepare` first")
    patients = prepare_progression(out / "progression", masks)
    paths = []
    for fold, base in bases.items():
        held_out = fold.removeprefix("prog_") if fold in PROGRESSION_FOLDS["tumour_v4"] else None
        if held_out is not None and held_out not in patients:
            raise ValueError(f"fold {fold}: no progression patient {held_out}")
        datalist = json.loads(base.read_text())
        datalist["training"] += progression_training_pairs(patients, out / "progression", held_out)
        paths.append(write_datalist(datalist, out / fold / DATALISTS["tumour_v4"], fold))
    return paths


def train(minutes: float | None, threads: int, extra: list[str], out: Path = RUNS, run: str = "tumour",
          folds: list[str] | None = None) -> int:
    """Train the unfinished folds (``folds``, default all) in order, within ``minutes`` in all; a fold that ends on
    its own is marked."""
    deadline = None if minutes is None else time.time() + minutes * 60
    known = run_folds(run)
    unknown = [f for f in folds or [] if f not in known]
    if unknown:
        raise ValueError(f"unknown fold(s) {unknown}: expected some of {', '.join(known)}")
    for fold in folds or known:
        root = fold_root(fold, run)
        if campaign.finished(root):
            continue
        left = None if deadline is None else (deadline - time.time()) / 60
        if left is not None and left <= 1:
            print("time is up: the next fold starts with the next call")
            return 0
        start = []
        if run in STARTS_FROM and not campaign.finished(root):
            start_fold = source_fold(run, fold)
            source = fold_weights(fold_root(start_fold, STARTS_FROM[run]), STARTS_FROM[run], start_fold)
            start = ["--init_ckpt", str(source)]
        key = KEYS.get(run, "val_tumour_dice_fixed")
        overrides = [*(TRAINING_OVERRIDES if key == "val_tumour_dice_fixed" else []), *start, *extra]
        rc = campaign.train_run(left, threads, overrides, root=root, configs=RECIPES[run],
                                out=out, datalist=out / fold / DATALISTS[run], key=key)
        if rc != 0:
            print(f"{fold}: training exited with {rc}; see {root / 'train.log'}")
            return rc
        if not campaign.finished(root):
            return 0  # stopped by the clock at a checkpoint: resume with the same command
    return 0


def source_fold(run: str, fold: str) -> str:
    """The fold of ``STARTS_FROM[run]`` (and of its datalists) that ``run``'s ``fold`` starts from."""
    return START_FOLD.get(run, {}).get(fold, fold)


def run_folds(run: str) -> list[str]:
    """The folds of ``run``: the tumour split's, or the run's own (``RUN_FOLDS``)."""
    return list(RUN_FOLDS.get(run, load_split("tumour")["folds"]))


def status(run: str = "tumour") -> dict:
    info = {}
    for fold in run_folds(run):
        root = fold_root(fold, run)
        if (root / "training_log.csv").is_file():
            from bundle.engines.training import read_training_log

            rows, vals = read_training_log(root / "training_log.csv", latest=True)
            key = KEYS.get(run, "val_tumour_dice_fixed")
            best = max(vals, key=lambda r: r["metrics"].get(key, float("-inf")), default=None)
            info[fold] = {"iterations": int(rows[-1]["iteration"]) if rows else 0, "finished": (root / "finished.json").is_file(),
                          f"best_{key}": best["metrics"].get(key) if best else None,
                          "best_iteration": int(best["iteration"]) if best else None}
    print(json.dumps(info, indent=1))
    return info


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else float("nan")


def _load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def held_out_rows(fold: str, datalist: dict, out_dir: Path, core: bool = False) -> list[dict]:
    """Whole-tumour Dice (every label > 0) of each test subject segmented as the fixed image of a test pair (its own
    grid), and of the pair's moving subject segmented on that grid; with ``core`` (3-class models and region labels)
    also the tumour core's (label 2)."""
    rows = []
    for pair in datalist["testing"]:
        subject = Path(pair["fixed_tumour"]).parent.name
        truth_fixed = np.squeeze(_load(pair["fixed_tumour"]))
        truth_moving = np.squeeze(_load(pair["moving_tumour"]))
        folder = out_dir / pair["name"]
        seg_fixed = np.squeeze(_load(folder / "seg_fixed.nii.gz"))
        seg_moving = np.squeeze(_load(folder / "seg_moving.nii.gz"))
        row = {
            "fold": fold, "subject": subject,
            "labels": "expert" if subject.startswith("brats_2013") else "automatic (silver)",
            "tumour_dice": round(dice(seg_fixed > 0, truth_fixed > 0), 4),
            # the pair's other (also held-out) image, segmented as the moving one on this image's grid
            "moving_subject": Path(pair["moving_tumour"]).parent.name,
            "moving_subject_tumour_dice": round(dice(seg_moving > 0, truth_moving > 0), 4),
        }
        if core:
            row["core_dice"] = round(dice(seg_fixed == 2, truth_fixed == 2), 4)
            row["moving_subject_core_dice"] = round(dice(seg_moving == 2, truth_moving == 2), 4)
        rows.append(row)
    return rows


def zero_flair(flair: str | Path) -> Path:
    """An all-zero image with FLAIR's grid next to it (``flair_missing.nii.gz``): how a missing FLAIR is given to
    the 2-channel model, which saw FLAIR dropped (zeroed) in a quarter of its training images."""
    flair = Path(flair)
    path = flair.with_name("flair_missing.nii.gz")
    if not path.is_file():
        image = nib.load(str(flair))
        tmp = path.with_name(".flair_missing.tmp.nii.gz")
        nib.save(nib.Nifti1Image(np.zeros(image.shape, np.float32), image.affine, image.header), str(tmp))
        tmp.replace(path)
    return path


def without_flair(datalist: dict) -> dict:
    """The same datalist with every FLAIR channel (the second file of each image) replaced by :func:`zero_flair`."""
    def strip(files):
        return [files[0], str(zero_flair(files[1])), *files[2:]] if isinstance(files, list) and len(files) > 1 else files

    return {section: [{**p, "moving": strip(p["moving"]), "fixed": strip(p["fixed"])} for p in pairs]
            for section, pairs in datalist.items()}


SEQUENCES = {"T1c+FLAIR": ("", "test_outputs"), "T1c only (FLAIR zero)": ("_no_flair", "test_outputs_no_flair")}


def inference_configs(run: str, base: tuple[str, ...] | list[str]) -> list[str]:
    """``base`` plus what the run's network needs at inference (its number of tumour classes, its λ conditioning):
    ``tumour.json`` builds the shipped 3-class (oedema / core) model; the one-class runs add ``tumour_whole.json``."""
    classes = ["tumour_regions.json"] if regions(run) else ["tumour_whole.json"]
    extra = [*classes, *[name for name in ("joint_conditioned.json",) if name in RECIPES[run]]]
    return [*base, *extra]


def evaluate(out: Path = RUNS, target: Path | None = None, run: str = "tumour") -> Path:
    """Run each finished cross-validation fold's best weights on its test pairs, with both sequences and with FLAIR
    missing (zeroed); per-subject Dice to ``target`` (default: the run's ``docs/results`` CSV)."""
    from bundle.configs import bundle_command

    target = target or results_path(RESULTS, run)
    split = load_split("tumour")
    rows = []
    for fold, spec in split["folds"].items():
        root = fold_root(fold, run)
        if not spec["testing"]:
            continue
        if not (root / "finished.json").is_file():
            print(f"{fold}: not finished, skipped")
            continue
        finished = json.loads((root / "finished.json").read_text())
        full = json.loads((out / fold / DATALISTS[run]).read_text())
        for sequences, (suffix, outputs) in SEQUENCES.items():
            datalist_path = out / fold / DATALISTS[run].replace(".json", f"{suffix}.json")
            out_dir = outputs_dir(out, fold, outputs, run)
            if suffix:
                datalist_path.write_text(json.dumps(without_flair(full), indent=1))
            settings = {"bundle_root": root, "datalist": datalist_path, "output_dir": out_dir,
                        "ckpt_path": fold_weights(root, run, fold), "progress_bar": False}
            out_dir.mkdir(parents=True, exist_ok=True)
            with open(out_dir.parent / "inference.log", "a") as log:
                configs = inference_configs(run, ["inference.json", "joint.json", "tumour_campaign.json"])
                subprocess.run(bundle_command("inference", REPO, configs, settings),
                               cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
            for row in held_out_rows(fold, json.loads(datalist_path.read_text()), out_dir, core=regions(run)):
                rows.append({**row, "sequences": sequences, "best_iteration": finished.get("best_iteration"),
                             "hardware": finished.get("hardware")})
    if not rows:
        raise FileNotFoundError("no finished cross-validation fold: run `tumour_campaign.py train` first")
    write_csv(target, rows)
    for sequences in SEQUENCES:
        for fold in dict.fromkeys(r["fold"] for r in rows):
            values = [r["tumour_dice"] for r in rows if r["fold"] == fold and r["sequences"] == sequences]
            print(f"{fold}, {sequences}: held-out tumour Dice {np.mean(values):.3f} ({len(values)} images)")
        values = [r["tumour_dice"] for r in rows if r["sequences"] == sequences]
        print(f"{sequences}: mean over folds' images {np.mean(values):.3f}")
    print(f"-> {target}")
    return target


def evaluate_segment(out: Path = RUNS, target: Path | None = None, run: str = "tumour") -> Path:
    """Each finished fold's best weights through the shipped single-image segmentation command (the configs of
    ``brainreg segment``: raw T1c + FLAIR files, scaled inside the brain by the configs) on its test subjects;
    Dice against the subject's own tumour labels on its native grid, to ``target`` (default: the run's CSV)."""
    import tumour_ablation  # the raw files of every case

    from bundle.configs import TUMOUR_SEGMENTATION_CONFIGS, bundle_command

    target = target or results_path(SEGMENT_RESULTS, run)
    split, sources, rows = load_split("tumour"), tumour_ablation._sources(DATA), []
    for fold, spec in split["folds"].items():
        root = fold_root(fold, run)
        if not spec["testing"] or not (root / "finished.json").is_file():
            continue
        finished = json.loads((root / "finished.json").read_text())
        datalist = {"testing": [{"image": [str(sources[s]["t1c"]), str(sources[s]["flair"])], "name": s}
                                for s in spec["testing"]]}
        datalist_path, out_dir = out / fold / "datalist_segment.json", outputs_dir(out, fold, "segment_outputs", run)
        out_dir.mkdir(parents=True, exist_ok=True)
        datalist_path.write_text(json.dumps(datalist, indent=1))
        settings = {"bundle_root": root, "datalist": datalist_path, "output_dir": out_dir,
                    "ckpt_path": fold_weights(root, run, fold)}
        with open(out_dir.parent / "segment.log", "a") as log:
            subprocess.run(bundle_command("inference", REPO, inference_configs(run, TUMOUR_SEGMENTATION_CONFIGS), settings),
                           cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
        for subject in spec["testing"]:
            truth = tumour_ablation.tumour_regions(np.squeeze(_load(sources[subject]["tumour"])))
            seg = np.squeeze(_load(out_dir / subject / "seg.nii.gz"))
            row = {"fold": fold, "subject": subject,
                   "labels": "expert" if subject.startswith("brats_2013") else "automatic (silver)",
                   "tumour_dice": round(dice(seg > 0, truth > 0), 4)}
            if regions(run):
                row["core_dice"] = round(dice(seg == 2, truth == 2), 4)
            rows.append({**row, "sequences": "T1c+FLAIR", "best_iteration": finished.get("best_iteration"),
                         "hardware": finished.get("hardware")})
            print(f"{fold} {subject}: {rows[-1]['tumour_dice']}")
    if not rows:
        raise FileNotFoundError("no finished cross-validation fold: run `tumour_campaign.py train` first")
    write_csv(target, rows)
    print(f"mean over folds' images {np.mean([r['tumour_dice'] for r in rows]):.3f} -> {target}")
    return target


def masked_ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of two images over ``mask``."""
    a, b = a[mask].astype(np.float64), b[mask].astype(np.float64)
    a, b = a - a.mean(), b - b.mean()
    norm = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / norm) if norm > 0 else float("nan")


def regularisation_rows(pair: dict, folder: Path) -> dict:
    """Registration of one test pair from its inference outputs, on the fixed image's grid and inside its brain
    (non-zero voxels of either sequence): the correlation of each warped sequence with the fixed one outside both
    tumours (the fixed tumour and the warped moving one, expert labels), the folding (% of voxels with a Jacobian
    determinant <= 0), the standard deviation of the log-Jacobian (clipped at 1e-9) and the fixed image's tumour Dice."""
    fixed = np.stack([np.squeeze(_load(f)) for f in pair["fixed"]])
    warped = np.squeeze(_load(folder / "warped.nii.gz"))
    warped = warped if warped.ndim == 4 and warped.shape[-1] == len(pair["fixed"]) else warped[..., None]
    brain = (fixed > 0).any(axis=0)
    outside = brain & ~(np.squeeze(_load(pair["fixed_tumour"])) > 0) & ~(np.squeeze(_load(folder / "warped_label.nii.gz")) > 0)
    jacobian = np.squeeze(_load(folder / "jacobian_det.nii.gz"))[brain]
    names = [Path(f).name.split(".")[0] for f in pair["fixed"]]
    row = {f"ncc_{n}": round(masked_ncc(warped[..., c], fixed[c], outside), 4) for c, n in enumerate(names)}
    row["ncc_mean"] = round(float(np.mean(list(row.values()))), 4)
    row.update(folding_pct=round(100 * float((jacobian <= 0).mean()), 4),
               sd_log_jacobian=round(float(np.log(np.clip(jacobian, 1e-9, None)).std()), 4),
               tumour_dice=round(dice(np.squeeze(_load(folder / "seg_fixed.nii.gz")) > 0,
                                      np.squeeze(_load(pair["fixed_tumour"])) > 0), 4))
    return row


def evaluate_regularisation(out: Path = RUNS, target: Path | None = None, run: str = "tumour_conditioned",
                            weights: tuple[float, ...] = REGULARISATION_WEIGHTS) -> Path:
    """The λ trade-off of a conditioned run: each finished fold's best weights on its test pairs at every λ of
    ``weights`` (config id ``regularisation_weight``), beside the plain fold it started from (trained at one λ),
    through ``configs/inference.json``; one row per pair and λ (:func:`regularisation_rows`) to ``target``."""
    from bundle.configs import bundle_command

    if run not in STARTS_FROM or "joint_conditioned.json" not in RECIPES[run]:
        raise ValueError(f"run {run!r} is not conditioned on the regularisation weight")
    target = target or REGULARISATION_RESULTS
    rows = []
    for fold, spec in load_split("tumour")["folds"].items():
        root = fold_root(fold, run)
        if not spec["testing"] or not (root / "finished.json").is_file():
            continue
        finished = json.loads((root / "finished.json").read_text())
        datalist_path = out / fold / DATALISTS[run]
        datalist = json.loads(datalist_path.read_text())
        plain = fold_root(fold, STARTS_FROM[run])
        plain_finished = json.loads((plain / "finished.json").read_text()) if (plain / "finished.json").is_file() else {}
        models = [(STARTS_FROM[run], plain / "models" / "model.pt", None)] + [(run, root / "models" / "model.pt", w) for w in weights]
        for model_run, ckpt, weight in models:
            out_dir = outputs_dir(out, fold, f"regularisation_outputs/{'plain' if weight is None else weight}", run)
            out_dir.mkdir(parents=True, exist_ok=True)
            settings = {"bundle_root": root, "datalist": datalist_path, "output_dir": out_dir, "ckpt_path": ckpt,
                        "progress_bar": False, **({} if weight is None else {"regularisation_weight": weight})}
            configs = inference_configs(model_run, ["inference.json", "joint.json", "tumour_campaign.json"])
            started = time.time()
            with open(out_dir.parent / "inference.log", "a") as log:
                subprocess.run(bundle_command("inference", REPO, configs, settings),
                               cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
            seconds = round((time.time() - started) / max(len(datalist["testing"]), 1), 1)
            for pair in datalist["testing"]:
                row = {"fold": fold, "pair": pair["name"], "model": model_run,
                       "regularisation_weight": "plain (trained at 1.0)" if weight is None else weight,
                       **regularisation_rows(pair, out_dir / pair["name"]), "seconds_per_pair": seconds,
                       "best_iteration": (finished if weight is not None else plain_finished).get("best_iteration"),
                       "hardware": finished.get("hardware")}
                rows.append(row)
                print(", ".join(f"{k} {v}" for k, v in row.items() if k != "hardware"))
    if not rows:
        raise FileNotFoundError(f"no finished fold of run {run}: run `tumour_campaign.py train --run {run}` first")
    write_csv(target, rows)
    print(f"mean over the {len(rows) // (len(weights) + 1)} test pairs of {len({r['fold'] for r in rows})} fold(s):")
    for weight in ["plain (trained at 1.0)", *weights]:
        chosen = [r for r in rows if r["regularisation_weight"] == weight]
        print(f"  λ {weight}: " + ", ".join(f"{k} {np.mean([r[k] for r in chosen]):.4f}" for k in
                                             ("ncc_mean", "folding_pct", "sd_log_jacobian", "tumour_dice"))
              + f", max folding {max(r['folding_pct'] for r in chosen):.4f}")
    print(f"-> {target}")
    return target


def progression_sources(data: Path | None = None) -> dict[str, dict[str, Path]]:
    """``{"PGBM-001_tp0": {"t1c", "flair", "tumour"}, ...}``: every time point of the TCIA progression patients."""
    data, cases = data or DATA, {}
    for patient in load_split("tumour")["progression"]:
        for folder in sorted((data / "tumor_progression" / patient).glob("tp*")):
            cases[f"{patient}_{folder.name.split('_')[0]}"] = {
                "t1c": folder / "T1post.nii.gz", "flair": folder / "FLAIRreg.nii.gz", "tumour": folder / "MaskTumor.nii.gz"}
    missing = [str(p) for c in cases.values() for p in c.values() if not p.is_file()]
    if not cases or missing:
        raise FileNotFoundError(f"TCIA progression time points not found under {data / 'tumor_progression'}: {missing or 'none'}")
    return cases


def evaluate_progression(out: Path = RUNS, target: Path | None = None, run: str = "tumour", fold: str = "all",
                         brain_masks: Path | None = None) -> Path:
    """Fold ``fold``'s best weights (by default the model to ship) on every TCIA progression time point (raw T1post +
    FLAIR, not skull-stripped, 6.5 mm slices; no fold trains on them) through the segmentation configs; Dice of
    the whole tumour and, for 3-class models, of the core against the expert ``MaskTumor``, to ``target``.

    ``brain_masks``: a folder of ``<time point>_brain_mask.nii.gz`` (``benchmarks/progression_brain_masks.py``) given
    to the configs as each image's ``brain_mask`` (skull-stripped input, the models' input contract); the results go
    to ``tumour_progression_stripped.csv`` (per run) and the outputs to ``progression_stripped_outputs``.

    The expert masks mark the contrast-enhancing tumour core, not the oedema: FLAIR is as bright just outside them
    as inside (docs/README.md), so the core is the prediction that corresponds to them."""
    from bundle.configs import TUMOUR_SEGMENTATION_CONFIGS, bundle_command

    target = target or results_path(STRIPPED_PROGRESSION_RESULTS if brain_masks else PROGRESSION_RESULTS, run)
    root = fold_root(fold, run)
    if not (root / "finished.json").is_file():
        raise FileNotFoundError(f"{root / 'finished.json'}: fold {fold} of run {run} has not finished training")
    finished = json.loads((root / "finished.json").read_text())
    sources = progression_sources()
    if run in RUN_FOLDS:  # folds that train on progression patients score only the one they hold out
        if fold not in PROGRESSION_FOLDS.get(run, []):
            raise ValueError(f"fold {fold} of run {run} trained on every progression patient: nothing is held out to score")
        sources = {n: c for n, c in sources.items() if n.rsplit("_", 1)[0] == fold.removeprefix("prog_")}
    datalist = {"testing": [{"image": [str(c["t1c"]), str(c["flair"])], "name": n} for n, c in sources.items()]}
    if brain_masks is not None:
        for entry in datalist["testing"]:
            mask = Path(brain_masks).resolve() / f"{entry['name']}_brain_mask.nii.gz"
            if not mask.is_file():
                raise FileNotFoundError(f"{mask}: no brain mask for {entry['name']} (benchmarks/progression_brain_masks.py)")
            entry["brain_mask"] = str(mask)
    suffix = "_stripped" if brain_masks is not None else ""
    out_dir = outputs_dir(out, fold, f"progression{suffix}_outputs", run)
    out_dir.mkdir(parents=True, exist_ok=True)
    datalist_path = out_dir.parent / f"datalist_progression{suffix}.json"
    datalist_path.write_text(json.dumps(datalist, indent=1))
    settings = {"bundle_root": root, "datalist": datalist_path, "output_dir": out_dir, "ckpt_path": fold_weights(root, run, fold)}
    with open(out_dir.parent / "progression.log", "a") as log:
        subprocess.run(bundle_command("inference", REPO, inference_configs(run, TUMOUR_SEGMENTATION_CONFIGS), settings),
                       cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
    rows = []
    for name, case in sources.items():
        truth = np.squeeze(_load(case["tumour"])) > 0
        seg = np.squeeze(_load(out_dir / name / "seg.nii.gz"))
        depth = depth_in_head(case["t1c"])
        row = {"run": run, "fold": fold, "time_point": name,
               "input": "brain masks (progression_brain_masks.py)" if brain_masks is not None else "raw head",
               "expert_ml": round(float(truth.sum()) * _voxel_ml(case["tumour"]), 2),
               "whole_tumour_dice": round(dice(seg > 0, truth), 4),
               "whole_tumour_ml": round(float((seg > 0).sum()) * _voxel_ml(case["tumour"]), 2),
               # median depth below the head's surface (mm): where the prediction and the expert mask lie
               "whole_tumour_depth_mm": round(float(np.median(depth[seg > 0])), 1) if (seg > 0).any() else float("nan"),
               "expert_depth_mm": round(float(np.median(depth[truth])), 1) if truth.any() else float("nan")}
        if regions(run):
            row.update(core_dice=round(dice(seg == 2, truth), 4), core_ml=round(float((seg == 2).sum()) * _voxel_ml(case["tumour"]), 2))
        rows.append({**row, "best_iteration": finished.get("best_iteration"), "hardware": finished.get("hardware")})
        print(", ".join(f"{k} {v}" for k, v in row.items()))
    if run in RUN_FOLDS and Path(target).is_file():  # one CSV for the run's folds: replace this fold's rows
        import csv

        with open(target, newline="") as f:
            others = [r for r in csv.DictReader(f) if r["fold"] != fold]
        rows = sorted(others + rows, key=lambda r: (r["fold"], r["time_point"]))
    write_csv(target, rows)
    print(f"-> {target}")
    return target


def depth_in_head(image: str | Path) -> np.ndarray:
    """Each voxel's distance (mm) from the surface of the head in ``image`` (0 outside it): the head is the voxels
    above the 20th percentile of the non-zero intensities, closed and hole-filled. Where a prediction lies at a few mm
    it is on the scalp or the skull, not in the brain."""
    from scipy import ndimage

    loaded = nib.load(str(image))
    data = np.squeeze(np.asarray(loaded.dataobj, dtype=np.float32))
    head = data > np.percentile(data[data > 0], 20) if (data > 0).any() else np.zeros(data.shape, bool)
    head = ndimage.binary_fill_holes(ndimage.binary_closing(head, iterations=3))
    return ndimage.distance_transform_edt(head, sampling=loaded.header.get_zooms()[:3])


def fold_weights(root: Path, run: str, fold: str) -> Path:
    """A fold's best weights; the shipped model's fold ``all`` is not kept twice: its weights are the shipped file.

    Raises:
        FileNotFoundError: none in this checkout (a rejected recipe's weights leave the tree; its training log and
            ``finished.json`` stay, and docs/README.md names the commit that holds the weights)."""
    weights = root / "models" / "model.pt"
    if not weights.is_file() and (run, fold) == (SHIPPED_RUN, "all"):
        return SHIPPED_TUMOUR
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: no weights of fold {fold} of run {run} in this checkout (rejected recipes' "
                                "weights are only in the history: see docs/README.md for the commit)")
    return weights


def _voxel_ml(path: Path) -> float:
    return float(np.prod(nib.load(str(path)).header.get_zooms()[:3])) / 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["prepare", "prepare-v4", "train", "status", "evaluate", "evaluate-segment", "evaluate-progression",
                                            "evaluate-regularisation"])
    parser.add_argument("--minutes", type=float, default=None, help="stop at the first checkpoint after this long, all folds together")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    parser.add_argument("--run", choices=list(RECIPES), default="tumour", help="which recipe's folds (default: the shipped model's)")
    parser.add_argument("--folds", nargs="+", default=None, help="train these folds, in this order (default: all, in the split's order)")
    parser.add_argument("--brain-masks", type=Path, default=None,
                        help="evaluate-progression, prepare-v4: skull-strip the time points with these masks (progression_brain_masks.py)")
    parser.add_argument("--fold", default="all", help="evaluate-progression: which fold's weights (default: all)")
    a, extra = parser.parse_known_args()
    if extra and a.command != "train":
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    commands = {"prepare": prepare, "train": lambda: train(a.minutes, a.threads, extra, run=a.run, folds=a.folds),
                "status": lambda: status(a.run), "evaluate": lambda: evaluate(run=a.run),
                "evaluate-segment": lambda: evaluate_segment(run=a.run),
                "evaluate-progression": lambda: evaluate_progression(run=a.run, fold=a.fold, brain_masks=a.brain_masks),
                "prepare-v4": lambda: prepare_v4(masks=a.brain_masks),
                "evaluate-regularisation": lambda: evaluate_regularisation(run=a.run)}
    try:
        result = commands[a.command]()
    except (FileNotFoundError, ValueError) as e:  # bad or missing input: one line naming it
        sys.exit(f"tumour_campaign.py {a.command}: error: {e}")
    if a.command == "train":
        sys.exit(result)


if __name__ == "__main__":
    main()
