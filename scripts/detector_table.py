"""Whole detectors, segmenters and unusual timm blocks through the public API: groups
pruned and excluded (with the reasons), one collapsing C-SGD step on the network's loss
(a detector's loss dict in train mode), the merge check of every output, parameters
before and after. Figures for docs/networks.md; tests/test_detectors.py checks the same.

    OMP_NUM_THREADS=1 python scripts/detector_table.py [name ...]
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import csgd_cli

SIZE = 64
NONE = {"weights": None, "weights_backbone": None}
RCNN = {"min_size": SIZE, "max_size": SIZE, "box_score_thresh": 0.0, "box_detections_per_img": 6,
        "rpn_pre_nms_top_n_test": 40, "rpn_post_nms_top_n_test": 20,
        "rpn_pre_nms_top_n_train": 40, "rpn_post_nms_top_n_train": 20}  # fmt: skip
DENSE = {"min_size": SIZE, "max_size": SIZE, "score_thresh": 0.0, "detections_per_img": 6,
         "topk_candidates": 30}  # fmt: skip


def _builders() -> dict[str, tuple[str, Callable[[], nn.Module]]]:
    from torchvision.models import detection as d
    from torchvision.models import segmentation as s

    out: dict[str, tuple[str, Callable[[], nn.Module]]] = {
        "fasterrcnn_mobilenet_v3_large_320_fpn": (
            "det", lambda: d.fasterrcnn_mobilenet_v3_large_320_fpn(num_classes=3, **NONE, **RCNN)
        ),
        "retinanet_resnet50_fpn": (
            "det", lambda: d.retinanet_resnet50_fpn(num_classes=3, **NONE, **DENSE)
        ),
        "fcos_resnet50_fpn": ("det", lambda: d.fcos_resnet50_fpn(num_classes=3, **NONE, **DENSE)),
        "ssdlite320_mobilenet_v3_large": (
            "det", lambda: d.ssdlite320_mobilenet_v3_large(
                num_classes=3, score_thresh=0.0, detections_per_img=6, topk_candidates=30, **NONE
            )
        ),
        "maskrcnn_resnet50_fpn": (
            "det", lambda: d.maskrcnn_resnet50_fpn(num_classes=3, **NONE, **RCNN)
        ),
        "keypointrcnn_resnet50_fpn": (
            "det", lambda: d.keypointrcnn_resnet50_fpn(
                num_classes=2, num_keypoints=4, **NONE, **RCNN
            )
        ),
        "lraspp_mobilenet_v3_large": (
            "seg", lambda: s.lraspp_mobilenet_v3_large(num_classes=3, **NONE)
        ),
        "deeplabv3_mobilenet_v3_large": (
            "seg", lambda: s.deeplabv3_mobilenet_v3_large(num_classes=3, **NONE)
        ),
        "fcn_resnet50": ("seg", lambda: s.fcn_resnet50(num_classes=3, **NONE)),
        "fasterrcnn_resnet50_fpn_v2": (
            "det", lambda: d.fasterrcnn_resnet50_fpn_v2(num_classes=3, **NONE, **RCNN)
        ),
        "retinanet_resnet50_fpn_v2": (
            "det", lambda: d.retinanet_resnet50_fpn_v2(num_classes=3, **NONE, **DENSE)
        ),
        "ssd300_vgg16": (
            "det", lambda: d.ssd300_vgg16(num_classes=3, score_thresh=0.0, detections_per_img=6,
                                          topk_candidates=30, **NONE)
        ),
        "deeplabv3_resnet50": ("seg", lambda: s.deeplabv3_resnet50(num_classes=3, **NONE)),
    }  # fmt: skip
    try:
        import timm

        for name in ("repvgg_a0", "ghostnetv2_100", "hgnetv2_b0", "mobileone_s1"):
            out[name] = ("cls", lambda n=name: timm.create_model(n, num_classes=5))
    except ImportError:
        pass
    return out


def _data(kind: str) -> tuple[Any, Callable[[nn.Module], torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    if kind == "det":
        images = [torch.rand(3, SIZE, SIZE, generator=g) for _ in range(2)]
        t = {
            "boxes": torch.tensor([[8.0, 10, 40, 50]]),
            "labels": torch.tensor([1]),
            "masks": torch.zeros(1, SIZE, SIZE, dtype=torch.uint8),
            "keypoints": torch.tensor([[[10.0, 12, 1], [20, 20, 1], [30, 40, 1], [38, 48, 1]]]),
        }
        t["masks"][0, 10:50, 8:40] = 1
        targets = [t, t]  # mask and keypoint targets are read only by those heads
        return images, lambda m: sum(m(images, targets).values())
    x = torch.rand(2, 3, SIZE, SIZE, generator=g)
    if kind == "seg":
        y = torch.randint(0, 3, (2, SIZE, SIZE), generator=g)
        return x, lambda m: nn.functional.cross_entropy(m(x)["out"], y)
    return x, lambda m: nn.functional.cross_entropy(m(x), torch.tensor([0, 1]))


def row(name: str, kind: str, build: Callable[[], nn.Module]) -> None:
    torch.manual_seed(0)
    model = build().eval()
    x, loss_of = _data(kind)
    t = time.perf_counter()
    try:
        pruner = csgd_cli.CSGD(model, x, ratio=0.5, clustering="even")
    except csgd_cli.CsgdError as e:
        print(f"{name}: refused: {e}")
        return
    t_groups = time.perf_counter() - t
    opt = pruner.optimizer(lr=1e-3, epsilon=1e3, norm_epsilon=1e3, momentum=0.0,
                           weight_decay=0.0, plain_norm_weight_decay=0.0)  # fmt: skip
    covered = sum(p.numel() for grp in opt.param_groups for p in grp["params"])
    model.train()
    loss = loss_of(model)
    opt.zero_grad()
    loss.backward()
    opt.step()
    for m in model.modules():  # running statistics moved by the train-mode step
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
    model.eval()
    try:
        pruner.merge()
        rep = pruner.merge_report
        merged = (f"merge rel diff {rep['relative_logit_diff']:.1e} over {rep['outputs']} "
                  f"outputs, params {rep['params_before']:,} -> {rep['params_after']:,}")  # fmt: skip
    except csgd_cli.CsgdError as e:
        merged = f"merge refused: {e}"
    why = Counter(r.split(" (")[0] if "'" not in r else r for r in pruner.excluded().values())
    print(f"{name}: {len(pruner.groups)} groups, {len(pruner.clusters)} pruned, "
          f"{len(pruner.excluded())} excluded ({t_groups:.1f} s); optimizer covers "
          f"{covered:,}/{sum(p.numel() for p in model.parameters()):,} params; "
          f"loss {loss.item():.3f}; {merged}")  # fmt: skip
    for r, n in why.most_common():
        print(f"    {n} x {r}")


if __name__ == "__main__":
    table = _builders()
    for name in sys.argv[1:] or list(table):
        row(name, *table[name])
