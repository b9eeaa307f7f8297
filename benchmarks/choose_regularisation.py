"""Choose the regularisation weight λ of a conditioned model on validation pairs (the bilevel upper level).

    python benchmarks/choose_regularisation.py --ckpt CKPT [--dataset lpba40] [--weights 0.01,0.03,0.1,0.3,1,3,10]
        [--max-folding 0.05] [--refine 2] [--configs inference.json,registration_only.json,regularisation_conditioned.json]
        [--out runs/choose_regularisation_<dataset>] [--set ID=VALUE]

One network conditioned on λ (``configs/regularisation_conditioned.json``) is run on every validation pair of the
data set (``compare_baselines.split_pairs(..., "validation")``; the test split is never read) at each weight of a
log-spaced grid, through the bundle's own inference config (``--set regularisation_weight=λ``). The chosen λ
maximises the mean validation Dice among the weights whose mean folding (% of voxels with det J <= 0) is at most
``--max-folding``; ``--refine N`` then evaluates the geometric midpoints between the best weight and its grid
neighbours, N times (a bracketing search in log λ). Rows accumulate in ``<out>/results.csv`` (one per pair and λ,
``compare_baselines``'s format, so an interrupted run resumes); ``<out>/curve.csv`` holds the validation curve
(λ, pairs, mean Dice, mean folding, admissible) and ``<out>/choice.json`` the choice. Prints both.

    python benchmarks/choose_regularisation.py combine OUT_1 OUT_2 ... [--max-folding 0.05] --out OUT

One default λ for several data sets: from the ``results.csv`` of runs above (one per data set), the weights that all
of them evaluated are scored by the mean over data sets of each data set's mean validation Dice (every data set
counts once, whatever its number of pairs) and of its mean folding; the same rule then chooses. Writes
``OUT/curve.csv`` (with each data set's mean beside the combined one) and ``OUT/choice.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import compare_baselines  # noqa: E402

DEFAULT_CONFIGS = "inference.json,registration_only.json,regularisation_conditioned.json"


def method_name(weight: float) -> str:
    return f"lambda_{weight:.6g}"


def curve(results_csv: Path) -> list[dict]:
    """Mean Dice and folding per λ from the rows of ``results_csv``, sorted by λ."""
    with open(results_csv) as fh:
        rows = [r for r in csv.DictReader(fh) if r["method"].startswith("lambda_")]
    weights = sorted({float(r["method"].removeprefix("lambda_")) for r in rows})
    out = []
    for w in weights:
        mine = [r for r in rows if r["method"] == method_name(w)]
        out.append({"weight": w, "pairs": len(mine),
                    "dice_mean": statistics.mean(float(r["dice_mean"]) for r in mine),
                    "folding_pct": statistics.mean(float(r["folding_pct"]) for r in mine)})
    return out


def choose(points: list[dict], max_folding: float) -> dict:
    """The admissible point (mean folding <= ``max_folding``) of highest mean Dice; ties go to the larger λ
    (the smoother field).

    Raises:
        ValueError: no point, or none admissible (the message gives the least folding reached).
    """
    if not points:
        raise ValueError("no validation results to choose from.")
    admissible = [p for p in points if p["folding_pct"] <= max_folding]
    if not admissible:
        least = min(points, key=lambda p: p["folding_pct"])
        raise ValueError(f"no weight keeps the mean folding at or below {max_folding} % of voxels (least: "
                         f"{least['folding_pct']:.4f} % at λ = {least['weight']:g}); widen the grid towards larger weights.")
    return max(admissible, key=lambda p: (round(p["dice_mean"], 6), p["weight"]))


def refinement_weights(points: list[dict], best: float) -> list[float]:
    """Geometric midpoints between ``best`` and its neighbours on the evaluated grid (not yet evaluated)."""
    weights = sorted(p["weight"] for p in points)
    i = weights.index(best)
    mids = [math.sqrt(best * weights[j]) for j in (i - 1, i + 1) if 0 <= j < len(weights)]
    return [w for w in mids if all(abs(math.log(w / v)) > 1e-6 for v in weights)]


def run(dataset, out: Path, ckpt: Path, configs: list[str], weights: list[float], max_folding: float, refine: int,
        overrides: dict | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)

    def evaluate(ws):
        for w in ws:
            compare_baselines.run(dataset, out, ["ours"], [0], ckpt, None, configs, name=method_name(w),
                                  overrides={**(overrides or {}), "regularisation_weight": float(w)}, section="validation")

    evaluate(weights)
    points = curve(out / "results.csv")
    best = choose(points, max_folding)
    for _ in range(refine):
        extra = refinement_weights(points, best["weight"])
        if not extra:
            break
        evaluate(extra)
        points = curve(out / "results.csv")
        best = choose(points, max_folding)
    with open(out / "curve.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["weight", "pairs", "dice_mean", "folding_pct", "admissible"])
        writer.writeheader()
        writer.writerows({**p, "admissible": p["folding_pct"] <= max_folding} for p in points)
    choice = {"regularisation_weight": best["weight"], "validation_dice_mean": best["dice_mean"],
              "validation_folding_pct": best["folding_pct"], "max_folding_pct": max_folding, "pairs": best["pairs"],
              "dataset": getattr(dataset, "name", type(dataset).__name__), "checkpoint": str(ckpt),
              "hardware": compare_baselines.hardware()}
    (out / "choice.json").write_text(json.dumps(choice, indent=2))
    return {"curve": points, "choice": choice}


CONDITIONED_TRAINING = ["train.json", "registration_only.json", "campaign.json", "regularisation_conditioned.json",
                        "campaign_conditioned.json"]


def validation_pairs(configs: list[str], datalist: Path, overrides: dict | None = None):
    """The conditioned network (weights not loaded), its λ range and the validation pairs of ``datalist`` as the
    training config pre-processes them: ``(moving, fixed, moving_onehot, fixed_onehot)`` on the network grid."""
    import torch
    from monai.networks.utils import one_hot

    from bundle.configs import read_config

    parser = read_config(REPO, configs, {"datalist": str(datalist), "num_workers": 0, "cache_rate": 0.0,
                                         **(overrides or {})})
    network = parser.get_parsed_content("network_def")
    num_classes = int(parser.get_parsed_content("num_classes"))
    pairs = []
    for batch in parser.get_parsed_content("validate#dataloader"):
        if "moving_label" not in batch or "fixed_label" not in batch:
            raise ValueError(f"validation pair {batch.get('name')} has no label maps: the hypergradient needs Dice.")
        onehot = [one_hot(torch.as_tensor(batch[k]).round().long(), num_classes).float() for k in ("moving_label", "fixed_label")]
        pairs.append((torch.as_tensor(batch["moving"]).float(), torch.as_tensor(batch["fixed"]).float(), *onehot))
    return network, tuple(parser.get_parsed_content("regularisation_range")), pairs


def run_hypergradient(ckpt: Path, datalist: Path, out: Path, start: float, steps: int, lr: float, max_folding: float,
                      penalty: float, configs: list[str] = CONDITIONED_TRAINING, overrides: dict | None = None) -> dict:
    from bundle.engines import load_weights
    from bundle.engines.regularisation_search import hypergradient_search

    network, weight_range, pairs = validation_pairs(configs, datalist, overrides)
    load_weights(network, ckpt)
    history = hypergradient_search(network, pairs, weight_range, start=start, steps=steps, learning_rate=lr,
                                   max_folding=max_folding, penalty=penalty)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "hypergradient.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    admissible = [h for h in history if h["admissible"]]
    if not admissible:
        raise ValueError(f"no step kept the folding at or below {max_folding} % (least: "
                         f"{min(h['folding_pct'] for h in history):.4f} %); raise --penalty or --start.")
    best = max(admissible, key=lambda h: (round(h["dice"], 6), h["weight"]))
    choice = {"regularisation_weight": best["weight"], "step": best["step"], "validation_soft_dice_network_grid": best["dice"],
              "validation_folding_pct_network_grid": best["folding_pct"], "max_folding_pct": max_folding,
              "pairs": len(pairs), "start": start, "steps": steps, "learning_rate": lr, "penalty": penalty,
              "weight_range": list(weight_range), "checkpoint": str(ckpt), "datalist": str(datalist),
              "hardware": compare_baselines.hardware()}
    (out / "hypergradient_choice.json").write_text(json.dumps(choice, indent=2))
    return {"history": history, "choice": choice}


def main_hypergradient(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="choose_regularisation.py hypergradient", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True, help="a checkpoint of the conditioned network")
    parser.add_argument("--datalist", type=Path, default=REPO / "runs" / "campaign" / "datalist.json",
                        help="its validation section is used (campaign.py prepare writes it)")
    parser.add_argument("--start", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.2, help="first Rprop step on log λ")
    parser.add_argument("--max-folding", type=float, default=0.05)
    parser.add_argument("--penalty", type=float, default=10.0)
    parser.add_argument("--configs", default=",".join(CONDITIONED_TRAINING))
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "choose_regularisation_hypergradient")
    parser.add_argument("--set", action="append", default=[], metavar="ID=VALUE", help="config override")
    a = parser.parse_args(argv)
    if not a.datalist.is_file():
        sys.exit(f"choose_regularisation.py: error: {a.datalist}: no such datalist (run benchmarks/campaign.py prepare).")
    try:
        result = run_hypergradient(a.ckpt, a.datalist, a.out.resolve(), a.start, a.steps, a.lr, a.max_folding, a.penalty,
                                   a.configs.split(","), dict(compare_baselines._override(s) for s in a.set))
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"choose_regularisation.py: error: {e}")
    c = result["choice"]
    print(f"chosen regularisation_weight {c['regularisation_weight']:.4g} (step {c['step']}): soft validation Dice "
          f"{c['validation_soft_dice_network_grid']:.4f} on the network grid, folding {c['validation_folding_pct_network_grid']:.4f} % "
          f"-> {a.out / 'hypergradient_choice.json'}")


def combine(runs: list[Path], out: Path, max_folding: float) -> dict:
    """One λ for several data sets: each run's curve (:func:`curve`) averaged over the runs at the weights all share.

    Raises:
        ValueError: fewer than two runs, a run without ``results.csv``, no weight common to all, none admissible.
    """
    if len(runs) < 2:
        raise ValueError("combine needs the output folders of two or more runs (one per data set).")
    curves = {}
    for folder in runs:
        if not (folder / "results.csv").is_file():
            raise ValueError(f"{folder / 'results.csv'}: no such file (run the per-data-set search first).")
        curves[folder.name] = {round(p["weight"], 9): p for p in curve(folder / "results.csv")}
    common = sorted(set.intersection(*(set(c) for c in curves.values())))
    if not common:
        raise ValueError(f"no weight was evaluated by all of {', '.join(curves)}; use the same --weights.")
    points = []
    for w in common:
        per_run = {name: c[w] for name, c in curves.items()}
        points.append({"weight": w, "pairs": sum(p["pairs"] for p in per_run.values()),
                       "dice_mean": statistics.mean(p["dice_mean"] for p in per_run.values()),
                       "folding_pct": statistics.mean(p["folding_pct"] for p in per_run.values()),
                       **{f"dice_{name}": p["dice_mean"] for name, p in per_run.items()}})
    best = choose(points, max_folding)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "curve.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*points[0], "admissible"])
        writer.writeheader()
        writer.writerows({**p, "admissible": p["folding_pct"] <= max_folding} for p in points)
    choice = {"regularisation_weight": best["weight"], "validation_dice_mean_over_datasets": best["dice_mean"],
              "validation_folding_pct": best["folding_pct"], "max_folding_pct": max_folding,
              "runs": [str(r) for r in runs], **{k: v for k, v in best.items() if k.startswith("dice_")}}
    (out / "choice.json").write_text(json.dumps(choice, indent=2))
    return {"curve": points, "choice": choice}


def main_combine(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="choose_regularisation.py combine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="output folders of per-data-set runs")
    parser.add_argument("--max-folding", type=float, default=0.05)
    parser.add_argument("--out", type=Path, required=True)
    a = parser.parse_args(argv)
    try:
        result = combine([r.resolve() for r in a.runs], a.out.resolve(), a.max_folding)
    except ValueError as e:
        sys.exit(f"choose_regularisation.py: error: {e}")
    for p in result["curve"]:
        others = "  ".join(f"{k.removeprefix('dice_')} {v:.4f}" for k, v in p.items() if k.startswith("dice_") and k != "dice_mean")
        print(f"λ = {p['weight']:<10.4g} mean Dice {p['dice_mean']:.4f} ({others})  folding {p['folding_pct']:.4f} %")
    c = result["choice"]
    print(f"chosen regularisation_weight {c['regularisation_weight']:.4g}: mean validation Dice over data sets "
          f"{c['validation_dice_mean_over_datasets']:.4f} -> {a.out / 'choice.json'}")


def main() -> None:
    from bundle.data.evaluation import DATASETS

    if sys.argv[1:2] == ["hypergradient"]:
        return main_hypergradient(sys.argv[2:])
    if sys.argv[1:2] == ["combine"]:
        return main_combine(sys.argv[2:])

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True, help="a checkpoint of the conditioned network")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="lpba40")
    parser.add_argument("--weights", default="0.01,0.03,0.1,0.3,1,3,10")
    parser.add_argument("--max-folding", type=float, default=0.05, help="%% of voxels with det J <= 0 (mean over pairs)")
    parser.add_argument("--refine", type=int, default=2)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="ID=VALUE", help="config override")
    a = parser.parse_args()
    weights = [float(w) for w in a.weights.split(",")]
    if any(not w > 0 for w in weights):
        parser.error(f"--weights must all be > 0, got {a.weights}")
    out = (a.out or REPO / "runs" / f"choose_regularisation_{a.dataset}").resolve()
    result = run(DATASETS[a.dataset](), out, a.ckpt, a.configs.split(","), weights, a.max_folding, a.refine,
                 dict(compare_baselines._override(s) for s in a.set))
    for p in result["curve"]:
        flag = "" if p["folding_pct"] <= a.max_folding else "  (folding above the limit)"
        print(f"λ = {p['weight']:<10.4g} Dice {p['dice_mean']:.4f}  folding {p['folding_pct']:.4f} %  ({p['pairs']} pairs){flag}")
    c = result["choice"]
    print(f"chosen regularisation_weight {c['regularisation_weight']:.4g}: validation Dice {c['validation_dice_mean']:.4f}, "
          f"folding {c['validation_folding_pct']:.4f} % -> {out / 'choice.json'}")


if __name__ == "__main__":
    main()
