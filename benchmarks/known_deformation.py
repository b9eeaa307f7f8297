"""Similarity masking measured against a known truth: pairs from the real tumour cases with a known deformation and
a region without correspondence (issue 14, item 3).

    python benchmarks/known_deformation.py make [--seed 0]      # the pairs -> runs/known_deformation/pairs + pairs.json
    python benchmarks/known_deformation.py run --ckpt-pattern 'models/campaign/tumour_{fold}/models/model.pt' \\
        [--steps 30] [--methods unmasked,tumour,consistency,tumour+consistency] [--masks prediction|truth] [--limit K]
                                                                # -> docs/results/known_deformation_pairs.csv
    python benchmarks/known_deformation.py report               # Wilcoxon tests -> docs/results/known_deformation.{csv,md}

Pairs (``make``, :func:`bundle.data.known_deformation.known_deformation_pair`): for every subject that a fold of
``bundle/data/splits/tumour_split.json`` holds out for testing, one ``growth`` and one ``resection`` pair from its
prepared T1c + FLAIR (``runs/tumour_campaign/data``, ``tumour_campaign.py prepare``): moving = the real image,
fixed = the image with its tumour grown or resected, deformed by a known smooth field (mass effect + smooth
random field). Seed of a pair: ``100 * seed + 2 * (index of the subject in the split) + (0 growth, 1 resection)``.

Methods (``run``), per pair with the model of the fold that held the subject out, on the campaign's network grid
(``configs/train.json`` + ``configs/tumour_campaign.json``: foreground crop, 2 mm, the validation preprocessing):
``network`` (its DDF), then the DDF refined by :class:`bundle.engines.InstanceOptimisationInferer` with the
recipe of ``configs/inference.json`` + ``configs/instance_optimisation.json`` (loss, learning rate, residual,
smoothness weight; ``--steps`` steps) and the same loss for every method, only the similarity mask differing:
``unmasked`` (LNCC everywhere); ``tumour`` (LNCC outside the fixed tumour and the warped moving tumour, from the
network's segmentations as the paper does, or the true masks with ``--masks truth``); ``consistency`` (LNCC
where the network's forward and backward fields agree, :func:`bundle.losses.consistency_mask`); and
``tumour+consistency`` (both). Scores (on the pair's 1 mm grid, the network's DDFs resampled to it):
:func:`bundle.metrics.endpoint_error_by_region` against the true DDF inside the tumour (fixed tumour united with
the non-corresponding region), in a 0-10 mm band and elsewhere in the brain, and folding per region.

Statistics (``report``): per region, each masked method against ``unmasked``: Wilcoxon signed-rank test of the
per-pair mean endpoint errors (two-sided, zero differences dropped), the median difference (negative: the masked
method is closer to the truth) and the matched-pairs rank-biserial correlation (-1: every pair improved).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bundle.data import load_split  # noqa: E402
from bundle.data.known_deformation import CHANGES, known_deformation_pair  # noqa: E402
from bundle.io.writers import write_atomic, write_csv, write_nifti  # noqa: E402

DATA = REPO / "runs" / "tumour_campaign" / "data"
OUT = REPO / "runs" / "known_deformation"
RESULTS = REPO / "docs" / "results"
CKPT_PATTERN = "models/campaign/tumour_{fold}/models/model.pt"
NETWORK_CONFIGS = ["train.json", "tumour_campaign.json"]
REFINEMENT_CONFIGS = ["inference.json", "joint.json", "instance_optimisation.json", "tumour_campaign.json"]
METHODS = ("unmasked", "tumour", "consistency", "tumour+consistency")
BASELINE = "unmasked"
SEQUENCES = ("t1c", "flair")
PAIR_FILES = {  # file of each item in a pair's folder
    **{f"moving_{s}": f"moving_{s}.nii.gz" for s in SEQUENCES},
    **{f"fixed_{s}": f"fixed_{s}.nii.gz" for s in SEQUENCES},
    "true_ddf": "true_ddf.nii.gz", "moving_tumour": "moving_tumour.nii.gz", "fixed_tumour": "fixed_tumour.nii.gz",
    "non_corresponding": "non_corresponding.nii.gz", "brain": "brain.nii.gz",
}


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(data, affine)`` of a NIfTI file; a missing or unreadable file is a one-line error naming it."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        image = nib.load(str(path))
        return np.asarray(image.dataobj), image.affine
    except Exception as e:  # nibabel's errors rarely name the file
        raise ValueError(f"{path}: not a readable NIfTI image ({type(e).__name__}: {e})") from e


def held_out_subjects(split: dict) -> list[tuple[str, str]]:
    """``(fold, subject)`` for every subject a cross-validation fold holds out for testing, in split order."""
    return [(fold, subject) for fold, spec in split["folds"].items() for subject in spec["testing"]]


def make(data: Path = DATA, out: Path = OUT, seed: int = 0) -> Path:
    """Write one growth and one resection pair per held-out subject, and ``pairs.json``; returns its path."""
    split = load_split("tumour")
    entries = []
    for fold, subject in held_out_subjects(split):
        folder = data / subject
        channels, affine = [], None
        for sequence in SEQUENCES:
            array, affine = _load(folder / f"{sequence}.nii.gz")
            channels.append(np.asarray(array, dtype=np.float32).reshape(array.shape[:3]))
        tumour, _ = _load(folder / "tumour.nii.gz")
        spacing = np.linalg.norm(affine[:3, :3], axis=0).tolist()
        image = np.stack(channels)
        for j, change in enumerate(CHANGES):
            pair_seed = 100 * seed + 2 * split["subjects"].index(subject) + j
            pair = known_deformation_pair(image, tumour.reshape(image.shape[1:])[None], spacing, change, pair_seed)
            name = f"{subject}_{change}"
            target = out / "pairs" / name
            for c, sequence in enumerate(SEQUENCES):
                write_nifti(pair["moving"][c : c + 1].numpy(), affine, target / PAIR_FILES[f"moving_{sequence}"])
                write_nifti(pair["fixed"][c : c + 1].numpy(), affine, target / PAIR_FILES[f"fixed_{sequence}"])
            write_nifti(pair["true_ddf"].numpy(), affine, target / PAIR_FILES["true_ddf"], vector=True)
            for key in ("moving_tumour", "fixed_tumour", "non_corresponding", "brain"):
                write_nifti(pair[key].numpy().astype(np.uint8), affine, target / PAIR_FILES[key])
            entries.append({"name": name, "subject": subject, "fold": fold, "change": change, "seed": pair_seed,
                            "folder": f"pairs/{name}", "spacing_mm": spacing, **pair["parameters"]})
            print(f"{name} (test subject of {fold}): {pair['parameters']}", flush=True)
    path = out / "pairs.json"
    listing = json.dumps({"data": str(data), "seed": seed, "pairs": entries}, indent=1)
    write_atomic(path, ".json", lambda tmp: Path(tmp).write_text(listing))
    print(f"{len(entries)} pairs -> {path}")
    return path


def read_pairs(out: Path) -> list[dict]:
    """The pairs of ``out/pairs.json`` with absolute folders.

    Raises:
        FileNotFoundError, ValueError: no such file, or not a pairs list.
    """
    path = out / "pairs.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `known_deformation.py make` first")
    try:
        pairs = json.loads(path.read_text())["pairs"]
        return [{**p, "folder": out / p["folder"]} for p in pairs]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a pairs list written by `known_deformation.py make` ({e})") from e


def exclusion_logits(mask: torch.Tensor) -> torch.Tensor:
    """Two-class logits ``(B, 2, *spatial)`` whose argmax is ``mask`` (``(B, 1, *spatial)``): what the joint loss with
    ``mask_source="prediction"`` reads as a tumour, i.e. excludes from the similarity."""
    mask = mask.float()
    return torch.cat([1.0 - mask, mask], dim=1)


def exclusions(method: str, moving_tumour: torch.Tensor, fixed_tumour: torch.Tensor, inconsistent: torch.Tensor):
    """``(moving, fixed)`` exclusion masks of a method: the joint loss ignores the fixed one and the moving one warped
    by the current DDF (so the tumour masks follow the refinement, as in training)."""
    none = torch.zeros_like(fixed_tumour)
    return {
        "unmasked": (none, none),
        "tumour": (moving_tumour, fixed_tumour),
        "consistency": (none, inconsistent),
        "tumour+consistency": (moving_tumour, fixed_tumour | inconsistent),
    }[method]


class _Models:
    """The network, preprocessing and refinement recipe of the campaign, with each fold's weights loaded on demand."""

    def __init__(self, ckpt_pattern: str, steps: int | None):
        from bundle.configs import read_config

        parser = read_config(REPO, NETWORK_CONFIGS)
        self.device = parser.get_parsed_content("device")
        self.preprocessing = parser.get_parsed_content("validate#preprocessing")
        self.network = parser.get_parsed_content("network_def").to(self.device).eval()
        self.num_classes = parser.get_parsed_content("num_tumour_classes")
        overrides = {"inferer#progress_every": 0, **({} if steps is None else {"instance_optimisation_steps": steps})}
        refinement = read_config(REPO, REFINEMENT_CONFIGS, overrides)
        self.inferer = refinement.get_parsed_content("inferer")
        self.recipe = {k: refinement.get_parsed_content(f"instance_optimisation_{k}")
                       for k in ("steps", "lr", "residual", "smoothness")}
        self.ckpt_pattern, self.fold = ckpt_pattern, None

    def load(self, fold: str) -> None:
        from bundle.engines import load_weights

        if fold != self.fold:
            load_weights(self.network, checkpoint_path(self.ckpt_pattern, fold))
            self.fold = fold


