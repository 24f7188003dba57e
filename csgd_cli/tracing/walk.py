"""Index arithmetic on the traced graph: the maps that carry channel indices across
concatenations, splits, slices and flattens (set by ``trace_graph`` on each edge), and
the walk that collects one group (``tracing``).

A channel travels as a row (its index in the current node, the root layer's index).
Every map acts on each row alone, so the walk visits each (node, handler, row) once:
linear in the graph, where Torch-Pruning re-walks a node for every distinct index list
that reaches it (exponential on ReXNet's partial residuals: minutes before a step).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from ..common.errors import CsgdError

TRACE_SECONDS = 60.0  # a walk that takes longer (CPU time, not wall) stops with one line
Rows = np.ndarray  # (n, 2) int64: index in the node, root index


@dataclass(frozen=True)
class Take:
    """Out of a concatenation or a split piece, into a slice: keep the rows with
    ``lo <= index < hi`` on the ``step``, renumbered from 0."""

    lo: int
    hi: int
    step: int = 1

    def __call__(self, rows: Rows) -> Rows:
        i = rows[:, 0]
        keep = (i >= self.lo) & (i < self.hi) & ((i - self.lo) % self.step == 0)
        out = rows[keep].copy()
        out[:, 0] = (out[:, 0] - self.lo) // self.step
        return out


@dataclass(frozen=True)
class Put:
    """Into a concatenation or a split tensor, out of a slice: index ``i`` -> ``at + step * i``
    for the ``n`` indices the piece has (others came by another path: dropped, so that
    indices cannot grow round a loop of pieces, as in a detector's post-processing)."""

    at: int
    step: int = 1
    n: int | None = None

    def __call__(self, rows: Rows) -> Rows:
        out = rows if self.n is None else rows[(rows[:, 0] >= 0) & (rows[:, 0] < self.n)]
        out = out.copy()
        out[:, 0] = self.at + self.step * out[:, 0]
        return out


@dataclass(frozen=True)
class Flatten:
    """An NCHW map flattened: channel ``c`` is columns ``c * n ... c * n + n - 1``
    (``back``: from the columns to the channels). ``channels``: the map's channel count;
    an index at or past it came through an op no map follows (its group is excluded for
    that op) and stays one row past the columns, not ``n`` (ResNeSt: 1,024 x 512)."""

    n: int
    back: bool = False
    channels: int | None = None

    def __call__(self, rows: Rows) -> Rows:
        if self.back:
            out = rows.copy()
            out[:, 0] //= self.n
            return np.unique(out, axis=0)
        lost = np.zeros(len(rows), bool) if self.channels is None else rows[:, 0] >= self.channels
        out = np.repeat(rows[~lost], self.n, axis=0)
        out[:, 0] = out[:, 0] * self.n + np.tile(np.arange(self.n), len(out) // self.n)
        if lost.any():
            past = rows[lost].copy()
            past[:, 0] *= self.n
            out = np.concatenate((out, past))
        return out


def walk(graph: Any, module: nn.Module) -> list[tuple[Any, Any, list[tuple[int, int]]]]:
    """(node, handler, (index, root index) pairs) for every node reached from
    ``module``'s output channels in ``graph`` (a ``trace_graph.Graph``). Stops with one
    line once ``graph.deadline`` has passed."""
    dg = graph.dg
    pruner = dg.get_pruner_of_module(module)
    fn = pruner.prune_out_channels  # a depthwise conv's: TP's depthwise pruner (in == out)
    root = dg.module2node[module]
    rows = np.repeat(np.arange(pruner.get_out_channels(module), dtype=np.int64)[:, None], 2, 1)
    # rows that reach a node wait there until it is visited (a FIFO of nodes), so rows
    # arriving in pieces (a split into heads, a concatenation) travel on together
    key = (root, fn)
    seen: dict[tuple[Any, Any], np.ndarray] = {key: np.unique(_codes(rows))}
    found: dict[tuple[Any, Any], list[Rows]] = {key: [rows]}
    pending: dict[tuple[Any, Any], list[Rows]] = {key: [rows]}
    queue = deque([key])
    while queue:
        if time.process_time() > graph.deadline:
            raise CsgdError(
                f"tracing stopped after {TRACE_SECONDS:.0f} s of CPU time in the group of "
                f"'{graph.names.get(module, '?')}' (the graph is too large to walk)",
                "declare channel_groups() on the model, or trace a smaller variant",
            )
        node, fn = key = queue.popleft()
        parts = pending.pop(key)
        rows = parts[0] if len(parts) == 1 else np.concatenate(parts)
        for dep in node.dependencies:
            if not dep.is_triggered_by(fn):
                continue
            new = rows
            for mapping in dep.index_mapping:
                if mapping is not None:
                    new = mapping(new)
            if not len(new):
                continue
            to = (dep.target, dep.handler)
            codes, first = np.unique(_codes(new), return_index=True)
            have = seen.get(to)  # sorted: a binary search tells the rows it has
            if have is None:
                fresh, seen[to] = first, codes
            else:
                known = have[np.minimum(np.searchsorted(have, codes), len(have) - 1)] == codes
                fresh = first[~known]
                if not len(fresh):
                    continue
                seen[to] = np.sort(np.concatenate((have, codes[~known])))
            found.setdefault(to, []).append(new[fresh])
            if to in pending:
                pending[to].append(new[fresh])
            else:
                pending[to] = [new[fresh]]
                queue.append(to)
    return [
        (node, handler, list(map(tuple, np.concatenate(parts).tolist())))
        for (node, handler), parts in found.items()
    ]


def _codes(rows: Rows) -> np.ndarray:
    return (rows[:, 0] << 32) | rows[:, 1]
