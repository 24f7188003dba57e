"""The baselines' criteria (``csgd_cli.baselines.criteria``), and L1 at C-SGD's widths.

Each criterion is checked on hand-made tensors of a network with one coupled group
(``a`` and ``b`` meet in a sum, BNs after both): which channels it keeps, and that the
members are scored jointly (the first producer alone would keep others)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from csgd_cli.baselines.criteria import (
    CRITERIA,
    SparseGammaSGD,
    channel_scores,
    gamma_rows,
    select,
)
from csgd_cli.common.errors import CsgdError
from csgd_cli.core.clustering import cluster_groups, target_widths
from csgd_cli.core.optim import plain_sgd
from csgd_cli.core.surgery import merge
from csgd_cli.models import get_model
from csgd_cli.tracing.trace import channel_groups


class Coupled(nn.Module):
    """Group ``a``: producers ``a`` and ``b`` (summed), BNs ``bn_a``, ``bn_b``; group
    ``c``: producer ``c`` with ``bn_c``, read by the head."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(2, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.b, self.bn_b = nn.Conv2d(2, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.c, self.bn_c = nn.Conv2d(4, 5, 1, bias=False), nn.BatchNorm2d(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn_a(self.a(x)) + self.bn_b(self.b(x)))
        return self.head(torch.relu(self.bn_c(self.c(y))).mean((2, 3)))


def coupled(a_rows: list[list[float]] | None = None, b_rows: list[list[float]] | None = None):
    torch.manual_seed(0)
    m = Coupled().eval()
    with torch.no_grad():
        for conv, rows in ((m.a, a_rows), (m.b, b_rows)):
            if rows is not None:
                conv.weight.copy_(torch.tensor(rows).reshape(4, 2, 1, 1))
    groups = channel_groups(m, torch.randn(2, 2, 4, 4))
    assert [(g.name, len(g.producers)) for g in groups] == [("a", 2), ("c", 1)]
    return m, groups


def kept(clusters: dict[str, list[list[int]]], name: str) -> list[int]:
    assert all(len(c) == 1 for c in clusters[name])  # singletons: the rest is dropped
    return [c[0] for c in clusters[name]]


def test_the_config_accepts_exactly_the_tables_names() -> None:
    from csgd_cli.runner.names import accepted

    assert accepted()["prune.method"] == ("csgd", *CRITERIA)


def test_l1_and_l2_norms_scored_jointly() -> None:
    # per channel: a's row, b's row; L1 and L2 disagree, and b changes a's ranking
    a = [[1, 1], [1.9, 0], [0.1, 0], [0.5, 0.5]]
    b = [[0, 0], [0, 0], [3, 0], [0, 0]]
    m, groups = coupled(a, b)
    # joint L1 [2, 1.9, 3.1, 1] keeps 0, 2 (a alone: 0, 1); joint squared L2
    # [2, 3.61, 9.01, 0.5] keeps 1, 2
    assert kept(select("l1", m, groups, {"a": 2}), "a") == [0, 2]
    assert kept(select("l2", m, groups, {"a": 2}), "a") == [1, 2]
    assert kept(select("l1", m, groups, {"a": 2, "c": 5}), "c") == [0, 1, 2, 3, 4]


def test_fpgm_drops_the_channel_nearest_the_others() -> None:
    # TP's FPGM measures distances between |w|^2 rows (points in 2-d here): a's points
    # (0,0) (1,.2) (1,0) (0,2) have distance sums 4.02, 3.28, 3.44, 6.30 (a alone drops
    # channel 1); b's (0,0) (5,0) (0,0) (0,0) add 5, 15, 5, 5: jointly channel 2 goes
    a = [[0, 0], [1, 0.2], [1, 0], [0, 2]]
    b = [[0, 0], [5, 0], [0, 0], [0, 0]]
    m, groups = coupled(
        [[math.sqrt(v) for v in r] for r in a], [[math.sqrt(v) for v in r] for r in b]
    )
    assert kept(select("fpgm", m, groups, {"a": 3}), "a") == [0, 1, 3]
    assert kept(select("l1", m, groups, {"a": 3}), "a") == [1, 2, 3]  # the norm drops 0
    with torch.no_grad():  # group c: points 0, 1, 2, 3, 10: the median (2) goes first
        m.c.weight.zero_()
        m.c.weight[:, 0, 0, 0] = torch.tensor([0, 1, 2, 3, 10.0]).sqrt()
    assert kept(select("fpgm", m, groups, {"c": 4}), "c") == [0, 1, 3, 4]


