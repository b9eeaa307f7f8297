"""The CPU training campaign of the shipped registration model: resumable, logged, committed as it goes.

    python benchmarks/campaign.py prepare                  # datalists from the fixed splits (IBSR aligned once)
    python benchmarks/campaign.py train [--minutes M] [--threads T]   # start or continue; stops at a checkpoint after M
    python benchmarks/campaign.py status                   # iterations, best validation Dice so far
    python benchmarks/campaign.py plot                     # learning curve -> docs/figures/
    python benchmarks/campaign.py ship                     # best validated weights -> models/pretrained/

``--run registration_t1_conditioned`` (train, status, plot, ship) selects the λ-conditioned run: the same recipe plus
``configs/regularisation_conditioned.json`` and ``configs/campaign_conditioned.json`` (FiLM on λ, λ drawn
log-uniformly in [0.03, 3] per pair, validation at λ = 0.3), started from the plain run's best weights
(``models/campaign/registration_t1_conditioned/init/``). ``--run autoreg_search``: the architecture search (AutoReg,
``configs/autoreg_search.json``) at 4 mm, 12 epochs of 50 iterations (``configs/autoreg_search_campaign.json``), its genotype
in ``models/campaign/autoreg_search/genotype.json``.
``--run registration_t1_lambda_{0.1,0.3,1}``: issue 17's fixed-λ references, plain networks with the smoothness weight
fixed, from the conditioned run's starting weights, its learning rate and 1,800 iterations (``configs/campaign_fixed_lambda.json``).
``--run registration_t1_probabilistic``: the probabilistic-features ablation, the λ = 1 reference with Gaussian encoder
features and their KL term (``configs/probabilistic_features*.json``), the same start, budget and validation pairs.
``--run registration_t1_autoreg``: the searched architecture, the finished search's genotype (frozen into the run's
``genotype.json`` on its first start) trained from scratch like the plain run for 2,000 iterations
(``configs/autoreg_searched.json``, ``configs/campaign_autoreg.json``); ``--run registration_t1_all3conv``: its
same-budget reference, the hand-designed All-3-Conv genotype (the VM-2 layers) trained with the same configs.

The run lives in ``models/campaign/<run>/``: ``models/checkpoint_*.pt`` (network, optimiser, scheduler and
trainer state: the next session or another machine continues exactly where it stopped), ``models/model.pt``
(best validation Dice so far) and ``training_log.csv`` (iteration, every loss term, learning rate, gradient
norm, validation Dice and folding, cumulative wall time, hardware). Commit those three after each session. A run
whose training ends on its own (epoch budget or early stop) gets ``finished.json`` and is not trained again.

Data (fixed subject splits, committed): LPBA40 (``bundle/data/splits/lpba40_split.json``: 10 training subjects, all ordered
pairs, 56 manual structures as auxiliary Dice) and IBSR (``bundle/data/splits/ibsr_split.json``: 9 training subjects aligned
affinely to the reference subject by the bundle's own ITK stage, CSF/GM/WM on the 6 labelled ones), and SynthSeg
(``bundle/data/splits/synthseg_split.json``: a seeded sample of ordered pairs of the 14 training label maps, aligned
affinely to the first one; a new image is synthesised from each map every epoch by ``RandSynthesisePaird``).
Validation pairs: LPBA40 validation subjects with each other and IBSR's validation subject with two labelled
training subjects. Test subjects are never read here.

The recipe is ``configs/train.json`` + ``configs/registration_only.json`` + ``configs/campaign.json`` (2 mm
grid cropped to the fixed image's foreground, diffeomorphic half-resolution flow, LNCC + diffusion + label
Dice, Adam with gradient clipping and a plateau schedule, validation every epoch of ``epoch_length``
iterations); the same command trains on a GPU when one is present.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from itertools import permutations
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
DATA = REPO.parent / "shared" / "data"
RUNS = REPO / "runs" / "campaign"
CAMPAIGNS = REPO / "models" / "campaign"
CONFIGS = REPO / "configs"
SHIPPED = REPO / "models" / "pretrained" / "registration_t1_2mm.pt"
RUN = "registration_t1"
FINISHED = "finished.json"  # marks a run whose training ended on its own


def _split(name: str) -> dict:
    from bundle.data import load_split

    return load_split(name)


def lpba40_classes(subject: str, label_values: list[int], out: Path) -> Path:
    """``out/<subject>_classes.nii.gz``: the subject's LPBA40 label map with ``label_values`` mapped to classes
    1..56 in that order (written once). Done on disk, not by the config's ``label_values``, because the synthetic
    pairs keep FreeSurfer values until they are synthesised (``RandSynthesisePaird`` maps those)."""
    import nibabel as nib
    import numpy as np

    from bundle.io import write_nifti

    target = out / f"{subject}_classes.nii.gz"
    if not target.is_file():
        img = nib.load(DATA / "lpba40" / subject / f"{subject}_label.nii.gz")
        values = np.asarray(img.dataobj).astype(np.int64)
        lookup = np.zeros(max(max(label_values), int(values.max())) + 1, dtype=np.uint8)
        lookup[label_values] = np.arange(1, len(label_values) + 1)
        write_nifti(lookup[values][None], img.affine, target)
    return target


def lpba40_pairs(split: dict, section: str, out: Path | None = None) -> list[dict]:
    """Ordered pairs of one LPBA40 split section (training: all ordered pairs of its subjects); with ``out``,
    the label maps are the class maps of :func:`lpba40_classes` written there."""
    def files(s: str) -> dict:
        image, label = DATA / "lpba40" / s / f"{s}.nii.gz", DATA / "lpba40" / s / f"{s}_label.nii.gz"
        for path in (image, label):
            if not path.is_file():
                raise FileNotFoundError(f"LPBA40 file not found: {path}")
        if out is not None:
            label = lpba40_classes(s, split["label_values"], out)
        return {"image": str(image), "label": str(label)}

    return [
        {"moving": files(m)["image"], "fixed": files(f)["image"], "moving_label": files(m)["label"],
         "fixed_label": files(f)["label"], "name": f"lpba40_{m}_to_{f}"}
        for m, f in permutations(split[section], 2)
    ]


def synthseg_subjects(split: dict, out: Path) -> dict[str, str]:
    """SynthSeg training label maps aligned affinely to the first one (written once to ``out``), by subject.

    The maps are in their own subject spaces; like IBSR, each is aligned by the bundle's ITK stage (on a T1-like
    image synthesised from it with a fixed seed; only the label map is kept, nearest neighbour) onto the
    reference map's grid cropped to its brain (+10 voxels), so the pairs are affinely aligned like the real ones;
    labels >= 100 (outside the brain) are set to 0.
    """
    import nibabel as nib
    import numpy as np
    import torch

    from bundle.alignment import itk_affine_register
    from bundle.io import write_nifti
    from bundle.spatial import resample_to_grid
    from bundle.transforms import RandSynthesiseImaged

    out.mkdir(parents=True, exist_ok=True)

    def load(subject: str):
        path = DATA / "synthseg_label_maps" / f"training_seg_{subject}.nii.gz"
        if not path.is_file():
            raise FileNotFoundError(f"SynthSeg label map not found: {path}")
        img = nib.load(path)
        label = np.asarray(img.dataobj).astype(np.int16)
        image, _ = RandSynthesiseImaged("l", "i").set_random_state(int(subject)).synthesise(torch.as_tensor(label)[None])
        return label, image[0].numpy(), img.affine

    reference = split["training"][0]
    ref_label, ref_image, ref_affine = load(reference)
    brain = np.argwhere((ref_label > 0) & (ref_label < 100))
    lo, hi = np.maximum(brain.min(0) - 10, 0), np.minimum(brain.max(0) + 11, ref_label.shape)
    grid = ref_affine.copy()
    grid[:3, 3] = ref_affine[:3, :3] @ lo + ref_affine[:3, 3]
    shape = tuple(int(v) for v in hi - lo)
    subjects = {}
    for subject in split["training"]:
        target = out / f"synthseg_{subject}_label.nii.gz"
        if not target.is_file():
            label, image, affine = load(subject)
            matrix = np.eye(4) if subject == reference else itk_affine_register(image, affine, ref_image, ref_affine)
            aligned = resample_to_grid(torch.as_tensor(label.astype(np.float32))[None], torch.as_tensor(affine),
                                       torch.as_tensor(matrix @ grid), shape, mode="nearest")
            aligned = aligned.numpy().astype(np.int16)
            aligned[aligned >= 100] = 0  # extra-cerebral labels: synthesis strips them; the crop then fits the brain
            write_nifti(aligned, grid, target)
            print(f"SynthSeg {subject}: aligned to {reference}", flush=True)
        subjects[subject] = str(target)
    return subjects


def synthseg_pairs(split: dict, out: Path, count: int, seed: int = 0) -> list[dict]:
    """``count`` ordered pairs (seeded sample) of the SynthSeg training maps, flagged for ``RandSynthesisePaird``:
    each label map is its own image, synthesised anew every epoch (the 30 VoxelMorph structures as classes)."""
    import random

    subjects = synthseg_subjects(split, out)
    pairs = sorted(permutations(split["training"], 2))
    chosen = random.Random(seed).sample(pairs, min(count, len(pairs)))
    return [{"moving": subjects[m], "fixed": subjects[f], "moving_label": subjects[m], "fixed_label": subjects[f],
             "synthesise": True, "name": f"synthseg_{m}_to_{f}"} for m, f in chosen]


def prepare(out: Path = RUNS, synthetic_pairs: int = 60) -> Path:
    """Write ``out/datalist.json``: training pairs of LPBA40, IBSR and ``synthetic_pairs`` SynthSeg pairs,
    validation pairs of LPBA40 and IBSR; IBSR and SynthSeg are aligned once."""
    sys.path.insert(0, str(HERE))
    import pretrain  # the IBSR affine preparation (aligned to the reference subject with the bundle's ITK stage)

    ibsr_dir = out / "ibsr"
    ibsr_datalist = ibsr_dir / "datalist.json"
    if not ibsr_datalist.is_file():
        pretrain.prepare(ibsr_dir)
    ibsr = json.loads(ibsr_datalist.read_text())
    ibsr_train = []
    for item in ibsr["training"]:
        labels = [item[k].replace("_image.nii.gz", "_label.nii.gz") for k in ("moving", "fixed")]
        extra = {"moving_label": labels[0], "fixed_label": labels[1]} if all(Path(p).is_file() for p in labels) else {}
        ibsr_train.append({**item, **extra, "name": "ibsr_" + item["name"]})
    lpba = _split("lpba40")
    val_subject = _split("ibsr")["validation"][0]
    ibsr_val = [p for p in ibsr["validation"] if p["name"].startswith(val_subject)][:2]  # validation subject as moving
    datalist = {
        "training": lpba40_pairs(lpba, "training", out / "lpba40") + ibsr_train
        + synthseg_pairs(_split("synthseg"), out / "synthseg", synthetic_pairs),
        "validation": lpba40_pairs(lpba, "validation", out / "lpba40") + [{**p, "name": "ibsr_" + p["name"]} for p in ibsr_val],
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / "datalist.json"
    tmp = path.with_name(".datalist.json.tmp")
    tmp.write_text(json.dumps(datalist, indent=1))
    tmp.replace(path)
    n_lab = sum("moving_label" in p for p in datalist["training"])
    print(f"{len(datalist['training'])} training pairs ({n_lab} labelled), {len(datalist['validation'])} validation pairs -> {path}")
    return path


RECIPE = ["train.json", "registration_only.json", "campaign.json"]
# the runs of the campaign: name -> (configs, shipped weights)
RECIPES = {
    RUN: (RECIPE, SHIPPED),
    # one network over a range of smoothness weights λ (FiLM), started from the plain run's best weights
    "registration_t1_conditioned": ([*RECIPE, "regularisation_conditioned.json", "campaign_conditioned.json"],
                                    SHIPPED.with_name("registration_t1_conditioned_2mm.pt")),
    # AutoReg: every block a mixture of the seed's 8 operations, α stepped on the validation pairs. The stated CPU
    # budget: 4 mm, 600 iterations, on a half-width proxy of VM-2 (same 11 blocks; DARTS too searches on a smaller
    # network than it trains): a training step of the mixture network at 48^3 takes 7.0 s on a shared core, 18.4 s at
    # VM-2's width, VM-2 itself 1.4 s (docs/results/regularisation/search_step_cpu.csv), and its checkpoint is ~22 MB
    # instead of 87 MB; α's rate 10x DARTS' 3e-4 for about a tenth of DARTS' steps; its genotype.json is then trained
    # at VM-2's width like VM-2 (registration_t1_autoreg)
    "autoreg_search": ([*RECIPE, "autoreg_search.json", "autoreg_search_campaign.json"],
                       SHIPPED.with_name("autoreg_search_4mm.pt")),
}
# issue 17's reference: plain networks, one per fixed smoothness weight λ, fine-tuned from the conditioned run's
# starting weights with its learning rate for the iterations of its 1,800-iteration snapshot (equal budget)
FIXED_LAMBDAS = (0.1, 0.3, 1.0)
RUN_OVERRIDES: dict[str, list[str]] = {}
for _lam in FIXED_LAMBDAS:
    RECIPES[f"registration_t1_lambda_{_lam:g}"] = ([*RECIPE, "campaign_fixed_lambda.json"],
                                                   SHIPPED.with_name(f"registration_t1_lambda_{_lam:g}_2mm.pt"))
    RUN_OVERRIDES[f"registration_t1_lambda_{_lam:g}"] = ["--smoothness_weight", f"{_lam:g}"]
# the probabilistic-features ablation: the λ = 1 reference above with Gaussian encoder features and their KL term
# (the seed's bilevel feature learning), same starting weights (its Gaussians start as the identity), budget and λ
RECIPES["registration_t1_probabilistic"] = (
    [*RECIPE, "campaign_fixed_lambda.json", "probabilistic_features.json", "probabilistic_features_train.json"],
    SHIPPED.with_name("registration_t1_probabilistic_2mm.pt"))
RUN_OVERRIDES["registration_t1_probabilistic"] = ["--smoothness_weight", "1"]
# the searched architecture (AutoReg's second step): autoreg_search's genotype trained from scratch like VM-2 (the
# plain run's recipe and data) for 2,000 iterations, compared with registration_t1_all3conv below
SEARCH = "autoreg_search"
RECIPES["registration_t1_autoreg"] = ([*RECIPE, "autoreg_searched.json", "campaign_autoreg.json"],
                                      SHIPPED.with_name("registration_t1_autoreg_2mm.pt"))
# its same-budget reference, AutoReg's hand-designed "All-3-Conv" cell (the VM-2 layers) trained now with the same
# configs: the plain run's own curve began under an earlier recipe (SynthSeg pairs came at its 1,500th iteration)
RECIPES["registration_t1_all3conv"] = ([*RECIPE, "autoreg_searched.json", "campaign_autoreg.json"],
                                       SHIPPED.with_name("registration_t1_all3conv_2mm.pt"))


def freeze_genotype(root: Path, search: Path = CAMPAIGNS / SEARCH) -> Path:
    """Copy the finished search's ``genotype.json`` into the run (``root/genotype.json``, read by
    ``configs/campaign_autoreg.json``) on its first start, so the run keeps its architecture whatever the search does.

    Raises:
        FileNotFoundError: the search has not finished, or left no genotype.
    """
    frozen = root / "genotype.json"
    if frozen.is_file():
        return frozen
    if not finished(search):
        raise FileNotFoundError(f"{search / FINISHED} not found: the architecture search has not finished "
                                f"(benchmarks/campaign.py train --run {search.name}).")
    sys.path.insert(0, str(REPO))
    from bundle.io.writers import write_atomic
    from bundle.networks.searched import read_genotype

    source = search / "genotype.json"
    record = {"genotype": read_genotype(source), "source": os.path.relpath(source, REPO),
              "frozen": time.strftime("%Y-%m-%d %H:%M:%S")}
    root.mkdir(parents=True, exist_ok=True)
    return write_atomic(frozen, ".json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))


def all_3_conv_genotype(root: Path) -> Path:
    """``root/genotype.json`` naming a 3x3x3 convolution for every block of the VM-2 U-Net (AutoReg's All-3-Conv)."""
    sys.path.insert(0, str(REPO))
    from bundle.io.writers import write_atomic
    from bundle.networks import RegistrationUNet, block_count

    frozen = root / "genotype.json"
    if frozen.is_file():
        return frozen
    blocks = block_count(RegistrationUNet(3, 2))
    root.mkdir(parents=True, exist_ok=True)
    record = {"genotype": ["conv_3"] * blocks, "source": "All-3-Conv (hand-designed)"}
    return write_atomic(frozen, ".json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))


# what a run needs before its first start: name -> setup(root)
RUN_SETUP = {"registration_t1_autoreg": freeze_genotype, "registration_t1_all3conv": all_3_conv_genotype}


def training_command(datalist: Path, root: Path, threads: int, extra: list[str], configs: list[str] = RECIPE) -> list[str]:
    from bundle.configs import bundle_command

    settings = {"bundle_root": root, "datalist": datalist, "training_log": root / "training_log.csv", "num_threads": threads}
    return [*bundle_command("training", REPO, configs, settings), *extra]


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _newest_checkpoint_time(root: Path) -> float:
    times = [p.stat().st_mtime for p in (root / "models").glob("checkpoint*.pt")]
    return max(times, default=0.0)


def train(minutes: float | None, threads: int, extra: list[str], out: Path = RUNS, root: Path = CAMPAIGNS / RUN,
          grace_minutes: float = 10.0, configs: list[str] = RECIPE, datalist: Path | None = None) -> int:
    """Start or resume the campaign; with ``minutes``, stop it cleanly after that long.

    The run checkpoints at the end of every epoch (``epoch_length`` iterations). After ``minutes`` it waits up
    to ``grace_minutes`` for the next checkpoint, then stops the run (SIGINT, then SIGTERM), so the state left
    on disk is a whole epoch and no more than a few minutes of training are lost.
    """
    datalist = datalist or out / "datalist.json"
    if not datalist.is_file():
        raise FileNotFoundError(f"{datalist} not found: run the campaign's `prepare` first.")
    root.mkdir(parents=True, exist_ok=True)
    args = training_command(datalist, root, threads, extra, configs)
    with open(root / "train.log", "a") as log:
        log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(args)}\n")
        log.flush()
        # SIGINT back to its default in the child: a campaign started in the background (`nohup ... &`) inherits
        # SIGINT ignored, and the clean stop below would then wait a minute and fall back to SIGTERM
        proc = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                                preexec_fn=_default_sigint if os.name == "posix" else None)
        try:
            return proc.wait(timeout=None if minutes is None else minutes * 60)
        except subprocess.TimeoutExpired:
            seen = _newest_checkpoint_time(root)
            deadline = time.time() + grace_minutes * 60
            while proc.poll() is None and time.time() < deadline and _newest_checkpoint_time(root) <= seen:
                time.sleep(5)
            time.sleep(2)  # let the saver finish its rename
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.terminate()
                proc.wait()
            print(f"stopped after {minutes} min at a checkpoint; resume with the same command")
            return 0


