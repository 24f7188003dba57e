"""Merging: exact on converged clusters (coupled stages included), widths, FLOPs."""

from __future__ import annotations

import pytest
import torch

from csgd_cli.common.nets import count_macs
from csgd_cli.core.chi import chi_report
from csgd_cli.core.clustering import cluster_groups, num_clusters, target_widths
from csgd_cli.core.surgery import merge
from csgd_cli.models import get_model
from csgd_cli.tracing.trace import channel_groups


def collapse(model: torch.nn.Module, clusters: dict) -> None:
    """Make every cluster hold exact copies (what converged C-SGD produces)."""
    mods = dict(model.named_modules())
    with torch.no_grad():
        for g in channel_groups(model):
            tensors = []
            for p in g.producers:
                tensors.append(mods[p.conv].weight)
                if p.norm:
                    bn = mods[p.norm]
                    tensors += [bn.weight, bn.bias, bn.running_mean, bn.running_var]
            for c in g.consumers:
                if c.kind == "norm":
                    bn = mods[c.module]
                    tensors += [
                        t[c.offset : c.offset + g.width]
                        for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)
                    ]
            for t in tensors:
                if t.dim() == 1:
                    t.uniform_(0.5, 1.5)  # non-trivial BN so a wrong merge shows
            for t in tensors:
                for members in clusters[g.name]:
                    t[members] = t[members[0]].clone()


@pytest.mark.parametrize(
    ("name", "kw", "shape"),
    [
        ("resnet20", {}, (3, 32, 32)),
        ("resnet56", {}, (3, 32, 32)),
        ("vgg11", {"in_channels": 1, "image_size": 8}, (1, 8, 8)),
        ("densenet40", {"depth": 16, "growth": 6}, (3, 16, 16)),
    ],
)
def test_merge_of_exact_copies_is_exact(name: str, kw: dict, shape: tuple) -> None:
    torch.manual_seed(0)
    model = get_model(name, **kw).double().eval()
    groups = channel_groups(model)
    method = "kmeans" if name.startswith("resnet") else "even"  # k-means on VGG-16 is slow
    clusters = cluster_groups(model, groups, target_widths(groups, 0.625), method, 0)
    collapse(model, clusters)
    assert chi_report(model, groups, clusters)["chi"] == 0.0
    thin = merge(model, groups, clusters).eval()
    assert type(thin) is type(model)
    x = torch.randn(6, *shape, dtype=torch.float64)
    a, b = model(x), thin(x)
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    assert thin.widths == [num_clusters(g.width, 0.625) for g in groups]


def test_merge_is_not_exact_without_copies() -> None:
    """Guards the test above: an unconverged model changes when merged."""
    torch.manual_seed(0)
    model = get_model("resnet20").double().eval()
    groups = channel_groups(model)
    clusters = cluster_groups(model, groups, target_widths(groups, 0.5), "even", 0)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    assert (model(x) - merge(model, groups, clusters).eval()(x)).abs().max() > 1e-3


def test_resnet56_five_eighths_flops_match_paper() -> None:
    model = get_model("resnet56")
    groups = channel_groups(model)
    clusters = cluster_groups(model, groups, target_widths(groups, 0.625), "even", 0)
    thin = merge(model, groups, clusters)
    stage = [w for w in thin.widths[:3]]
    assert stage == [10, 20, 40]
    reduction = 1 - count_macs(thin, (3, 32, 32)) / count_macs(model, (3, 32, 32))
    assert abs(100 * reduction - 60.85) < 0.1


class _Ranker(torch.nn.Module):
    """Ends in a discrete choice (a stable argsort of its scores, as a detector's top-k
    or NMS): scores that are tied but for rounding can come out in another order."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 16, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.conv2(torch.relu(self.bn1(self.conv1(x)))).mean((2, 3))
        order = y.argsort(dim=1, stable=True)  # integer: as a detector's labels
        return {"order": order, "scores": y.gather(1, order)}


def test_a_merge_exact_up_to_a_flipped_tie_passes_and_a_wrong_one_does_not() -> None:
    """The final outputs differ (rounding flipped tied scores), every layer's output
    agrees: the merge is accepted and says so. An unconverged merge is still refused."""
    from csgd_cli.common.errors import CsgdError
    from csgd_cli.core.surgery import merge_checked

    torch.manual_seed(0)
    model = _Ranker().eval()
    x = torch.randn(64, 3, 8, 8)
    groups = channel_groups(model, x)
    g = next(g for g in groups if g.name == "conv1")
    clusters = {g.name: [[i, i + 4] for i in range(4)]}
    with torch.no_grad():  # row 2k+1 reads each cluster's members swapped: tied scores
        w = model.conv2.weight
        for k in range(8):
            for a, b in clusters[g.name]:
                w[2 * k + 1, a], w[2 * k + 1, b] = w[2 * k, b].clone(), w[2 * k, a].clone()
        model.conv2.bias[1::2] = model.conv2.bias[0::2]
    with pytest.raises(CsgdError, match="merge check failed"):
        merge_checked(model, [g], clusters, x, tolerance=1e-4)  # members still differ
    bn = model.bn1
    with torch.no_grad():
        for t in (model.conv1.weight, model.conv1.bias, bn.weight, bn.bias, bn.running_mean,
                  bn.running_var):  # fmt: skip
            for a, b in clusters[g.name]:
                t[b] = t[a]
    thin, rep = merge_checked(model, [g], clusters, x, tolerance=1e-4)
    assert rep["relative_logit_diff"] > 1e-4  # the order of some tied scores flipped
    assert rep["outputs_after_ties"] and rep["inner_relative_diff"] <= 1e-4
    assert rep["inner_outputs"] == 1 and thin.conv1.out_channels == 4  # conv2's, unresized
    from csgd_cli.api.pruner import CSGD

    assert CSGD(model, x, clusters=clusters).ready()  # ready() is the merge's own verdict
