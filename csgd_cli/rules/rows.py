"""A group's rows: what the optimizer pulls together, chi measures and k-means reads.

Each ``out`` and ``channel`` member of a group gives one ``RowBlock`` per centripetal
tensor (``layers.member_rows``, ``layers.segment_rows``): the slab of the tensor that
holds the group channels it covers. A channel is one row of the channel dimension, or
``block`` rows (a whole attention head: ``head_dim`` rows of q, k and v); the channel
dimension is usually 0, or another one (Swin's relative position bias table holds one
column per head). ``RowBlock.rows`` gives the slab as an
``(n, D)`` matrix, one row per group channel, which is what every consumer works on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..common.errors import CsgdError
from .base import Role


@dataclass(frozen=True)
class RowBlock:
    """Group channels ``[start, start + n)`` in one tensor: ``n * block`` entries of its
    dimension ``dim`` from ``row`` (``tensor.narrow(dim, row, n * block)``, a view), with
    its role (kernel, affine, buffer)."""

    key: str  # state_dict key
    tensor: torch.Tensor  # the parameter or buffer
    row: int
    start: int
    n: int
    role: Role
    block: int = 1  # entries of ``dim`` per group channel (an attention head: head_dim)
    dim: int = 0

    def slab(self, t: torch.Tensor | None = None) -> torch.Tensor:
        """The block's entries of ``t`` (default its tensor; or a tensor of its shape,
        e.g. a gradient or an optimizer's buffer), channel dimension first: a view."""
        t = self.tensor if t is None else t
        return t.narrow(self.dim, self.row, self.n * self.block).movedim(self.dim, 0)

    def rows(self, t: torch.Tensor | None = None) -> torch.Tensor:
        """``(n, D)``: one row per group channel (a view where the layout allows, else a
        copy: write back with ``put``)."""
        return self.slab(t).reshape(self.n, -1)

    def put(self, rows: torch.Tensor, t: torch.Tensor | None = None) -> None:
        """Write ``(n, D)`` rows back into the block's entries of ``t``."""
        s = self.slab(t)
        s.copy_(rows.reshape(s.shape))

    def view(self, t: torch.Tensor) -> torch.Tensor:
        """``rows(t)`` that must be a view (an optimizer's persistent slice of a buffer)."""
        s = self.slab(t)
        try:
            return s.view(self.n, -1)
        except RuntimeError:
            raise CsgdError(
                f"the rows of {self.key} are not contiguous per channel",
                # nn.Module has no contiguous(): name the call that exists
                "call model.to(memory_format=torch.contiguous_format) first, or exclude its group",
            ) from None
