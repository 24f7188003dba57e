#!/usr/bin/env bash
# C-SGD against the usual pruning criteria on Fashion-MNIST, on the CPU
# (conf/experiment/compare_fashion_mnist.yaml; results: docs/results_fashion_mnist.md):
# ResNet-20 at half width, the first 5,000 training images, csgd l1 fpgm taylor slimming
# random at FLOPs targets 0.5 and 0.25, 3 seeds, scored on the full 10,000-image test set.
#   1. one base model per seed (pretrained once: every method of a seed starts from it)
#   2. per seed, 6 methods x 2 targets = 12 runs, N_JOBS at once (one thread each), then
#      csgd report over every run so far: a seed that finished is in the table even when a
#      later one did not (report.md, report_agg.csv: mean, std, n; acc_flops.png), and
#      scripts/paired_diffs.py: C-SGD minus each criterion, seed by seed
# Needs the idx files: apt-get install dataset-fashion-mnist, or dataset.download=true.
# Usage:  scripts/compare_fashion_mnist.sh [extra overrides for the runs]
#   OUT=multirun/fm N_JOBS=2 METHODS=csgd,l1 SEEDS=0,1 scripts/compare_fashion_mnist.sh
# Rerunning continues an interrupted comparison (resume=true skips finished phases).
# About 30-40 min on 2 idle CPU cores (measured: docs/results_fashion_mnist.md).
set -euo pipefail

OUT=${OUT:-multirun/compare_fashion_mnist}
N_JOBS=${N_JOBS:-2}
SEEDS=${SEEDS:-0,1,2}
METHODS=${METHODS:-csgd,l1,fpgm,taylor,slimming,random}
TARGETS=${TARGETS:-flops:0.5,flops:0.25}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} CSGD_NO_BAR=1
launcher=(hydra/launcher=csgd_joblib hydra.launcher.n_jobs="$N_JOBS")
exp=(experiment=compare_fashion_mnist device=cpu resume=true)
start=$(date +%s)
echo "start $(date -u +%FT%TZ)"

csgd pretrain -m "${exp[@]}" seed="$SEEDS" "${launcher[@]}" \
    hydra.sweep.dir="$OUT/bases" 'hydra.sweep.subdir=seed${seed}'
echo "bases done after $(($(date +%s) - start)) s"

for seed in ${SEEDS//,/ }; do  # seed by seed: what finished is reported
    csgd run -m "${exp[@]}" prune.method="$METHODS" prune.target="$TARGETS" seed="$seed" \
        "${launcher[@]}" "init=$OUT/bases/seed$seed/last.pt" hydra.sweep.dir="$OUT/runs" \
        "hydra.sweep.subdir=seed${seed}_\${hydra.job.num}" "$@"
    csgd report dir="$OUT/runs"
    python "$(dirname "$0")/paired_diffs.py" "$OUT/runs/report.csv"  # C-SGD - criterion, per seed
    echo "seed $seed done after $(($(date +%s) - start)) s"
done
echo "end $(date -u +%FT%TZ): $(($(date +%s) - start)) s"
