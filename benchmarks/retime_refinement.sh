#!/usr/bin/env bash
# The native refinement (configs/native_refinement.json, chosen on validation) and greedy timed again side by side
# on the held-out test pairs, in one run on an idle machine, after the refinement was made faster without changing
# its settings (docs/README.md, "The held-out test splits"). Rows go to runs/retime_<dataset>/results.csv
# (resumable), then copied to docs/results/native_refinement_retime_<dataset>.csv; `summary` prints the medians.
#   bash benchmarks/retime_refinement.sh [run|summary]
set -euo pipefail
cd "$(dirname "$0")/.."
step="${1:-run}"
for dataset in lpba40 ibsr; do
    out="runs/retime_${dataset}"
    if [ "$step" = run ]; then
        uptime
        python benchmarks/compare_baselines.py run --dataset "$dataset" --out "$out" --methods ours \
            --configs inference.json,native_refinement.json --name ours_native
        python benchmarks/compare_baselines.py run --dataset "$dataset" --out "$out" --methods greedy
        cp "$out/results.csv" "docs/results/native_refinement_retime_${dataset}.csv"
    fi
    python - "docs/results/native_refinement_retime_${dataset}.csv" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
for method in dict.fromkeys(r["method"] for r in rows):
    mine = [r for r in rows if r["method"] == method]
    print(f"{sys.argv[1]}: {method}: {len(mine)} pairs, mean Dice {statistics.mean(float(r['dice_mean']) for r in mine):.4f}, "
          f"folding mean {statistics.mean(float(r['folding_pct']) for r in mine):.4f} %, "
          f"median {statistics.median(float(r['seconds']) for r in mine):.1f} s per pair ({mine[0]['hardware']})")
PY
done
echo "RETIME_DONE"
