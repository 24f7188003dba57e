#!/usr/bin/env bash
# Reproduce C-SGD-5/8 on CIFAR-10 ResNet-56 (Ding et al., CVPR 2019), for a machine with a GPU.
#
# Expected (the paper's figures):
#   base ResNet-56            93.39% top-1
#   C-SGD-5/8 (merged)        93.44% top-1, FLOPs -60.85%
# "5/8": every conv is pruned to 5/8 of its filters (16 -> 10, 32 -> 20, 64 -> 40), the
# classifier is kept; ResNet-56 has 1x1 projection shortcuts in stages 2 and 3. The paper
# reports no fine-tuning after the merge, so finetune.epochs=0: the merged model is the
# C-SGD model, and the report's "pruned %" equals its "C-SGD %".
# The FLOPs column counts multiply-adds with torch's flop counter; a different counting
# convention (e.g. whether BN, ReLU and the classifier are counted) moves it by a little.
#
# Schedule (conf/schedule/csgd.yaml, the reference code's): batch 64, weight decay 1e-4,
# Nesterov momentum 0.9, epsilon 3e-3, lr 0.03 decayed x0.1 at epochs 200 and 400 of 600.
# The base model is trained first with conf/schedule/base.yaml (200 epochs, lr 0.1,
# x0.1 at 100 and 150); pass init=<a trained ResNet-56 checkpoint> to skip that.
#
# Usage:  scripts/reproduce_resnet56_cifar10.sh [extra overrides]
#   SEEDS=0,1,2 scripts/reproduce_resnet56_cifar10.sh          # three seeds, one after another
#   scripts/reproduce_resnet56_cifar10.sh hydra/launcher=csgd_slurm hydra.launcher.partition=gpu
# Rerunning the same command continues an interrupted run (resume=true: finished phases
# are skipped, the interrupted one continues from its last.pt).
set -euo pipefail

OUT=${OUT:-outputs/reproduce/resnet56_cifar10}
SEEDS=${SEEDS:-0}

csgd run -m \
    model=resnet56 dataset=cifar10 \
    ratio=0.625 epsilon=3e-3 clustering=kmeans \
    finetune.epochs=0 \
    seed="$SEEDS" device=cuda resume=true \
    hydra.sweep.dir="$OUT" \
    "$@"

csgd report dir="$OUT"
