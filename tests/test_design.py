"""Widths rounded to a multiple (``core.clustering``): the last test of the design pass,
to join tests/test_clustering.py (another session's file) once that exists. The rest
moved to the files of their units (test_stages, test_cli, test_optim, test_iterative,
test_chi, test_e2e_stages, test_report, test_data)."""

from __future__ import annotations

from csgd_cli.core.clustering import num_clusters, target_widths
from csgd_cli.models import get_model
from csgd_cli.rules.groups import ChannelGroup
from csgd_cli.tracing.trace import channel_groups


def test_round_to_widths() -> None:
    assert [num_clusters(w, 0.625, 16) for w in (16, 32, 64)] == [16, 16, 32]  # 40: a tie
    assert [num_clusters(w, 0.625, 8) for w in (16, 32, 64)] == [8, 16, 40]  # 20: a tie
    assert num_clusters(64, 0.7, 16) == 48 and num_clusters(256, 0.7, 16) == 176
    assert num_clusters(8, 0.5, 16) == 8  # narrower than the block: stays whole
    assert num_clusters(20, 0.9, 16) == 16  # never above the width, a multiple when it can
    assert num_clusters(64, 0.05, 16) == 16  # at least one block
    model = get_model("resnet56")
    groups = channel_groups(model)
    thin = target_widths(groups, 0.5, {g.name: g.width for g in groups}, round_to=16)
    assert all(w % 16 == 0 for w in thin.values())
    # an iterative round on a thinned model keeps the multiple and never grows a group
    shrunk = [ChannelGroup(g.name, thin[g.name], g.members) for g in groups]
    again = target_widths(shrunk, 0.25, {g.name: g.width for g in groups}, round_to=16)
    assert all(w % 16 == 0 and w <= thin[k] for k, w in again.items())