def finished(root: Path) -> bool:
    """Whether the run's training ended on its own (epoch budget or early stop): see :func:`train_run`."""
    return (root / FINISHED).is_file()


def mark_finished(root: Path, key: str = "val_mean_dice") -> Path:
    """Write ``finished.json`` (the run's status and when it ended): the run is not trained again."""
    sys.path.insert(0, str(REPO))
    from bundle.io.writers import write_atomic

    info = {**status(root, key=key), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    return write_atomic(root / FINISHED, ".json", lambda tmp: Path(tmp).write_text(json.dumps(info, indent=1)))


def train_run(minutes: float | None, threads: int, extra: list[str], root: Path, configs: list[str] = RECIPE,
              out: Path = RUNS, datalist: Path | None = None, key: str = "val_mean_dice") -> int:
    """:func:`train` unless the run has finished; marks it finished when its training ends on its own.

    A run stopped by the clock resumes from its checkpoint with the same command. A finished one is left alone:
    resuming it would restart an early-stopped run (the early-stop state is not checkpointed), and its final
    checkpoint may then leave the repository, which would otherwise retrain it from scratch without a word.
    """
    if finished(root):
        print(f"{root.name}: finished ({root / FINISHED}); nothing to train")
        return 0
    if root.name in RUN_SETUP:
        RUN_SETUP[root.name](root)
    started = time.time()
    rc = train(minutes, threads, extra, out=out, root=root, configs=configs, datalist=datalist)
    if rc == 0 and (minutes is None or time.time() - started < minutes * 60):  # not stopped by the clock
        mark_finished(root, key)
        print(f"{root.name}: finished")
    return rc


def status(root: Path = CAMPAIGNS / RUN, key: str = "val_mean_dice") -> dict:
    """Iterations done, wall time and the best validation value of the metric ``key`` (with its iteration) so far."""
    sys.path.insert(0, str(REPO))
    from bundle.engines.training import read_training_log

    train_rows, val_rows = read_training_log(root / "training_log.csv", latest=True)
    best = max(val_rows, key=lambda r: r["metrics"].get(key, -1), default=None)
    info = {
        "iterations": int(train_rows[-1]["iteration"]) if train_rows else 0,
        "wall_hours": round(float(train_rows[-1]["wall_s"]) / 3600, 2) if train_rows else 0,
        "validations": len(val_rows),
        f"best_{key}": best["metrics"].get(key) if best else None,
        "best_iteration": int(best["iteration"]) if best else None,
        "last_val": val_rows[-1]["metrics"] if val_rows else None,
        "hardware": train_rows[-1]["hardware"] if train_rows else None,
    }
    print(json.dumps(info, indent=1))
    return info


def network_grid_mm(configs: list[str]) -> float:
    """The network grid's spacing (mm) a run's configs set: the last of them that sets ``pixdim``."""
    spacing = None
    for name in configs:
        spacing = json.loads((CONFIGS / name).read_text()).get("pixdim", spacing)
    return float(spacing[0])


def plot(root: Path = CAMPAIGNS / RUN, target: Path | None = None, grid_mm: float = 2.0) -> Path:
    """Validation Dice and folding, and the training loss terms, against iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sys.path.insert(0, str(REPO))
    from bundle.engines.training import read_training_log

    train_rows, val_rows = read_training_log(root / "training_log.csv", latest=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    it = [int(r["iteration"]) for r in train_rows]
    for key in ("similarity", "label_dice"):
        values = [float(r[key]) if r.get(key) else float("nan") for r in train_rows]
        ax1.plot(it, values, label=key, lw=0.8)
    ax1.set_xlabel("iteration"), ax1.set_title("training loss terms"), ax1.legend()
    vit = [int(r["iteration"]) for r in val_rows]
    ax2.plot(vit, [r["metrics"].get("val_mean_dice") for r in val_rows], "o-", label="validation mean Dice")
    ax2.set_xlabel("iteration"), ax2.set_title(f"validation ({grid_mm:g} mm network grid)"), ax2.legend(loc="lower right")
    hw = train_rows[-1]["hardware"] if train_rows else ""
    target = target or REPO / "docs" / "figures" / f"campaign_{root.name}.png"
    fig.suptitle(f"{root.name}: {hw}", fontsize=8)
    fig.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=110)
    print(f"-> {target}")
    return target


def ship(root: Path = CAMPAIGNS / RUN, target: Path = SHIPPED) -> Path:
    """Copy the best validated weights (a plain state dict) to ``models/pretrained/``."""
    import torch

    sys.path.insert(0, str(REPO))
    from bundle.engines.checkpoints import network_state_dict
    from bundle.io.writers import write_atomic

    state = network_state_dict(root / "models" / "model.pt")
    write_atomic(target, ".pt", lambda tmp: torch.save(state, tmp))
    print(f"{root / 'models' / 'model.pt'} -> {target} ({target.stat().st_size / 1e6:.1f} MB)")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["prepare", "train", "status", "plot", "ship"])
    parser.add_argument("--minutes", type=float, default=None,
                        help="stop the training at the first checkpoint after this long (it resumes from there)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the training process")
    parser.add_argument("--run", choices=sorted(RECIPES), default=RUN, help="which run of the campaign")
    a, extra = parser.parse_known_args()
    if extra and a.command != "train":
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    root, (configs, shipped) = CAMPAIGNS / a.run, RECIPES[a.run]
    extra = [*RUN_OVERRIDES.get(a.run, []), *extra]
    commands = {"prepare": prepare, "train": lambda: train_run(a.minutes, a.threads, extra, root=root, configs=configs),
                "status": lambda: status(root), "plot": lambda: plot(root, grid_mm=network_grid_mm(configs)), "ship": lambda: ship(root, shipped)}
    try:
        result = commands[a.command]()
    except (FileNotFoundError, ValueError) as e:  # bad or missing input: one line naming it, nothing else
        sys.exit(f"campaign.py {a.command}: error: {e}")
    if a.command == "train":
        sys.exit(result)


if __name__ == "__main__":
    main()
