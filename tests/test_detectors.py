"""Whole torchvision detectors and segmenters through the public API (issue 22.3): traced
from a list of images, every group pruned or excluded with its reason, the C-SGD
optimizer over every parameter, one C-SGD step on the detector's loss dict (train mode,
``(images, targets)``), an exact merge of every output (boxes, scores, labels, masks,
keypoints; score maps; and before them the heads' raw outputs, which no top-k or NMS
selects from), the thin network trained on, saved and loaded into a fresh one.

One step collapses every cluster (momentum 0, ``lr * epsilon = 1``, a small lr), so the check is on
the merge, not on training. BatchNorm running statistics are reset before the merge:
the step's train-mode forward moved them per channel (issue 22.1 is about them).
The smallest builders run by default, and every class (RetinaNet, FCOS, SSD, Mask
and Keypoint R-CNN, FCN, DeepLabV3) over a tiny backbone; the ResNet-50 builders are slow.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import csgd_cli
from csgd_cli.common.nets import outputs_of

tv = pytest.importorskip("torchvision")
from torchvision.models import detection as det  # noqa: E402
from torchvision.models import segmentation as seg  # noqa: E402

SIZE = 64
NONE = {"weights": None, "weights_backbone": None}
RCNN = {  # small images, few proposals and boxes, every box kept (random weights)
    "min_size": SIZE, "max_size": SIZE, "box_score_thresh": 0.0, "box_detections_per_img": 6,
    "rpn_pre_nms_top_n_test": 40, "rpn_post_nms_top_n_test": 20,
    "rpn_pre_nms_top_n_train": 40, "rpn_post_nms_top_n_train": 20,
}  # fmt: skip
DENSE = {"min_size": SIZE, "max_size": SIZE, "score_thresh": 0.0, "detections_per_img": 6,
         "topk_candidates": 30}  # fmt: skip

DETECTORS: dict[str, Callable[[], nn.Module]] = {
    "fasterrcnn_mobilenet_v3_large_320_fpn": lambda: det.fasterrcnn_mobilenet_v3_large_320_fpn(
        num_classes=3, **NONE, **RCNN
    ),
    "ssdlite320_mobilenet_v3_large": lambda: det.ssdlite320_mobilenet_v3_large(
        num_classes=3, score_thresh=0.0, detections_per_img=6, topk_candidates=30, **NONE
    ),
    "retinanet_resnet50_fpn": lambda: det.retinanet_resnet50_fpn(num_classes=3, **NONE, **DENSE),
    "fcos_resnet50_fpn": lambda: det.fcos_resnet50_fpn(num_classes=3, **NONE, **DENSE),
    "maskrcnn_resnet50_fpn": lambda: det.maskrcnn_resnet50_fpn(num_classes=3, **NONE, **RCNN),
    "keypointrcnn_resnet50_fpn": lambda: det.keypointrcnn_resnet50_fpn(
        num_classes=2, num_keypoints=4, **NONE, **RCNN
    ),
}
SEGMENTERS: dict[str, Callable[[], nn.Module]] = {
    "lraspp_mobilenet_v3_large": lambda: seg.lraspp_mobilenet_v3_large(num_classes=3, **NONE),
    "deeplabv3_mobilenet_v3_large": lambda: seg.deeplabv3_mobilenet_v3_large(
        num_classes=3, aux_loss=True, **NONE
    ),
    "fcn_resnet50": lambda: seg.fcn_resnet50(num_classes=3, aux_loss=True, **NONE),
}
FAST = {"fasterrcnn_mobilenet_v3_large_320_fpn", "lraspp_mobilenet_v3_large"}


class _TinyBackbone(nn.Module):
    """Two feature maps of 32 channels (strides 4 and 8): torchvision's detector and
    segmenter classes, their heads and post-processing, over a backbone small enough
    for every test run (the ResNet-50 builders above are marked slow)."""

    out_channels = 32  # FCOS's head: GroupNorm(32, 32), one channel per group

    def __init__(self) -> None:
        super().__init__()

        def block(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, 2, 1), nn.BatchNorm2d(o), nn.ReLU())

        self.s4, self.s8 = nn.Sequential(block(3, 8), block(8, 32)), block(32, 32)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        a = self.s4(x)
        return {"0": a, "1": self.s8(a)}


def _small(kind: str) -> nn.Module:
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.keypoint_rcnn import (
        KeypointRCNNHeads,
        KeypointRCNNPredictor,
    )
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign

    bb, two = _TinyBackbone(), ((0.5, 1.0, 2.0),) * 2
    if kind == "retinanet":
        return det.RetinaNet(bb, 3, anchor_generator=AnchorGenerator(((16,), (32,)), two), **DENSE)
    if kind == "ssd":
        from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
        from torchvision.models.detection.ssd import SSD, SSDHead

        return SSD(bb, DefaultBoxGenerator([[2], [2]]), (SIZE, SIZE), 3,
                       head=SSDHead([32, 32], [4, 4], 3), score_thresh=0.0,
                       detections_per_img=6, topk_candidates=30)  # fmt: skip
    if kind == "fcos":
        anchors = AnchorGenerator(((8,), (16,)), ((1.0,),) * 2)
        return det.FCOS(bb, 3, anchor_generator=anchors, **DENSE)
    rcnn = dict(
        rpn_anchor_generator=AnchorGenerator(((16,), (32,)), two),
        box_roi_pool=MultiScaleRoIAlign(["0", "1"], 7, 2),
        box_head=TwoMLPHead(32 * 7 * 7, 32), box_predictor=FastRCNNPredictor(32, 3), **RCNN,
    )  # fmt: skip
    if kind == "maskrcnn":
        return det.MaskRCNN(
            bb, mask_roi_pool=MultiScaleRoIAlign(["0", "1"], 14, 2),
            mask_head=MaskRCNNHeads(32, (16, 16), 1), mask_predictor=MaskRCNNPredictor(16, 16, 3),
            **rcnn,
        )  # fmt: skip
    return det.KeypointRCNN(
        bb, keypoint_roi_pool=MultiScaleRoIAlign(["0", "1"], 14, 2),
        keypoint_head=KeypointRCNNHeads(32, (16, 16)), keypoint_predictor=KeypointRCNNPredictor(16, 4),
        **{**rcnn, "box_predictor": FastRCNNPredictor(32, 2)},
    )  # fmt: skip


def _small_segmenter(kind: str) -> nn.Module:
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead
    from torchvision.models.segmentation.fcn import FCNHead

    class Out(_TinyBackbone):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            f = super().forward(x)
            return {"out": f["1"], "aux": f["0"]}

    if kind == "fcn":
        return seg.FCN(Out(), FCNHead(32, 3), FCNHead(32, 3))
    return seg.DeepLabV3(Out(), DeepLabHead(32, 3), FCNHead(32, 3))


# the same classes over the tiny backbone: every kind the issue names runs in every test run
for _k in ("retinanet", "fcos", "ssd", "maskrcnn", "keypointrcnn"):
    DETECTORS[f"small_{_k}"] = lambda k=_k: _small(k)
    FAST.add(f"small_{_k}")
for _k in ("fcn", "deeplabv3"):
    SEGMENTERS[f"small_{_k}"] = lambda k=_k: _small_segmenter(k)
    FAST.add(f"small_{_k}")


def _params(name: str) -> list[Any]:
    marks = () if name in FAST else (pytest.mark.slow,)
    return [pytest.param(name, marks=marks, id=name)]


def _lively(model: nn.Module) -> nn.Module:
    """PyTorch's default init for every conv and linear layer: torchvision's heads start
    at std 0.01 (near-uniform scores, boxes close to the anchors), which would make the
    comparison of outputs after the merge weak."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.reset_parameters()
    return model.eval()


