"""Channel groups: the one description of a network's coupled channels.

A group is a set of channels that must be clustered together. Its *members* are the
layers that touch those channels, each of one of three kinds:

- ``out``: a conv/linear whose output rows write the channels (a *producer*): sliced at
  merge, centripetal. Producers may write only a segment of the group (a concatenation
  of two convs that a per-channel layer then couples); clusters never cross segments.
- ``channel``: a per-channel layer over the channels (a BN, a depthwise conv, a BN over a
  concatenation at an offset): sliced at merge, centripetal.
- ``in``: a conv/linear that reads the channels as inputs: the cluster's input slices
  are summed into the kept one at merge. ``repeat`` > 1 is a linear layer after a
  ``flatten`` of a map larger than 1x1, where each channel owns ``repeat`` columns.

A group channel may be a *block* of a member's rows or input channels (``block`` > 1):
a whole attention head is ``head_dim`` rows of its q, k and v and ``head_dim`` input
columns of the projection, so a group of heads clusters, pulls and merges heads as
units through the same members. Two groups that share rows (an attention's heads and
its head channels) cannot both be pruned at once: the one with ``yields_to`` set is
left out by ``select_groups`` when the group it names is chosen too.

This module is the vocabulary only (no layer is looked at here): which tensors a member
touches, per layer kind, is ``csgd_cli.rules.layers``; finding a model's groups (declared or
traced) is ``csgd_cli.tracing``.
"""

from __future__ import annotations

import fnmatch
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from ..common.errors import CsgdError

Clusters = dict[str, list[list[int]]]
Kind = Literal["out", "channel", "in"]


@dataclass(frozen=True)
class Member:
    module: str
    kind: Kind
    offset: int = 0  # first channel of the module's dimension that belongs to the group
    start: int = 0  # first group channel this member covers
    length: int | None = None  # group channels covered (None: from start to the end)
    repeat: int = 1  # ``in`` only: input columns per channel (flatten of an HxW map)
    # ``out`` only: a cluster's rows are summed into the kept one, not sliced (a query
    # channel of attention: q_i k_i + q_j k_j = 2 q_i k_i once q_j = q_i and k_j = k_i)
    summed: bool = False
    # group channel i is rows (columns, for ``in``) [offset + (i - start) * block, + block)
    # of the member's dimension: a whole attention head is ``head_dim`` rows
    block: int = 1

    def span(self, width: int) -> tuple[int, int]:
        """(first, end) group channels this member covers."""
        return self.start, self.start + (width - self.start if self.length is None else self.length)


class Producer(NamedTuple):
    conv: str
    norm: str | None = None


class Consumer(NamedTuple):
    module: str
    offset: int = 0
    kind: Literal["input", "norm"] = "input"


@dataclass
class ChannelGroup:
    name: str
    width: int
    members: list[Member] = field(default_factory=list)
    excluded: str | None = None  # why this group cannot be merged exactly (never pruned)
    # the name of a group sharing this one's rows (an attention's head channels, for its
    # heads): when both are chosen, this one is left out (prune one at a time)
    yields_to: str | None = None

    @property
    def producers(self) -> list[Producer]:
        """Read-only view: each ``out`` member with the norm declared right after it."""
        out, ms = [], self.members
        for i, m in enumerate(ms):
            if m.kind == "out":
                nxt = ms[i + 1] if i + 1 < len(ms) else None
                paired = nxt is not None and nxt.kind == "channel" and nxt.offset == 0
                out.append(Producer(m.module, nxt.module if paired else None))
        return out

    @property
    def consumers(self) -> list[Consumer]:
        """Read-only view: readers (``input``) and per-channel layers at an offset that
        are not a producer's own norm (``norm``, e.g. a BN over a concatenation)."""
        own = {p.norm for p in self.producers}
        return [
            Consumer(m.module, m.offset, "input" if m.kind == "in" else "norm")
            for m in self.members
            if m.kind == "in" or (m.kind == "channel" and m.module not in own)
        ]

    def of_kind(self, *kinds: Kind) -> list[Member]:
        return [m for m in self.members if m.kind in kinds]

    def segments(self) -> list[tuple[int, int]]:
        """Contiguous channel ranges written by the same producers and read by the same
        readers: clusters stay inside one (two channels merge exactly only if computed the
        same way from one input, and only a reader that sees both can sum them)."""
        cuts = {0, self.width}
        for m in self.members:  # ``in`` too: each piece of a split has its own readers
            cuts.update(m.span(self.width))
        edges = sorted(c for c in cuts if 0 <= c <= self.width)
        return list(itertools.pairwise(edges))


def producer(conv: str, norm: str | None = None) -> list[Member]:
    """A conv writing the group's channels, and the norm right after it."""
    return [Member(conv, "out")] + ([Member(norm, "channel")] if norm else [])


