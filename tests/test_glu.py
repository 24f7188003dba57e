"""Gated MLPs that pack the gate and the value in one layer (``rules/splits.py``): timm's
``GluMlp`` (``SwiGLUPacked``) and transformers' ``gate_up_proj`` MLPs chunk the layer's
output in two halves, so group channel ``i`` is rows ``i`` and ``i + h`` of the packed
layer; C-SGD pulls both together and the merge keeps ``k`` rows of each half, exactly (the
l1 criterion scores both rows, the cost model counts ``2 k``). A
split at a size fixed in the code, an undeclared subclass and a LayerNorm over the hidden
channels stay excluded with their reasons."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from csgd_cli.api.pruner import CSGD
from csgd_cli.baselines.criteria import select
from csgd_cli.common.nets import count_macs, count_params
from csgd_cli.core.clustering import num_clusters
from csgd_cli.core.surgery import merge
from csgd_cli.rules.groups import ChannelGroup, Member
from csgd_cli.rules.splits import split_rule_for
from csgd_cli.targets.costs import Shapes, macs_cost, params_cost
from csgd_cli.tracing.trace import channel_groups

timm = pytest.importorskip("timm")
GluMlp = timm.layers.GluMlp


def chunk_pieces(m: nn.Module) -> int | None:
    """The pieces a split rule declares for ``m`` (None: no chunk declared)."""
    rule = split_rule_for(m)
    return rule.pieces if rule is not None else None


class _Net(nn.Module):
    """A gated MLP between two linear layers (or 1x1 convs: ``use_conv``)."""

    def __init__(self, mlp: nn.Module, conv: bool = False) -> None:
        super().__init__()
        layer = (lambda i, o: nn.Conv2d(i, o, 1)) if conv else nn.Linear
        self.a, self.mlp, self.b = layer(8, 16), mlp, layer(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.mlp(self.a(x)))


class _FixedSplit(nn.Module):
    """GluMlp's shapes, but halves cut at a size written in the code: not declared."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.fc1(x).split(16, dim=-1)
        return self.fc2(a * nn.functional.silu(b))


class _Sub(GluMlp):
    """A subclass may change the forward: not the class declared."""


def _net(mlp: nn.Module, conv: bool = False) -> _Net:
    torch.manual_seed(0)
    net = _Net(mlp, conv)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.5)
    return net.double()


def _group(net: nn.Module, x: torch.Tensor, name: str) -> ChannelGroup:
    return next(g for g in channel_groups(net, x) if g.name == name)


@pytest.mark.parametrize("gate_last", [True, False])
def test_glu_mlp_hidden_group_pairs_rows_i_and_i_plus_half(gate_last: bool) -> None:
    net = _net(GluMlp(16, 32, act_layer=nn.SiLU, gate_last=gate_last))
    g = _group(net, torch.randn(2, 5, 8, dtype=torch.float64), "mlp.fc1")
    assert g.excluded is None and g.width == 16
    assert g.members == [
        Member("mlp.fc1", "out", 0), Member("mlp.fc1", "out", 16), Member("mlp.fc2", "in", 0)
    ]  # fmt: skip


