"""Channel groups: the one description of a network's coupled channels.

A group is a set of channels that must be clustered together. Its *producers* write
those channels (a conv/linear output, plus the per-channel norm right after it); its
*consumers* read them, at a channel offset: ``input`` consumers (a conv or linear input)
get the cluster's input slices summed at merge time, ``norm`` consumers (a BN over a
concatenation, as in DenseNet) are sliced and also get the centripetal update. Every
stage (cluster, train, chi, merge) works on these and never on a model's own code.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from .errors import CsgdError

Clusters = dict[str, list[list[int]]]


@dataclass(frozen=True)
class Producer:
    conv: str
    norm: str | None = None


@dataclass(frozen=True)
class Consumer:
    module: str
    offset: int = 0
    kind: Literal["input", "norm"] = "input"


@dataclass
class ChannelGroup:
    name: str
    width: int
    producers: list[Producer] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)


def channel_groups(model: nn.Module) -> list[ChannelGroup]:
    """The model's groups, in the order of its ``widths`` spec."""
    fn = getattr(model, "channel_groups", None)
    if fn is None:
        raise CsgdError(
            f"model {type(model).__name__} declares no channel groups",
            "use a model from `csgd_cli.list_models()`",
        )
    return fn()


def select_groups(
    groups: Sequence[ChannelGroup], include: Sequence[str], exclude: Sequence[str] = ()
) -> list[ChannelGroup]:
    """Groups whose names match an ``include`` glob and no ``exclude`` glob."""
    chosen = [
        g
        for g in groups
        if any(fnmatch.fnmatchcase(g.name, p) for p in include)
        and not any(fnmatch.fnmatchcase(g.name, p) for p in exclude)
    ]
    if not chosen:
        names = ", ".join(g.name for g in groups[:6])
        raise CsgdError(
            f"prune.include={list(include)} matches no channel group",
            f"use globs over the group names (e.g. {names}, ...) or '*'",
        )
    return chosen


def check_clusters(groups: Sequence[ChannelGroup], clusters: object, where: str = "") -> None:
    """Refuse clusters that are malformed or do not partition the model's groups' channels.

    ``where`` (e.g. ``"ckpt=x.pt"``) prefixes the message: clusters come from files."""
    fix = "recompute them with `csgd cluster` on this checkpoint"
    pre = f"{where}: " if where else ""
    well_formed = isinstance(clusters, dict) and all(
        isinstance(cl, list)
        and all(isinstance(c, list) and all(isinstance(i, int) for i in c) for c in cl)
        for cl in clusters.values()
    )
    if not well_formed:
        raise CsgdError(f"{pre}its clusters are malformed", fix)
    by_name = {g.name: g for g in groups}
    for name, cl in clusters.items():
        if name not in by_name:
            raise CsgdError(
                f"{pre}clusters name group '{name}', which this model does not have", fix
            )
        flat = sorted(i for c in cl for i in c)
        if flat != list(range(by_name[name].width)) or any(len(c) == 0 for c in cl):
            raise CsgdError(
                f"{pre}clusters of group '{name}' do not partition its {by_name[name].width} channels",
                fix,
            )


def cluster_labels(clusters: list[list[int]], width: int) -> list[int]:
    """Cluster index of each channel."""
    labels = [0] * width
    for c, members in enumerate(clusters):
        for i in members:
            labels[i] = c
    return labels
