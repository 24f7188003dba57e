"""chi, the kernel deviation (``csgd_cli.core.chi``): what it counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from csgd_cli.core.chi import chi_report
from csgd_cli.core.clustering import cluster_groups, target_widths
from csgd_cli.models import get_model
from csgd_cli.rules.layers import segment_rows
from csgd_cli.tracing.trace import channel_groups


def collapse(model: nn.Module, clusters: dict[str, list[list[int]]], roles=("kernel",)) -> None:
    """Make every cluster's members identical in the given roles' rows (copy the first)."""
    with torch.no_grad():
        for g in channel_groups(model):
            for a, b, blocks in segment_rows(model, g, roles):
                for c in clusters.get(g.name, []):
                    if not a <= c[0] < b:
                        continue
                    for r in blocks:
                        rows = r.tensor.narrow(0, r.row, b - a)
                        for i in c[1:]:
                            rows[i - a].copy_(rows[c[0] - a])


def test_check_counts_the_norms_over_a_concatenation() -> None:
    """A DenseNet BN over the concatenation is pulled by the optimizer, so chi
    (with gamma/beta) must see its slices differ even when every kernel matches."""
    torch.manual_seed(0)
    model = get_model("densenet40", depth=10, growth=4, in_channels=3)
    groups = channel_groups(model)
    clusters = cluster_groups(model, groups, target_widths(groups, 0.5), "even", 0)
    collapse(model, clusters, ("kernel", "affine"))
    assert chi_report(model, groups, clusters, affine=True)["chi"] == pytest.approx(0, abs=1e-20)
    g = next(g for g in groups if g.name == "dense1.0.conv")
    norm = next(m for m in g.members if m.kind == "channel")  # a later BN, at an offset
    assert norm.offset > 0
    with torch.no_grad():  # second member of the first cluster, in that BN only
        dict(model.named_modules())[norm.module].weight[norm.offset + 1] += 0.5
    assert chi_report(model, groups, clusters)["chi"] == pytest.approx(0, abs=1e-20)
    rep = chi_report(model, groups, clusters, affine=True)
    assert rep["groups"][g.name]["chi"] == pytest.approx(0.5**2 / 2)
