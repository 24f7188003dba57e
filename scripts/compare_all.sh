#!/usr/bin/env bash
# C-SGD against the usual pruning criteria on digits (conf/experiment/compare_all.yaml):
# ResNet-20, every method, FLOPs targets 0.5 and 0.25, 3 seeds; offline, on the CPU.
#   1. one base model per seed (pretrained once: every method of a seed starts from it)
#   2. 7 methods x 2 targets x 3 seeds = 42 runs, N_JOBS at once (one thread each)
#   3. csgd report: report.md / report.csv (a row per run), report_agg.csv (mean, std, n
#      over the seeds) and acc_flops.png (error bars, one line per method)
# Usage:  scripts/compare_all.sh [extra overrides for the runs]
#   OUT=multirun/compare_all N_JOBS=2 METHODS=csgd,l1 SEEDS=0,1 scripts/compare_all.sh
# Rerunning continues an interrupted sweep (resume=true skips finished phases).
set -euo pipefail

OUT=${OUT:-multirun/compare_all}
N_JOBS=${N_JOBS:-2}
SEEDS=${SEEDS:-0,1,2}
METHODS=${METHODS:-csgd,l1,l2,fpgm,taylor,slimming,random}
TARGETS=${TARGETS:-flops:0.5,flops:0.25}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} CSGD_NO_BAR=1
launcher=(hydra/launcher=csgd_joblib hydra.launcher.n_jobs="$N_JOBS")

csgd pretrain -m experiment=compare_all seed="$SEEDS" device=cpu resume=true "${launcher[@]}" \
    hydra.sweep.dir="$OUT/bases" 'hydra.sweep.subdir=seed${seed}'

csgd run -m experiment=compare_all prune.method="$METHODS" prune.target="$TARGETS" \
    seed="$SEEDS" device=cpu resume=true "${launcher[@]}" \
    "init=$OUT/bases/seed\${seed}/last.pt" hydra.sweep.dir="$OUT/runs" "$@"

csgd report dir="$OUT/runs"