def test_slimming_scores_every_bn_of_the_group() -> None:
    m, groups = coupled()
    with torch.no_grad():
        m.bn_a.weight.copy_(torch.tensor([1.0, 0.1, 0.5, 0.2]))
        m.bn_b.weight.copy_(torch.tensor([0.0, -1.0, 0.1, 0.1]))  # |gamma| counts
    # joint |gamma| [1, 1.1, 0.6, 0.3] keeps 0, 1 (bn_a alone: 0, 2)
    assert kept(select("slimming", m, groups, {"a": 2}), "a") == [0, 1]


def test_a_group_without_what_a_criterion_reads_is_refused_in_one_line() -> None:
    m, _ = coupled()
    m.bn_c = nn.Identity()  # group c: a conv and no BN
    groups = channel_groups(m, torch.randn(2, 2, 4, 4))
    with pytest.raises(CsgdError, match="group 'c' has no layer this criterion") as e:
        select("slimming", m, groups, {"a": 2, "c": 3})
    assert "\n" not in str(e.value)
    kept_all = select("slimming", m, groups, {"a": 2, "c": 5})  # c kept whole: no score needed
    assert kept(kept_all, "c") == [0, 1, 2, 3, 4]


def test_taylor_sums_over_batches_and_members() -> None:
    a = [[0, 0], [0, 0], [1, -1], [0.5, 2]]  # channel 1 lives in b only
    b = [[0, 0], [2, 1], [1, 1], [-1, 0.5]]
    m, groups = coupled(a, b)
    m.train()
    bn_before = m.bn_a.running_mean.clone()
    torch.manual_seed(1)
    batches = [(torch.randn(8, 2, 4, 4), torch.randint(0, 3, (8,))) for _ in range(2)]
    both = channel_scores("taylor", m, groups, ["a"], batches)["a"][0]
    one = [channel_scores("taylor", m, groups, ["a"], [bt])["a"][0] for bt in batches]
    assert torch.allclose(both, one[0] + one[1])  # accumulated over the batches
    # the oracle: sum over producers of |w * dL/dw| per channel, eval-mode forward
    expect = torch.zeros(4)
    for x, y in batches:
        m.eval()
        m.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        for conv in (m.a, m.b):
            expect += (conv.weight * conv.weight.grad).abs().flatten(1).sum(1).detach()
    m.zero_grad(set_to_none=True)
    m.train()
    assert torch.allclose(both, expect, rtol=1e-5)
    assert both[0] == 0 and both[1] > 0  # zero kernels score 0; b alone carries channel 1
    assert kept(select("taylor", m, groups, {"a": 3}, batches=batches), "a") == [1, 2, 3]
    # scoring changes nothing: train mode back, no gradients left, BN statistics kept
    assert m.training and m.a.weight.grad is None
    assert torch.equal(m.bn_a.running_mean, bn_before)


def test_random_is_seeded_and_every_criterion_keeps_csgd_widths() -> None:
    from csgd_cli.models import get_model

    torch.manual_seed(0)
    model = get_model("resnet20", num_classes=10, in_channels=1, image_size=8).eval()
    groups = channel_groups(model)
    ks = {g.name: max(1, g.width // 2 - 1) for g in groups}
    r0, r1 = (select("random", model, groups, ks, seed=s) for s in (0, 1))
    assert r0 == select("random", model, groups, ks, seed=0) and r0 != r1
    x = (torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,)))
    thin_csgd = merge(model, groups, cluster_groups(model, groups, ks, "even"))
    for name in CRITERIA:
        sel = select(name, model, groups, ks, batches=[x])
        assert {g: len(c) for g, c in sel.items()} == ks
        assert merge(model, groups, sel, partial=True).widths == thin_csgd.widths


