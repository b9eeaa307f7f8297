#!/usr/bin/env bash
# The native refinement (configs/native_refinement.json, chosen on validation) and greedy timed again side by side
# on the held-out test pairs, in one run on an idle machine, after the refinement was made faster without changing
# its settings (docs/README.md, "The held-out test splits"). Rows go to runs/retime_<dataset>/results.csv
# (resumable), then copied to docs/results/native_refinement_retime_<dataset>.csv; `summary` prints the means and medians (benchmarks/method_summary.py).
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
    python benchmarks/method_summary.py "docs/results/native_refinement_retime_${dataset}.csv"
done
echo "RETIME_DONE"
