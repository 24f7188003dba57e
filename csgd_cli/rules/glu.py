"""Gated MLPs that pack the gate and the value in one layer (GLU, "packed" SwiGLU).

Their first layer writes ``2 h`` channels and the forward chunks them in two halves:
channel ``i`` of one half gates channel ``i`` of the other (``x1 * act(x2)``, or the
reverse), so the two must stay paired. The trace shows a split either way; whether its
sizes follow the width (``chunk(2)``) or are fixed in the code (``split(h)``) cannot be
told from the graph, so a split of the channels is refused unless the class that runs it
is declared here as chunking into equal pieces. Then group channel ``i`` is rows ``i`` and
``i + h`` of the packed layer (two ``out`` members, at offsets 0 and ``h``) and input
column ``i`` of the layer after it: C-SGD pulls both rows of a cluster together, the merge
keeps ``k`` rows of each half, and the thin layer's ``2 k`` rows chunk into the same
pairs. Nothing is refit: the chunk follows the width.

Only the classes named match (not subclasses: a subclass may change the forward). A norm
over the hidden channels (timm's ``norm_layer``) is judged by its own rule (LayerNorm:
excluded, said).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .attention import exact_class


@dataclass(frozen=True)
class ChunkRule:
    name: str
    match: Callable[[nn.Module], bool]
    pieces: int = 2  # its forward chunks the packed layer's output in this many equal parts


_HF = tuple(  # ``gate_up_proj`` chunked in two, ``down_proj`` after the product
    f"transformers.models.{m}.modeling_{m}.{c}MLP"
    for m, c in (("phi3", "Phi3"), ("glm", "Glm"), ("glm4", "Glm4"))
)
CHUNK_RULES: list[ChunkRule] = [
    ChunkRule("timm GluMlp (SwiGLUPacked)", exact_class("timm.layers.mlp.GluMlp")),
    ChunkRule("transformers packed gate/up MLP", exact_class(*_HF)),
]


def chunk_pieces(m: nn.Module) -> int | None:
    """In how many equal pieces the forward of ``m`` chunks its channels, or None when no
    rule declares it (then any split of its channels is refused)."""
    return next((r.pieces for r in CHUNK_RULES if r.match(m)), None)
