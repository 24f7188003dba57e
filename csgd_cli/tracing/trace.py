"""A model's channel groups: declared by the model, else traced from one forward pass.

Torch-Pruning's ``DependencyGraph`` (the field's standard tracer for coupled channels)
follows autograd from the logits back to the input and tells, for the output channels of
a conv or linear layer, every tensor slice that must shrink with them, with index maps
through concatenations, splits and flattens. Each of its groups is mapped onto our
``ChannelGroup``:

- every layer is mapped by its rule (``csgd_cli.rules.layers``): conv/linear output rows ->
  ``out``; BatchNorm, per-channel norms and depthwise convs -> ``channel``; conv/linear
  input columns -> ``in`` (``repeat`` columns per channel after a flatten);
- a member is cut into runs where its channels sit contiguously in the module, so a BN
  over a concatenation is a ``channel`` member at its offset, and a layer holding the
  channels twice (a conv over ``cat([x, f(x)])``) has a member per copy;
- the graph is TP's made exact first (``trace_graph``: index maps from recorded shapes,
  ops attributed to the layer that ran them; ``trace_ops`` judges each op);
- the group's channel order is the root layer's, and the group is named after its first
  producer (stable across iterative rounds, which re-trace the thinned model).

Never a wrong merge: anything the merge cannot make exact (the input or output of a
grouped, non-depthwise conv; LayerNorm, GroupNorm over several channels and other layers
without a rule; a free ``nn.Parameter`` applied to the channels; a reshape that is not a flatten
into a linear layer, a transpose or permute as in a channel shuffle; a reduction over
channels; any op not known to keep channels apart) makes the group *excluded* with a
one-line reason naming the layer. Groups of the network's logits are not groups.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..common.errors import CsgdError
from ..rules import queries
from ..rules.groups import ChannelGroup
from ..rules.layers import member_kind, member_rows, rule_for
from .graph import Graph, build_graph, channels_last
from .inputs import where
from .layout import reads_channels
from .members import Raw, overlaps, to_group, unique_names
from .ops import OUTPUT, op_problem
from .walk import TRACE_SECONDS, walk

_CACHE_ATTR = "_csgd_traced_groups"
_BY_ARCH: dict[str, tuple[tuple, list[ChannelGroup]]] = {}  # one trace per architecture


def example_input(model: nn.Module) -> torch.Tensor:
    """One input of the model's shape: ``model.input_shape``, else ``in_channels`` and
    ``image_size`` of its registry kwargs, else the first conv's inputs at 64x64."""
    p = next(iter(model.parameters()), None)
    shape = getattr(model, "input_shape", None)
    if shape is None:
        kw = (getattr(model, "arch", None) or {}).get("kwargs", {})
        first = next((c for m in model.modules() if (c := queries.image_channels(m))), None)
        c = kw.get("in_channels") or (first if first is not None else 3)
        s = kw.get("image_size") or 64
        shape = (c, s, s)
    kw = {"dtype": p.dtype, "device": p.device} if p is not None else {}
    return torch.randn(1, *shape, **kw)


def channel_groups(model: nn.Module, x: torch.Tensor | None = None) -> list[ChannelGroup]:
    """The model's groups: its own ``channel_groups()`` when it declares them, else traced
    from one forward pass of ``x`` (default: ``example_input(model)``)."""
    fn = getattr(model, "channel_groups", None)
    return _frozen(model, fn() if fn is not None else traced_groups(model, x))


def _frozen(model: nn.Module, groups: list[ChannelGroup]) -> list[ChannelGroup]:
    """Groups whose rows the optimizer would pull include a frozen parameter: excluded,
    naming it (C-SGD cannot move it, so its clusters could never collapse)."""
    out = []
    for g in groups:
        why = g.excluded
        if why is None:
            rows = member_rows(model, g, ("kernel", "affine"))
            key = next((b.key for b in rows if not b.tensor.requires_grad), None)
            if key is not None:
                why = f"parameter '{key}' is frozen (requires_grad=False)"
        out.append(replace(g, members=list(g.members), excluded=why))  # yields_to kept
    return out


def _signature(model: nn.Module) -> tuple:
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def _arch_key(model: nn.Module) -> str | None:
    arch = getattr(model, "arch", None)  # registry models: the same spec, the same graph
    try:
        return json.dumps(arch, sort_keys=True) if arch else None
    except TypeError:
        return None


def traced_groups(model: nn.Module, x: torch.Tensor | None = None) -> list[ChannelGroup]:
    """The model's channel groups from a trace, cached until a layer changes shape: on
    the model, and for registry models on their spec (a stage's preflight and the stage,
    or the phases of ``csgd run``, trace once). Raises ``CsgdError`` when the forward
    pass cannot be traced."""
    sig, key = _signature(model), _arch_key(model)
    cached = model.__dict__.get(_CACHE_ATTR) or _BY_ARCH.get(key or "")
    if cached is None or cached[0] != sig:
        cached = (sig, _trace(model, example_input(model) if x is None else x))
        if key is not None:
            _BY_ARCH.clear()  # the last architecture only: groups are small, models not
            _BY_ARCH[key] = cached
    model.__dict__[_CACHE_ATTR] = cached
    return [replace(g, members=list(g.members)) for g in cached[1]]  # copies, yields_to kept


def trace_seconds(model: nn.Module) -> float:
    """Wall time of one uncached trace (reported in the docs)."""
    model.__dict__.pop(_CACHE_ATTR, None)
    _BY_ARCH.clear()
    t = time.perf_counter()
    traced_groups(model)
    return time.perf_counter() - t


