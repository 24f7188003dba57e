"""Where the channels are: the dimension of each traced tensor that holds a group's
channels (``graph.Graph.cdim``), followed forward from the layers that write them.

A conv writes its channels in dim 1 (NCHW), a linear layer in the last dim (tokens,
NHWC maps). Ops move them: a permute or transpose carries the dim along, a view or
reshape keeps it when the dim is intact (same size, same stride: ``flatten(2)`` of an
NCHW map, tokens to an NHWC grid, a window partition), a reduction over other dims
renumbers it, and elementwise ops keep it (right-aligned, as broadcasting does). Where
it cannot be told (a reshape that splits the channels into heads), it is None, and the
tracer falls back to judging the op without it (usually: excluded with its reason).

Knowing the dim makes ``patch_embed``'s ``flatten(2).transpose(1, 2)`` and a ConvNeXt
block's ``permute(0, 2, 3, 1)`` moves of the channels (nothing mixed), and a
concatenation or reduction along tokens harmless.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from ..rules.queries import channel_dim

_RESHAPES = set(
    "ViewBackward UnsafeViewBackward ReshapeAliasBackward SqueezeBackward UnsqueezeBackward"
    " SelectBackward AliasBackward CloneBackward".split()
)
_REDUCTIONS = {"MeanBackward", "SumBackward", "AmaxBackward", "AminBackward"}
MOVES = {"PermuteBackward", "TransposeBackward"}  # channels moved, never mixed


def dim_at(d: int, nd: int) -> int:
    """Dim ``d`` of an ``nd``-D tensor as autograd saved it, counted from 0: a negative
    dim is saved as an unsigned 64-bit integer (-1 as ``2**64 - 1``), whose remainder
    is wrong for a 3-D tensor (tokens: ``chunk(2, dim=-1)``)."""
    return (d - 2**64 if d >= 2**63 else d) % nd


def out_shape(node: Any) -> tuple[int, ...] | None:
    g = node.grad_fn
    if g is None:
        return None
    var = getattr(g, "variable", None)
    try:
        return tuple(var.shape if var is not None else g._input_metadata[0].shape)
    except (IndexError, RuntimeError):
        return None


def _name(node: Any) -> str:
    return re.sub(r"\d+$", "", node.grad_fn.name()) if node.grad_fn is not None else ""


def intact(a: tuple[int, ...], b: tuple[int, ...], d: int) -> int | None:
    """The dim of shape ``b`` that holds dim ``d`` of shape ``a`` unchanged after a
    row-major reshape (same size, same number of elements after it), or None."""
    size, inner = a[d], 1
    for s in a[d + 1 :]:
        inner *= s
    found, after = [], 1
    for j in range(len(b) - 1, -1, -1):
        if b[j] == size and after == inner:
            found.append(j)
        after *= b[j]
    return found[0] if len(found) == 1 and size > 1 else None


def _from_inputs(cdim: dict[Any, int | None], node: Any, nd: int) -> int | None:
    """Elementwise ops (broadcast right-aligned): the input dims, if they agree."""
    dims = set()
    for i in node.inputs:
        shape = out_shape(i)
        c = cdim.get(i)
        if c is not None and shape is not None:
            dims.add(c + nd - len(shape))
    return dims.pop() if len(dims) == 1 and 0 <= next(iter(dims)) < nd else None


def _of(cdim: dict[Any, int | None], node: Any, names: dict[Any, str]) -> int | None:
    out = out_shape(node)
    if out is None:
        return None
    nd, mod = len(out), node.module
    if mod in names:  # a layer: a producer writes the dim its rule names
        d = channel_dim(mod)
        if d is not None:
            return nd - 1 if d == -1 else (d if nd > d else None)
        return _from_inputs(cdim, node, nd)
    name = _name(node)
    src = node.inputs[0] if len(node.inputs) == 1 else None
    c = cdim.get(src) if src is not None else None
    a = out_shape(src) if src is not None else None
    if name in MOVES or name in _RESHAPES or name in _REDUCTIONS:
        if c is None or a is None:
            return None
        g = node.grad_fn
        if name == "PermuteBackward":
            return [dim_at(d, len(a)) for d in g._saved_dims].index(c)
        if name == "TransposeBackward":
            d0, d1 = dim_at(g._saved_dim0, len(a)), dim_at(g._saved_dim1, len(a))
            return d1 if c == d0 else d0 if c == d1 else c
        if name in _REDUCTIONS:
            dims = getattr(g, "_saved_dim", None)
            if dims is None:
                return None
            dims = [dim_at(d, len(a)) for d in ([dims] if isinstance(dims, int) else dims)]
            if c in dims:
                return None
            return c if getattr(g, "_saved_keepdim", False) else c - sum(d < c for d in dims)
        return intact(a, out, c)
    return _from_inputs(cdim, node, nd)


def channel_dims(graph: Any) -> dict[Any, int | None]:
    """Per node of ``graph`` (a ``graph.Graph``): the dim of its output that holds
    channels, in forward order (autograd sequence numbers)."""
    nodes = [n for n in graph.dg.module2node.values() if n.grad_fn is not None]
    nodes.sort(
        key=lambda n: n.grad_fn._sequence_nr() if not isinstance(n.module, nn.Parameter) else -1
    )
    cdim: dict[Any, int | None] = {}
    for n in nodes:
        cdim[n] = None if isinstance(n.module, nn.Parameter) else _of(cdim, n, graph.names)
    return cdim


def along(graph: Any, node: Any, dim: int, nd: int) -> bool | None:
    """Whether ``dim`` holds the channels of ``node``'s tensor; unknown: the NCHW guess
    (dim 1 of a 2-, 4- or 5-D tensor; None for 3-D: channels first or tokens last)."""
    c, dim = graph.cdim.get(node), dim_at(dim, nd)
    if c is not None:
        return dim == c
    return False if dim == 0 else (True if dim == 1 and nd in (2, 4, 5) else None)


def reads_channels(graph: Any, node: Any) -> str | None:
    """For a conv or linear layer's node: None when the tensor it reads holds the
    channels in the dim it reads (1, or the last), else why not."""
    mod = node.module
    seen, frontier = set(), list(node.inputs)
    while frontier:  # up through the layer's own ops (F.linear's view, addmm)
        n = frontier.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if n.module is not mod and graph.owner(n) is mod and n.module not in graph.names:
            frontier.extend(n.inputs)
            continue
        c, shape = graph.cdim.get(n), out_shape(n)
        if c is None or shape is None:
            continue
        want = len(shape) - 1 if channel_dim(mod) == -1 else 1
        if c != want:
            return (
                f"'{graph.names[mod]}' reads dim {want} of a tensor whose channels are in dim {c}"
            )
    return None
