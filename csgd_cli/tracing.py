"""A model's channel groups: declared by the model, else traced from one forward pass.

Torch-Pruning's ``DependencyGraph`` (the field's standard tracer for coupled channels)
follows autograd from the logits back to the input and tells, for the output channels of
a conv or linear layer, every tensor slice that must shrink with them, with index maps
through concatenations, splits and flattens. Each of its groups is mapped onto our
``ChannelGroup``:

- every layer is mapped by its rule (``csgd_cli.layers``): conv/linear output rows ->
  ``out``; BatchNorm, per-channel norms and depthwise convs -> ``channel``; conv/linear
  input columns -> ``in`` (``repeat`` columns per channel after a flatten);
- a member is cut into runs where its channels sit contiguously in the module, so a BN
  over a concatenation is a ``channel`` member at its offset;
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

import re
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import CsgdError
from .groups import ChannelGroup, Member
from .layers import member_kind, rule_for

# autograd ops that act on every channel separately (names without the trailing digit)
_PER_CHANNEL_OPS = {
    "AddBackward", "SubBackward", "MulBackward", "DivBackward", "NegBackward",
    "ReluBackward", "HardtanhBackward", "SigmoidBackward", "SiluBackward", "TanhBackward",
    "HardswishBackward", "HardsigmoidBackward", "GeluBackward", "LeakyReluBackward",
    "EluBackward", "SoftplusBackward", "MishBackward", "ExpBackward", "PowBackward",
    "CloneBackward", "MaxPool2DWithIndicesBackward", "MaxPool2DBackward",
    "AvgPool2DBackward", "AdaptiveAvgPool2DBackward", "AdaptiveMaxPool2DBackward",
    "MaxPool1DWithIndicesBackward", "AvgPool1DBackward", "AdaptiveAvgPool1DBackward",
    "UpsampleNearest2DBackward", "UpsampleBilinear2DBackward", "ConstantPadNdBackward",
    "ReflectionPad2DBackward", "ReplicationPad2DBackward", "ToCopyBackward",
}  # fmt: skip
_REDUCTIONS = {"MeanBackward", "SumBackward", "AmaxBackward", "SqueezeBackward",
               "UnsqueezeBackward"}  # fmt: skip
_CACHE_ATTR = "_csgd_traced_groups"


def _op_name(grad_fn: Any) -> str:
    return re.sub(r"\d+$", "", grad_fn.name()) if grad_fn is not None else "?"


def example_input(model: nn.Module) -> torch.Tensor:
    """One input of the model's shape: ``model.input_shape``, else ``in_channels`` and
    ``image_size`` of its registry kwargs, else the first conv's inputs at 64x64."""
    p = next(iter(model.parameters()), None)
    shape = getattr(model, "input_shape", None)
    if shape is None:
        kw = (getattr(model, "arch", None) or {}).get("kwargs", {})
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        c = kw.get("in_channels") or (first.in_channels if first is not None else 3)
        s = kw.get("image_size") or 64
        shape = (c, s, s)
    kw = {"dtype": p.dtype, "device": p.device} if p is not None else {}
    return torch.randn(1, *shape, **kw)


def channel_groups(model: nn.Module, x: torch.Tensor | None = None) -> list[ChannelGroup]:
    """The model's groups: its own ``channel_groups()`` when it declares them, else traced
    from one forward pass of ``x`` (default: ``example_input(model)``)."""
    fn = getattr(model, "channel_groups", None)
    if fn is not None:
        return fn()
    return traced_groups(model, x)


def _signature(model: nn.Module) -> tuple:
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def traced_groups(model: nn.Module, x: torch.Tensor | None = None) -> list[ChannelGroup]:
    """The model's channel groups from a trace (cached on the model until a layer changes
    shape). Raises ``CsgdError`` when the forward pass cannot be traced."""
    sig = _signature(model)
    cached = model.__dict__.get(_CACHE_ATTR)
    if cached is not None and cached[0] == sig:
        return [ChannelGroup(g.name, g.width, list(g.members), g.excluded) for g in cached[1]]
    groups = _trace(model, example_input(model) if x is None else x)
    model.__dict__[_CACHE_ATTR] = (sig, groups)
    return [ChannelGroup(g.name, g.width, list(g.members), g.excluded) for g in groups]


