"""Choose the instance-optimisation (refinement) settings on validation pairs, never on test pairs.

    python benchmarks/choose_refinement.py --ckpt CKPT [--dataset ibsr,lpba40] [--steps 0,25,50,100]
        [--lr 0.05,0.1] [--smoothness 0.5,1,2] [--residual ddf] [--max-folding 0.05]
        [--native-levels 2:60+1:20,2:40+1:10 --native-lr 0.25 --native-smoothness 0.1,1 --native-residual svf]
        [--configs inference.json,registration_only.json] [--out runs/choose_refinement] [--set ID=VALUE]

Every combination of steps x learning rate x smoothness weight x residual (``instance_optimisation_*`` ids of
``configs/inference.json``) is run through the bundle's own inference config on every validation pair of each
data set (``compare_baselines.split_pairs(..., "validation")``; the test split is never read), and scored in the
fixed image's native grid like ``compare_baselines`` (mean Dice over the structures, % of voxels with det J <= 0,
seconds per pair). ``steps = 0`` is the network alone (one row per pair, whatever the other settings).
``--native-levels`` adds the refinement on the fixed image's native grid (``native_refinement_*`` ids,
:class:`bundle.transforms.RefineNatived`; a level list ``factor:steps+factor:steps``, coarse to fine) to the grid:
every combination of levels x ``--native-lr`` x ``--native-smoothness`` x ``--native-residual``, network-grid
refinement off.

The chosen settings have the highest Dice, averaged over the data sets (each data set's mean over its pairs, so
a data set with many pairs does not outvote one with few), among those whose mean folding is at most
``--max-folding`` on every data set; ties go to fewer steps (the faster). Rows accumulate in
``<out>/<dataset>/results.csv`` (an interrupted run resumes), ``<out>/curve.csv`` holds one line per setting
(per-data-set Dice, folding and median seconds, admissible or not) and ``<out>/choice.json`` the choice, with
the ``--set`` overrides that reproduce it. Prints both.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import compare_baselines  # noqa: E402

DEFAULT_CONFIGS = "inference.json,registration_only.json"
NETWORK_ALONE = "refine_none"


def settings_grid(steps: list[int], lrs: list[float], smoothness: list[float], residuals: list[str]) -> list[dict]:
    """Every combination, with ``steps = 0`` (the network alone) once."""
    grid = [{"steps": 0}] if 0 in steps else []
    grid += [{"steps": s, "lr": lr, "smoothness": sm, "residual": r}
             for s, lr, sm, r in itertools.product(sorted(set(steps) - {0}), lrs, smoothness, residuals)]
    return grid


def native_grid(levels: list[list[list[int]]], lrs: list[float], smoothness: list[float], residuals: list[str]) -> list[dict]:
    """Every combination of native-grid refinement settings (``steps``: the total over the levels)."""
    return [{"stage": "native", "levels": lv, "steps": sum(s for _, s in lv), "lr": lr, "smoothness": sm, "residual": r}
            for lv, lr, sm, r in itertools.product(levels, lrs, smoothness, residuals)]


def parse_levels(text: str) -> list[list[int]]:
    """``"2:60+1:20"`` -> ``[[2, 60], [1, 20]]``.

    Raises:
        ValueError: not ``factor:steps`` pairs of integers, factor >= 1, steps >= 0.
    """
    try:
        levels = [[int(v) for v in level.split(":")] for level in text.split("+")]
    except ValueError:
        raise ValueError(f"native levels {text!r} must be factor:steps pairs joined by '+', e.g. 2:60+1:20.") from None
    if any(len(lv) != 2 or lv[0] < 1 or lv[1] < 0 for lv in levels):
        raise ValueError(f"native levels {text!r} must be factor:steps pairs with factor >= 1 and steps >= 0.")
    return levels


def method_name(setting: dict) -> str:
    """The ``method`` column of a setting's rows (``compare_baselines`` appends ``_io<steps>``)."""
    if setting.get("stage") == "native":
        levels = "-".join(f"{f}x{s}" for f, s in setting["levels"])
        return f"native_{levels}_lr{setting['lr']:g}_s{setting['smoothness']:g}_{setting['residual']}"
    if setting["steps"] == 0:
        return NETWORK_ALONE
    return f"refine_lr{setting['lr']:g}_s{setting['smoothness']:g}_{setting['residual']}_io{setting['steps']}"