def checkpoint_path(pattern: str, fold: str) -> Path:
    """The checkpoint of ``fold``: ``pattern`` with ``{fold}`` replaced, relative to the repository unless absolute."""
    path = Path(pattern.format(fold=fold))
    return path if path.is_absolute() else REPO / path


def _pair_items(pair: dict) -> dict:
    folder = pair["folder"]
    return {"moving": [str(folder / PAIR_FILES[f"moving_{s}"]) for s in SEQUENCES],
            "fixed": [str(folder / PAIR_FILES[f"fixed_{s}"]) for s in SEQUENCES],
            "moving_tumour": str(folder / PAIR_FILES["moving_tumour"]), "fixed_tumour": str(folder / PAIR_FILES["fixed_tumour"])}


def register_pair(models: _Models, pair: dict, methods: list[str], masks: str) -> tuple[dict, dict]:
    """Network-grid DDFs ``{method: (3, *spatial)}`` (``network`` and each method) mapped to the pair's grid, and the
    % of the brain each method excludes from the similarity."""
    from bundle.losses import consistency_mask
    from bundle.networks.joint import logits_to_labels
    from bundle.networks.outputs import pack_joint_output, split_joint_output
    from bundle.spatial import resample_ddf

    models.load(pair["fold"])
    item = models.preprocessing(_pair_items(pair))
    moving = torch.as_tensor(item["moving"])[None].float().to(models.device)
    fixed = torch.as_tensor(item["fixed"])[None].float().to(models.device)
    with torch.no_grad():
        forward = split_joint_output(models.network(torch.cat([moving, fixed], 1)), 3, models.num_classes)
        backward = split_joint_output(models.network(torch.cat([fixed, moving], 1)), 3, models.num_classes)
    if masks == "truth":
        moving_tumour = torch.as_tensor(item["moving_tumour"])[None].to(models.device) > 0
        fixed_tumour = torch.as_tensor(item["fixed_tumour"])[None].to(models.device) > 0
    else:
        moving_tumour = logits_to_labels(forward["seg_moving"]) > 0
        fixed_tumour = logits_to_labels(forward["seg_fixed"]) > 0
    brain = (fixed > 0).any(1, keepdim=True)  # images are 0 outside the brain
    inconsistent = (consistency_mask(forward["ddf"], backward["ddf"], roi=brain) < 0.5) & brain
    inputs = torch.cat([moving, fixed], 1)
    ddfs, excluded = {"network": forward["ddf"]}, {"network": float("nan")}
    for method in methods:
        moving_ex, fixed_ex = exclusions(method, moving_tumour, fixed_tumour, inconsistent)
        packed = pack_joint_output(forward["ddf"], exclusion_logits(moving_ex), exclusion_logits(fixed_ex))
        ddfs[method] = models.inferer(inputs, lambda _, packed=packed: packed)[:, :3]
        excluded[method] = 100.0 * float((brain & (moving_ex | fixed_ex)).sum()) / max(int(brain.sum()), 1)
    _, affine = _load(pair["folder"] / PAIR_FILES["true_ddf"])
    shape = tuple(_load(pair["folder"] / PAIR_FILES["brain"])[0].shape[:3])
    grid = torch.as_tensor(item["fixed"].affine, dtype=torch.float64)
    on_pair_grid = {m: resample_ddf(d[0].detach().cpu(), grid, torch.as_tensor(affine), shape) for m, d in ddfs.items()}
    return on_pair_grid, excluded


