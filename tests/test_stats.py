"""``csgd_cli.core.stats`` on its own: which running statistics a group's clusters hold,
their averaging (into the model, into a state dict, every step by ``StatSync``) and
their relative spread, on tiny hand-built models with values checked by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from csgd_cli.core.stats import StatSync, average_statistics, deviation, stat_segments
from csgd_cli.rules.groups import ChannelGroup, Member, producer, reader

CLUSTERS = {"conv": [[0, 1], [2, 3]]}


class Net(nn.Module):
    """conv -> bn -> head: one group of 4 channels (``conv``)."""

    def __init__(self, **bn: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4, **bn)
        self.head = nn.Conv2d(4, 2, 1)


GROUP = ChannelGroup("conv", 4, producer("conv", "bn") + reader("head"))


def _net(mean: list[float], var: list[float]) -> Net:
    net = Net()
    with torch.no_grad():
        net.bn.running_mean.copy_(torch.tensor(mean))
        net.bn.running_var.copy_(torch.tensor(var))
        net.bn.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))  # differ: not statistics
    return net


class Concat(nn.Module):
    """Two producers writing channels 0-1 and 2-3 of one group, each with its BN, and a
    BN over a wider concatenation that holds the group at offset 3 (DenseNet-like)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)
        self.b, self.bn_b = nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)
        self.bn_cat = nn.BatchNorm2d(7)
        self.head = nn.Conv2d(7, 2, 1)


CAT = ChannelGroup(
    "cat",
    4,
    [
        Member("a", "out", length=2),
        Member("bn_a", "channel", length=2),
        Member("b", "out", start=2),
        Member("bn_b", "channel", start=2),
        Member("bn_cat", "channel", offset=3),
        Member("head", "in", offset=3),
    ],
)


def test_stat_segments_name_the_running_statistics_only() -> None:
    net = _net([1, 3, 5, 5], [1, 1, 2, 2])
    [(name, blocks, local)] = stat_segments(net, [GROUP], CLUSTERS)
    assert name == "conv" and local == [[0, 1], [2, 3]]
    assert sorted(b.key for b in blocks) == ["bn.running_mean", "bn.running_var"]
    assert {id(b.tensor) for b in blocks} == {id(net.bn.running_mean), id(net.bn.running_var)}


def test_stat_segments_skip_groups_without_clusters_or_statistics() -> None:
    net = Net()
    assert stat_segments(net, [GROUP], {}) == []  # not clustered
    no_bn = ChannelGroup("conv", 4, [Member("conv", "out"), Member("head", "in")])
    assert stat_segments(net, [no_bn], CLUSTERS) == []
    untracked = Net(track_running_stats=False)
    assert stat_segments(untracked, [GROUP], CLUSTERS) == []
    assert deviation(untracked, [GROUP], CLUSTERS) == {}


