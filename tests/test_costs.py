"""``targets.costs``: what a network would cost at other widths, without building it.

A two-conv network whose counts are written out by hand: conv1 (3 -> a, 3x3, bias),
bn1, conv2 (a -> b, 3x3), bn2, a linear head (b -> 5) on a 6x6 input. Per image:

    multiply-adds = 36 a 27 + 36 b a 9 + 5 b = 972 a + 324 a b + 5 b
    parameters    = (27 a + a) + 2 a + 9 a b + 2 b + (5 b + 5) = 30 a + 9 a b + 7 b + 5
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from csgd_cli.common.nets import count_macs, count_params
from csgd_cli.core.clustering import cluster_groups
from csgd_cli.core.surgery import merge
from csgd_cli.rules.groups import ChannelGroup, Member
from csgd_cli.targets.costs import Shapes, TermCost, descend, give_back, macs_cost, params_cost


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


# its channel groups, as tracing finds them (``test_tracing`` covers finding them)
GROUPS = [
    ChannelGroup(
        "conv1", 8, [Member("conv1", "out"), Member("bn1", "channel"), Member("conv2", "in")]
    ),
    ChannelGroup(
        "conv2", 16, [Member("conv2", "out"), Member("bn2", "channel"), Member("fc", "in")]
    ),
]


def macs(a: int, b: int) -> int:
    return 972 * a + 324 * a * b + 5 * b


def params(a: int, b: int) -> int:
    return 30 * a + 9 * a * b + 7 * b + 5


@pytest.fixture(scope="module")
def net() -> tuple[nn.Module, torch.Tensor, list, Shapes]:
    torch.manual_seed(0)
    model, x = Tiny().eval(), torch.randn(2, 3, 6, 6)
    return model, x, GROUPS, Shapes(model, GROUPS, {"conv1", "conv2"})


WIDTHS = [{}, {"conv1": 3}, {"conv2": 5}, {"conv1": 1, "conv2": 1}, {"conv1": 6, "conv2": 11}]


@pytest.mark.parametrize("ks", WIDTHS)
def test_counts_match_the_hand_count_and_the_built_network(net, ks: dict[str, int]) -> None:
    model, x, groups, shapes = net
    a, b = ks.get("conv1", 8), ks.get("conv2", 16)
    flops, size = macs_cost(model, shapes, x), params_cost(model, shapes, x)
    assert flops.exact and size.exact  # every layer here is one a rule knows
    assert (flops.cost(ks), size.cost(ks)) == (macs(a, b), params(a, b))
    thin = merge(model, groups, cluster_groups(model, groups, ks, "even"))
    assert (count_macs(thin, x), count_params(thin)) == (macs(a, b), params(a, b))


def test_shapes_cut_every_tensor_a_group_touches(net) -> None:
    shapes = net[3]
    ks = {"conv1": 3, "conv2": 10}
    assert shapes.shape("conv2.weight", ks) == [10, 3, 3, 3]  # out by conv2, in by conv1
    assert shapes.shape("fc.weight", ks) == [5, 10] and shapes.shape("bn1.weight", ks) == [3]
    assert shapes.shape("conv1.weight", {}) == [8, 3, 3, 3]  # the current widths
    assert shapes.neighbours() == {"conv1": {"conv1", "conv2"}, "conv2": {"conv1", "conv2"}}
    assert shapes.kept("conv2", 0, 16, 4) == 4


def test_a_delta_is_the_difference_of_two_costs(net) -> None:
    model, x, _, shapes = net
    cost = macs_cost(model, shapes, x)
    ks = {"conv1": 5, "conv2": 9}
    for group, k in (("conv1", 2), ("conv2", 14), ("conv1", 5)):
        want = cost.cost({**ks, group: k}) - cost.cost(ks)
        assert cost.delta(ks, group, k) == pytest.approx(want)
    assert cost.delta(ks, "conv2", 7) == macs(5, 7) - macs(5, 9)


def test_a_partial_cost_has_no_constant_and_counts_only_its_terms(net) -> None:
    shapes = net[3]
    only_conv2 = TermCost(shapes, {"conv2.weight": lambda d: float(d[0] * d[1])})
    assert only_conv2.const == 0 and only_conv2.cost({"conv1": 2, "conv2": 3}) == 6
    assert not only_conv2.exact


def ladders(widths: dict[str, int]) -> dict[str, list[int]]:
    return {g: list(range(1, w + 1)) for g, w in widths.items()}


def test_descend_meets_the_budget_taking_the_least_damage_first(net) -> None:
    model, x, _, shapes = net
    cost = macs_cost(model, shapes, x)
    full = {"conv1": 8, "conv2": 16}
    budget = 0.6 * macs(8, 16)
    ks = dict(full)  # conv2's channels cost nothing to lose, conv1's a great deal
    descend(cost, ks, ladders(full), budget, lambda g, k: 0.0 if g == "conv2" else 1e9 * -k)
    assert cost.cost(ks) <= budget and ks["conv1"] == 8
    # it stopped at the first fit (a step is up to 3 rungs: the largest saving at no damage)
    assert cost.cost({**ks, "conv2": ks["conv2"] + 3}) > budget
    ks = dict(full)  # the other way round
    descend(cost, ks, ladders(full), budget, lambda g, k: 0.0 if g == "conv1" else 1e9 * -k)
    assert cost.cost(ks) <= budget and ks["conv2"] == 16


def test_descend_stops_at_the_floor_when_the_budget_is_out_of_reach(net) -> None:
    model, x, _, shapes = net
    cost = macs_cost(model, shapes, x)
    ks = {"conv1": 8, "conv2": 16}
    descend(cost, ks, ladders(ks), 1.0, lambda g, k: -k)
    assert ks == {"conv1": 1, "conv2": 1}


def test_give_back_grows_within_the_budget_the_highest_gain_first(net) -> None:
    model, x, _, shapes = net
    cost = params_cost(model, shapes, x)
    cands = ladders({"conv1": 8, "conv2": 16})
    budget = params(4, 10) + 0.5
    ks = {"conv1": 2, "conv2": 2}
    give_back(cost, ks, cands, budget, lambda g, k, k2, d: 1.0 if g == "conv2" else 0.0)
    assert cost.cost(ks) <= budget
    for g, c in cands.items():  # nothing more fits: it stopped only when it had to
        if ks[g] < c[-1]:
            assert cost.cost({**ks, g: ks[g] + 1}) > budget
    assert ks["conv2"] > ks["conv1"]  # conv2 was grown first, as far as it fits


def test_macs_are_counted_on_timms_pit() -> None:
    """torch's flop counter fails on PiT under no_grad (its module hooks meet a tensor
    that requires grad with no grad_fn): counted with grad on, and as much as an eager
    count of its linears and convs says at least."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("pit_ti_224", img_size=64, num_classes=10)
    macs = count_macs(model, (3, 64, 64))
    assert macs > sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
