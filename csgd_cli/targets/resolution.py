"""The per-image resolution a target counts at: multiply-adds (and a latency) scale
with the image's area, so ``flops:0.5`` met at 32x32 is not met at 224x224 for every
network (parameters do not change). A target is chosen on an example input resized to
the deployment resolution, and every report of a target states the one it counted at."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..common.errors import CsgdError

Resolution = int | Sequence[int] | None


def at_resolution(x: Any, resolution: Resolution) -> Any:
    """``x`` (an image batch, N x C x H x W) resized to ``resolution`` (one number: a
    square; None: ``x`` as it is). Counting and timing read only the shape; the pixels
    are interpolated, so the input stays an image."""
    if resolution is None:
        return x
    size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    if len(size) != 2 or not all(isinstance(s, int) and s >= 1 for s in size):
        raise CsgdError(
            f"resolution={resolution!r} is not an image size",
            "pass resolution=<pixels> or (height, width), each >= 1",
        )
    if not (isinstance(x, torch.Tensor) and x.dim() == 4):
        raise CsgdError(
            "resolution= resizes one image batch (N, C, H, W), not this example input",
            "pass an example input at the deployment resolution instead",
        )
    if tuple(x.shape[2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def resolution_of(x: Any) -> list[int] | None:
    """The per-image resolution (H, W) an image input counts at; None for another input."""
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        return [int(s) for s in x.shape[2:]]
    return None


def label(resolution: Sequence[int] | None) -> str:
    """``at 32x32 per image`` (empty when not an image input)."""
    return f"at {resolution[0]}x{resolution[1]} per image" if resolution else ""