def _classify(graph: Graph, node: Any, handler: Any) -> tuple[str | None, str | None]:
    """(kind or None, problem or None) of one node of a group, reached with ``handler``."""
    mod = node.module
    if isinstance(mod, nn.Parameter):
        return None, f"parameter '{graph.dg._param_to_name.get(mod, '?')}' acts on the channels"
    name = graph.names.get(mod)
    if name is not None:  # a layer: its rule decides (csgd_cli.rules.layers)
        kind = member_kind(mod, bool(graph.dg.is_out_channel_pruning_fn(handler)), name)
        if kind == "in":  # the channels must sit in the dim the layer reads
            return kind, reads_channels(graph, node)
        if kind in ("out", "channel"):
            return kind, None
        return None, kind
    try:
        problem = op_problem(graph, node, [n.module for n in node.outputs])
    except Exception as e:  # an op of an unexpected form: excluded, named
        op = node.grad_fn.name() if node.grad_fn is not None else type(node.module).__name__
        problem = f"op {op}{where(graph, node)} could not be judged ({type(e).__name__})"
    return ("output", None) if problem == OUTPUT else (None, problem)


def _raw_group(graph: Graph, module: nn.Module) -> Raw:
    raw = Raw(graph.names[module])
    judged = [(n, h, pairs, *_classify(graph, n, h)) for n, h, pairs in walk(graph, module)]
    # an NCHW flatten's map is wrong for channels a linear layer wrote last (NHWC, tokens)
    nhwc = any(kind == "out" and channels_last(n) for n, _, _, kind, _ in judged)
    layer_problems: list[str] = []
    for node, _, pairs, kind, problem in judged:
        if nhwc and node in graph.flatten and graph.cdim.get(node.inputs[0]) is None:
            problem = "a flatten of channels a linear layer wrote last (NHWC)"
        if problem:  # a layer's reason (LayerNorm) names it best: those first
            (layer_problems if node.module in graph.names else raw.problems).append(problem)
        if kind == "output" or (kind == "out" and not node.outputs):
            raw.output = True  # the logits (or another output) of the network
        if kind is not None and kind != "output":
            raw.pairs.setdefault((graph.names[node.module], kind), []).extend(pairs)
    raw.problems[:0] = layer_problems
    raw.logits = raw.output and all(  # written by linear layers: the logits
        queries.channels_last(graph.dg.model.get_submodule(m)) for m, k in raw.pairs if k == "out"
    )
    return raw


@contextmanager
def _no_gc() -> Iterator[None]:
    """The cyclic garbage collector paused while tracing: the walk makes millions of
    small tuples, and each collection scans the whole graph again (a third of coat's
    trace time). Nothing the trace makes is garbage before it ends."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _trace(model: nn.Module, x: torch.Tensor) -> list[ChannelGroup]:
    with _no_gc():
        return _trace_groups(model, x)


def _trace_groups(model: nn.Module, x: torch.Tensor) -> list[ChannelGroup]:
    label = (getattr(model, "arch", None) or {}).get("name", type(model).__name__)
    graph = build_graph(model, x, label)
    graph.deadline = time.process_time() + TRACE_SECONDS  # CPU time: a busy machine is no cause
    names = graph.names
    index = {n: i for i, n in enumerate(names.values())}
    declared, inner = _declared(model, graph)
    roots = [  # producers, whose outputs are channels: convs and linear layers (by rule)
        m
        for m in model.modules()
        if queries.channel_dim(m) is not None
        and m in graph.dg.module2node
        and names[m] not in inner
    ]
    raws: list[Raw] = []
    slots: list[set[tuple[str, str, int]]] = []
    covered: set[tuple[str, int]] = set()
    for m in roots:
        n = names[m]
        width = queries.out_width(m)
        if all((n, i) in covered for i in range(width)):
            continue
        try:
            raw = _raw_group(graph, m)
        except CsgdError:
            raise
        except Exception as e:  # a surprise in the walk: this group excluded, named
            raw = Raw(n, {(n, "out"): [(i, i) for i in range(width)]})
            raw.problems.append(f"tracing the channels of '{n}' failed ({type(e).__name__})")
        slots.append(raw.slots())
        covered |= {(mod, i) for mod, k, i in slots[-1] if k in ("out", "channel")}
        raws.append(raw)
    # a later root may span earlier ones (a depthwise conv over a concatenation): keep the
    # widest, and one of equal ones (roots of one excluded group: fastvit's grouped convs);
    # two groups that overlap without one holding the other cannot be mapped
    near = overlaps(raws, slots)
    keep = [
        i
        for i in range(len(raws))
        if not any(slots[i] < slots[j] or (slots[i] == slots[j] and j < i) for j in near[i])
    ]
    groups = []
    for i in keep:
        if raws[i].logits:
            continue
        g = to_group(raws[i], index)
        clash = next((j for j in keep if j in near[i]), None)
        if clash is not None and g.excluded is None:
            g.excluded = f"channels also coupled with the group of '{raws[clash].root}'"
        groups.append(g)
    groups += declared
    unique_names(groups)
    return sorted(groups, key=lambda g: index.get(g.name.split("@")[0], 0))


def _declared(model: nn.Module, graph: Graph) -> tuple[list[ChannelGroup], set[str]]:
    """Groups that modules declare by their rule (an attention's head channels), and
    the layers whose outputs they cover (not walked: a head's reshapes are the rule's)."""
    groups, inner = [], set()
    for name, m in model.named_modules():
        rule = rule_for(m)
        if rule is None or rule.groups is None:
            continue
        mods = dict(m.named_modules(prefix=name))
        for g in rule.groups(m, name):
            outs = {x.module for x in g.members if x.kind == "out"}
            if all(mods.get(o) in graph.dg.module2node for o in outs):  # ran in the trace
                groups.append(g)
                inner |= outs
    return groups, inner