def run(ckpt_pattern: str = CKPT_PATTERN, steps: int | None = None, methods=METHODS, masks: str = "prediction",
        limit: int | None = None, out: Path = OUT, results: Path = RESULTS, command: str = "",
        resume: bool = True) -> Path:
    """Register every pair (or the first ``limit``) with each method and score it; writes ``known_deformation_pairs.csv``
    after every pair. ``resume``: keep the pairs an earlier run of the same methods, masks and recipe scored."""
    from bundle.engines import hardware_description
    from bundle.metrics import endpoint_error_by_region

    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"--methods must be a comma-separated subset of {','.join(METHODS)}, "
                         f"got {','.join(methods) or 'nothing'}")
    pairs = read_pairs(out)[:limit]
    missing = sorted({str(path) for path in (checkpoint_path(ckpt_pattern, p["fold"]) for p in pairs) if not path.is_file()})
    if missing:
        raise FileNotFoundError(f"checkpoint not found: {', '.join(missing)} (train the fold or pass --ckpt-pattern)")
    torch.manual_seed(0)
    models = _Models(ckpt_pattern, steps)
    hardware = hardware_description(models.device)
    path = results / "known_deformation_pairs.csv"
    rows = _earlier_rows(path, list(methods), masks, models.recipe) if resume else []
    done = {r["pair"] for r in rows}
    for pair in pairs:
        if pair["name"] in done:
            print(f"{pair['name']}: scored earlier, kept", flush=True)
            continue
        started = time.time()
        ddfs, excluded = register_pair(models, pair, list(methods), masks)
        folder = pair["folder"]
        vectors = _load(folder / PAIR_FILES["true_ddf"])[0]  # (*spatial, 1, 3), as write_nifti writes a field
        true_ddf = torch.as_tensor(np.moveaxis(vectors.reshape(*ddfs["network"].shape[1:], 3), -1, 0))
        tumour = (_load(folder / PAIR_FILES["fixed_tumour"])[0] > 0) | (_load(folder / PAIR_FILES["non_corresponding"])[0] > 0)
        brain = _load(folder / PAIR_FILES["brain"])[0] > 0
        outside = {}
        for method, ddf in ddfs.items():
            scores = endpoint_error_by_region(ddf, true_ddf, torch.as_tensor(tumour)[None], pair["spacing_mm"],
                                              torch.as_tensor(brain)[None])
            outside[method] = scores["outside"]["epe_mean_mm"]
            for region, values in scores.items():
                rows.append({"pair": pair["name"], "subject": pair["subject"], "fold": pair["fold"], "change": pair["change"],
                             "method": method, "masks": masks if method in ("tumour", "tumour+consistency") else "",
                             "region": region, "epe_mean_mm": round(values["epe_mean_mm"], 4),
                             "epe_median_mm": round(values["epe_median_mm"], 4), "folding_pct": round(values["folding_pct"], 4),
                             "voxels": values["voxels"], "excluded_pct": round(excluded[method], 2),
                             **{f"refinement_{k}": v for k, v in models.recipe.items()}, "seed": pair["seed"],
                             "hardware": hardware, "command": command})
        summary = ", ".join(f"{m} {v:.2f}" for m, v in outside.items())
        print(f"{pair['name']} ({time.time() - started:.0f} s): mean EPE outside the tumour and band (mm): {summary}", flush=True)
        write_csv(path, rows)  # after every pair: an interrupted run resumes from the next one
    print(f"{len(rows)} rows -> {path}")
    return path


