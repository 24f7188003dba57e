"""What a network would cost at other group widths, without building it.

Every tensor a group touches shrinks along the dimension its member kind names
(``layers.member_tensors``): a group at ``k`` clusters keeps, in each producer segment,
the share ``clustering.split_k`` gives it. So each tensor's shape is a function of the
widths, and

- parameters = sum of the parameter tensors' sizes (exact);
- multiply-adds = sum over conv/linear layers of weight size x output positions (what
  torch's flop counter counts; positions come from one forward pass), plus what no
  group touches, a constant (exact for every layer a rule knows);
- latency (modelled) = sum over the convs that change of their time alone at their
  channel counts, looked up in a table of measured layer times (``latency.Timings``)
  and interpolated between the measured channel counts.

``TermCost.cost(ks)`` evaluates one of these; ``delta`` only the tensors of one group,
so the greedy searches over thousands of width steps (``descend``, ``give_back``) stay
fast.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..common.nets import count_macs, count_params, first_input, run_model
from ..core.clustering import split_k
from ..deploy.latency import LayerTable, Timings
from ..rules.groups import ChannelGroup
from ..rules.layers import member_tensors
from ..rules.queries import timed_conv, weighted

Widths = dict[str, int]


@dataclass
class Term:
    """One tensor: its shape at the current widths and the cuts groups make in it,
    ``(dim, group, first, end, repeat, offset)`` (``repeat`` entries per channel), one
    per member."""

    module: str
    shape: tuple[int, ...]
    cuts: set[tuple[int, str, int, int, int, int]] = field(default_factory=set)


class Shapes:
    """The shape of every tensor that pruned groups touch, as a function of the widths."""

    def __init__(self, model: nn.Module, groups: Sequence[ChannelGroup], names: set[str]) -> None:
        mods = dict(model.named_modules())
        self.width = {g.name: g.width for g in groups if g.name in names}
        self.segs = {g.name: g.segments() for g in groups if g.name in names}
        self.terms: dict[str, Term] = {}
        self.params = {n for n, _ in model.named_parameters()}
        for g in groups:
            if g.name not in names:
                continue
            for m in g.members:
                first, end = m.span(g.width)
                for attr, dim, _role in member_tensors(mods[m.module], m.kind):
                    key = f"{m.module}.{attr}" if m.module else attr
                    t = self.terms.setdefault(
                        key, Term(m.module, tuple(getattr(mods[m.module], attr).shape))
                    )
                    # per member (its offset: q, k and v of one fused layer are three cuts);
                    # a channel is ``repeat`` columns after a flatten, ``block`` for a head
                    t.cuts.add((dim, g.name, first, end, m.repeat * m.block, m.offset))
        self.by_group: dict[str, list[str]] = {n: [] for n in self.width}
        self.term_groups: dict[str, tuple[str, ...]] = {}
        for key, t in self.terms.items():
            self.term_groups[key] = tuple(sorted({c[1] for c in t.cuts}))
            for g in self.term_groups[key]:
                self.by_group[g].append(key)
        self._kept: dict[tuple[str, int, int, int], int] = {}

    def kept(self, group: str, first: int, end: int, k: int) -> int:
        """Channels of ``[first, end)`` left when ``group`` has ``k`` clusters."""
        key = (group, first, end, k)
        if key not in self._kept:
            segs = self.segs[group]
            ks = split_k(min(k, self.width[group]), segs)
            self._kept[key] = sum(
                n for (a, b), n in zip(segs, ks, strict=True) if first <= a and b <= end
            )
        return self._kept[key]

    def shape(self, key: str, ks: Widths) -> list[int]:
        t = self.terms[key]
        dims = list(t.shape)
        for dim, g, first, end, rep, _at in t.cuts:
            k = ks.get(g, self.width[g])
            if k != self.width[g]:
                dims[dim] -= rep * (end - first - self.kept(g, first, end, k))
        return dims

    def neighbours(self) -> dict[str, set[str]]:
        """Groups whose cost changes when a group's width does (they share a tensor)."""
        out: dict[str, set[str]] = {g: {g} for g in self.width}
        for t in self.terms.values():
            gs = {c[1] for c in t.cuts}
            for g in gs:
                out[g] |= gs
        return out