def test_a_frozen_norms_buffer_gamma_beta_are_not_statistics() -> None:
    """torchvision's FrozenBatchNorm2d keeps gamma/beta as buffers too: only its
    running mean and variance are averaged."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    net = Net()
    net.bn = FrozenBatchNorm2d(4)
    with torch.no_grad():
        net.bn.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        net.bn.running_mean.copy_(torch.tensor([1.0, 3.0, 5.0, 5.0]))
    [(_, blocks, _)] = stat_segments(net, [GROUP], CLUSTERS)
    assert sorted(b.key for b in blocks) == ["bn.running_mean", "bn.running_var"]
    average_statistics(net, [GROUP], CLUSTERS)
    assert net.bn.running_mean.tolist() == [2, 2, 5, 5]
    assert net.bn.weight.tolist() == [1, 2, 3, 4]


def test_stat_segments_of_a_concatenation_give_local_clusters_per_segment() -> None:
    net = Concat()
    segs = stat_segments(net, [CAT], {"cat": [[0, 1], [2, 3]]})
    assert [(n, sorted(b.key.split(".")[0] for b in bl), loc) for n, bl, loc in segs] == [
        ("cat", ["bn_a", "bn_a", "bn_cat", "bn_cat"], [[0, 1]]),
        ("cat", ["bn_b", "bn_b", "bn_cat", "bn_cat"], [[0, 1]]),  # channels 2, 3 -> 0, 1
    ]
    rows = {b.key: b.row for b in segs[1][1]}
    assert rows["bn_cat.running_mean"] == 3 + 2 and rows["bn_b.running_mean"] == 0


def test_average_statistics_sets_cluster_means_and_nothing_else() -> None:
    net = _net([1, 3, 5, 5], [1, 3, 2, 4])
    with torch.no_grad():
        net.bn.num_batches_tracked.fill_(7)
    average_statistics(net, [GROUP], CLUSTERS)
    assert net.bn.running_mean.tolist() == [2, 2, 5, 5]
    assert net.bn.running_var.tolist() == [2, 2, 3, 3]
    assert net.bn.weight.tolist() == [1, 2, 3, 4]  # gamma is the optimizer's, not averaged
    assert int(net.bn.num_batches_tracked) == 7
    assert deviation(net, [GROUP], CLUSTERS) == {"conv": 0.0}


def test_average_statistics_into_a_state_dict_leaves_the_model_alone() -> None:
    net = _net([1, 3, 5, 5], [1, 3, 2, 4])
    state = {k: v.clone() for k, v in net.state_dict().items()}
    average_statistics(net, [GROUP], CLUSTERS, state)
    assert state["bn.running_mean"].tolist() == [2, 2, 5, 5]
    assert state["bn.running_var"].tolist() == [2, 2, 3, 3]
    assert net.bn.running_mean.tolist() == [1, 3, 5, 5]
    assert net.bn.running_var.tolist() == [1, 3, 2, 4]


def test_averaging_a_concatenation_touches_only_the_groups_rows() -> None:
    net = Concat()
    with torch.no_grad():
        net.bn_a.running_mean.copy_(torch.tensor([1.0, 3.0]))
        net.bn_b.running_mean.copy_(torch.tensor([10.0, 20.0]))
        net.bn_cat.running_mean.copy_(torch.arange(7.0))  # group rows 3..6
    average_statistics(net, [CAT], {"cat": [[0, 1], [2, 3]]})
    assert net.bn_a.running_mean.tolist() == [2, 2]
    assert net.bn_b.running_mean.tolist() == [15, 15]
    assert net.bn_cat.running_mean.tolist() == [0, 1, 2, 3.5, 3.5, 5.5, 5.5]


def test_deviation_by_hand() -> None:
    """Rows (mean, var): (1,1) (3,1) | (5,2) (5,2): spread 1 + 1 over a size of
    1+1+9+1+25+4+25+4 = 70."""
    net = _net([1, 3, 5, 5], [1, 1, 2, 2])
    assert deviation(net, [GROUP], CLUSTERS) == {"conv": pytest.approx(math.sqrt(2 / 70))}
    assert deviation(net, [GROUP], {"conv": [[0], [1], [2], [3]]}) == {"conv": 0.0}


def test_deviation_sums_a_groups_segments_before_the_ratio() -> None:
    """One ratio per group: spreads and sizes summed over segments (not a mean of ratios).
    Rows (bn mean, bn var, bn_cat mean, bn_cat var): segment a (1,1,0,1), (3,1,0,1):
    spread 2, size 3 + 11; segment b (10,1,0,1) twice: spread 0, size 2 x 102."""
    net = Concat()
    with torch.no_grad():
        net.bn_a.running_mean.copy_(torch.tensor([1.0, 3.0]))
        net.bn_b.running_mean.copy_(torch.tensor([10.0, 10.0]))
    assert deviation(net, [CAT], {"cat": [[0, 1], [2, 3]]}) == {
        "cat": pytest.approx(math.sqrt(2 / (14 + 204)))
    }


def test_stat_sync_averages_every_call_and_follows_replaced_buffers() -> None:
    net = _net([1, 3, 5, 5], [1, 3, 2, 4])
    sync = StatSync(net, [GROUP], CLUSTERS)
    sync()
    assert net.bn.running_mean.tolist() == [2, 2, 5, 5]
    with torch.no_grad():  # a forward pass in train mode moves them apart again
        net.bn.running_mean.copy_(torch.tensor([0.0, 4.0, 6.0, 8.0]))
    sync()
    assert net.bn.running_mean.tolist() == [2, 2, 7, 7]
    net.double()  # new buffer tensors: the old views would average stale copies
    with torch.no_grad():
        net.bn.running_var.copy_(torch.tensor([1.0, 5.0, 1.0, 1.0]))
    sync()
    assert net.bn.running_var.dtype == torch.float64
    assert net.bn.running_var.tolist() == [3, 3, 1, 1]


def test_stat_sync_without_statistics_does_nothing() -> None:
    net = Net(track_running_stats=False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    StatSync(net, [GROUP], CLUSTERS)()
    after = net.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
