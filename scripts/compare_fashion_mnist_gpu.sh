#!/usr/bin/env bash
# C-SGD against the usual pruning criteria on Fashion-MNIST with the paper's kind of
# schedule, for a machine with a GPU: the same comparison as the CPU-sized
# scripts/compare_fashion_mnist.sh (docs/results_fashion_mnist.md) without its cuts:
# ResNet-20 at full width (16/32/64), all 60,000 training images, csgd l1 fpgm taylor
# slimming random at FLOPs 0.5 and 0.25, 3 seeds, the full 10,000-image test set.
#
# Nothing but the method differs within a seed: one base per seed (step 1, the reference
# base schedule conf/schedule/base.yaml: 200 epochs, lr 0.1, x0.1 at 100 and 150), the
# widths C-SGD's pruner chooses for the target on that base, and the same epochs after
# the base: C-SGD 600 (the reference schedule conf/schedule/csgd.yaml: batch 64, Nesterov
# 0.9, weight decay 1e-4, eps 3e-3, lr 0.03 x0.1 at 200 and 400) + fine-tune 10;
# slimming's sparsity phase is those 600 epochs (lambda 1e-5, Liu et al.'s ResNet value)
# + fine-tune 10; the others retrain 600 on C-SGD's schedule (plain momentum SGD, the
# same learning rates) + fine-tune 10 (prune.baseline_schedule=csgd).
#
# Time: an ESTIMATE (no GPU was available to measure it). Measured here on the CPU, one
# thread: a half-width ResNet-20 epoch of 5,000 28x28 images costs 7-9 s of CPU time and
# an evaluation of the 10,000 test images 7 s, so a full-width epoch of 60,000 would be
# about 4 x 12 x 8 s = 6.4 min of one core (~65 h for one 610-epoch run). On one GPU
# ResNet-20 at batch 64 is bound by kernel launches, not arithmetic: about 938 steps of
# ~3-6 ms, i.e. ~3-6 s an epoch (csgd keeps the set on the GPU; the test set is scored
# every epoch, about 1 s more). Then a base takes ~10-20 min, a run (~610 epochs) ~0.5-1
# h, and the grid (3 bases + 36 runs) ~20-40 GPU-hours; with hydra/launcher=csgd_slurm, a
# few hours on a cluster. Time one C-SGD
# epoch on yours first:  SEEDS=0 METHODS=csgd TARGETS=flops:0.5 EPOCHS=1 BASE_EPOCHS=1
# (EPOCHS / BASE_EPOCHS / FT_EPOCHS shorten the schedules; the milestones scale with them).
# Usage:  scripts/compare_fashion_mnist_gpu.sh [extra overrides for the runs]
#   scripts/compare_fashion_mnist_gpu.sh hydra/launcher=csgd_slurm hydra.launcher.partition=gpu
# Rerunning the same command continues an interrupted run (resume=true).
set -euo pipefail

OUT=${OUT:-outputs/compare/resnet20_fashion_mnist}
SEEDS=${SEEDS:-0,1,2}
METHODS=${METHODS:-csgd,l1,fpgm,taylor,slimming,random}
TARGETS=${TARGETS:-flops:0.5,flops:0.25}
BASE_EPOCHS=${BASE_EPOCHS:-200}
EPOCHS=${EPOCHS:-600}
FT_EPOCHS=${FT_EPOCHS:-10}
read -r -a LAUNCHER <<< "${LAUNCHER:-}"
common=(model=resnet20 dataset=fashion_mnist dataset.batch_size=64 seed="$SEEDS"
    device=cuda resume=true)
base=(pretrain.epochs="$BASE_EPOCHS"
    "pretrain.milestones=[$((BASE_EPOCHS / 2)),$((BASE_EPOCHS * 3 / 4))]")
csgd_sched=(schedule.epochs="$EPOCHS" "schedule.milestones=[$((EPOCHS / 3)),$((EPOCHS * 2 / 3))]")
start=$(date +%s)

csgd pretrain -m "${common[@]}" "${base[@]}" "${LAUNCHER[@]}" \
    hydra.sweep.dir="$OUT/bases" 'hydra.sweep.subdir=seed${seed}'

csgd run -m "${common[@]}" "${csgd_sched[@]}" "${LAUNCHER[@]}" \
    prune.method="$METHODS" prune.target="$TARGETS" \
    epsilon=3e-3 finetune.epochs="$FT_EPOCHS" prune.export=false \
    prune.slimming_lambda=1e-5 prune.score_batches=64 prune.baseline_schedule=csgd \
    "init=$OUT/bases/seed\${seed}/last.pt" hydra.sweep.dir="$OUT/runs" "$@"

csgd report dir="$OUT/runs"
echo "took $(($(date +%s) - start)) s"
