#!/usr/bin/env bash
# The held-out test splits, scored once with the shipped model and its peers side by side in one harness
# (docs/README.md, "The held-out test splits"). Rows go to runs/test_final_<dataset>/results.csv (resumable:
# pairs already scored are skipped), then `report` writes docs/results/baselines{,_lpba40}.{csv,md} and figures.
#   bash benchmarks/test_split.sh [run|report]
set -euo pipefail
cd "$(dirname "$0")/.."
step="${1:-run}"
for dataset in lpba40 ibsr; do
    out="runs/test_final_${dataset}"
    if [ "$step" = run ]; then
        # network alone (configs/inference.json, λ 0.173 chosen on validation) and the classical peers
        python benchmarks/compare_baselines.py run --dataset "$dataset" --out "$out" \
            --methods identity,affine,ours,greedy,ants_syn
        # network + the native refinement chosen on validation (configs/native_refinement.json)
        python benchmarks/compare_baselines.py run --dataset "$dataset" --out "$out" --methods ours \
            --configs inference.json,native_refinement.json --name ours_native
        # the same network behind the ITK pre-alignment (the slower path) instead of the default torch one
        python benchmarks/compare_baselines.py run --dataset "$dataset" --out "$out" --methods ours \
            --name ours_itk_prealign --set prealign_method=itk --set "prealign_options={}"
    else
        python benchmarks/compare_baselines.py report --dataset "$dataset" --out "$out"
    fi
done
echo "TEST_SPLIT_DONE"
