#!/usr/bin/env bash
# C-SGD against the usual pruning criteria on CIFAR-10 ResNet-56, the paper's setting, for a
# machine with a GPU: every method (csgd l1 l2 fpgm taylor slimming random) at FLOPs targets
# 0.5 and 0.25, 3 seeds; the same experiment as conf/experiment/compare_all.yaml (digits).
#
# Nothing but the method differs within a seed: one base ResNet-56 per seed (step 1, the
# reference base schedule: 200 epochs, lr 0.1, x0.1 at 100 and 150), the widths C-SGD's
# pruner chooses for the target on that base (every method gets them), and the same
# epochs after the base: C-SGD 600 (the reference schedule: batch 64, Nesterov 0.9, weight
# decay 1e-4, eps 3e-3, lr 0.03 x0.1 at 200 and 400) + fine-tune 10; slimming's sparsity
# phase is those 600 epochs (lambda 1e-5: Liu et al.'s ResNet value) + fine-tune 10; the
# others fine-tune 10 + 600 (pipeline.budget_schedule).
#
# Time (an ESTIMATE, not measured here: no GPU was available to this project's sessions):
# ResNet-56 at batch 64 is launch-bound, about 10-20 s per epoch of 50,000 images on one
# current GPU (A100/H100 class; csgd keeps CIFAR on the GPU, AMP on). So per seed the base
# takes ~35-70 min, and each of the 14 runs of a seed ~610 epochs ~ 1.7-3.5 h: the whole
# grid (3 bases + 42 runs) ~ 75-150 GPU-hours, ~3-6 days on one GPU, hours on a cluster
# (hydra/launcher=csgd_slurm runs one job per run). `python scripts/gpu_check.py` measures
# the C-SGD epoch on your GPU: multiply by ~610 for a run.
#
# C-SGD-5/8 (the paper's headline, FLOPs -60.85%) is close to TARGETS=flops:0.39.
# Usage:  scripts/compare_resnet56_cifar10.sh [extra overrides for the runs]
#   SEEDS=0 METHODS=csgd,l1 TARGETS=flops:0.39 scripts/compare_resnet56_cifar10.sh
#   scripts/compare_resnet56_cifar10.sh hydra/launcher=csgd_slurm hydra.launcher.partition=gpu
# (pass the launcher to step 1 too by editing LAUNCHER=...). Rerunning the same command
# continues an interrupted run (resume=true).
set -euo pipefail

OUT=${OUT:-outputs/compare/resnet56_cifar10}
SEEDS=${SEEDS:-0,1,2}
METHODS=${METHODS:-csgd,l1,l2,fpgm,taylor,slimming,random}
TARGETS=${TARGETS:-flops:0.5,flops:0.25}
read -r -a LAUNCHER <<< "${LAUNCHER:-}"
common=(model=resnet56 dataset=cifar10 seed="$SEEDS" device=cuda resume=true)

csgd pretrain -m "${common[@]}" "${LAUNCHER[@]}" \
    hydra.sweep.dir="$OUT/bases" 'hydra.sweep.subdir=seed${seed}'

csgd run -m "${common[@]}" "${LAUNCHER[@]}" \
    prune.method="$METHODS" prune.target="$TARGETS" \
    epsilon=3e-3 clustering=kmeans finetune.epochs=10 prune.export=false \
    prune.slimming_lambda=1e-5 prune.score_batches=64 \
    "init=$OUT/bases/seed\${seed}/last.pt" hydra.sweep.dir="$OUT/runs" "$@"

csgd report dir="$OUT/runs"