def trace_seconds(model: nn.Module) -> float:
    """Wall time of one uncached trace (reported in the docs)."""
    model.__dict__.pop(_CACHE_ATTR, None)
    t = time.perf_counter()
    traced_groups(model)
    return time.perf_counter() - t


def _dependency_graph(model: nn.Module, x: torch.Tensor) -> Any:
    import torch_pruning as tp

    name = (getattr(model, "arch", None) or {}).get("name", type(model).__name__)
    was_training = model.training
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tp.DependencyGraph().build_dependency(model, x, verbose=False)
    except CsgdError:
        raise
    except Exception as e:  # any failure of the user's forward pass or of the tracer
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CsgdError(
            f"cannot trace model {name} to find its channel groups ({type(e).__name__}: {msg[:160]})",
            "make its forward pass a plain tensor computation (no data-dependent Python on "
            "tensor values), or declare channel_groups() on the model",
        ) from None
    finally:
        model.train(was_training)


@dataclass
class _Raw:
    """One Torch-Pruning group: per (module, kind) the (local index, root index) pairs."""

    root: str
    pairs: dict[tuple[str, str], list[tuple[int, int]]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    logits: bool = False
    output: bool = False

    def slots(self) -> set[tuple[str, str, int]]:
        return {(m, k, i) for (m, k), ps in self.pairs.items() for i, _ in ps}


def _classify(dg: Any, names: dict[Any, str], dep: Any) -> tuple[str | None, str | None]:
    """(kind or None, problem or None) of one dependency target of a group."""
    import torch_pruning as tp

    node, mod = dep.target, dep.target.module
    if isinstance(mod, nn.Parameter):
        return None, f"parameter '{dg._param_to_name.get(mod, '?')}' acts on the channels"
    name = names.get(mod)
    if name is not None:  # a layer: its rule decides (csgd_cli.layers)
        kind = member_kind(mod, bool(dg.is_out_channel_pruning_fn(dep.handler)), name)
        if kind in ("out", "channel", "in"):
            return kind, None
        return None, kind
    op = tp.ops
    if isinstance(mod, (op._ConcatOp, op._SplitOp, op._SliceOp)):
        return None, None
    if isinstance(mod, op._OutputOp):
        return "output", None
    outs = [n.module for n in node.outputs]
    if isinstance(mod, op._ReshapeOp):
        if outs and all(isinstance(o, nn.Linear) for o in outs):
            return None, None  # a flatten into a linear layer: ``repeat`` columns per channel
        return None, "a reshape/view of the channels (not a flatten into a linear layer)"
    if isinstance(mod, op._ElementWiseOp):
        gf = node.grad_fn
        kind = _op_name(gf)
        if kind in _PER_CHANNEL_OPS:
            return None, None
        if kind == "TBackward" and outs and all(isinstance(o, nn.Linear) for o in outs):
            return None, None  # a linear layer's own weight transpose
        if kind in _REDUCTIONS:
            dims = getattr(gf, "_saved_dim", None)
            sizes = getattr(gf, "_saved_self_sym_sizes", None)
            if dims is not None:
                dims = [dims] if isinstance(dims, int) else list(dims)
                nd = len(sizes) if sizes is not None else 4
                if all(d % nd != 1 for d in dims):
                    return None, None
        return None, f"op {kind} is not known to keep channels apart"
    return None, f"op {type(mod).__name__.strip('_')} is not supported by the merge"


def _raw_group(dg: Any, names: dict[Any, str], module: nn.Module) -> _Raw:
    pruner = dg.get_pruner_of_module(module)
    group = dg.get_pruning_group(
        module, pruner.prune_out_channels, list(range(pruner.get_out_channels(module)))
    )
    raw = _Raw(names[module])
    for item in group.items:
        kind, problem = _classify(dg, names, item.dep)
        if problem:
            raw.problems.append(problem)
        if kind == "output" or (kind == "out" and not item.dep.target.outputs):
            raw.output = True  # the logits (or another output) of the network
        if kind is not None and kind != "output":
            key = (names[item.dep.target.module], kind)
            raw.pairs.setdefault(key, []).extend(
                zip((int(i) for i in item.idxs), (int(r) for r in item.root_idxs), strict=True)
            )
    raw.logits = raw.output and all(
        isinstance(dg.model.get_submodule(m), nn.Linear) for (m, k) in raw.pairs if k == "out"
    )
    return raw


def _runs(pairs: Iterable[tuple[int, int]], kind: str, order: list[int]) -> list[Member] | None:
    """Members for one (module, kind): runs of group channels stored contiguously in the
    module (``repeat`` columns each for ``in``); None when the layout is not mappable."""
    by_root: dict[int, list[int]] = {}
    for local, root in set(pairs):
        by_root.setdefault(root, []).append(local)
    rank = {r: i for i, r in enumerate(order)}
    repeat = {len(v) for v in by_root.values()}
    if len(repeat) != 1 or (kind != "in" and repeat != {1}):
        return None
    rep = repeat.pop()
    blocks = []  # (group channel, first local index) with a contiguous block of ``rep``
    for root, locs in by_root.items():
        locs.sort()
        if locs != list(range(locs[0], locs[0] + rep)) or locs[0] % rep:
            return None
        blocks.append((rank[root], locs[0] // rep))
    blocks.sort()
    out, run = [], [blocks[0]]
    for g, lo in blocks[1:]:
        if g == run[-1][0] + 1 and lo == run[-1][1] + 1:
            run.append((g, lo))
        else:
            out.append(run)
            run = [(g, lo)]
    out.append(run)
    return [Member("", kind, r[0][1], r[0][0], len(r), rep) for r in out]


def _to_group(raw: _Raw, index: dict[str, int]) -> ChannelGroup:
    order = sorted({r for ps in raw.pairs.values() for _, r in ps})
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


def _trace(model: nn.Module, x: torch.Tensor) -> list[ChannelGroup]:
    dg = _dependency_graph(model, x)
    names = {m: n for n, m in model.named_modules()}
    index = {n: i for i, n in enumerate(names.values())}
    roots = [
        m
        for m in model.modules()
        if getattr(rule_for(m), "name", None) in ("conv", "linear") and m in dg.module2node
    ]
    raws: list[_Raw] = []
    covered: set[tuple[str, int]] = set()
    for m in roots:
        n = names[m]
        width = m.out_features if isinstance(m, nn.Linear) else m.out_channels
        if all((n, i) in covered for i in range(width)):
            continue
        raw = _raw_group(dg, names, m)
        covered |= {(mod, i) for mod, k, i in raw.slots() if k in ("out", "channel")}
        raws.append(raw)
    # a later root may span earlier ones (a depthwise conv over a concatenation): keep the
    # widest; two groups that overlap without one holding the other cannot be mapped
    slots = [r.slots() for r in raws]
    keep = [
        i
        for i in range(len(raws))
        if not any(j != i and slots[i] < slots[j] for j in range(len(raws)))
    ]
    groups = []
    for i in keep:
        if raws[i].logits:
            continue
        g = _to_group(raws[i], index)
        clash = next((j for j in keep if j != i and slots[i] & slots[j]), None)
        if clash is not None and g.excluded is None:
            g.excluded = f"channels also coupled with the group of '{raws[clash].root}'"
        groups.append(g)
    _unique_names(groups)
    return sorted(groups, key=lambda g: index.get(g.name.split("@")[0], 0))


def _unique_names(groups: list[ChannelGroup]) -> None:
    seen: dict[str, int] = {}
    for g in groups:
        seen[g.name] = seen.get(g.name, 0) + 1
    for g in groups:
        if seen[g.name] > 1:
            first = next(m for m in g.members if m.module == g.name)
            g.name = f"{g.name}@{first.offset}"