def _data(name: str) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, SIZE, SIZE, generator=g) for _ in range(2)]
    targets = []
    for _ in images:
        t = {"boxes": torch.tensor([[8.0, 10.0, 40.0, 50.0]]), "labels": torch.tensor([1])}
        if name.startswith(("maskrcnn", "small_maskrcnn")):
            t["masks"] = torch.zeros(1, SIZE, SIZE, dtype=torch.uint8)
            t["masks"][0, 10:50, 8:40] = 1
        if name.startswith(("keypointrcnn", "small_keypointrcnn")):
            t["keypoints"] = torch.tensor([[[10.0, 12, 1], [20, 20, 1], [30, 40, 1], [38, 48, 1]]])
        targets.append(t)
    return images, targets


def _collapse_step(pruner: csgd_cli.CSGD, model: nn.Module, loss_of: Callable[[], Any]) -> None:
    """One C-SGD step over the whole model on its loss (a dict: summed)."""
    opt = pruner.optimizer(
        lr=1e-3, epsilon=1e3, norm_epsilon=1e3, momentum=0.0, weight_decay=0.0,
        plain_norm_weight_decay=0.0,
    )  # fmt: skip
    trained = {id(p) for group in opt.param_groups for p in group["params"]}
    assert trained == {id(p) for p in model.parameters()}  # heads, FPN, RPN: all of it
    model.train()
    loss = loss_of()
    if isinstance(loss, dict):  # a detector's loss dict, a segmenter's per output
        loss = sum(loss.values())
    opt.zero_grad()
    loss.backward()
    opt.step()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
    assert pruner.ready()
    model.eval()