class TermCost:
    """``const + sum_t value_t(shape_t(ks))`` over the tensors (or layers) ``values`` names."""

    def __init__(
        self,
        shapes: Shapes,
        values: dict[str, Callable[[list[int]], float]],
        total: float | None = None,
    ) -> None:
        """``total``: the cost at the current widths (the constant is what the values do
        not cover); None: no constant (a modelled time of the layers that change)."""
        self.shapes, self.values = shapes, values
        self.by_group = {g: [k for k in keys if k in values] for g, keys in shapes.by_group.items()}
        self._memo: dict[tuple[str, tuple[int, ...]], float] = {}
        self.const = 0.0 if total is None else total - self._sum(values, {})
        self.exact = False  # True: no cost outside ``values`` can change with the widths

    def _value(self, key: str, ks: Widths) -> float:
        width = self.shapes.width
        sig = (key, tuple(ks.get(g, width[g]) for g in self.shapes.term_groups[key]))
        if sig not in self._memo:  # a greedy search asks for the same shapes many times
            self._memo[sig] = self.values[key](self.shapes.shape(key, ks))
        return self._memo[sig]

    def _sum(self, keys: Any, ks: Widths) -> float:
        return sum(self._value(k, ks) for k in keys)

    def cost(self, ks: Widths) -> float:
        return self.const + self._sum(self.values, ks)

    def delta(self, ks: Widths, group: str, k: int) -> float:
        """cost(ks with ``group`` at ``k``) - cost(ks)."""
        keys = self.by_group[group]
        return self._sum(keys, {**ks, group: k}) - self._sum(keys, ks)


def _probe(model: nn.Module, modules: set[str], x: Any) -> dict[str, tuple[int, ...]]:
    """Per module: (output positions per sample, summed over calls; input H, W of the
    first call), from one forward pass of the first sample."""
    x1 = first_input(model, x)  # a tensor, or a tuple/list/dict of them
    seen: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name, m in model.named_modules():
        if name in modules:

            def hook(mod: nn.Module, i: Any, out: Any, name: str = name) -> None:
                pos = out.numel() // mod.weight.shape[0]
                old = seen.get(name)
                seen[name] = (pos + old[0], *old[1:]) if old else (pos, *i[0].shape[2:])

            hooks.append(m.register_forward_hook(hook))
    was = model.training
    try:
        with torch.no_grad():
            run_model(model.eval(), x1)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return seen


def _prod(dims: list[int]) -> int:
    return math.prod(dims)


def _times(positions: int) -> Callable[[list[int]], float]:
    return lambda dims: positions * _prod(dims)


def params_cost(model: nn.Module, shapes: Shapes, x: Any) -> TermCost:
    del x
    values = {k: _prod for k in shapes.terms if k in shapes.params}
    cost = TermCost(shapes, values, count_params(model))
    cost.exact = True  # every parameter tensor a group touches is a term
    return cost


def macs_cost(model: nn.Module, shapes: Shapes, x: Any) -> TermCost:
    mods = dict(model.named_modules())
    weights = {
        k: t.module
        for k, t in shapes.terms.items()
        if k.endswith("weight") and weighted(mods[t.module])
    }
    layers = {n for n, m in mods.items() if weighted(m)}
    pos = {n: v[0] for n, v in _probe(model, layers, x).items()}
    values = {k: _times(pos.get(m, 0)) for k, m in weights.items()}
    cost = TermCost(shapes, values, count_macs(model, x))
    # every multiply-add the counter saw is a conv's or linear's: the terms are the whole
    # story, and a candidate needs no count of its own
    layer_macs = sum(pos.get(n, 0) * mods[n].weight.numel() for n in layers)
    cost.exact = layer_macs == cost.cost({})
    return cost


