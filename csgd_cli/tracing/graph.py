"""Torch-Pruning's dependency graph, made exact for csgd's merge (``tracing`` maps it).

Torch-Pruning (TP) records one forward pass through autograd and couples the channels of
every layer it knows. Four things are done here so that its graph is exact:

- **Layers only through their rules.** A layer csgd has a rule for but TP does not know
  (frozen BN, timm's FrozenBatchNormAct2d) is registered as a TP per-channel layer, so it
  is a member of its group; the parameters of ruled layers are frozen during the trace,
  so that computation on weights alone (timm's weight standardisation) is no part of the
  graph.
- **Ops know their layer.** TP maps a layer to the autograd op of its *output*; each op's
  module (the innermost one whose forward ran it, from autograd sequence numbers) lets
  ``trace_ops`` accept ops run inside a layer (BatchNormAct2d's ``batch_norm``).
- **Shapes from the trace, not inferred.** Concatenations, splits, slices and flattens
  get their index maps from the shapes autograd recorded, per edge, in the order a
  dependency applies them (TP infers sizes recursively, which fails on deep graphs, maps
  a split's pieces by consumer order, and composes split-into-concat maps backwards).
- **Linear walks** (``trace_walk``): each (node, channel) of a group is visited once.
"""

from __future__ import annotations

import bisect
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import torch
from torch import nn

from ..common.errors import CsgdError
from ..rules.layers import member_kind, member_tensors, rule_for
from .inputs import (
    ModelError,
    constants,
    forward,
    layer_results,
    leaves,
    recording,
    trace_outputs,
    where,
)
from .layout import MOVES, channel_dims, intact
from .layout import along as on_channels
from .ops import ROW_OPS
from .walk import Flatten, Put, Take


def _shape(fn: Any, nr: int) -> tuple[int, ...]:
    """Shape of output ``nr`` of the op of autograd node ``fn``."""
    var = getattr(fn, "variable", None)  # a leaf (AccumulateGrad)
    return tuple(var.shape if var is not None else fn._input_metadata[nr].shape)


class _PerChannel:
    """TP pruner of a per-channel layer TP does not know (csgd never prunes through TP:
    the graph only needs the counts and the in == out coupling)."""

    pruning_dim = 0

    def prune_out_channels(self, layer: nn.Module, idxs: Any) -> nn.Module:
        raise NotImplementedError  # csgd merges through layers.py

    prune_in_channels = prune_out_channels  # in == out: the intra-layer coupling

    def get_out_channels(self, layer: nn.Module) -> int:
        name, dim, _ = member_tensors(layer, "channel")[0]
        return int(getattr(layer, name).shape[dim])

    get_in_channels = get_out_channels


@dataclass
class Graph:
    """TP's graph, with what csgd needs besides: module names, nodes whose channels
    cannot be merged (and why), and for each op the module whose forward ran it."""

    dg: Any
    names: dict[Any, str]
    bad: dict[Any, str] = field(default_factory=dict)
    identity: set[Any] = field(default_factory=set)  # ops that leave every channel be
    flatten: set[Any] = field(default_factory=set)  # flattens of an NCHW map (mapped)
    spans: list[tuple[int, int, nn.Module]] = field(default_factory=list)
    deadline: float = float("inf")  # ``trace_walk.walk`` stops after it
    cdim: dict[Any, int | None] = field(default_factory=dict)  # ``layout.channel_dims``
    consts: dict[Any, list] = field(default_factory=dict)  # ``inputs.constants``
    _parent: list[int] = field(default_factory=list)

    def owner(self, node: Any) -> nn.Module | None:
        """The innermost module whose forward created ``node``'s op (module calls nest,
        so it is the last call begun before the op, or the nearest one around that)."""
        if not self._parent:
            stack: list[int] = []
            for i, (start, _end, _m) in enumerate(self.spans):
                while stack and self.spans[stack[-1]][1] < start:
                    stack.pop()
                self._parent.append(stack[-1] if stack else -1)
                stack.append(i)
        seq = node.grad_fn._sequence_nr() if node.grad_fn is not None else -1
        i = bisect.bisect_left(self.spans, seq, key=lambda s: s[0]) - 1
        while i >= 0 and self.spans[i][1] < seq:
            i = self._parent[i]
        return self.spans[i][2] if i >= 0 else None


