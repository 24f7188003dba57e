"""``ready()`` answers the merge's own question (issue 22.1): true exactly when
``merge()`` without force passes on the example input. Running statistics are part of
C-SGD (the optimizer averages them inside clusters), and a refused merge names the
group and what still differs."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torchvision
from torch import nn

from csgd_cli.api.pruner import CSGD
from csgd_cli.common.errors import CsgdError
from csgd_cli.core.stats import deviation, stat_segments


def _merges(pruner: CSGD, x: Any) -> tuple[bool, str]:
    from csgd_cli.core.surgery import merge_checked

    try:
        merge_checked(pruner.model, pruner.groups, pruner.clusters, x, tolerance=1e-4)
    except CsgdError as e:
        return False, str(e)
    return True, ""


def _train_until_ready(model: nn.Module, x: Any, loss_of: Any, steps: int, every: int) -> CSGD:
    """The README loop: C-SGD steps, ready() probed against the merge each time."""
    pruner = CSGD(model, x, ratio=0.5)
    opt = pruner.optimizer(0.05, epsilon=3.0, norm_epsilon=3.0, momentum=0.9)
    agreed = []
    for step in range(1, steps + 1):
        model.train()
        opt.zero_grad()
        loss_of(model).backward()
        opt.step()
        if step % every == 0:
            ready, (ok, _) = pruner.ready(), _merges(pruner, x)
            agreed.append((ready, ok))
            if ready:
                break
    assert all(r == ok for r, ok in agreed), agreed  # one definition, the same answer
    assert agreed[-1] == (True, True) and (False, False) in agreed
    return pruner


@pytest.fixture(scope="module")
def lraspp() -> tuple[CSGD, torch.Tensor]:
    """torchvision's LR-ASPP (BatchNorm momentum 0.01), trained until ready()."""
    torch.manual_seed(0)
    seg = torchvision.models.segmentation
    model = seg.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3)
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 3, (4, 64, 64))

    def loss(m: nn.Module) -> torch.Tensor:
        return nn.functional.cross_entropy(m(x)["out"], y)

    return _train_until_ready(model, x, loss, steps=150, every=10), x


def test_lraspp_ready_is_the_merge_and_the_merge_passes(lraspp: Any) -> None:
    pruner, _ = lraspp
    assert pruner.ready()
    thin = pruner.merge()
    assert pruner.merge_report["relative_logit_diff"] <= 1e-4
    assert sum(p.numel() for p in thin.parameters()) < sum(
        p.numel() for p in pruner.model.parameters()
    )


def test_the_optimizer_keeps_running_statistics_equal_inside_clusters(lraspp: Any) -> None:
    pruner, _ = lraspp
    assert stat_segments(pruner.model, pruner.groups, pruner.clusters)  # BN stats are there
    assert max(deviation(pruner.model, pruner.groups, pruner.clusters).values()) < 1e-6


def test_running_statistics_that_differ_are_named_and_synced(lraspp: Any) -> None:
    """Statistics made to differ inside one cluster (as a loop that runs forward passes
    outside the optimizer leaves them): not ready, the refusal names the group and the
    running statistics, and ``sync_statistics()`` is the fix that helps."""
    pruner, x = lraspp
    name, blocks, local = next(
        (n, b, c)
        for n, b, c in stat_segments(pruner.model, pruner.groups, pruner.clusters)
        if any(len(m) > 1 for m in c)
    )
    member = next(m for m in local if len(m) > 1)[1]
    saved = blocks[0].tensor.clone()
    with torch.no_grad():
        blocks[0].tensor[blocks[0].row + member] += 0.5
    try:
        assert not pruner.ready()
        ok, err = _merges(pruner, x)
        assert not ok and f"group '{name}'" in err and "running statistics" in err
        assert "sync_statistics()" in err
        pruner.sync_statistics()
        assert pruner.ready() and _merges(pruner, x)[0]
    finally:
        with torch.no_grad():
            blocks[0].tensor.copy_(saved)


def test_kernels_that_differ_are_named_with_their_fix(lraspp: Any) -> None:
    pruner, x = lraspp
    g = next(g for g in pruner.groups if any(len(c) > 1 for c in pruner.clusters.get(g.name, [])))
    from csgd_cli.rules.layers import segment_rows

    blk = segment_rows(pruner.model, g, ("kernel",))[0][2][0]
    member = next(c for c in pruner.clusters[g.name] if len(c) > 1)[1]
    saved = blk.tensor.detach().clone()
    with torch.no_grad():
        blk.tensor[blk.row + member] *= 1.5
    try:
        ok, err = _merges(pruner, x)
        assert not pruner.ready() and not ok
        assert "kernels still differ" in err and "epsilon" in err
    finally:
        with torch.no_grad():
            blk.tensor.copy_(saved)


def test_regnet_with_slow_statistics_ready_agrees_with_the_merge() -> None:
    """A network of our choice, not named in the issue: torchvision's RegNetX-400MF
    (grouped convolutions) with its BatchNorm momentum set to 0.003 (statistics that
    barely move): ready() and the merge agree at every probe, and pass together."""
    torch.manual_seed(1)
    model = torchvision.models.regnet_x_400mf(weights=None, num_classes=5)
    x, y = torch.randn(4, 3, 48, 48), torch.randint(0, 5, (4,))
    model.train()
    with torch.no_grad():  # statistics that differ from channel to channel
        model(torch.randn(4, 3, 48, 48))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.003

    def loss(m: nn.Module) -> torch.Tensor:
        return nn.functional.cross_entropy(m(x), y)

    pruner = _train_until_ready(model, x, loss, steps=150, every=10)
    pruner.merge()
    assert pruner.merge_report["relative_logit_diff"] <= 1e-4
