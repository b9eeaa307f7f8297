#!/usr/bin/env bash
# Issue 17's check of the automatic λ: the shipped λ-conditioned network (configs/inference.json, network alone) run
# on the held-out test pairs at every λ of the validation grid (docs/README.md, "λ chosen on validation pairs"), to
# see how far the λ chosen on validation (0.173) is from the best λ scored on the test split. Scoring only: nothing
# is chosen from these rows. Rows -> runs/lambda_test_<dataset>/results.csv (resumable), copied to
# docs/results/regularisation/lambda_test_<dataset>.csv; `summary` prints the mean Dice per λ (benchmarks/method_summary.py).
#   bash benchmarks/lambda_test_grid.sh [run|summary]
set -euo pipefail
cd "$(dirname "$0")/.."
step="${1:-run}"
for dataset in lpba40 ibsr; do
    out="runs/lambda_test_${dataset}"
    if [ "$step" = run ]; then
        uptime
        for weight in 0.03 0.1 0.173 0.3 0.548 1.0 3.0; do
            python benchmarks/compare_baselines.py run --dataset "$dataset" --out "$out" --methods ours \
                --name "ours_l${weight}" --set "regularisation_weight=${weight}"
        done
        cp "$out/results.csv" "docs/results/regularisation/lambda_test_${dataset}.csv"
    fi
    python benchmarks/method_summary.py "docs/results/regularisation/lambda_test_${dataset}.csv"
done
echo "LAMBDA_TEST_DONE"
