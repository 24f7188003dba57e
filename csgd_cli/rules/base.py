"""The shape of a layer rule (``layers.RULES`` holds them; ``attention`` adds its own).

A rule answers every question csgd asks about one layer kind; see ``layers`` for the
fields every rule has. Two optional fields serve modules made of several layers
(attention):

- ``groups(m, name)``: channel groups the module declares for its inner layers (the heads
  and head channels of an attention), which the tracer takes instead of walking them;
- ``refit(m)``: after its inner layers were resized to a merged state dict, the module's
  own attributes that follow their widths (``num_heads``, ``head_dim``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from .groups import ChannelGroup

Role = Literal["kernel", "affine", "buffer"]
TensorSpec = tuple[str, int, Role]  # (attribute, dimension of the channels, role)
StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LayerRule:
    name: str
    match: Callable[[nn.Module], bool]
    kind: Callable[[nn.Module, bool], str]  # a Kind, or why not ({layer}: where the name goes)
    tensors: Callable[[nn.Module, str], list[TensorSpec]]
    resize: Callable[[nn.Module, StateDict, str], None]
    own_ops: frozenset[str] = field(default_factory=frozenset)
    groups: Callable[[nn.Module, str], list[ChannelGroup]] | None = None
    refit: Callable[[nn.Module], None] | None = None
    # its multiply-adds are its weight's size x output positions (what a FLOPs target
    # counts); False: its cost is not modelled (per-channel layers are negligible)
    weighted: bool = False
    # Torch-Pruning's function for its output channels: the branch of an importance
    # that scores them (None: no criterion reads this layer)
    scored_by: str | None = None
    # a producer (a layer writing channels of its own: conv, linear) writes them, and
    # reads its input's, in this dim: 1 (NCHW) or -1 (the last: tokens, NHWC maps);
    # None: not a producer (a per-channel layer keeps its input's dim)
    channel_dim: int | None = None


def subclass_of(*paths: str) -> Callable[[nn.Module], bool]:
    """Matches instances of the classes named ``package.module.Class`` and their
    subclasses, without importing the package (timm is optional)."""
    names = frozenset(paths)
    return lambda m: any(f"{c.__module__}.{c.__qualname__}" in names for c in type(m).__mro__)


def exact_class(*paths: str) -> Callable[[nn.Module], bool]:
    """Matches the classes named, not subclasses (a subclass may change the forward)."""
    names = frozenset(paths)
    return lambda m: f"{type(m).__module__}.{type(m).__qualname__}" in names


def with_bias(m: nn.Module, weight: TensorSpec) -> list[TensorSpec]:
    return [weight] + ([("bias", 0, "affine")] if getattr(m, "bias", None) is not None else [])


def with_versions(sd: StateDict, model_sd: StateDict) -> StateDict:
    """``sd`` with ``model_sd``'s per-module versions where it has none (a dict built by a
    merge or read from a file): a layer's loader may require its own (torchvision's
    MNASNet refuses a state dict without one)."""
    if getattr(sd, "_metadata", None) is not None:
        return sd
    out = OrderedDict(sd)
    out._metadata = getattr(model_sd, "_metadata", None)  # type: ignore[attr-defined]
    return out