def build_graph(model: nn.Module, x: Any, label: str) -> Graph:
    """TP's graph of ``model`` on ``x`` with exact index maps; ``label`` names the model
    in the one-line error of a forward pass that cannot be traced."""
    import torch_pruning as tp
    from torch_pruning.dependency import index_mapping, shape_infer

    custom = {  # ruled per-channel layers TP does not know
        type(m): _PerChannel()
        for m in model.modules()
        if rule_for(m) is not None
        and tp.ops.module2type(m) == tp.ops.OPTYPE.ELEMENTWISE
        and member_kind(m, True) == "channel"
    }
    graph = Graph(tp.DependencyGraph(), {m: n for n, m in model.named_modules()})
    x = leaves(x)  # the graph starts at the input (every float tensor of a list/dict too)
    results: list[torch.Tensor] = []
    was_training = model.training
    try:
        with (
            torch.enable_grad(),
            warnings.catch_warnings(),
            recording(model, graph.spans),
            layer_results(model, results),
            constants(graph.consts),
            # shapes come from the trace (below), not from TP's recursive inference
            mock.patch.object(shape_infer, "init_shape_information", lambda g: None),
            mock.patch.object(index_mapping, "update_index_mapping", lambda g: None),
        ):
            warnings.simplefilter("ignore")
            graph.dg.build_dependency(
                model, x, forward_fn=forward,
                output_transform=lambda out: trace_outputs(out, results),
                verbose=False, customized_pruners=custom,
            )  # fmt: skip
    except ModelError as e:  # the user's forward pass refused the example input
        raise CsgdError(
            f"cannot trace model {label}: its forward fails on the example input ({e.args[0]})",
            "pass an example input its forward accepts (as in training: a batched tensor, "
            "a tuple of the forward's arguments, a dict of keyword arguments)",
        ) from None
    except CsgdError:
        raise
    except Exception as e:  # any failure of the user's forward pass or of the tracer
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CsgdError(
            f"cannot trace model {label} to find its channel groups ({type(e).__name__}: {msg[:160]})",
            "make its forward pass a plain tensor computation (no data-dependent Python on "
            "tensor values), or declare channel_groups() on the model",
        ) from None
    finally:
        model.train(was_training)
    _exact_index_maps(graph)
    return graph


# -- index maps from the recorded shapes ------------------------------------------------------
def _edge_deps(a: Any, b: Any, k: int) -> tuple[Any, Any] | None:
    """The k-th dependency a -> b and the k-th b -> a (one per edge of the autograd graph)."""
    ab = [d for d in a.dependencies if d.target is b]
    ba = [d for d in b.dependencies if d.target is a]
    return (ab[k], ba[k]) if k < len(ab) and k < len(ba) else None


def _set_maps(op: Any, other: Any, k: int, into: Any, out_of: Any) -> bool:
    """Index maps of the k-th edge between mapping node ``op`` and ``other``: ``into``
    carries indices into ``op``'s coordinates, ``out_of`` out of them. A dependency
    applies its source's map first (slot 0), then its target's (slot 1): TP puts both
    in one slot, which maps a split feeding a concatenation backwards wrongly."""
    deps = _edge_deps(other, op, k)
    if deps is None:
        return False
    deps[0].index_mapping[1], deps[1].index_mapping[0] = into, out_of
    return True