def overrides(setting: dict) -> dict:
    """The config ids that apply a setting."""
    if setting.get("stage") == "native":
        return {"instance_optimisation_steps": 0, "native_refinement_levels": setting["levels"],
                "native_refinement_lr": setting["lr"], "native_refinement_smoothness": setting["smoothness"],
                "native_refinement_residual": setting["residual"]}
    if setting["steps"] == 0:
        return {"instance_optimisation_steps": 0}
    return {"instance_optimisation_steps": setting["steps"], "instance_optimisation_lr": setting["lr"],
            "instance_optimisation_smoothness": setting["smoothness"],
            "instance_optimisation_residual": setting["residual"]}


def summarise(rows_by_dataset: dict[str, list[dict]], grid: list[dict], max_folding: float) -> list[dict]:
    """One point per setting evaluated on every data set: mean Dice (mean over data sets of the per-data-set means),
    the per-data-set Dice / folding / median seconds, and whether it is admissible."""
    points = []
    for setting in grid:
        name, point = method_name(setting), {**setting}
        for dataset, rows in rows_by_dataset.items():
            mine = [r for r in rows if r["method"] == name]
            if not mine:
                break
            point[f"{dataset}_pairs"] = len(mine)
            point[f"{dataset}_dice"] = statistics.mean(float(r["dice_mean"]) for r in mine)
            point[f"{dataset}_folding_pct"] = statistics.mean(float(r["folding_pct"]) for r in mine)
            point[f"{dataset}_seconds"] = statistics.median(float(r["seconds"]) for r in mine)
        else:
            point["dice_mean"] = statistics.mean(point[f"{d}_dice"] for d in rows_by_dataset)
            point["admissible"] = all(point[f"{d}_folding_pct"] <= max_folding for d in rows_by_dataset)
            points.append(point)
    return points


def choose(points: list[dict]) -> dict:
    """The admissible point of highest mean Dice; ties (to 1e-6) go to fewer steps.

    Raises:
        ValueError: no point, or none admissible.
    """
    if not points:
        raise ValueError("no validation results to choose from.")
    admissible = [p for p in points if p["admissible"]]
    if not admissible:
        raise ValueError("no setting keeps the mean folding within the limit on every data set; add a larger "
                         "smoothness weight or fewer steps to the grid.")
    return max(admissible, key=lambda p: (round(p["dice_mean"], 6), -p["steps"]))


def _rows(results_csv: Path) -> list[dict]:
    if not results_csv.is_file():
        return []
    with open(results_csv) as fh:
        return list(csv.DictReader(fh))


