#!/usr/bin/env bash
# Issue 17's first check: one λ-conditioned network against three plain networks trained separately at fixed λ.
# On the held-out test pairs, network alone (configs/inference.json's pipeline: affine pre-alignment + network):
#   cond_l<λ>  the conditioned run's 1,800-iteration snapshot
#              (models/campaign/registration_t1_conditioned/snapshots/model_it1800.pt) at λ = 0.1, 0.3, 1;
#   fixed_l<λ> the best validated weights of `campaign.py train --run registration_t1_lambda_<λ>` (same start,
#              learning rate and 1,800 iterations, λ fixed in training).
# Scoring only, once, after the runs finished; nothing is chosen from these rows. Rows -> runs/fixed_lambda_test_<dataset>/
# results.csv (resumable), copied to docs/results/regularisation/fixed_lambda_test_<dataset>.csv; `summary` prints
# mean Dice and folding per method (benchmarks/method_summary.py).
#   bash benchmarks/fixed_lambda_test.sh [run|summary]
set -euo pipefail
cd "$(dirname "$0")/.."
step="${1:-run}"
snapshot=models/campaign/registration_t1_conditioned/snapshots/model_it1800.pt
for dataset in lpba40 ibsr; do
    out="runs/fixed_lambda_test_${dataset}"
    if [ "$step" = run ]; then
        uptime
        for weight in 0.1 0.3 1; do
            fixed="models/campaign/registration_t1_lambda_${weight}/models/model.pt"
            if [ ! -f "$fixed" ]; then
                echo "fixed_lambda_test.sh: error: $fixed is missing: train it first (benchmarks/campaign.py train --run registration_t1_lambda_${weight})" >&2
                exit 1
            fi
            python benchmarks/compare_baselines.py run --dataset "$dataset" --out "$out" --methods ours \
                --ckpt "$snapshot" --name "cond_l${weight}" --set "regularisation_weight=${weight}"
            python benchmarks/compare_baselines.py run --dataset "$dataset" --out "$out" --methods ours \
                --ckpt "$fixed" --configs inference.json,registration_only.json,campaign.json --name "fixed_l${weight}"
        done
        mkdir -p docs/results/regularisation
        cp "$out/results.csv" "docs/results/regularisation/fixed_lambda_test_${dataset}.csv"
    fi
    python benchmarks/method_summary.py "docs/results/regularisation/fixed_lambda_test_${dataset}.csv"
done
echo "FIXED_LAMBDA_TEST_DONE"