def _exact_index_maps(graph: Graph) -> None:
    """Index maps for every node; a node whose autograd record is not what the maps
    expect is marked bad (its group is excluded, naming it), never a traceback."""
    graph.cdim = channel_dims(graph)
    for node in list(graph.dg.module2node.values()):
        if node.grad_fn is None:
            continue  # no autograd record (an output that carries no graph)
        try:
            _map_node(graph, node)
        except Exception as e:  # an op of an unexpected form: excluded, named
            op, at = node.grad_fn.name(), where(graph, node)
            graph.bad[node] = f"op {op}{at} csgd cannot map ({type(e).__name__})"


def _map_node(graph: Graph, node: Any) -> None:
    tp_ops = graph.dg.ops
    unwrapped = [p for p, _ in graph.dg.unwrapped_parameters]
    g, kind = node.grad_fn, node.type
    if g.name() in ROW_OPS:  # RoI pooling: boxes index rows, they share no channels
        for f, _ in g.next_functions[1:]:
            for k, src in enumerate(n for n in node.inputs if n.grad_fn is f):
                _set_maps(node, src, k, Take(0, 0), Take(0, 0))
    elif kind == tp_ops.OPTYPE.CONCAT:
        nd = len(_shape(g, 0))
        along, cd = on_channels(graph, node, g._saved_dim, nd), g._saved_dim % nd
        if along is None:
            graph.bad[node] = f"a concatenation along dim {g._saved_dim} of a {nd}-D tensor"
        if not along:
            return
        ins = list(g.next_functions)
        if any(f is None for f, _ in ins):
            graph.bad[node] = "a concatenation with a constant tensor"
            return
        offsets = [0]
        for f, nr in ins:
            offsets.append(offsets[-1] + _shape(f, nr)[cd])
        live = [
            i
            for i, (f, _) in enumerate(ins)
            if getattr(f, "variable", None) is None or any(f.variable is p for p in unwrapped)
        ]
        seen: Counter = Counter()
        if len(live) != len(node.inputs):
            graph.bad[node] = "a concatenation csgd cannot map"
            return
        for i, src in zip(live, node.inputs, strict=True):
            into = Put(offsets[i], 1, offsets[i + 1] - offsets[i])
            out_of = Take(offsets[i], offsets[i + 1])
            if not _set_maps(node, src, seen[src], into, out_of):
                graph.bad[node] = "a concatenation csgd cannot map"
                break
            seen[src] += 1
    elif kind == tp_ops.OPTYPE.SPLIT:
        sizes = [tuple(m.shape) for m in g._input_metadata]
        src = node.inputs[0] if node.inputs else node
        along, cd = (
            on_channels(graph, src, g._saved_dim, len(sizes[0])),
            g._saved_dim % len(sizes[0]),
        )
        if along is None:
            graph.bad[node] = f"a split along dim {g._saved_dim} of a {len(sizes[0])}-D tensor"
        if not along:
            return
        offsets = [0]
        for s in sizes:
            offsets.append(offsets[-1] + s[cd])
        seen = Counter()
        for out in node.outputs:
            nrs = [nr for f, nr in out.grad_fn.next_functions if f is g]
            k = seen[out]
            seen[out] += 1
            piece = nrs[k] if k < len(nrs) else None
            if (
                piece is None
                or not _set_maps(  # into: from the piece's consumer
                    node,
                    out,
                    k,
                    Put(offsets[piece], 1, offsets[piece + 1] - offsets[piece]),
                    Take(*offsets[piece : piece + 2]),
                )
            ):
                graph.bad[node] = "a split csgd cannot map"
                break
    elif kind == tp_ops.OPTYPE.SLICE:
        size = tuple(g._saved_self_sym_sizes)
        src = node.inputs[0] if node.inputs else node
        along, cd = on_channels(graph, src, g._saved_dim, len(size)), g._saved_dim % len(size)
        if along is None:
            graph.bad[node] = f"a slice along dim {g._saved_dim} of a {len(size)}-D tensor"
        elif along:
            a, b, step = g._saved_start, g._saved_end, g._saved_step
            out_of = Put(a, step, len(range(a, min(b, size[cd]), step)))
            if not _set_maps(node, node.inputs[0], 0, Take(a, b, step), out_of):
                graph.bad[node] = "a slice csgd cannot map"
            if g._saved_start == 0 and g._saved_step == 1 and g._saved_end >= size[cd]:
                graph.identity.add(node)  # the whole tensor: stays whole after a merge
        else:
            graph.identity.add(node)
    elif kind == tp_ops.OPTYPE.RESHAPE:
        _map_reshape(graph, node)
    elif kind == tp_ops.OPTYPE.EXPAND:
        a, b = tuple(g._saved_self_sym_sizes), _shape(g, 0)
        if len(a) == len(b) in (2, 4, 5) and a[1] == b[1]:
            graph.identity.add(node)  # a broadcast over batch or space
    elif g.name().rstrip("0123456789") in MOVES and graph.cdim.get(node) is not None:
        graph.identity.add(node)  # a permute/transpose: the channels move, kept apart
    elif "CopySlices" in g.name() and _whole_inplace(g):
        graph.identity.add(node)  # an in-place op on a view of the whole tensor (x += y)
    elif g.name().startswith("AsStridedBackward") and _whole_view(g):
        graph.identity.add(node)