def run(datasets: dict, out: Path, ckpt: Path, configs: list[str], grid: list[dict], max_folding: float,
        extra: dict | None = None) -> dict:
    """Evaluate ``grid`` on the validation pairs of each of ``datasets`` (name -> data set), then choose."""
    out.mkdir(parents=True, exist_ok=True)
    for name, dataset in datasets.items():
        for setting in grid:
            label = method_name(setting)
            network_steps = 0 if setting.get("stage") == "native" else setting["steps"]
            base = label.rsplit("_io", 1)[0] if network_steps else label
            compare_baselines.run(dataset, out / name, ["ours"], [network_steps], ckpt, None, configs, name=base,
                                  overrides={**(extra or {}), **overrides(setting)}, section="validation")
    points = summarise({n: _rows(out / n / "results.csv") for n in datasets}, grid, max_folding)
    best = choose(points)
    fields = list(dict.fromkeys(k for p in points for k in p))
    with open(out / "curve.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(points)
    choice = {"setting": {k: best[k] for k in ("stage", "levels", "steps", "lr", "smoothness", "residual") if k in best},
              "set": overrides(best),
              "validation": {k: v for k, v in best.items() if k not in ("stage", "levels", "lr", "smoothness", "residual")},
              "max_folding_pct": max_folding, "datasets": list(datasets), "checkpoint": str(ckpt),
              "configs": configs, "extra_overrides": extra or {}, "hardware": compare_baselines.hardware()}
    (out / "choice.json").write_text(json.dumps(choice, indent=2))
    return {"curve": points, "choice": choice}


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def main() -> None:
    from bundle.data.evaluation import DATASETS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--dataset", default="ibsr,lpba40", help="comma separated")
    parser.add_argument("--steps", default="0,25,50,100")
    parser.add_argument("--lr", default="0.05,0.1")
    parser.add_argument("--smoothness", default="0.5,1,2")
    parser.add_argument("--residual", default="ddf")
    parser.add_argument("--native-levels", default="", help="comma separated level lists, e.g. 2:60+1:20,1:30")
    parser.add_argument("--native-lr", default="0.25")
    parser.add_argument("--native-smoothness", default="0.1,1")
    parser.add_argument("--native-residual", default="svf")
    parser.add_argument("--max-folding", type=float, default=0.05, help="%% of voxels with det J <= 0 (mean over pairs)")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "choose_refinement")
    parser.add_argument("--set", action="append", default=[], metavar="ID=VALUE", help="config override")
    a = parser.parse_args()
    names = [d for d in a.dataset.split(",") if d]
    unknown = [d for d in names if d not in DATASETS]
    if unknown or not names:
        parser.error(f"--dataset: unknown {unknown}; known: {', '.join(sorted(DATASETS))}")
    steps = [int(s) for s in a.steps.split(",") if s]
    lrs, smoothness = _floats(a.lr), _floats(a.smoothness)
    residuals = [r for r in a.residual.split(",") if r]
    if any(s < 0 for s in steps) or any(v <= 0 for v in lrs) or any(v < 0 for v in smoothness):
        parser.error("--steps must be >= 0, --lr > 0 and --smoothness >= 0")
    from bundle.engines.instance_optimisation import RESIDUALS

    if any(r not in RESIDUALS for r in residuals):
        parser.error(f"--residual must be from {RESIDUALS}, got {a.residual}")
    grid = settings_grid(steps, lrs, smoothness, residuals)
    if a.native_levels:
        try:
            levels = [parse_levels(t) for t in a.native_levels.split(",") if t]
        except ValueError as e:
            parser.error(f"--native-levels: {e}")
        native_lrs, native_smoothness = _floats(a.native_lr), _floats(a.native_smoothness)
        native_residuals = [r for r in a.native_residual.split(",") if r]
        if any(v <= 0 for v in native_lrs) or any(v < 0 for v in native_smoothness) or any(
                r not in RESIDUALS for r in native_residuals):
            parser.error(f"--native-lr must be > 0, --native-smoothness >= 0, --native-residual from {RESIDUALS}")
        grid += native_grid(levels, native_lrs, native_smoothness, native_residuals)
    try:
        result = run({d: DATASETS[d]() for d in names}, a.out.resolve(), a.ckpt, a.configs.split(","), grid,
                     a.max_folding, dict(compare_baselines._override(s) for s in a.set))
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"choose_refinement.py: error: {e}")
    for p in result["curve"]:
        per = "  ".join(f"{d} {p[f'{d}_dice']:.4f} ({p[f'{d}_folding_pct']:.4f} %, {p[f'{d}_seconds']:.1f} s)" for d in names)
        print(f"{method_name(p):40s} mean Dice {p['dice_mean']:.4f}  {per}{'' if p['admissible'] else '  (folding above the limit)'}")
    c = result["choice"]
    print(f"chosen {c['setting']}: validation mean Dice {c['validation']['dice_mean']:.4f} -> {a.out / 'choice.json'}")


if __name__ == "__main__":
    main()