def _earlier_rows(path: Path, methods: list[str], masks: str, recipe: dict) -> list[dict]:
    """The rows of an earlier (interrupted) run to keep: only if it scored the same methods, masks and refinement
    recipe, else an error (a mixed table would compare unlike runs)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return []
    earlier = {"methods": sorted({r["method"] for r in rows}),
               "masks": sorted({r["masks"] for r in rows if r["masks"]}),
               "recipe": {k: rows[0].get(f"refinement_{k}") for k in recipe}}
    wanted = {"methods": sorted({"network", *methods}),
              "masks": [masks] if {"tumour", "tumour+consistency"} & set(methods) else [],
              "recipe": {k: str(v) for k, v in recipe.items()}}
    if earlier != wanted:
        raise ValueError(f"{path} holds another run ({earlier}, not {wanted}): move it away or pass --fresh.")
    return rows


def paired_tests(rows: list[dict], baseline: str = BASELINE, value: str = "epe_mean_mm") -> list[dict]:
    """Per region, each method but ``baseline`` and ``network`` against ``baseline``: Wilcoxon signed-rank test of
    the per-pair ``value`` (pairs where both are finite), median difference ``method - baseline`` and the
    matched-pairs rank-biserial correlation ``(R+ - R-) / (R+ + R-)`` of the non-zero differences (negative: the
    method's values are lower). Without a non-zero difference the correlation and p-value are NaN."""
    from scipy.stats import rankdata, wilcoxon

    table = {(r["method"], r["region"], r["pair"]): float(r[value]) for r in rows}
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m not in (baseline, "network")]
    regions = list(dict.fromkeys(r["region"] for r in rows))
    out = []
    for method in methods:
        for region in regions:
            paired = [(v, table.get((baseline, region, p), math.nan))
                      for (m, g, p), v in table.items() if m == method and g == region]
            paired = [(x, y) for x, y in paired if math.isfinite(x) and math.isfinite(y)]
            if not paired:
                continue
            x, y = np.array(paired).T
            d = x - y
            nonzero = d[d != 0]
            if len(nonzero):
                ranks = rankdata(np.abs(nonzero))
                rank_biserial = float((ranks[nonzero > 0].sum() - ranks[nonzero < 0].sum()) / ranks.sum())
                p_value = float(wilcoxon(x, y, zero_method="wilcox").pvalue)
            else:
                rank_biserial = p_value = float("nan")
            out.append({"method": method, "baseline": baseline, "region": region, "n": len(d),
                        f"median_{value}": round(float(np.median(x)), 4),
                        f"median_{value}_baseline": round(float(np.median(y)), 4),
                        "median_difference_mm": round(float(np.median(d)), 4), "rank_biserial": round(rank_biserial, 4),
                        "p_value": p_value})
    return out


