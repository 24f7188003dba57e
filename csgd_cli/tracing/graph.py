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
  ``ops`` accept ops run inside a layer (BatchNormAct2d's ``batch_norm``).
- **Shapes from the trace, not inferred** (``maps``). Concatenations, splits, slices and flattens
  get their index maps from the shapes autograd recorded, per edge, in the order a
  dependency applies them (TP infers sizes recursively, which fails on deep graphs, maps
  a split's pieces by consumer order, and composes split-into-concat maps backwards).
- **Linear walks** (``walk``): each (node, channel) of a group is visited once.
"""

from __future__ import annotations

import bisect
import warnings
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import torch
from torch import nn

from ..common.errors import CsgdError
from ..rules import queries
from ..rules.layers import member_kind, member_tensors, rule_for
from .inputs import (
    ModelError,
    constants,
    forward,
    layer_results,
    leaves,
    one_thread,
    recording,
    trace_outputs,
)
from .maps import exact_index_maps, shape


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


class _Producer:
    """TP pruner of a producer TP does not know (a layer kind only its rule describes):
    its output channels and its input's, not coupled to each other."""

    pruning_dim = 0

    def prune_out_channels(self, layer: nn.Module, idxs: Any) -> nn.Module:
        raise NotImplementedError  # csgd merges through layers.py

    def prune_in_channels(self, layer: nn.Module, idxs: Any) -> nn.Module:
        raise NotImplementedError

    def get_out_channels(self, layer: nn.Module) -> int:
        return queries.out_width(layer)

    def get_in_channels(self, layer: nn.Module) -> int:
        return queries.in_width(layer)


def _custom_pruners(model: nn.Module, tp: Any) -> dict[type, Any]:
    """A TP pruner for each ruled layer kind TP does not know, so it is a node of the
    graph: per-channel layers (in == out) and producers (by their rules)."""
    custom: dict[type, Any] = {}
    for m in model.modules():
        if rule_for(m) is None or tp.ops.module2type(m) != tp.ops.OPTYPE.ELEMENTWISE:
            continue
        if member_kind(m, True) == "channel":
            custom[type(m)] = _PerChannel()
        elif queries.channel_dim(m) is not None:
            custom[type(m)] = _Producer()
    return custom


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

    custom = _custom_pruners(model, tp)
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
            one_thread(),
            # shapes come from the trace (below), not from TP's recursive inference
            mock.patch.object(shape_infer, "init_shape_information", lambda g: None),
            mock.patch.object(index_mapping, "update_index_mapping", lambda g: None),
        ):
            warnings.simplefilter("ignore")
            graph.dg.build_dependency(
                model,
                x,
                forward_fn=forward,
                output_transform=lambda out: trace_outputs(out, results),
                verbose=False,
                customized_pruners=custom,
            )
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
    exact_index_maps(graph)
    return graph


def channels_last(node: Any) -> bool:
    """A producer's node that writes its channels last (a linear layer) into more than
    two dims (tokens, NHWC maps): its channels are the last dim, not dim 1."""
    return queries.channels_last(node.module) and len(shape(node.grad_fn, 0)) > 2
