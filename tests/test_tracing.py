"""Traced channel groups: the coupling kinds, exclusions with reasons, agreement with
the hand-declared groups, caching, and one-line errors for bad models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from csgd_cli.common.errors import CsgdError
from csgd_cli.models import get_model
from csgd_cli.rules.base import LayerRule
from csgd_cli.rules.groups import Member
from csgd_cli.tracing.trace import channel_groups, traced_groups
from tests.tracing_models import Grouped, Mixed, Shuffle, Untraceable


def members(g) -> set[tuple[str, str, int]]:
    return {(m.module, m.kind, m.offset) for m in g.members}


def by_name(groups) -> dict:
    return {g.name: g for g in groups}


def test_mixed_model_couplings() -> None:
    gs = by_name(traced_groups(Mixed()))
    assert set(gs) == {"stem", "b", "c", "se.squeeze", "head"}  # no group for the logits
    assert all(g.excluded is None for g in gs.values())
    # residual add: the stem and the projection write one group, BNs after both
    assert members(gs["stem"]) == {
        ("stem", "out", 0), ("bn0", "channel", 0), ("proj", "out", 0),
        ("bn2", "channel", 0), ("b", "in", 0), ("c", "in", 0), ("head", "in", 0),
    }  # fmt: skip
    # concatenation: c's channels sit at offset 16 of the depthwise conv, its BN, the
    # SE's expanding conv (a per-channel scale: an ``out`` member) and the readers
    assert members(gs["c"]) == {
        ("c", "out", 0), ("dw", "channel", 16), ("bn1", "channel", 16),
        ("se.expand", "out", 16), ("se.squeeze", "in", 16), ("proj", "in", 16),
    }  # fmt: skip
    assert (gs["b"].width, gs["c"].width) == (16, 8)
    assert ("dw", "channel", 0) in members(gs["b"])
    # flatten of a 2x2 map into the classifier: 4 columns per channel
    fc = next(m for m in gs["head"].members if m.module == "fc")
    assert fc == Member("fc", "in", 0, 0, None, 4)


def test_grouped_conv_groups_are_excluded_with_reasons() -> None:
    gs = by_name(traced_groups(Grouped()))
    assert gs["conv1"].excluded == "input of grouped conv 'conv2' (groups=2)"
    assert gs["conv2"].excluded == "output of grouped conv 'conv2' (groups=2)"
    assert gs["conv3"].excluded is None


def test_shuffle_and_groupnorm_are_excluded() -> None:
    gs = by_name(traced_groups(Shuffle()))
    assert "reshape" in gs["conv1"].excluded
    assert gs["conv2"].excluded == "GroupNorm 'gn' has no per-channel merge rule"
    assert gs["conv3"].excluded is None


@pytest.mark.parametrize(
    ("name", "kw"),
    [
        ("resnet20", {}),
        ("vgg11", {"in_channels": 1, "image_size": 8}),
        ("densenet40", {"depth": 16, "growth": 6, "image_size": 16}),
    ],
)
def test_traced_groups_equal_declared(name: str, kw: dict) -> None:
    """Hand-written declarations and the tracer check each other: every declared group
    is traced with the same members; the tracer adds only hidden linear layers."""
    model = get_model(name, **kw)
    declared = {frozenset(members(g)): g.width for g in model.channel_groups()}
    traced = traced_groups(model)
    found = {frozenset(members(g)): g.width for g in traced}
    assert {k: found.get(k) for k in declared} == declared
    extra = [g for g in traced if frozenset(members(g)) not in declared]
    assert all(m.module.startswith("classifier") for g in extra for m in g.of_kind("out"))


def test_resnet164_preactivation_coupling() -> None:
    model = get_model("resnet164", depth=20)  # 2 bottlenecks per stage
    gs = by_name(channel_groups(model))
    stage1 = next(g for g in gs.values() if ("layer1.0.shortcut", "out", 0) in members(g))
    # the stream is written by the shortcut and every conv3, normalised by every later
    # block's first BN (a per-channel member) and read by the next stage's first block
    assert {
        ("layer1.0.conv3", "out", 0), ("layer1.1.conv3", "out", 0),
        ("layer1.1.bn1", "channel", 0), ("layer2.0.bn1", "channel", 0),
        ("layer1.1.conv1", "in", 0), ("layer2.0.conv1", "in", 0),
        ("layer2.0.shortcut", "in", 0),
    } <= members(stage1)  # fmt: skip
    assert members(gs["conv1"]) == {
        ("conv1", "out", 0), ("layer1.0.bn1", "channel", 0),
        ("layer1.0.conv1", "in", 0), ("layer1.0.shortcut", "in", 0),
    }  # fmt: skip
    assert members(gs["layer1.0.conv1"]) == {
        ("layer1.0.conv1", "out", 0),
        ("layer1.0.bn2", "channel", 0),
        ("layer1.0.conv2", "in", 0),
    }
    assert sum(p.numel() for p in get_model("resnet164").parameters()) == 1_703_258


def test_groups_are_cached_until_shapes_change() -> None:
    model = Mixed()
    first = traced_groups(model)
    assert traced_groups(model) == first  # from the cache
    model.head = torch.nn.Conv2d(8, 12, 3, stride=2, padding=1)
    model.fc = torch.nn.Linear(12 * 4, 10)
    assert by_name(traced_groups(model))["head"].width == 12  # re-traced


def test_untraceable_forward_is_one_line() -> None:
    with pytest.raises(CsgdError, match="cannot trace model Untraceable") as e:
        traced_groups(Untraceable())
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("name", "kw", "words"),
    [
        ("resnet_nope", {}, "unknown model 'resnet_nope'"),
        ("custom", {"target": "tests.tracing_models.nothing_here"}, "does not import"),
        ("custom", {"target": "no_such_package.net"}, "does not import"),
        ("custom", {"target": "tests.tracing_models.not_a_module"}, "not an nn.Module"),
        ("custom", {}, "needs model._target_"),
    ],
)
def test_bad_models_are_one_line_errors(name: str, kw: dict, words: str) -> None:
    with pytest.raises(CsgdError, match=words):
        get_model(name, **kw)


def test_torchvision_fallback_and_prefix() -> None:
    m = get_model("torchvision.vgg11", num_classes=7, image_size=32)
    assert m.arch["name"] == "torchvision.vgg11" and m.classifier[-1].out_features == 7
    assert type(get_model("vgg11")).__name__ == "CifarVGG"  # csgd's own wins unprefixed
    sq = get_model("squeezenet1_1", in_channels=1, num_classes=5, image_size=64)
    assert sq.features[0].in_channels == 1
    assert sq(torch.randn(2, 1, 64, 64)).shape == (2, 5)


# -- a new layer kind needs only its rule ---------------------------------------------------
class Dense(torch.nn.Module):
    """A layer kind csgd has never seen (no torch layer class): y = x W^T + b."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.bias = torch.nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)


