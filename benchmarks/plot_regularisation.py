"""The accuracy/smoothness trade-off over λ on the test pairs: mean Dice against mean SDlogJ, per data set.

    python benchmarks/plot_regularisation.py [--out docs/figures/regularisation_tradeoff.png]

Reads the rows the two scoring scripts wrote (nothing is run here): the shipped λ-conditioned network at every λ of
the validation grid (``benchmarks/lambda_test_grid.sh``: methods ``ours_l<λ>``), and its 1,800-iteration snapshot
against the plain networks trained at fixed λ (``benchmarks/fixed_lambda_test.sh``: ``cond_l<λ>``, ``fixed_l<λ>``).
One curve per method family, each point labelled with its λ; the λ chosen on the validation pairs
(``grid_conditioned_final_combined_choice.json``) is marked.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from method_summary import method_means  # noqa: E402  (the per-method means the scoring scripts print)

RESULTS = REPO / "docs" / "results" / "regularisation"
FIGURE = REPO / "docs" / "figures" / "regularisation_tradeoff.png"
DATASETS = {"lpba40": "LPBA40 test (12 pairs, 56 structures)", "ibsr": "IBSR test (12 pairs, CSF/GM/WM)"}
# method prefix -> (file stem, legend)
FAMILIES = {
    "ours_l": ("lambda_test", "conditioned, shipped weights"),
    "cond_l": ("fixed_lambda_test", "conditioned, 1,800-iteration snapshot"),
    "fixed_l": ("fixed_lambda_test", "plain network trained at fixed λ (1,800 iterations)"),
}
CHOICE = "grid_conditioned_final_combined_choice.json"  # λ chosen on the validation pairs (choose_regularisation.py)


def tradeoff_points(path: str | Path, prefix: str) -> list[dict]:
    """Per λ of the methods named ``<prefix><λ>`` in a ``compare_baselines.py`` results CSV: mean Dice, mean SDlogJ,
    mean folding % and the number of pairs, sorted by λ."""
    path = Path(path)
    points = []
    for method, means in method_means(path).items():
        if not method.startswith(prefix):
            continue
        try:
            weight = float(method[len(prefix):])
        except ValueError:
            raise ValueError(f"{path}: method {method!r} does not end with a λ after {prefix!r}") from None
        points.append({"lambda": weight, **{k: means[k] for k in ("pairs", "dice", "sd_log_jacobian", "folding_pct")}})
    if not points:
        raise ValueError(f"{path}: no method named {prefix}<λ>")
    return sorted(points, key=lambda p: p["lambda"])


def plot(results: Path = RESULTS, target: Path = FIGURE) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bundle.io.writers import write_atomic

    chosen = json.loads((results / CHOICE).read_text())["regularisation_weight"]
    fig, axes = plt.subplots(1, len(DATASETS), figsize=(11, 4.2))
    for ax, (dataset, title) in zip(axes, DATASETS.items()):
        for (prefix, (stem, legend)), style in zip(FAMILIES.items(), ("o-", "s--", "^:")):
            points = tradeoff_points(results / f"{stem}_{dataset}.csv", prefix)
            x, y = [p["sd_log_jacobian"] for p in points], [p["dice"] for p in points]
            ax.plot(x, y, style, label=legend, ms=5)
            for p in points:
                ax.annotate(f"{p['lambda']:g}", (p["sd_log_jacobian"], p["dice"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
                if prefix == "ours_l" and abs(p["lambda"] - chosen) < 1e-9:
                    ax.plot(p["sd_log_jacobian"], p["dice"], "o", mfc="none", mec="k", ms=11,
                            label=f"λ = {chosen:g}, chosen on validation")
        ax.set_xlabel("mean SDlogJ (rougher →)"), ax.set_ylabel("mean Dice"), ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Accuracy against smoothness over λ, network alone, held-out test pairs", fontsize=9)
    fig.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, ".png", lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    print(f"-> {target}")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the scoring scripts' CSVs")
    parser.add_argument("--out", type=Path, default=FIGURE, help="the figure to write")
    a = parser.parse_args()
    try:
        plot(a.results, a.out)
    except (FileNotFoundError, ValueError) as e:  # missing or malformed rows: one line naming the file
        raise SystemExit(f"plot_regularisation.py: error: {e}")


if __name__ == "__main__":
    main()
