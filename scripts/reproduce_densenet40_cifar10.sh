#!/usr/bin/env bash
# C-SGD on CIFAR-10 DenseNet-40 (growth rate 12), for a machine with a GPU.
#
# Expected figures: the paper's seed notes in this project (shared/seeds/: a summary and the
# paper's appendix) give NO accuracy or FLOPs numbers for DenseNet-40. What they say is how
# a DenseNet is slimmed (appendix, Figure 3): every conv gets its own clusters, and because
# of the dense connections and the pre-activation layout the clusters are applied *at the
# corresponding position* to every later batch-norm layer that reads that conv's output,
# whose gamma and beta get the same centripetal update. Write your measured figures here.
#
# Choices made here (ours, not from the seeds):
#   - base training: the usual DenseNet recipe (Huang et al. 2017): 300 epochs, batch 64,
#     lr 0.1 divided by 10 at epochs 150 and 225, weight decay 1e-4, Nesterov momentum 0.9;
#   - C-SGD: the ResNet-56 reference schedule (conf/schedule/csgd.yaml: 600 epochs,
#     lr 0.03, x0.1 at 200 and 400, epsilon 3e-3) and ratio 5/8, as for ResNet-56;
#   - no fine-tuning after the merge (finetune.epochs=0).
#
# Usage:  scripts/reproduce_densenet40_cifar10.sh [extra overrides]   (e.g. ratio=0.5)
#   SEEDS=0,1,2 scripts/reproduce_densenet40_cifar10.sh
# Rerunning the same command continues an interrupted run (resume=true).
set -euo pipefail

OUT=${OUT:-outputs/reproduce/densenet40_cifar10}
SEEDS=${SEEDS:-0}

csgd run -m \
    model=densenet40 dataset=cifar10 \
    pretrain.epochs=300 'pretrain.milestones=[150,225]' \
    ratio=0.625 epsilon=3e-3 clustering=kmeans \
    finetune.epochs=0 \
    seed="$SEEDS" device=cuda resume=true \
    hydra.sweep.dir="$OUT" \
    "$@"

csgd report dir="$OUT"
