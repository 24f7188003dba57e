"""What the tracer runs and follows: the example input made a graph leaf, the model's own
errors told apart from the tracer's, and the outputs the trace starts from.

Autograd is followed back from the outputs, so a layer whose result leaves the graph
(a detector's RPN head: its boxes are detached into proposals) would be missed, and its
input columns would not shrink with the channels that feed it. Its output is then an
end of the trace too: the layers that ran with a graph but are reached from no output
add their last results to the outputs (and their channels count as an output).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..common.errors import CsgdError
from ..common.nets import outputs_of, run_model
from ..rules.layers import rule_for


class ModelError(Exception):
    """The model's own forward pass raised (not the tracer): its message is the answer."""


def forward(model: nn.Module, x: Any) -> Any:
    """``run_model``; the model's own exception becomes a one-line ``ModelError``."""
    try:
        return run_model(model, x)
    except CsgdError:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelError(f"{type(e).__name__}: {msg[:200]}") from None


def leaves(x: Any) -> Any:
    """``x`` with every floating tensor (in tuples, lists and dicts too) a fresh leaf that
    requires grad: the trace follows autograd back to them."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone().requires_grad_(True) if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: leaves(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(leaves(v) for v in x)
    return x


@contextmanager
def recording(model: nn.Module, spans: list[tuple[int, int, nn.Module]]) -> Iterator[None]:
    """Record each module call's range of autograd sequence numbers (ops created in
    its forward), and freeze the parameters of ruled layers (restored after)."""
    leaf = torch.zeros((), requires_grad=True)
    open_: dict[int, list[int]] = {}

    def mark() -> int:
        with torch.enable_grad():
            return (leaf * 1).grad_fn._sequence_nr()

    def pre(m: nn.Module, *_: Any) -> None:
        open_.setdefault(id(m), []).append(mark())

    def post(m: nn.Module, *_: Any) -> None:
        spans.append((open_[id(m)].pop(), mark(), m))

    hooks = [m.register_forward_pre_hook(pre) for m in model.modules()]
    hooks += [m.register_forward_hook(post) for m in model.modules()]
    frozen = [
        p
        for m in model.modules()
        if rule_for(m) is not None
        for p in m.parameters(recurse=False)
        if p.requires_grad
    ]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for p in frozen:
            p.requires_grad_(True)
        spans.sort(key=lambda s: (s[0], -s[1]))


@contextmanager
def one_thread() -> Iterator[None]:
    """The trace's forward pass on one thread (restored after): a batch of one gains
    little from more, and on busy cores OpenMP's threads wait for each other (a timm
    network's forward at 224x224 took 5-11 s on 2 threads, 0.4 s on one)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@contextmanager
def layer_results(model: nn.Module, into: list[torch.Tensor]) -> Iterator[None]:
    """Collect into ``into`` every result with a graph of a layer csgd has a rule for."""

    def hook(m: nn.Module, _inp: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            into.append(out)

    hooks = [m.register_forward_hook(hook) for m in model.modules() if rule_for(m) is not None]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


class _Constants(TorchFunctionMode):
    """Records, per autograd node of an op's result, the shapes of its operands that
    carry no graph: a Python number is shape () (timm's ``out += 0``), a buffer its own."""

    def __init__(self, into: dict[Any, list[tuple[int, ...]]]) -> None:
        super().__init__()
        self.into = into

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.grad_fn is not None and len(args) >= 2:
            shapes = [
                () if isinstance(a, (int, float)) else tuple(a.shape)
                for a in args
                if (isinstance(a, (int, float)) and not isinstance(a, bool))
                or (isinstance(a, torch.Tensor) and a.grad_fn is None and not a.requires_grad)
            ]
            if shapes:
                self.into[out.grad_fn] = shapes
        return out


@contextmanager
def constants(into: dict[Any, list[tuple[int, ...]]]) -> Iterator[None]:
    """Record the operands without a graph of every op run inside (``_Constants``)."""
    with _Constants(into):
        yield


def _reached(starts: list[Any]) -> set[Any]:
    seen, stack = set(), list(starts)
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        stack.extend(f for f, _ in getattr(fn, "next_functions", ()))
    return seen


def trace_outputs(out: Any, results: list[torch.Tensor]) -> list[torch.Tensor]:
    """The outputs with a graph (a detector's labels carry none), then the layer
    results reached from none of them and from no other such result (dangling ends)."""
    outs = [t for t in outputs_of(out) if t.grad_fn is not None]
    seen = _reached([t.grad_fn for t in outs])
    dangling = [t for t in results if t.grad_fn not in seen]
    below = _reached([f for t in dangling for f, _ in t.grad_fn.next_functions])
    return outs + [t for t in dangling if t.grad_fn not in below]


def where(graph: Any, node: Any) -> str:
    """`` in 'layer' (Class)`` or `` in Class.forward``: the module whose forward ran the op
    of ``node`` (of a ``graph.Graph``), for a reason that names it."""
    owner = graph.owner(node)
    if owner is None:
        return ""
    at = graph.names.get(owner)
    return f" in '{at}' ({type(owner).__name__})" if at else f" in {type(owner).__name__}.forward"