# -- latency: measured layer times, interpolated ---------------------------------------------
def latency_cost(
    model: nn.Module,
    shapes: Shapes,
    x: Any,
    timings: Timings,
    candidates: dict[str, list[int]],
) -> TermCost:
    """Modelled time (ms) of the 2-d convs whose channels change, per layer measured
    alone in the runtime at the channel counts the candidate widths give."""
    mods = dict(model.named_modules())
    convs = {
        k: t.module
        for k, t in shapes.terms.items()
        if k.endswith("weight") and timed_conv(mods[t.module]) is not None
    }
    inputs = {n: v[1:] for n, v in _probe(model, set(convs.values()), x).items()}
    lowest = {g: c[0] for g, c in candidates.items()}
    values: dict[str, Callable[[list[int]], float]] = {}
    for key, name in convs.items():
        conv = mods[name]
        if name not in inputs:  # never called: costs nothing
            continue
        dw = bool(timed_conv(conv))
        # channel counts to measure: each group's candidates (the others as they are),
        # and every group at its narrowest
        settings: list[Widths] = [{}, lowest]
        for g in {c[1] for c in shapes.terms[key].cuts}:
            settings += [{g: k} for k in candidates.get(g, [])]
        cins, couts = set(), set()
        for ks in settings:
            dims = shapes.shape(key, ks)
            couts.add(dims[0])
            cins.add(dims[0] if dw else dims[1])
        kh, kw = conv.kernel_size
        pad = conv.padding
        if isinstance(pad, str):  # "same" or "valid"
            pad = (conv.dilation[0] * (kh - 1) // 2,) if pad == "same" else (0,)
        sig = (0, 0, kh, kw, conv.stride[0], pad[0], conv.dilation[0], int(dw), *inputs[name])
        values[key] = LayerTable(sig, cins, couts, timings)
    return TermCost(shapes, values)


# -- searching the widths: greedy steps over a cost ---------------------------------------
def descend(
    cost: TermCost,
    ks: Widths,
    ladders: dict[str, list[int]],
    budget: float,
    damage: Callable[[str, int], float],
) -> None:
    """Greedy: the step (up to 3 rungs down) with the least damage per cost saved,
    until ``cost <= budget`` or nothing can shrink. Only the moves of groups that share
    a tensor with the one that moved are recomputed."""
    near = cost.shapes.neighbours()
    cur, best, stale = cost.cost(ks), {}, set(ladders)
    while cur > budget:
        for g in stale:
            lad, i = ladders[g], ladders[g].index(ks[g])
            moves = []
            for k in lad[max(0, i - 3) : i]:
                d = cost.delta(ks, g, k)
                if d < 0:
                    moves.append(((damage(g, k) - damage(g, ks[g])) / -d, d, k))
            best[g] = min(moves) if moves else None
        pick = min(((m, g) for g, m in best.items() if m is not None), default=None)
        if pick is None:
            return
        (_, d, k), g = pick
        ks[g], cur, stale = k, cur + d, near[g]


def give_back(
    cost: TermCost,
    ks: Widths,
    cands: dict[str, list[int]],
    budget: float,
    gain: Callable[[str, int, int, float], float],
) -> None:
    """Grow one group by one candidate step at a time, the highest ``gain`` first,
    while the cost stays within ``budget``."""
    cur = cost.cost(ks)
    while True:
        options = []
        for g, c in cands.items():
            i = c.index(ks[g])
            if i + 1 < len(c):
                d = cost.delta(ks, g, c[i + 1])
                if cur + d <= budget:
                    options.append((gain(g, ks[g], c[i + 1], d), g, c[i + 1], d))
        if not options:
            return
        _, g, k, d = max(options)
        ks[g], cur = k, cur + d
