"""Per-method summary of a ``compare_baselines.py`` results CSV (the lines the benchmark scripts print).

    python benchmarks/method_summary.py RESULTS.csv
"""

from __future__ import annotations

import argparse
import csv
import statistics


def summarise(path: str) -> list[str]:
    """One line per method, in order of first appearance: pairs, mean Dice, mean and max folding %, mean SDlogJ,
    median seconds per pair and the hardware."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    lines = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]

        def column(name):
            return [float(r[name]) for r in mine]

        lines.append(f"{path}: {method}: {len(mine)} pairs, mean Dice {statistics.mean(column('dice_mean')):.4f}, "
                     f"folding mean {statistics.mean(column('folding_pct')):.5f} % max {max(column('folding_pct')):.4f} %, "
                     f"SDlogJ {statistics.mean(column('sd_log_jacobian')):.3f}, "
                     f"median {statistics.median(column('seconds')):.1f} s per pair ({mine[0]['hardware']})")
    return lines


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="a compare_baselines.py results CSV")
    print("\n".join(summarise(parser.parse_args().results)))