def _same(a: Any, b: Any) -> None:
    """Every output equal: integers exactly, floats to the merge's rounding."""
    outs_a, outs_b = outputs_of(a), outputs_of(b)
    assert len(outs_a) == len(outs_b) > 0
    for x, y in zip(outs_a, outs_b, strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
        if x.is_floating_point():
            scale = max(x.abs().max().item(), 1.0) if x.numel() else 1.0
            torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4 * scale)
        else:
            assert torch.equal(x, y)


HEADS = ("head", "rpn.head", "roi_heads.box_predictor", "roi_heads.mask_predictor",
         "roi_heads.keypoint_predictor")  # fmt: skip


def _raw(model: nn.Module, images: list[torch.Tensor]) -> dict[str, Any]:
    """The heads' raw outputs (class logits, box deltas, mask and keypoint logits), before
    any top-k, threshold or NMS: what the merge must keep whatever the scores' ties."""
    mods, seen, hooks = dict(model.named_modules()), {}, []
    for name in (n for n in HEADS if n in mods):
        hook = lambda m, i, o, name=name: seen.setdefault(name, o)  # noqa: E731
        hooks.append(mods[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in hooks:
            h.remove()
    assert seen, "no head found"
    return seen


def _every_group_accounted(pruner: csgd_cli.CSGD) -> None:
    for g in pruner.groups:
        assert (g.name in pruner.clusters) != bool(g.excluded), g.name
        if g.excluded:  # the reason names a layer or says why the channels are kept
            assert "'" in g.excluded or "output" in g.excluded, g.excluded
    assert len(pruner.clusters) >= len(pruner.groups) // 2


def _save_and_load(thin: nn.Module, fresh: nn.Module, path: Path, x: Any) -> nn.Module:
    csgd_cli.save(thin, path)
    back = csgd_cli.load_model(path, model=fresh)
    assert sum(p.numel() for p in back.parameters()) == sum(p.numel() for p in thin.parameters())
    with torch.no_grad():
        _same(
            thin(*x) if isinstance(x, tuple) else thin(x),
            back(*x) if isinstance(x, tuple) else back(x),
        )
    return back


@pytest.mark.parametrize("name", [p for n in DETECTORS for p in _params(n)])
def test_detector_through_the_api(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _lively(DETECTORS[name]())
    images, targets = _data(name)
    pruner = csgd_cli.CSGD(model, (images,), ratio=0.5, clustering="even")
    _every_group_accounted(pruner)

    def loss() -> dict[str, torch.Tensor]:
        losses = model(images, targets)
        assert len(losses) >= 2 and all(k.startswith(("loss", "bbox", "class")) for k in losses)
        return losses

    _collapse_step(pruner, model, loss)
    with torch.no_grad():
        before = model(images)
    scores = torch.cat([d["scores"] for d in before])
    assert len(scores) > 2 and scores.unique().numel() > 2  # boxes to compare, not ties
    raw = _raw(model, images)
    thin = pruner.merge()
    assert pruner.merge_report["params_after"] < pruner.merge_report["params_before"]
    thin_raw = _raw(thin, images)
    assert thin_raw.keys() == raw.keys()
    for k in raw:  # the dense outputs first: exact whatever post-processing selects
        _same(raw[k], thin_raw[k])
    with torch.no_grad():
        _same(before, thin(images))
    losses = thin.train()(images, targets)  # the thin detector trains on (train-only parts)
    assert all(torch.isfinite(v) for v in losses.values())
    _save_and_load(thin.eval(), DETECTORS[name](), tmp_path / "thin.pt", (images,))


@pytest.mark.parametrize("name", [p for n in SEGMENTERS for p in _params(n)])
def test_segmenter_through_the_api(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SEGMENTERS[name]().eval()
    x = torch.rand(2, 3, SIZE, SIZE)
    y = torch.randint(0, 3, (2, SIZE, SIZE))
    pruner = csgd_cli.CSGD(model, x, ratio=0.5, clustering="even")
    _every_group_accounted(pruner)

    def loss() -> dict[str, torch.Tensor]:
        return {k: nn.functional.cross_entropy(v, y) for k, v in model(x).items()}

    _collapse_step(pruner, model, loss)
    with torch.no_grad():
        before = model(x)
    thin = pruner.merge()
    with torch.no_grad():
        _same(before, thin(x))
    _save_and_load(thin, SEGMENTERS[name](), tmp_path / "thin.pt", x)


class Cat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.c, self.d = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d(self.c(torch.cat([self.a(x), self.b(x)], 1)))


def test_a_tracing_surprise_is_an_exclusion_naming_the_node(monkeypatch: Any) -> None:
    """An op whose autograd record breaks the index maps: its group is excluded with a
    reason that names the op and the module that ran it, never a traceback."""
    from csgd_cli.tracing import maps

    real = maps._map_node

    def surprised(g: Any, node: Any) -> None:
        if "Cat" in node.grad_fn.name():
            raise IndexError("a record of an unexpected form")
        real(g, node)

    monkeypatch.setattr(maps, "_map_node", surprised)
    pruner = csgd_cli.CSGD(Cat(), torch.rand(1, 3, 8, 8), ratio=0.5)
    why = pruner.excluded()
    assert why["a"] == "op CatBackward0 in Cat.forward csgd cannot map (IndexError)"
    assert "c" in pruner.clusters and not {"a", "b"} & set(pruner.clusters)


def test_a_bare_list_of_images_is_the_detectors_one_argument() -> None:
    """``CSGD(detector, images)``: a forward whose first argument is a list takes the
    list whole (a tuple still holds positional arguments); one image is one sample."""
    from csgd_cli.common.nets import count_macs

    images, _ = _data("fasterrcnn_mobilenet_v3_large_320_fpn")
    build = DETECTORS["fasterrcnn_mobilenet_v3_large_320_fpn"]
    bare = csgd_cli.CSGD(build().eval(), images, ratio=0.5, clustering="even")
    wrapped = csgd_cli.CSGD(build().eval(), (images,), ratio=0.5, clustering="even")
    assert bare.clusters == wrapped.clusters and bare.excluded() == wrapped.excluded()
    # the RPN's scores and box deltas leave the graph (detached proposals): ends of the
    # trace, so its conv is pruned with the FPN's channels
    assert set(bare.excluded()) == {"rpn.head.cls_logits", "rpn.head.bbox_pred"}
    assert "rpn.head.conv.0.0" in bare.clusters
    model = build().eval()
    assert count_macs(model, images) == count_macs(model, (images[:1],)) > 0


def test_a_detector_with_a_frozen_backbone_stem() -> None:
    """As with pretrained backbones (``trainable_backbone_layers``): the frozen layers'
    groups are excluded with that reason, naming the parameter; the rest is pruned."""
    from csgd_cli.tracing.trace import channel_groups

    model = DETECTORS["fasterrcnn_mobilenet_v3_large_320_fpn"]().eval()
    for p in model.backbone.body["0"].parameters():  # the stem conv and its BN
        p.requires_grad_(False)
    images, _ = _data("fasterrcnn_mobilenet_v3_large_320_fpn")
    why = {g.name: g.excluded for g in channel_groups(model, (images,))}
    frozen = {n: w for n, w in why.items() if w and "frozen" in w}
    assert frozen == {
        "backbone.body.0.0": "parameter 'backbone.body.0.0.weight' is frozen (requires_grad=False)"
    }
    assert sum(w is None for w in why.values()) == len(why) - 3  # + the RPN's two outputs


class _Named(nn.Module):
    def forward(self, images):
        return torch.stack(images).sum()


class _Annotated(nn.Module):
    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(x).sum()


class _Spread(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a - b


def test_which_lists_are_one_argument() -> None:
    from csgd_cli.common.nets import run_model

    one, two = torch.ones(2), 2 * torch.ones(2)
    assert run_model(_Named(), [one, two, two]).item() == 10  # one list argument
    assert run_model(_Annotated(), [one, two]).item() == 6
    assert torch.equal(run_model(_Spread(), [one, two]), -one)  # positional arguments
    assert torch.equal(run_model(_Spread(), (one, two)), -one)


def test_a_surprise_in_the_walk_excludes_that_group_naming_it(monkeypatch: Any) -> None:
    from csgd_cli.tracing import trace

    real = trace._raw_group

    def surprised(graph: Any, module: nn.Module) -> Any:
        if graph.names[module] == "c":
            raise KeyError("a node of an unexpected form")
        return real(graph, module)

    monkeypatch.setattr(trace, "_raw_group", surprised)
    pruner = csgd_cli.CSGD(Cat(), torch.rand(1, 3, 8, 8), ratio=0.5)
    assert pruner.excluded()["c"] == "tracing the channels of 'c' failed (KeyError)"
    assert {"a", "c"} <= {g.name for g in pruner.groups}


def test_put_keeps_only_the_indices_its_piece_has() -> None:
    """Rows reaching a concatenation's piece by another path (a detector's paste of masks
    loops through pieces) are dropped, so indices cannot grow without bound (the Mask
    R-CNN mask-logits walk ran for minutes before)."""
    import numpy as np

    from csgd_cli.tracing.walk import Put

    rows = np.array([[0, 0], [2, 1], [3, 2], [7, 3]])
    assert Put(4, 1, 3)(rows).tolist() == [[4, 0], [6, 1]]
    assert Put(1, 2)(rows).tolist() == [[1, 0], [5, 1], [7, 2], [15, 3]]
