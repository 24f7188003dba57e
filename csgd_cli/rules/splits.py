"""Modules whose forward splits their channels: the one table the tracer asks before it
refuses a split or slice of the channels (``tracing/ops.py``).

A split's sizes either follow the width or are fixed in the code; the graph cannot tell
which. A rule declares one of two kinds:

- ``refit``: the sizes are attributes of the module (timm's MixedConv2d, Res2Net's block);
  ``layers.fit_to_state_dict`` recomputes them from the resized children after a merge;
- ``pieces``: the forward chunks the channels into this many equal parts (GLU, "packed"
  SwiGLU: one layer writes ``2 h`` channels and channel ``i`` of one half gates channel
  ``i`` of the other). Group channel ``i`` is then rows ``i`` and ``i + h`` of the packed
  layer (two ``out`` members, at offsets 0 and ``h``) and input column ``i`` of the layer
  after the product: the merge keeps ``k`` rows of each half, and the thin layer's ``2 k``
  rows chunk into the same pairs. Nothing is refit. Only a split into ``pieces`` equal
  parts is accepted, and only the classes named match (a subclass may change the
  forward); a norm over the hidden channels is judged by its own rule.

Any other split or slice of the channels excludes its group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from torch import nn

from .base import exact_class, subclass_of


class SplitRule(NamedTuple):
    name: str
    match: Callable[[nn.Module], bool]
    refit: Callable[[nn.Module], None] | None = None  # the split sizes from resized children
    pieces: int | None = None  # or: the forward chunks the channels in this many equal parts


def _refit_mixed_conv(m: nn.Module) -> None:
    convs = list(m.values())  # one conv per kernel size, each on its split of the input
    m.splits = [c.in_channels for c in convs]
    m.in_channels, m.out_channels = sum(m.splits), sum(c.out_channels for c in convs)


def _refit_res2net(m: nn.Module) -> None:
    # ``scale`` splits: one per 3x3 conv, the last passed on (or pooled) into conv3
    widths = [c.in_channels for c in m.convs]
    rest = m.conv3.in_channels - sum(c.out_channels for c in m.convs)
    m.width = widths + ([rest] if m.scale > 1 else [])  # torch.split takes a list of sizes


_R2N = ("timm.models.res2net.Bottle2neck", "timm.models.dla.DlaBottle2neck")
_HF = tuple(  # ``gate_up_proj`` chunked in two, ``down_proj`` after the product
    f"transformers.models.{m}.modeling_{m}.{c}MLP"
    for m, c in (("phi3", "Phi3"), ("glm", "Glm"), ("glm4", "Glm4"))
)
SPLIT_RULES: list[SplitRule] = [
    SplitRule("mixed conv", subclass_of("timm.layers.mixed_conv2d.MixedConv2d"), _refit_mixed_conv),
    SplitRule("res2net block", subclass_of(*_R2N), _refit_res2net),
    SplitRule("timm GluMlp (SwiGLUPacked)", exact_class("timm.layers.mlp.GluMlp"), pieces=2),
    SplitRule("transformers packed gate/up MLP", exact_class(*_HF), pieces=2),
]


def split_rule_for(m: nn.Module) -> SplitRule | None:
    return next((r for r in SPLIT_RULES if r.match(m)), None)
