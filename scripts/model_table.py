"""Supported-networks table: params and MACs before/after the merge at each network's
reference setting (even clusters: the widths, hence the figures, are those any converged
C-SGD run produces), traced groups, excluded groups with reasons, tracing time.

    python scripts/model_table.py            # prints a Markdown table and the exclusions
"""

from __future__ import annotations

import time

from csgd_cli.common.nets import count_macs, count_params
from csgd_cli.core.clustering import cluster_groups, target_widths
from csgd_cli.core.surgery import merge
from csgd_cli.models import get_model
from csgd_cli.rules.groups import select_groups
from csgd_cli.tracing.trace import channel_groups, trace_seconds

# (model, kwargs, input size, ratio, prune.include, setting)
ROWS = [
    ("resnet56", {}, 32, 0.625, ["*"], "CIFAR, C-SGD-5/8, every conv (declared)"),
    ("vgg16", {}, 32, 0.625, ["*"], "CIFAR, 5/8 (declared)"),
    ("densenet40", {}, 32, 0.625, ["*"], "CIFAR, 5/8 (declared)"),
    ("resnet164", {}, 32, 0.625, ["*"], "CIFAR, 5/8, every conv (traced)"),
    ("resnet50", {}, 224, 0.7, ["layer*.conv1", "layer*.conv2"], "experiment=resnet50_imagenet"),
    ("resnet18", {}, 224, 0.625, ["*"], "ImageNet 224, 5/8 (traced)"),
    ("mobilenet_v2", {}, 224, 0.625, ["*"], "ImageNet 224, 5/8 (traced)"),
    ("efficientnet_b0", {}, 224, 0.625, ["*"], "ImageNet 224, 5/8 (traced)"),
    ("regnet_x_400mf", {}, 224, 0.625, ["*"], "ImageNet 224, 5/8 (traced)"),
]


def main() -> None:
    print(
        "| model | setting | groups (excluded) | params before -> after | MACs before -> after | FLOPs |"
    )
    print("|---|---|---|---|---|---|")
    notes = []
    for name, kw, size, ratio, include, setting in ROWS:
        classes = 10 if size == 32 else 1000
        model = get_model(name, num_classes=classes, image_size=size, **kw)
        groups = channel_groups(model)
        chosen = select_groups(groups, include)
        clusters = cluster_groups(model, chosen, target_widths(chosen, ratio), "even", 0)
        thin = merge(model, groups, clusters)
        shape = (3, size, size)
        mb, ma = count_macs(model, shape), count_macs(thin, shape)
        pb, pa = count_params(model), count_params(thin)
        ex = [g for g in groups if g.excluded]
        print(
            f"| {name} | {setting} | {len(groups)} ({len(ex)}) | {pb / 1e6:.2f}M -> {pa / 1e6:.2f}M "
            f"| {mb / 1e6:.1f}M -> {ma / 1e6:.1f}M | -{100 * (1 - ma / mb):.2f}% |"
        )
        notes += [f"- {name} `{g.name}` (width {g.width}): {g.excluded}" for g in ex]
        if name == "resnet50":
            t = min(trace_seconds(get_model("resnet50")) for _ in range(2))
            notes.insert(0, f"tracing torchvision resnet50 at 224x224: {t:.2f} s")
    print("\n" + "\n".join(notes))


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"\n({time.time() - t0:.0f} s)")
