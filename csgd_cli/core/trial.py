"""A trial merge before training: the thin network's forward must run.

The trace sees tensors, not Python: a forward that reads its input's width as a number
(timm's ``LambdaLayer`` reshapes its output to ``x.shape[1]`` channels, whatever its
own layers write) traces as prunable, yet its thin network fails. Such a group must be
refused before any training, not by a traceback in the merge. So the planned clusters
are merged once on the untrained weights and the example input is run through the thin
network (shapes only: the numbers are not checked here); if that fails, each pruned group
is tried alone and the first one whose merge breaks the forward is named.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..common.errors import CsgdError
from ..common.nets import run_model
from ..rules.groups import ChannelGroup, Clusters
from ..tracing.trace import example_input
from .surgery import merge


def _fails(model: nn.Module, groups: Sequence[ChannelGroup], clusters: Clusters, x: Any) -> str:
    """Why the thin network's forward fails on ``x`` ("" when it runs)."""
    thin = merge(model, groups, clusters).eval()
    try:
        with torch.no_grad():
            run_model(thin, x)
    except Exception as e:  # the user's forward code: any error at all
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        return f"{type(e).__name__}: {msg}"
    return ""


def _guess(model: nn.Module) -> Any:
    """The tracer's guess of an input, if the network runs on it (else None: no trial)."""
    was = model.training
    try:
        x = example_input(model)
        with torch.no_grad():
            run_model(model.eval(), x)
    except Exception:  # the guessed shape does not fit: the merge's own check decides
        return None
    finally:
        model.train(was)
    return x


def check_thin_forward(
    model: nn.Module, groups: Sequence[ChannelGroup], clusters: Clusters, x: Any = None
) -> None:
    """Refuse, in one line naming the groups, clusters whose merged network cannot run
    on ``x`` (default: the tracer's guess, when the network runs on it)."""
    pruned = {k: v for k, v in clusters.items() if v and len(v) < sum(map(len, v))}
    x = x if x is not None or not pruned else _guess(model)
    if x is None or not pruned or not (why := _fails(model, groups, pruned, x)):
        return
    bad = [k for k in pruned if _fails(model, groups, {k: pruned[k]}, x)]
    names = ", ".join(f"'{k}'" for k in bad[:3]) + (f" and {len(bad) - 3} more" if bad[3:] else "")
    raise CsgdError(
        f"the network's forward fails once {f'groups {names} are' if bad else 'it is'} "
        f"narrowed ({why}): its code reads a width the merge cannot change",
        f"exclude them (exclude={bad!r}; csgd run: prune.exclude)" if bad else "exclude groups",
    )