def _map_reshape(graph: Graph, node: Any) -> None:
    """A flatten of an NCHW map (``repeat`` columns per channel) or a reshape that keeps
    each channel where it was; anything else gets no map (and ``tracing`` excludes it
    unless it is a layer's own)."""
    ins = [(f, nr) for f, nr in node.grad_fn.next_functions if f is not None]
    owner = graph.owner(node)
    if len(ins) != 1 or len(node.inputs) != 1 or (owner and rule_for(owner)):
        return  # inside a layer (F.linear over an NHWC map): its rule speaks for it
    a, b = _shape(*ins[0]), _shape(node.grad_fn, 0)
    nchw = graph.cdim.get(node.inputs[0]) in (1, None)  # an NHWC map flattens otherwise
    if nchw and len(a) == 4 and len(b) == 2 and a[0] == b[0] and b[1] == a[1] * a[2] * a[3]:
        stride = a[2] * a[3]
        if stride == 1:
            graph.identity.add(node)
            return
        if _set_maps(node, node.inputs[0], 0, Flatten(stride), Flatten(stride, back=True)):
            graph.flatten.add(node)
    elif len(a) == 2 and len(b) == 4 and a == b[:2] and b[2:] == (1, 1):
        graph.identity.add(node)  # (N, C) -> (N, C, 1, 1), e.g. an SE gate
    elif graph.cdim.get(node.inputs[0]) is not None:
        if intact(a, b, graph.cdim[node.inputs[0]]) is not None:
            graph.identity.add(node)  # the channel dim kept whole: flatten(2), tokens <-> grid


def channels_last(node: Any) -> bool:
    """A linear layer's node whose output has more than two dims (tokens, NHWC maps):
    its channels are the last dim, not dim 1."""
    return isinstance(node.module, nn.Linear) and len(_shape(node.grad_fn, 0)) > 2


def _whole_inplace(g: Any) -> bool:
    """An in-place op on a view: exact only if every other operand has the base's shape
    (then the view is the whole base, and in-place ops act elementwise)."""
    base, *rest = [(f, nr) for f, nr in g.next_functions if f is not None] or [(None, 0)]
    if base[0] is None or not rest:
        return False
    shape = _shape(g, 0)
    return all(_shape(f, nr) == shape for f, nr in rest)


def _whole_view(g: Any) -> bool:
    return (
        tuple(g._saved_size) == _shape(g, 0)
        and g._saved_storage_offset == 0
        and all(_shape(f, nr) == _shape(g, 0) for f, nr in g.next_functions if f is not None)
    )