def _read_rows(path: Path) -> list[dict]:
    required = {"pair", "method", "region", "epe_mean_mm", "hardware", "command"}
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `known_deformation.py run` first")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not required <= set(rows[0]):
        found = sorted(rows[0]) if rows else "no rows"
        raise ValueError(f"{path}: expected the columns {sorted(required)} of `known_deformation.py run`, got {found}")
    return rows


def report(results: Path = RESULTS, command: str = "") -> Path:
    """The paired tests of ``known_deformation_pairs.csv`` -> ``known_deformation.csv`` and ``.md``."""
    source = results / "known_deformation_pairs.csv"
    rows = _read_rows(source)
    if not any(r["method"] == BASELINE for r in rows):
        raise ValueError(f"{source}: no {BASELINE!r} rows to compare with")
    hardware = "; ".join(dict.fromkeys(r["hardware"] for r in rows))
    run_command = "; ".join(dict.fromkeys(r["command"] for r in rows))
    tests = [{**t, "hardware": hardware, "command": run_command} for t in paired_tests(rows)]
    if not tests:
        raise ValueError(f"{source}: no masked method to compare with {BASELINE!r}")
    path = write_csv(results / "known_deformation.csv", tests)
    lines = [
        "# Similarity masking against a known deformation", "",
        (f"Endpoint error (mm) of the refined DDF against the true one, per pair mean in each region; each masked method "
         f"vs `{BASELINE}` (paired Wilcoxon signed-rank, two-sided; difference = method - {BASELINE}, negative = closer "
         "to the truth; rank-biserial -1 = every pair improved)."), "",
        f"- run: `{run_command}`", f"- report: `{command}`", f"- hardware: {hardware}",
        f"- pairs: {len({r['pair'] for r in rows})} (`{source.name}`)", "",
        "| method | region | n | median EPE (mm) | median EPE unmasked (mm) | median difference (mm) | rank-biserial | p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in tests:
        lines.append(f"| {t['method']} | {t['region']} | {t['n']} | {t['median_epe_mean_mm']:.3f} "
                     f"| {t['median_epe_mean_mm_baseline']:.3f} "
                     f"| {t['median_difference_mm']:+.3f} | {t['rank_biserial']:+.2f} | {t['p_value']:.4g} |")
    markdown = results / "known_deformation.md"
    write_atomic(markdown, ".md", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    print("\n".join(lines[-len(tests) - 2:]))
    print(f"-> {path}, {markdown}")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["make", "run", "report"])
    parser.add_argument("--data", type=Path, default=DATA, help="prepared cases (tumour_campaign.py prepare)")
    parser.add_argument("--out", type=Path, default=OUT, help="folder of the pairs")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the CSV and Markdown results")
    parser.add_argument("--seed", type=int, default=0, help="make: base seed of the pairs")
    parser.add_argument("--ckpt-pattern", default=CKPT_PATTERN,
                        help="run: checkpoint of a fold, '{fold}' replaced (relative to the repository)")
    parser.add_argument("--steps", type=int, default=None,
                        help="run: refinement steps (default: configs/instance_optimisation.json)")
    parser.add_argument("--methods", default=",".join(METHODS), help="run: comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--masks", choices=["prediction", "truth"], default="prediction",
                        help="run: tumour masks from the network's segmentations (the paper) or the true masks")
    parser.add_argument("--limit", type=int, default=None, help="run: only the first K pairs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--fresh", action="store_true", help="run: start over instead of resuming an earlier run's CSV")
    a = parser.parse_args(argv)
    torch.set_num_threads(a.threads)
    command = "python benchmarks/known_deformation.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        if a.command == "make":
            make(a.data, a.out, a.seed)
        elif a.command == "run":
            run(a.ckpt_pattern, a.steps, [m for m in a.methods.split(",") if m], a.masks, a.limit, a.out, a.results, command,
                resume=not a.fresh)
        else:
            report(a.results, command)
    except (FileNotFoundError, ValueError) as e:  # bad or missing input: one line naming it
        sys.exit(f"known_deformation.py {a.command}: error: {e}")


if __name__ == "__main__":
    main()
