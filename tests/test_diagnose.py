"""``csgd_cli.core.diagnose`` on its own: the relative spreads inside clusters (kernels,
norm gamma/beta and biases, running statistics) by hand, and which one a refused merge
blames, with its fix."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from csgd_cli.core.diagnose import FIXES, cause, deviations
from csgd_cli.rules.groups import ChannelGroup, Clusters, producer, reader

KINDS = ["kernels", "norm gamma/beta", "running statistics"]


class Net(nn.Module):
    """Two groups of 4 channels: ``c1`` (conv -> bn) read by ``c2`` (conv -> bn), read by
    ``head``."""

    def __init__(self, bias: bool = False, affine: bool = True) -> None:
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(1, 4, 1, bias=bias), nn.BatchNorm2d(4, affine=affine)
        self.c2, self.bn2 = nn.Conv2d(4, 4, 1, bias=bias), nn.BatchNorm2d(4, affine=affine)
        self.head = nn.Conv2d(4, 2, 1)


GROUPS = [
    ChannelGroup("c1", 4, producer("c1", "bn1") + reader("c2")),
    ChannelGroup("c2", 4, producer("c2", "bn2") + reader("head")),
]
CLUSTERS: Clusters = {"c1": [[0, 1], [2, 3]], "c2": [[0, 1], [2, 3]]}


def _agreeing(**kw: bool) -> Net:
    """Every tensor equal inside each cluster: channels 0, 1 alike, 2, 3 alike."""
    net = Net(**kw).double()
    with torch.no_grad():
        for t in (*net.c1.parameters(), *net.bn1.parameters(), *net.bn1.buffers()):
            if t.dim() > 0:
                t.copy_(torch.tensor([1.0, 1.0, 2.0, 2.0]).view(-1, *[1] * (t.dim() - 1)))
        for t in (*net.c2.parameters(), *net.bn2.parameters(), *net.bn2.buffers()):
            if t.dim() > 0:
                t.copy_(torch.tensor([3.0, 3.0, 1.0, 1.0]).view(-1, *[1] * (t.dim() - 1)))
    return net


def test_agreeing_clusters_have_no_spread_and_blame_the_arithmetic() -> None:
    net = _agreeing()
    assert deviations(net, GROUPS, CLUSTERS) == {g: dict.fromkeys(KINDS, 0.0) for g in CLUSTERS}
    why, fix = cause(net, GROUPS, CLUSTERS)
    assert "agree within clusters (largest relative spread 0.0e+00)" in why
    assert "arithmetic" in why and "larger tolerance" in fix


def test_deviations_by_hand() -> None:
    """c1's conv rows 1, 3 | 2, 2: spread 2 over size 18; bn1 beta 0, 0 | 0, 2 (gamma 1):
    spread 2 over size 8; bn1 (mean, var) rows (1,1) (3,1) | (5,2) (5,2): 2 over 70."""
    net = _agreeing()
    with torch.no_grad():
        net.c1.weight.view(-1).copy_(torch.tensor([1.0, 3.0, 2.0, 2.0]))
        net.bn1.weight.fill_(1.0)
        net.bn1.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 2.0]))
        net.bn1.running_mean.copy_(torch.tensor([1.0, 3.0, 5.0, 5.0]))
        net.bn1.running_var.copy_(torch.tensor([1.0, 1.0, 2.0, 2.0]))
    devs = deviations(net, GROUPS, CLUSTERS)
    assert devs["c1"] == {
        "kernels": pytest.approx(1 / 3),
        "norm gamma/beta": pytest.approx(0.5),
        "running statistics": pytest.approx(math.sqrt(2 / 70)),
    }
    assert devs["c2"] == dict.fromkeys(KINDS, 0.0)  # untouched group: nothing differs
    why, fix = cause(net, GROUPS, CLUSTERS)  # the largest of the three
    assert why == "group 'c1': its norm gamma/beta still differ inside clusters (relative 5.0e-01)"
    assert fix == FIXES["norm gamma/beta"] and "norm_epsilon" in fix


@pytest.mark.parametrize(
    ("tensor", "kind", "says"),
    [
        ("c2.weight", "kernels", "larger epsilon"),
        ("bn2.weight", "norm gamma/beta", "larger norm_epsilon"),
        ("bn2.bias", "norm gamma/beta", "larger norm_epsilon"),
        ("bn2.running_mean", "running statistics", "sync_statistics()"),
        ("bn2.running_var", "running statistics", "sync_statistics()"),
    ],
)
def test_what_differs_is_named_with_its_fix(tensor: str, kind: str, says: str) -> None:
    net = _agreeing()
    t = net.get_parameter(tensor) if "running" not in tensor else net.get_buffer(tensor)
    with torch.no_grad():
        t.view(4, -1)[1] += 0.5  # channel 1 leaves channel 0, its cluster mate
    devs = deviations(net, GROUPS, CLUSTERS)
    assert devs["c1"] == dict.fromkeys(KINDS, 0.0)
    assert [k for k, v in devs["c2"].items() if v > 1e-6] == [kind]  # rounding aside
    why, fix = cause(net, GROUPS, CLUSTERS)
    assert why.startswith(f"group 'c2': its {kind} still differ inside clusters (relative ")
    assert f"{devs['c2'][kind]:.1e}" in why
    assert fix == FIXES[kind] and says in fix


def test_the_largest_spread_over_groups_is_blamed() -> None:
    net = _agreeing()
    with torch.no_grad():
        net.c1.weight.view(-1)[1] += 0.1  # a small kernel spread in c1
        net.bn2.running_mean[3] += 2.0  # a larger statistics spread in c2
    devs = deviations(net, GROUPS, CLUSTERS)
    assert devs["c2"]["running statistics"] > devs["c1"]["kernels"] > 0
    assert cause(net, GROUPS, CLUSTERS)[0].startswith("group 'c2': its running statistics")
    # c2 not clustered (not pruned): not measured, c1's kernels are named
    only_c1 = {"c1": CLUSTERS["c1"]}
    assert list(deviations(net, GROUPS, only_c1)) == ["c1"]
    assert cause(net, GROUPS, only_c1)[0].startswith("group 'c1': its kernels")


def test_a_conv_bias_counts_with_gamma_beta() -> None:
    """Conv bias 1, 3 | 2, 2 with a BN without gamma/beta: spread 2 over 18."""
    net = _agreeing(bias=True, affine=False)
    with torch.no_grad():
        net.c1.bias.copy_(torch.tensor([1.0, 3.0, 2.0, 2.0]))
    devs = deviations(net, GROUPS, CLUSTERS)
    assert devs["c1"]["norm gamma/beta"] == pytest.approx(1 / 3)
    assert devs["c1"]["kernels"] == 0.0


def test_no_gamma_beta_and_no_bias_is_no_spread() -> None:
    """Nothing affine at all (size 0): 0, not a division by zero."""
    net = _agreeing(affine=False)
    with torch.no_grad():
        net.c1.weight.view(-1)[1] += 1.0
    devs = deviations(net, GROUPS, CLUSTERS)
    assert devs["c1"]["norm gamma/beta"] == 0.0 and devs["c1"]["kernels"] > 0


def test_a_spread_under_1e_6_is_the_arithmetics() -> None:
    """c1's conv rows 1, 1 + 2e-7 | 1, 1: spread 2e-14 over ~4, relative ~7.1e-08,
    below the 1e-6 that blames a group."""
    net = _agreeing()
    with torch.no_grad():
        net.c1.weight.view(-1).copy_(torch.tensor([1.0, 1.0 + 2e-7, 1.0, 1.0], dtype=torch.float64))
    spread = deviations(net, GROUPS, CLUSTERS)["c1"]["kernels"]
    assert spread == pytest.approx(math.sqrt(2e-14 / 4), rel=1e-3)
    why, fix = cause(net, GROUPS, CLUSTERS)
    assert f"largest relative spread {spread:.1e}" in why and "larger tolerance" in fix


def test_singleton_clusters_and_no_groups_have_nothing_to_blame() -> None:
    net = Net()  # random weights: they differ, but every channel is its own cluster
    singles: Clusters = {g: [[0], [1], [2], [3]] for g in CLUSTERS}
    assert all(v == 0.0 for d in deviations(net, GROUPS, singles).values() for v in d.values())
    assert deviations(net, [], {}) == {}
    why, fix = cause(net, [], {})
    assert "largest relative spread 0.0e+00" in why and "larger tolerance" in fix