def test_sparse_gamma_sgd_penalises_only_the_pruned_groups() -> None:
    m, groups = coupled()
    hyper = {"lr": 0.1, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0}
    sched = OmegaConf.create({**hyper, "norm_weight_decay": None})
    rows = gamma_rows(m, groups, ["a"])
    assert {id(t) for t, _, _ in rows} == {id(m.bn_a.weight), id(m.bn_b.weight)}
    with torch.no_grad():
        m.bn_b.weight.copy_(torch.tensor([1.0, -1.0, 0.5, -0.5]))
    opt = SparseGammaSGD(plain_sgd(m, sched), rows, lam=0.5)
    before = {k: v.detach().clone() for k, v in m.named_parameters()}
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.allclose(m.bn_a.weight, before["bn_a.weight"] - 0.05)  # lr * lam * sign
    assert torch.allclose(m.bn_b.weight, torch.tensor([0.95, -0.95, 0.45, -0.45]))
    for k in ("bn_c.weight", "bn_a.bias", "a.weight"):  # nothing else moves
        assert torch.equal(dict(m.named_parameters())[k], before[k])
    assert set(opt.state_dict()) == {"state", "param_groups"}  # an SGD state: resumable


@pytest.fixture
def one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_l1_same_widths_keeps_largest_norms(ratio: float, one_thread: None) -> None:
    torch.manual_seed(0)
    model = get_model("resnet20", num_classes=10, in_channels=1, image_size=8).eval()
    groups = channel_groups(model)
    mods = dict(model.named_modules())
    stage = groups[0]  # layer1: conv1 and every block's conv2 meet in its residual sums
    assert len(stage.producers) == 4
    with torch.no_grad():  # channel 0: weak in the first producer, strong in the others
        mods[stage.producers[0].conv].weight[0].mul_(1e-3)
        for p in stage.producers[1:]:
            mods[p.conv].weight[0].mul_(10)
    ks = target_widths(groups, ratio)
    l1 = select("l1", model, groups, ks)  # L1-norm filter pruning (Li et al. 2017)
    csgd = cluster_groups(model, groups, ks, "kmeans", seed=0)
    for g in groups:
        score = sum(
            mods[p.conv].weight.detach().abs().reshape(g.width, -1).sum(1) for p in g.producers
        )
        kept = [c[0] for c in l1[g.name]]
        assert len(kept) == len(csgd[g.name]) == ks[g.name]
        assert kept == sorted(torch.topk(score, ks[g.name]).indices.tolist())
    assert 0 in [c[0] for c in l1[stage.name]]  # scored jointly, not by the first producer
    thin_l1 = merge(model, groups, l1, partial=True)
    thin_csgd = merge(model, groups, csgd)
    assert thin_l1.widths == thin_csgd.widths
    # the kept channels are copied unchanged (sliced, never merged)
    thin_mods = dict(thin_l1.named_modules())
    for g in groups:
        kept = torch.tensor([c[0] for c in l1[g.name]])
        for p in g.producers:
            for k in ("weight", "bias", "running_mean", "running_var"):
                assert torch.equal(getattr(thin_mods[p.norm], k), getattr(mods[p.norm], k)[kept])
    kept = torch.tensor([c[0] for c in l1[stage.name]])
    assert torch.equal(thin_mods["conv1"].weight, mods["conv1"].weight[kept])  # reads the image
    x = torch.randn(4, 1, 8, 8)
    assert thin_l1(x).shape == (4, 10)


def test_a_criterion_scores_a_whole_head_over_all_its_rows() -> None:
    """A head group's channel is a head (``Member.block`` rows of q, k, v): a criterion
    scores it by all those rows, and the partial merge keeps the chosen heads."""
    timm = pytest.importorskip("timm")
    from csgd_cli.core.surgery import merge_checked
    from csgd_cli.rules.groups import select_groups
    from csgd_cli.tracing.trace import channel_groups

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, num_heads=4,
                              num_classes=10).eval()  # fmt: skip
    x = torch.randn(2, 3, 32, 32)
    qkv = model.blocks[0].attn.qkv
    d = qkv.out_features // 12  # head_dim
    with torch.no_grad():  # heads 1 and 3 stand out only in the last q row of each
        for h in (1, 3):
            qkv.weight[h * d + d - 1] *= 100
    groups = select_groups(channel_groups(model, x), ["blocks.0.attn"], ["*.qkv"])
    assert [g.name for g in groups] == ["blocks.0.attn"] and groups[0].width == 4
    chosen = select("l1", model, groups, {"blocks.0.attn": 2})
    assert kept(chosen, "blocks.0.attn") == [1, 3]
    thin, _ = merge_checked(model, groups, chosen, x, tolerance=1.0, partial=True)
    assert thin.blocks[0].attn.num_heads == 2 and thin(x).shape == (2, 10)
