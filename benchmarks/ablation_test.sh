#!/usr/bin/env bash
# Issue 17's ablations on the held-out test pairs, each network against its same-budget reference (network alone,
# configs/inference.json's pipeline: affine pre-alignment + network), scored once after both runs finished:
#   probabilistic  fixed_l1       best validated weights of `campaign.py train --run registration_t1_lambda_1`
#                  probabilistic  ... of `--run registration_t1_probabilistic` (the same run plus Gaussian encoder
#                                 features and their KL term)
#   autoreg        all3conv       ... of `--run registration_t1_all3conv` (AutoReg's hand-designed cell, the VM-2 layers)
#                  autoreg        ... of `--run registration_t1_autoreg` (the searched genotype; same configs and budget)
# Nothing is chosen from these rows (the decision is on validation). Rows -> runs/ablation_<name>_<dataset>/results.csv
# (resumable), copied to docs/results/regularisation/ablation_<name>_test_<dataset>.csv; `summary` prints mean Dice
# and folding per method (benchmarks/method_summary.py).
#   bash benchmarks/ablation_test.sh probabilistic|autoreg [run|summary]
set -euo pipefail
cd "$(dirname "$0")/.."
ablation="${1:?usage: ablation_test.sh probabilistic|autoreg [run|summary]}"
step="${2:-run}"
base=inference.json,registration_only.json,campaign.json
case "$ablation" in
    probabilistic) runs="fixed_l1:registration_t1_lambda_1:$base probabilistic:registration_t1_probabilistic:$base,probabilistic_features.json" ;;
    autoreg) runs="all3conv:registration_t1_all3conv:$base,autoreg_searched.json autoreg:registration_t1_autoreg:$base,autoreg_searched.json" ;;
    *) echo "ablation_test.sh: error: unknown ablation '$ablation' (probabilistic or autoreg)" >&2; exit 2 ;;
esac
if [ "$step" != run ] && [ "$step" != summary ]; then
    echo "ablation_test.sh: error: unknown step '$step' (run or summary)" >&2; exit 2
fi
if [ "$step" = run ]; then  # both runs finished before anything is scored
    for spec in $runs; do
        IFS=: read -r name run configs <<< "$spec"
        if [ ! -f "models/campaign/$run/finished.json" ]; then
            echo "ablation_test.sh: error: models/campaign/$run/finished.json is missing: finish the run first (benchmarks/campaign.py train --run $run)" >&2
            exit 1
        fi
    done
fi
for dataset in lpba40 ibsr; do
    out="runs/ablation_${ablation}_${dataset}"
    rows="docs/results/regularisation/ablation_${ablation}_test_${dataset}.csv"
    if [ "$step" = run ]; then
        uptime
        for spec in $runs; do
            IFS=: read -r name run configs <<< "$spec"
            root="models/campaign/$run"
            genotype=()  # only the searched networks read a genotype file
            case "$configs" in *autoreg_searched.json*) genotype=(--set "genotype_file=$root/genotype.json") ;; esac
            python benchmarks/compare_baselines.py run --dataset "$dataset" --out "$out" --methods ours \
                --ckpt "$root/models/model.pt" --configs "$configs" --name "$name" "${genotype[@]}"
        done
        mkdir -p "$(dirname "$rows")"
        cp "$out/results.csv" "$rows"
    fi
    python benchmarks/method_summary.py "$rows"
done
echo "ABLATION_TEST_DONE"
