"""Index maps from the recorded shapes: for each node of the graph (``graph.Graph``), the
maps that carry channel indices across it, set per edge from the shapes autograd saved.

One handler per op kind (``_BY_TYPE``: Torch-Pruning's op types; ``_IDENTITY``: ops
known by name that leave every channel where it was when a condition holds). A node
whose record is not what its handler expects is marked bad (its group is excluded,
naming it), never a traceback.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from ..rules.layers import rule_for
from .inputs import where
from .layout import MOVES, channel_dims, dim_at, intact
from .layout import along as on_channels
from .ops import ROW_OPS
from .walk import Flatten, Put, Take


def shape(fn: Any, nr: int) -> tuple[int, ...]:
    """Shape of output ``nr`` of the op of autograd node ``fn``."""
    var = getattr(fn, "variable", None)  # a leaf (AccumulateGrad)
    return tuple(var.shape if var is not None else fn._input_metadata[nr].shape)


def exact_index_maps(graph: Any) -> None:
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


def _map_node(graph: Any, node: Any) -> None:
    name = node.grad_fn.name()
    if name in ROW_OPS:
        return _map_rows(graph, node)
    handler = _BY_TYPE.get(node.type.name)
    if handler is not None:
        return handler(graph, node)
    for matches, whole in _IDENTITY:
        if matches(name) and whole(graph, node):
            graph.identity.add(node)
            return None
    return None


# -- the edges of a mapping node ----------------------------------------------------------
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


def _offsets(sizes: list[int]) -> list[int]:
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return out


# -- one handler per op kind --------------------------------------------------------------
def _map_rows(graph: Any, node: Any) -> None:
    """RoI pooling: boxes index rows, they share no channels."""
    del graph
    for f, _ in node.grad_fn.next_functions[1:]:
        for k, src in enumerate(n for n in node.inputs if n.grad_fn is f):
            _set_maps(node, src, k, Take(0, 0), Take(0, 0))


def _map_concat(graph: Any, node: Any) -> None:
    g = node.grad_fn
    nd = len(shape(g, 0))
    along, cd = on_channels(graph, node, g._saved_dim, nd), dim_at(g._saved_dim, nd)
    if along is None:
        graph.bad[node] = f"a concatenation along dim {cd} of a {nd}-D tensor"
    if not along:
        return
    ins = list(g.next_functions)
    if any(f is None for f, _ in ins):
        graph.bad[node] = "a concatenation with a constant tensor"
        return
    offsets = _offsets([shape(f, nr)[cd] for f, nr in ins])
    unwrapped = [p for p, _ in graph.dg.unwrapped_parameters]
    live = [
        i
        for i, (f, _) in enumerate(ins)
        if getattr(f, "variable", None) is None or any(f.variable is p for p in unwrapped)
    ]
    if len(live) != len(node.inputs):
        graph.bad[node] = "a concatenation csgd cannot map"
        return
    seen: Counter = Counter()
    for i, src in zip(live, node.inputs, strict=True):
        into = Put(offsets[i], 1, offsets[i + 1] - offsets[i])
        if not _set_maps(node, src, seen[src], into, Take(offsets[i], offsets[i + 1])):
            graph.bad[node] = "a concatenation csgd cannot map"
            break
        seen[src] += 1


def _map_split(graph: Any, node: Any) -> None:
    g = node.grad_fn
    sizes = [tuple(m.shape) for m in g._input_metadata]
    src = node.inputs[0] if node.inputs else node
    nd = len(sizes[0])
    along, cd = on_channels(graph, src, g._saved_dim, nd), dim_at(g._saved_dim, nd)
    if along is None:
        graph.bad[node] = f"a split along dim {cd} of a {nd}-D tensor"
    if not along:
        return
    offsets = _offsets([s[cd] for s in sizes])
    seen: Counter = Counter()
    for out in node.outputs:
        nrs = [nr for f, nr in out.grad_fn.next_functions if f is g]
        k = seen[out]
        seen[out] += 1
        piece = nrs[k] if k < len(nrs) else None
        if piece is None:
            graph.bad[node] = "a split csgd cannot map"
            break
        a, b = offsets[piece], offsets[piece + 1]
        if not _set_maps(node, out, k, Put(a, 1, b - a), Take(a, b)):  # into: from its consumer
            graph.bad[node] = "a split csgd cannot map"
            break


def _map_slice(graph: Any, node: Any) -> None:
    g = node.grad_fn
    size = tuple(g._saved_self_sym_sizes)
    src = node.inputs[0] if node.inputs else node
    cd = dim_at(g._saved_dim, len(size))
    along = on_channels(graph, src, cd, len(size))
    if along is None:
        graph.bad[node] = f"a slice along dim {cd} of a {len(size)}-D tensor"
    elif along:
        a, b, step = g._saved_start, g._saved_end, g._saved_step
        out_of = Put(a, step, len(range(a, min(b, size[cd]), step)))
        if not _set_maps(node, node.inputs[0], 0, Take(a, b, step), out_of):
            graph.bad[node] = "a slice csgd cannot map"
        if g._saved_start == 0 and g._saved_step == 1 and g._saved_end >= size[cd]:
            graph.identity.add(node)  # the whole tensor: stays whole after a merge
    else:
        graph.identity.add(node)


def _map_reshape(graph: Any, node: Any) -> None:
    """A flatten of an NCHW map (``repeat`` columns per channel) or a reshape that keeps
    each channel where it was; anything else gets no map (and ``tracing`` excludes it
    unless it is a layer's own)."""
    ins = [(f, nr) for f, nr in node.grad_fn.next_functions if f is not None]
    owner = graph.owner(node)
    if len(ins) != 1 or len(node.inputs) != 1 or (owner and rule_for(owner)):
        return  # inside a layer (F.linear over an NHWC map): its rule speaks for it
    a, b = shape(*ins[0]), shape(node.grad_fn, 0)
    nchw = graph.cdim.get(node.inputs[0]) in (1, None)  # an NHWC map flattens otherwise
    if nchw and len(a) == 4 and len(b) == 2 and a[0] == b[0] and b[1] == a[1] * a[2] * a[3]:
        stride = a[2] * a[3]
        if stride == 1:
            graph.identity.add(node)
            return
        if _set_maps(
            node, node.inputs[0], 0, Flatten(stride, channels=a[1]), Flatten(stride, back=True)
        ):
            graph.flatten.add(node)
    elif len(a) == 2 and len(b) == 4 and a == b[:2] and b[2:] == (1, 1):
        graph.identity.add(node)  # (N, C) -> (N, C, 1, 1), e.g. an SE gate
    elif graph.cdim.get(node.inputs[0]) is not None:
        if intact(a, b, graph.cdim[node.inputs[0]]) is not None:
            graph.identity.add(node)  # the channel dim kept whole: flatten(2), tokens <-> grid


def _map_expand(graph: Any, node: Any) -> None:
    g = node.grad_fn
    a, b = tuple(g._saved_self_sym_sizes), shape(g, 0)
    if len(a) == len(b) in (2, 4, 5) and a[1] == b[1]:
        graph.identity.add(node)  # a broadcast over batch or space


_BY_TYPE: dict[str, Callable[[Any, Any], None]] = {  # Torch-Pruning's OPTYPE names
    "CONCAT": _map_concat,
    "SPLIT": _map_split,
    "SLICE": _map_slice,
    "RESHAPE": _map_reshape,
    "EXPAND": _map_expand,
}


def _whole_inplace(g: Any) -> bool:
    """An in-place op on a view: exact only if every other operand has the base's shape
    (then the view is the whole base, and in-place ops act elementwise)."""
    base, *rest = [(f, nr) for f, nr in g.next_functions if f is not None] or [(None, 0)]
    if base[0] is None or not rest:
        return False
    out = shape(g, 0)
    return all(shape(f, nr) == out for f, nr in rest)


def _whole_view(g: Any) -> bool:
    return (
        tuple(g._saved_size) == shape(g, 0)
        and g._saved_storage_offset == 0
        and all(shape(f, nr) == shape(g, 0) for f, nr in g.next_functions if f is not None)
    )


# ops known by name that keep every channel where it was when their test holds
_IDENTITY: list[tuple[Callable[[str], bool], Callable[[Any, Any], bool]]] = [
    # a permute/transpose: the channels move, kept apart
    (lambda n: n.rstrip("0123456789") in MOVES, lambda gr, nd: gr.cdim.get(nd) is not None),
    # an in-place op on a view of the whole tensor (x += y)
    (lambda n: "CopySlices" in n, lambda gr, nd: _whole_inplace(nd.grad_fn)),
    (lambda n: n.startswith("AsStridedBackward"), lambda gr, nd: _whole_view(nd.grad_fn)),
]
