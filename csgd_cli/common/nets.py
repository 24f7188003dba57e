"""What csgd measures on a model: chi (kernel deviation), top-1 and loss, parameters,
FLOPs (multiply-adds) and latency."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@torch.no_grad()
def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_model(model: nn.Module, x: Any) -> Any:
    """``model(x)``; a tuple ``x`` holds the forward's positional arguments, a dict its
    keyword arguments (``{"input_ids": ...}``, as transformers models take them), and a
    list too, unless the forward's first argument is a list (torchvision detectors:
    ``images: List[Tensor]``, or named ``images``)."""
    args, kwargs = call_args(model, x)
    return model(*args, **kwargs)


def call_args(model: nn.Module, x: Any) -> tuple[tuple, dict[str, Any]]:
    """The positional and keyword arguments ``run_model`` passes for ``x``."""
    if isinstance(x, dict):
        return (), x
    if isinstance(x, list) and _takes_a_list(model):
        return (x,), {}
    return (tuple(x) if isinstance(x, (tuple, list)) else (x,)), {}


LIST_TYPES = ("List", "list", "Sequence")


def _takes_a_list(model: nn.Module) -> bool:
    try:
        first = next(iter(inspect.signature(model.forward).parameters.values()), None)
    except (TypeError, ValueError):
        return False
    if first is None:
        return False
    ann = first.annotation  # torchvision's RetinaNet has no annotation, only the name
    name = ann if isinstance(ann, str) else getattr(typing.get_origin(ann), "__name__", "")
    return first.name == "images" or name.split("[")[0].rsplit(".", 1)[-1] in LIST_TYPES


def first_input(model: nn.Module, x: Any, n: int = 1) -> Any:
    """An input ``run_model`` passes the same way as ``x``, of its first ``n`` samples
    (a top-level list: the forward's arguments, or a detector's images)."""
    args, kwargs = call_args(model, x)
    if kwargs:
        return {k: first_samples(v, n) for k, v in kwargs.items()}
    return tuple(first_samples(a, n) for a in args)


def first_samples(x: Any, n: int = 1) -> Any:
    """The first ``n`` samples of an argument: of a tensor, of each tensor in a tuple or
    dict, and the first ``n`` items of a list (a detector's images, one per sample)."""
    if isinstance(x, dict):
        return {k: first_samples(v, n) for k, v in x.items()}
    if isinstance(x, list):
        return x[:n]
    if isinstance(x, tuple):
        return tuple(first_samples(v, n) for v in x)
    return x[:n] if isinstance(x, torch.Tensor) and x.dim() else x


def outputs_of(out: Any) -> list[torch.Tensor]:
    """Every tensor of a model's output (a tensor, or tuples/lists/dicts of them), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out, key=str) for t in outputs_of(out[k])]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in outputs_of(o)]
    return []


@torch.no_grad()
def count_macs(model: nn.Module, example: Sequence[int] | Any) -> int:
    """Multiply-adds of one forward pass on one sample, by torch's own flop counter.
    ``example``: the input shape of one sample, or an example input (its first sample)."""
    if isinstance(example, dict) or (
        isinstance(example, (torch.Tensor, tuple, list))
        and not all(isinstance(v, int) for v in example)
    ):
        x = first_input(model, example)
    else:
        p = next(model.parameters(), None)  # a network of no parameters: the defaults
        x = torch.zeros(
            1,
            *example,
            device=p.device if p is not None else None,
            dtype=p.dtype if p is not None else None,
        )
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as fc:
            run_model(model, x)
    except AssertionError:  # the counter's module hooks meet a tensor that requires grad
        with torch.enable_grad(), FlopCounterMode(display=False) as fc:  # but has no grad_fn
            run_model(model, x)  # under no_grad (timm's PiT): counted with grad on
    finally:
        model.train(was_training)
    return fc.get_total_flops() // 2