def reader(module: str, offset: int = 0, norm: str | None = None) -> list[Member]:
    """A conv/linear reading the channels at ``offset`` (and a BN over its input)."""
    # the reader first: a norm right after an ``out`` member is that producer's own
    return [Member(module, "in", offset)] + ([Member(norm, "channel", offset)] if norm else [])


def prunable(groups: Sequence[ChannelGroup]) -> list[ChannelGroup]:
    return [g for g in groups if g.excluded is None]


def select_groups(
    groups: Sequence[ChannelGroup], include: Sequence[str], exclude: Sequence[str] = ()
) -> list[ChannelGroup]:
    """Prunable groups whose names match an ``include`` glob and no ``exclude`` glob; a
    group that ``yields_to`` another chosen group is left out (they share rows)."""
    chosen = [
        g
        for g in prunable(groups)
        if any(fnmatch.fnmatchcase(g.name, p) for p in include)
        and not any(fnmatch.fnmatchcase(g.name, p) for p in exclude)
    ]
    names = {g.name for g in chosen}
    chosen = [g for g in chosen if g.yields_to not in names]
    if not chosen and not prunable(groups):
        why = next((g.excluded for g in groups), None)
        raise CsgdError(
            f"the model has no prunable channel group ({len(groups)} found, all excluded"
            + (f"; the first: {why})" if why else ")"),
            "`csgd groups` lists every group and why; choose another model or declare "
            "channel_groups() on it",
        )
    if not chosen:
        names = ", ".join(g.name for g in prunable(groups)[:6])
        raise CsgdError(
            f"prune.include={list(include)} matches no prunable channel group",
            f"use globs over the group names (e.g. {names}, ...; `csgd groups` lists them) or '*'",
        )
    return chosen


def canonical(clusters: list[list[int]]) -> list[list[int]]:
    """Members sorted, clusters ordered by their first member (the one a merge keeps)."""
    return sorted((sorted(c) for c in clusters), key=lambda c: c[0])


def check_clusters(groups: Sequence[ChannelGroup], clusters: object, where: str = "") -> None:
    """Refuse clusters that are malformed, do not partition a group's channels, cross a
    producer segment or touch an excluded group. ``where`` (e.g. ``"ckpt=x.pt"``)
    prefixes the message: clusters come from files."""
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
        g = by_name.get(name)
        if g is None:
            raise CsgdError(
                f"{pre}clusters name group '{name}', which this model does not have", fix
            )
        if g.excluded is not None and len(cl) < g.width:
            raise CsgdError(f"{pre}group '{name}' cannot be pruned ({g.excluded})", fix)
        flat = sorted(i for c in cl for i in c)
        if flat != list(range(g.width)) or any(len(c) == 0 for c in cl):
            raise CsgdError(
                f"{pre}clusters of group '{name}' do not partition its {g.width} channels", fix
            )
        seg = segment_of(g)
        if any(len({seg[i] for i in c}) > 1 for c in cl):
            raise CsgdError(
                f"{pre}a cluster of group '{name}' spans channels written by different layers",
                fix,
            )
        partner = by_name.get(g.yields_to or "")
        other = clusters.get(partner.name) if partner is not None else None
        if other is not None and len(cl) < g.width and len(other) < partner.width:
            raise CsgdError(
                f"{pre}groups '{name}' and '{g.yields_to}' share rows and cannot both be pruned",
                f"prune one at a time (prune.exclude=['{g.yields_to}'] prunes '{name}')",
            )


def segment_of(group: ChannelGroup) -> list[int]:
    """Segment index of each channel."""
    lab = [0] * group.width
    for s, (a, b) in enumerate(group.segments()):
        for i in range(a, b):
            lab[i] = s
    return lab


def cluster_labels(clusters: list[list[int]], width: int) -> list[int]:
    """Cluster index of each channel."""
    labels = [0] * width
    for c, members in enumerate(clusters):
        for i in members:
            labels[i] = c
    return labels


def describe(groups: Sequence[ChannelGroup]) -> str:
    """A table of every group: name, width, members by kind, excluded or not and why."""
    lines = []
    for g in groups:
        kinds = {k: [m.module for m in g.of_kind(k)] for k in ("out", "channel", "in")}
        state = f"EXCLUDED: {g.excluded}" if g.excluded else "prunable"
        if g.yields_to and not g.excluded:  # heads: chosen when their head channels are not
            state += f" when '{g.yields_to}' is excluded (they share rows)"
        lines.append(f"{g.name}  width {g.width}  {state}")
        for k, label in (("out", "producers"), ("channel", "per-channel"), ("in", "readers")):
            if kinds[k]:
                lines.append(f"    {label:<12} {', '.join(kinds[k])}")
    return "\n".join(lines)
