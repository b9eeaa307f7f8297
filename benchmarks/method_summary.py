"""Per-method summary of a ``compare_baselines.py`` results CSV (the lines the benchmark scripts print).

    python benchmarks/method_summary.py RESULTS.csv
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path


def method_means(path: str | Path) -> dict[str, dict]:
    """Per method, in order of first appearance: pairs, mean Dice, mean and max folding %, mean SDlogJ, median
    seconds per pair and the hardware."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    means = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]

        def column(name):
            return [float(r[name]) for r in mine]

        means[method] = {"pairs": len(mine), "dice": statistics.mean(column("dice_mean")),
                         "folding_pct": statistics.mean(column("folding_pct")), "folding_max": max(column("folding_pct")),
                         "sd_log_jacobian": statistics.mean(column("sd_log_jacobian")),
                         "seconds": statistics.median(column("seconds")), "hardware": mine[0]["hardware"]}
    return means


def summarise(path: str) -> list[str]:
    """One line per method (:func:`method_means`), in order of first appearance."""
    return [f"{path}: {method}: {m['pairs']} pairs, mean Dice {m['dice']:.4f}, "
            f"folding mean {m['folding_pct']:.5f} % max {m['folding_max']:.4f} %, SDlogJ {m['sd_log_jacobian']:.3f}, "
            f"median {m['seconds']:.1f} s per pair ({m['hardware']})" for method, m in method_means(path).items()]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="a compare_baselines.py results CSV")
    print("\n".join(summarise(parser.parse_args().results)))
