"""What a traced op does to the channels it carries: kept apart (and still right after a
merge), or why not. Layers are judged by their rules (``layers.py``); this is every
other node of the graph (``trace_graph.Graph``): autograd ops, concatenations, splits,
slices and reshapes.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ..rules.layers import KINDS, member_kind, rule_for
from ..rules.queries import channels_last
from ..rules.splits import split_rule_for
from .layout import dim_at

PER_CHANNEL_OPS = set(
    "AddBackward SubBackward MulBackward DivBackward NegBackward ReluBackward"
    " HardtanhBackward SigmoidBackward SiluBackward TanhBackward HardswishBackward"
    " HardsigmoidBackward GeluBackward LeakyReluBackward EluBackward SoftplusBackward"
    " MishBackward ExpBackward PowBackward CloneBackward MaxPool2DWithIndicesBackward"
    " MaxPool2DBackward AvgPool2DBackward AdaptiveAvgPool2DBackward AdaptiveMaxPool2DBackward"
    " MaxPool1DWithIndicesBackward AvgPool1DBackward AdaptiveAvgPool1DBackward"
    " UpsampleNearest2DBackward UpsampleBilinear2DBackward ConstantPadNdBackward"
    " ReflectionPad2DBackward ReplicationPad2DBackward ToCopyBackward AliasBackward"
    " ContiguousBackward".split()
)
# ops that pool or place whole rows of a map (RoIs, samples) whatever their other,
# graph-less operands (boxes, a fresh output buffer) are: channels stay apart
ROW_OPS = {
    f"GeneratedBackwardFor_torchvision_{op}_defaultBackward" for op in ("roi_align", "roi_pool")
}
REDUCTIONS = set("MeanBackward SumBackward AmaxBackward SqueezeBackward UnsqueezeBackward".split())


def op_name(grad_fn: Any) -> str:
    return re.sub(r"\d+$", "", grad_fn.name()) if grad_fn is not None else "?"


OUTPUT = "output"


def op_problem(graph: Any, node: Any, outs: list[Any]) -> str | None:
    """None when ``node`` (of ``graph``, a ``trace_graph.Graph``) keeps channels apart and
    stays right after a merge, ``OUTPUT`` for the network's output, else why the group
    cannot be merged exactly. ``outs``: the modules of the nodes it feeds."""
    ops = graph.dg.ops
    mod, name = node.module, op_name(node.grad_fn)
    if isinstance(mod, ops._OutputOp):
        return OUTPUT
    if node in graph.bad:
        return graph.bad[node]
    owner = graph.owner(node)
    rule = rule_for(owner) if owner is not None else None
    at, cls = graph.names.get(owner), type(owner).__name__
    if rule is not None and (rule.groups is not None or _either_side(owner, at)):
        return member_kind(owner, True, at or "")  # an op of a layer that merges no channels
    if rule is not None and (name in PER_CHANNEL_OPS or name in rule.own_ops):
        return None  # the layer's own computation, which its rule describes
    where = (f" in '{at}' ({cls})" if at else f" in {cls}.forward") if owner is not None else ""
    if isinstance(mod, ops._ConcatOp) or node in graph.identity:
        return None
    if isinstance(mod, (ops._SplitOp, ops._SliceOp)):
        split = split_rule_for(owner) if owner is not None else None
        if split is not None and (split.pieces is None or _even_chunk(graph, node, split.pieces)):
            return None  # sizes refit after the merge, or a chunk in equal pieces (rules.splits)
        return f"channels split at sizes fixed in the forward code{where}"
    if isinstance(mod, ops._ReshapeOp):
        if node in graph.flatten and outs and all(channels_last(o) for o in outs):
            return None  # a flatten into a linear layer: ``repeat`` columns per channel
        return f"a reshape/view of the channels{where} (not a flatten into a linear layer)"
    if name in ROW_OPS or (name == "IndexPutBackward" and _rows_only(node.grad_fn)):
        return None
    if isinstance(mod, ops._ElementWiseOp):
        g = node.grad_fn
        if name in PER_CHANNEL_OPS:
            consts = graph.consts.get(g)  # operands without a graph, recorded in the trace
            return _constant_operand(g, f"op {name}{where}", graph.cdim.get(node), consts)
        if name in REDUCTIONS:
            dims = getattr(g, "_saved_dim", None)
            sizes = getattr(g, "_saved_self_sym_sizes", None)
            if dims is not None:
                dims = [dims] if isinstance(dims, int) else list(dims)
                nd = len(sizes) if sizes is not None else 4
                c = graph.cdim.get(node.inputs[0]) if len(node.inputs) == 1 else None
                if all(dim_at(d, nd) != (1 if c is None else c) for d in dims):
                    return None
        return f"op {name}{where} is not known to keep channels apart"
    return f"op {type(mod).__name__.strip('_')}{where} is not supported by the merge"


def _constant_operand(
    g: Any, op: str, cd: int | None = None, shapes: list[tuple[int, ...]] | None = None
) -> str | None:
    """An operand that is no node of the graph (a buffer, a weight used outside its
    layer) keeps its width after a merge: harmless only if it is one wide along the
    channels (a Python number, a scalar, a spatial mask). ``shapes``: those operands'
    shapes as the trace saw them (``inputs.constants``), else read from autograd."""
    if all(f is not None for f, _ in g.next_functions):
        return None
    nd = len(g._input_metadata[0].shape)
    dims = (cd,) if cd else (1, 2) if nd == 3 else (1,)  # 3-D, unknown: first or last
    if shapes is None:
        saved = [getattr(g, a, None) for a in ("_saved_other", "_saved_self")]
        shapes = [
            tuple(t.shape) for t in saved if isinstance(t, torch.Tensor) and not t.requires_grad
        ]
    if shapes and all(
        len(s) <= nd - d or (len(s) <= nd and s[d - (nd - len(s))] == 1)
        for s in shapes
        for d in dims
    ):
        return None
    return f"{op} applies a constant tensor to the channels (a buffer?)"


def _even_chunk(graph: Any, node: Any, pieces: int) -> bool:
    """A split of the channels into ``pieces`` equal parts (a declared module's chunk)."""
    if not isinstance(node.module, graph.dg.ops._SplitOp) or not node.inputs:
        return False
    c = graph.cdim.get(node.inputs[0])
    sizes = [tuple(m.shape) for m in node.grad_fn._input_metadata]
    return c is not None and len(sizes) == pieces and len({s[c] for s in sizes}) == 1


def _rows_only(g: Any) -> bool:
    """``out[rows] = v`` (MultiScaleRoIAlign's per-level results): one index tensor, on
    dim 0, so every channel lands in its own place."""
    idx = getattr(g, "_saved_indices", None) or ()
    return len(idx) == 1 and isinstance(idx[0], torch.Tensor)


def _either_side(layer: nn.Module, name: str | None) -> bool:
    """A layer that carries no channels on either side, for one reason (LayerNorm)."""
    verdict = member_kind(layer, True, name or "")
    return verdict not in KINDS and verdict == member_kind(layer, False, name or "")