def _dense_rule() -> LayerRule:
    def tensors(m: torch.nn.Module, kind: str) -> list:
        if kind == "in":
            return [("weight", 1, "kernel")]
        return [("weight", 0, "kernel"), ("bias", 0, "affine")]

    return LayerRule(
        "dense", lambda m: isinstance(m, Dense), lambda m, out: "out" if out else "in",
        tensors, lambda m, sd, p: None, frozenset({"AddmmBackward"}), weighted=True,
        channel_dim=-1,
    )  # fmt: skip


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        Dense(6, 16), torch.nn.ReLU(), Dense(16, 12), torch.nn.BatchNorm1d(12), Dense(12, 3)
    )


def test_a_new_layer_kind_is_traced_trained_and_merged_by_its_rule_alone(monkeypatch) -> None:
    """One rule in the table, no other change: the tracer finds its groups (producer,
    per-channel and reader members), C-SGD trains them, and the merge is exact."""
    import csgd_cli as csgd
    from csgd_cli.rules import layers

    x = torch.randn(32, 6)
    assert traced_groups(_mlp(), x[:1]) == []  # without a rule: no layer csgd knows
    monkeypatch.setattr(layers, "RULES", [_dense_rule(), *layers.RULES])
    model = _mlp()
    gs = by_name(traced_groups(model, x[:1]))
    assert members(gs["0"]) == {("0", "out", 0), ("2", "in", 0)}
    assert members(gs["2"]) == {("2", "out", 0), ("3", "channel", 0), ("4", "in", 0)}
    assert all(g.excluded is None for g in gs.values()) and set(gs) == {"0", "2"}
    pruner = csgd.CSGD(model, x[:4], ratio=0.5, clustering="even")
    opt = pruner.optimizer(lr=0.05, epsilon=10.0, norm_epsilon=10.0, momentum=0.0, weight_decay=0.0)
    y = torch.randint(0, 3, (32,))
    for _ in range(80):  # each step halves the members' differences
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    thin = pruner.merge(x, tolerance=1e-5)
    assert pruner.merge_report["top1_agreement"] == 1.0
    assert [tuple(thin[i].weight.shape) for i in (0, 2, 4)] == [(8, 6), (6, 8), (3, 6)]
    torch.testing.assert_close(thin(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_walk_past_the_cpu_time_deadline_stops_in_one_line(monkeypatch) -> None:
    """The deadline counts the tracer's CPU time (a busy machine is no cause): past it,
    one line that names the group and the fix."""
    import csgd_cli.tracing.trace as trace_mod

    monkeypatch.setattr(trace_mod, "TRACE_SECONDS", -1.0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    with pytest.raises(CsgdError, match=r"tracing stopped after .* of CPU time in the group"):
        trace_mod.channel_groups(model, torch.randn(1, 3, 8, 8))


# -- indices through an op no map follows ----------------------------------------------------
def test_flatten_keeps_an_index_past_its_channels_one_row() -> None:
    """An index at or past the map's channels came through an op no map follows: it stays
    past the columns as one row, where ``n`` rows each would make the walk quadratic."""
    import numpy as np

    from csgd_cli.tracing.walk import Flatten

    rows = np.array([[0, 0], [1, 1], [5, 2]])
    out = Flatten(3, channels=2)(rows)
    assert out.tolist() == [[0, 0], [1, 0], [2, 0], [3, 1], [4, 1], [5, 1], [15, 2]]
    assert len(Flatten(3)(rows)) == 9  # without a channel count: every index expands
    assert Flatten(3, back=True)(out).tolist() == [[0, 0], [1, 1], [5, 2]]


class SplitAttention(nn.Module):
    """ResNeSt's radix softmax: the channels viewed as (cardinality, radix, rest) and
    softmaxed over the radix, then flattened back; a 1x1 conv reads the gate."""

    def __init__(self, c: int = 32) -> None:
        super().__init__()
        self.conv, self.fc, self.out = nn.Conv2d(3, c, 1), nn.Conv2d(c, c, 1), nn.Conv2d(c, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.fc(self.conv(x).mean((2, 3), keepdim=True))
        b = a.size(0)
        gate = a.view(b, 1, 2, -1).transpose(1, 2).softmax(dim=1).reshape(b, -1)
        return self.out(gate.view(b, -1, 1, 1))


def test_a_radix_softmax_is_walked_in_linear_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gate's group is excluded for the view no map follows; the walk carries at most
    two rows per channel and node (it carried one per channel pair: 25,088 rows here;
    ResNeSt-50's trace took 48 s of CPU, now 13 s)."""
    from csgd_cli.tracing import trace, walk

    carried: dict[str, tuple[int, int]] = {}

    def counting(graph, module):
        out = walk.walk(graph, module)
        carried[graph.names[module]] = (sum(len(p) for _, _, p in out), len(out))
        return out

    monkeypatch.setattr(trace, "walk", counting)
    c = 128
    groups = {g.name: g for g in channel_groups(SplitAttention(c), torch.randn(2, 3, 8, 8))}
    assert groups["fc"].excluded and "reshape/view" in groups["fc"].excluded
    rows, nodes = carried["fc"]
    assert rows <= 2 * nodes * c, carried
