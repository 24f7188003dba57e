"""``targets.widths`` (and ``targets.problem``, what a choice works on): per-group widths
that meet a count target on a tiny network whose costs are counted by hand
(``tests.test_costs``), within ``min_width`` and ``round_to``, the same every time."""

from __future__ import annotations

import pytest
import torch

from csgd_cli.common.errors import CsgdError
from csgd_cli.common.nets import count_macs, count_params
from csgd_cli.common.target import Target
from csgd_cli.deploy.latency import Runtime
from csgd_cli.targets.problem import Problem, setup, thin_at, width_share
from csgd_cli.targets.widths import LADDER, _ladder, check_reachable, choose
from tests.test_costs import GROUPS, Tiny, macs, params

BASE = macs(8, 16)


@pytest.fixture(scope="module")
def net() -> tuple[torch.nn.Module, torch.Tensor, list]:
    torch.manual_seed(0)
    model, x = Tiny().eval(), torch.randn(2, 3, 6, 6)
    return model, x, GROUPS


def problem(net, round_to: int = 1, min_width: int = 1, names=("conv1", "conv2")) -> Problem:
    model, x, groups = net
    return Problem(model, groups, list(names), x, round_to, min_width, Runtime(), None)


@pytest.mark.parametrize("rule", ["distortion", "uniform"])
@pytest.mark.parametrize("value", [0.3, 0.5, 0.8])
def test_a_flops_target_is_met_closely_and_the_count_is_the_built_networks(
    net, rule: str, value: float
) -> None:
    choice = choose(problem(net), Target.parse(f"flops:{value}"), rule)
    a, b = choice.widths["conv1"], choice.widths["conv2"]
    rep = choice.report
    assert rep["met"] and rep["reached"] == macs(a, b) <= value * BASE
    for up in ({"conv1": a + 1, "conv2": b}, {"conv1": a, "conv2": b + 1}):  # given back:
        if up["conv1"] <= 8 and up["conv2"] <= 16:  # no group can take one more channel
            assert macs(up["conv1"], up["conv2"]) > value * BASE
    assert count_macs(thin_at(problem(net), choice.widths), net[1]) == macs(a, b)
    assert (rep["base"], rep["now"], rep["before"]) == (BASE, BASE, {"conv1": 8, "conv2": 16})


def test_a_params_target_counts_parameters(net) -> None:
    choice = choose(problem(net), Target.parse("params:0.4"))
    a, b = choice.widths["conv1"], choice.widths["conv2"]
    assert choice.report["reached"] == params(a, b) <= 0.4 * params(8, 16)
    assert count_params(thin_at(problem(net), choice.widths)) == params(a, b)


def test_min_width_and_round_to_bound_every_width(net) -> None:
    for round_to, min_width in ((4, 4), (1, 6), (8, 1)):
        p = problem(net, round_to, min_width)
        choice = choose(p, Target.parse("flops:0.6"))
        assert choice.report["met"]
        for g, k in choice.widths.items():
            full = {"conv1": 8, "conv2": 16}[g]
            assert k >= min(min_width, full) and (k % round_to == 0 or k == full), (g, k)
    _, cands = setup(problem(net, 4, 4), Target.parse("flops:0.5"))
    assert cands == {"conv1": [4, 8], "conv2": [4, 8, 12, 16]}


def test_the_same_problem_gives_the_same_widths(net) -> None:
    first = choose(problem(net), Target.parse("flops:0.45"), seed=3)
    again = choose(problem(net), Target.parse("flops:0.45"), seed=3)
    assert first.widths == again.widths and first.report["reached"] == again.report["reached"]


def test_only_the_allowed_groups_shrink(net) -> None:
    choice = choose(problem(net, names=["conv2"]), Target.parse("flops:0.5"))
    assert set(choice.widths) == {"conv2"}
    assert choice.report["reached"] == macs(8, choice.widths["conv2"]) <= 0.5 * BASE


def test_a_round_aims_at_the_base_cost_it_is_given(net) -> None:
    """An iterative round on a network already at 60% of its base: the target is a share
    of the base's cost, and a round already there keeps every width."""
    choice = choose(problem(net), Target.parse("flops:0.5"), base_cost=BASE / 0.6)
    assert choice.report["reached"] <= 0.5 * BASE / 0.6 < BASE
    there = choose(problem(net), Target.parse("flops:0.9"), base_cost=BASE / 0.6)
    assert there.widths == {"conv1": 8, "conv2": 16}


def test_an_unreachable_target_names_the_floor(net) -> None:
    floor = macs(4, 4) / BASE
    for call in (
        lambda: choose(problem(net, 4, 4), Target.parse("flops:0.05")),
        lambda: check_reachable(problem(net, 4, 4), Target.parse("flops:0.05")),
    ):
        with pytest.raises(CsgdError, match=rf"smallest reachable is flops:{floor:.4g} "):
            call()
    check_reachable(problem(net, 4, 4), Target.parse(f"flops:{floor + 0.01}"))  # no error


def test_an_unknown_rule_is_refused(net) -> None:
    with pytest.raises(CsgdError, match=r"rule=magic is unknown.*distortion\|uniform"):
        choose(problem(net), Target.parse("flops:0.5"), rule="magic")


def test_width_share_and_the_ladder() -> None:
    assert width_share({"a": 8, "b": 16}, {"a": 4}) == 0.5
    assert width_share({"a": 8, "b": 16}, {"a": 2, "b": 4}) == 0.25
    cands = list(range(1, 201))
    rungs = _ladder(cands)
    assert len(rungs) <= LADDER and rungs[0] == 1 and rungs[-1] == 200  # the current width
    assert rungs == sorted(set(rungs)) and _ladder([1, 2, 3]) == [1, 2, 3]