def _pulled_and_merged(net: nn.Module, x: torch.Tensor, mlp: str) -> nn.Module:
    """C-SGD through the public API (lr x epsilon = 1 without momentum collapses every
    cluster in a step), then the merge, which must leave the outputs where they were."""
    pruner = CSGD(net, x, ratio=0.5, clustering="kmeans")
    assert mlp in pruner.clusters
    opt = pruner.optimizer(1e-3, epsilon=1e3, norm_epsilon=1e3, momentum=0.0, weight_decay=0.0)
    for _ in range(2):
        loss = net(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert pruner.chi() <= 1e-20
    thin = pruner.merge(x, tolerance=1e-5)
    with torch.no_grad():
        a, b = net(x), thin(x)
    assert float((a - b).abs().max() / a.abs().max()) <= 1e-5
    return thin


@pytest.mark.parametrize("gate_last", [True, False])
def test_csgd_merges_a_glu_mlp_exactly_keeping_k_rows_of_each_half(gate_last: bool) -> None:
    net = _net(GluMlp(16, 32, act_layer=nn.SiLU, gate_last=gate_last))
    x = torch.randn(4, 5, 8, dtype=torch.float64)
    thin = _pulled_and_merged(net, x, "mlp.fc1")
    k = num_clusters(16, 0.5)
    assert (thin.mlp.fc1.out_features, thin.mlp.fc2.in_features) == (2 * k, k)


def test_l1_scores_both_halves_of_a_channel_and_the_cost_model_counts_2k_rows() -> None:
    net = _net(GluMlp(16, 32, act_layer=nn.SiLU))
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    groups = channel_groups(net, x)
    clusters = select("l1", net, groups, {"mlp.fc1": 5})
    keep = [c[0] for c in clusters["mlp.fc1"]]
    w = net.mlp.fc1.weight.detach()
    norms = w[:16].abs().sum(1) + w[16:].abs().sum(1)  # a channel's rows in both halves
    assert keep == sorted(norms.topk(5).indices.tolist())
    thin = merge(net, groups, clusters, partial=True)
    assert torch.equal(thin.mlp.fc1.weight, torch.cat([w[keep], w[[16 + i for i in keep]]]))
    shapes = Shapes(net, groups, {g.name for g in groups})
    assert params_cost(net, shapes, x).cost({"mlp.fc1": 5}) == count_params(thin)
    assert macs_cost(net, shapes, x).cost({"mlp.fc1": 5}) == count_macs(thin, x)


def test_a_conv_glu_mlp_chunks_along_dim_1_and_merges_exactly() -> None:
    net = _net(GluMlp(16, 32, act_layer=nn.Sigmoid, use_conv=True), conv=True)
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    assert _group(net, x, "mlp.fc1").excluded is None
    assert _pulled_and_merged(net, x, "mlp.fc1").mlp.fc1.out_channels == 2 * num_clusters(16, 0.5)


def test_phi3_style_gate_up_proj_merges_exactly() -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.models.phi3.modeling_phi3 import Phi3MLP

    cfg = transformers.Phi3Config(hidden_size=16, intermediate_size=12, hidden_act="silu")
    net = _net(Phi3MLP(cfg))
    x = torch.randn(4, 5, 8, dtype=torch.float64)
    g = _group(net, x, "mlp.gate_up_proj")
    assert g.excluded is None and g.width == 12
    thin = _pulled_and_merged(net, x, "mlp.gate_up_proj")
    assert thin.mlp.gate_up_proj.out_features == 2 * num_clusters(12, 0.5)


def test_a_fixed_split_or_an_undeclared_subclass_stays_refused() -> None:
    x = torch.randn(2, 5, 8)
    assert chunk_pieces(GluMlp(16, 32)) == 2 and chunk_pieces(_Sub(16, 32)) is None
    assert chunk_pieces(_FixedSplit()) is None
    for mlp, cls in ((_FixedSplit(), "_FixedSplit"), (_Sub(16, 32), "_Sub")):
        g = _group(_Net(mlp), x, "mlp.fc1")
        assert g.excluded == f"channels split at sizes fixed in the forward code in 'mlp' ({cls})"


def test_a_layernorm_over_the_hidden_channels_stays_excluded_for_its_own_reason() -> None:
    net = _Net(GluMlp(16, 32, act_layer=nn.SiLU, norm_layer=nn.LayerNorm))
    g = _group(net, torch.randn(2, 5, 8), "mlp.fc1")
    assert g.excluded is not None
    assert g.excluded.startswith("LayerNorm 'mlp.norm' normalises over the channels")


class _TokensCat(nn.Module):
    """Two linear layers' tokens concatenated along ``dim=-1``: autograd saves -1 as
    ``2**64 - 1``, which read modulo 3 was dim 0 (the batch), not the channels."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 6), nn.Linear(8, 4), nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.cat([self.a(x), self.b(x)], dim=-1)).mean(1)


def test_a_negative_dim_on_tokens_is_the_channels_dim() -> None:
    net = _TokensCat().double()
    x = torch.randn(4, 5, 8, dtype=torch.float64)
    groups = {g.name: g for g in channel_groups(net, x)}
    assert groups["a"].members == [Member("a", "out"), Member("c", "in")]
    assert groups["b"].members == [Member("b", "out"), Member("c", "in", 6)]
    thin = _pulled_and_merged(net, x, "a")
    assert (thin.a.out_features, thin.b.out_features, thin.c.in_features) == (3, 2, 5)
