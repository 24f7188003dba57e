"""From one walked group to a ``ChannelGroup``: its members cut into runs where the
channels sit contiguously, root channels one slot holds tied into one, groups that
overlap found, names made unique (``trace`` walks; this assembles)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from ..rules.groups import ChannelGroup, Member


@dataclass
class Raw:
    """One Torch-Pruning group: per (module, kind) the (local index, root index) pairs."""

    root: str
    pairs: dict[tuple[str, str], list[tuple[int, int]]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    logits: bool = False
    output: bool = False

    def slots(self) -> set[tuple[str, str, int]]:
        return {(m, k, i) for (m, k), ps in self.pairs.items() for i, _ in ps}


def _runs(pairs: Iterable[tuple[int, int]], kind: str, order: np.ndarray) -> list[Member] | None:
    """Members for one (module, kind): runs of group channels stored contiguously in the
    module (``repeat`` columns each for ``in`` after a flatten; a module that holds the
    channels several times, as a conv over ``cat([x, f(x)])`` with ``f`` per-channel, has
    members per copy); None when the layout is not mappable. ``order``: the group's
    roots, sorted (a root's rank is its group channel)."""
    a = np.unique(np.array(list(pairs), dtype=np.int64).reshape(-1, 2), axis=0)
    if not len(a):
        return None
    a = a[np.lexsort((a[:, 0], a[:, 1]))]  # by root, then local index
    roots, counts = np.unique(a[:, 1], return_counts=True)
    n = int(counts[0])
    if (counts != n).any():
        return None
    locs = a[:, 0].reshape(-1, n)  # per root, its local indices ascending
    rank = np.searchsorted(order, roots)
    blocked = (locs == locs[:, :1] + np.arange(n)).all() and (locs[:, 0] % n == 0).all()
    if kind == "in" and blocked:  # a flatten: ``n`` columns per channel
        return _contiguous(rank, locs[:, 0] // n, kind, n)
    out = []  # copy j: the j-th place where each channel is held
    for j in range(n):
        out += _contiguous(rank, locs[:, j], kind, 1)
    return out


def _contiguous(g: np.ndarray, lo: np.ndarray, kind: str, rep: int) -> list[Member]:
    """Blocks (group channel ``g``, local index ``lo``; one per channel) cut into runs
    contiguous in both."""
    i = np.argsort(g, kind="stable")
    g, lo = g[i], lo[i]
    cut = np.flatnonzero((np.diff(g) != 1) | (np.diff(lo) != 1)) + 1
    starts, ends = np.r_[0, cut], np.r_[cut, len(g)]
    return [
        Member("", kind, int(lo[a]), int(g[a]), int(b - a), rep)
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True)
    ]


def _tie(raw: Raw) -> None:
    """Root channels held by one slot of a layer are one channel (GhostNet adds the stem's
    8 channels to ``cat([x, dw(x)])`` of a 4-channel conv: stem channels i and i + 4 are
    both that conv's channel i): each is renamed to the smallest root of its class."""
    parent: dict[int, int] = {}

    def find(r: int) -> int:
        while parent.get(r, r) != r:
            r = parent[r]
        return r

    for pairs in raw.pairs.values():
        first: dict[int, int] = {}
        for local, root in pairs:
            r = first.setdefault(local, root)
            if r != root:  # the slot's second root (else nothing to join)
                a, b = find(r), find(root)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    if parent:
        for key, pairs in raw.pairs.items():
            raw.pairs[key] = [(local, find(root)) for local, root in pairs]


def to_group(raw: Raw, index: dict[str, int]) -> ChannelGroup:
    _tie(raw)
    order = np.array(sorted({r for ps in raw.pairs.values() for _, r in ps}), dtype=np.int64)
    width = len(order)
    members: list[Member] = []
    problems = list(raw.problems)
    kind_rank = {"out": 0, "channel": 1, "in": 2}
    for (module, kind), pairs in sorted(
        raw.pairs.items(), key=lambda kv: (index[kv[0][0]], kind_rank[kv[0][1]])
    ):
        runs = _runs(pairs, kind, order)
        if runs is None:
            problems.append(f"'{module}' holds the channels in a layout csgd cannot map")
            continue
        for m in runs:
            length = None if (m.start == 0 and m.length == width) else m.length
            members.append(Member(module, kind, m.offset, m.start, length, m.repeat))
    outs = [m.module for m in members if m.kind == "out"]
    name = outs[0] if outs else raw.root
    if not outs:
        problems.append("no conv or linear layer produces these channels (network input?)")
    if raw.output:
        problems.append("the channels are an output of the network")
    excluded = problems[0] if problems else None
    return ChannelGroup(name, width, members, excluded)


def overlaps(raws: list[Raw], slots: list[set]) -> list[set[int]]:
    """Per group, the other groups holding one of its slots (only groups that share a
    (module, kind) can: those pairs are compared)."""
    by_key: dict[tuple[str, str], list[int]] = {}
    for i, r in enumerate(raws):
        for key in r.pairs:
            by_key.setdefault(key, []).append(i)
    near: list[set[int]] = [set() for _ in raws]
    for i, r in enumerate(raws):
        for j in {j for key in r.pairs for j in by_key[key]} - {i}:
            if not slots[i].isdisjoint(slots[j]):
                near[i].add(j)
    return near


def unique_names(groups: list[ChannelGroup]) -> None:
    seen: dict[str, int] = {}
    for g in groups:
        seen[g.name] = seen.get(g.name, 0) + 1
    for g in groups:
        if seen[g.name] > 1:
            first = next(m for m in g.members if m.module == g.name)
            g.name = f"{g.name}@{first.offset}"
