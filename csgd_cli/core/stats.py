"""Running statistics (BatchNorm running_mean/running_var) inside a cluster.

C-SGD pulls a cluster's kernels and norm gamma/beta together by gradient; running
statistics have no gradient, so they are pulled together by averaging: ``StatSync``
sets every member's running statistics to their cluster mean, after each optimizer
step. That is exact in the limit: once a cluster's kernels agree, its members see
identical batch statistics at every step, so their exponential averages would agree
anyway, but only after the memory of the earlier batches fades (BatchNorm momentum
0.01 keeps 37 % of a value 100 steps later). The merge averages them too
(``surgery``), and ``deviation`` measures what is left (``csgd check``, a refused
merge's cause).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..rules.groups import ChannelGroup, Clusters, cluster_labels
from ..rules.layers import RowBlock, segment_rows

STATS = ("running_mean", "running_var")


def stat_segments(
    model: nn.Module, groups: Sequence[ChannelGroup], clusters: Clusters
) -> list[tuple[str, list[RowBlock], list[list[int]]]]:
    """(group name, the running-statistic row blocks of one segment, its local clusters)."""
    out = []
    for g in groups:
        if g.name not in clusters:
            continue
        for a, b, blocks in segment_rows(model, g, ("buffer",)):
            rows = [r for r in blocks if r.key.endswith(STATS)]
            if rows:
                local = [[i - a for i in c] for c in clusters[g.name] if a <= c[0] < b]
                out.append((g.name, rows, local))
    return out


def _labels(rows: Sequence[torch.Tensor], local: list[list[int]]) -> tuple[torch.Tensor, ...]:
    """(each row's cluster, each cluster's size) on the rows' device."""
    dev = rows[0].device
    lab = torch.tensor(cluster_labels(local, rows[0].shape[0]), device=dev)
    return lab, torch.tensor([len(c) for c in local], device=dev, dtype=rows[0].dtype)


def _average(rows: Sequence[torch.Tensor], lab: torch.Tensor, size: torch.Tensor) -> None:
    """Each row view set to its cluster's mean, in place."""
    for r in rows:
        mean = torch.zeros(len(size), device=r.device, dtype=r.dtype).index_add_(0, lab, r)
        r.copy_(mean.div_(size).index_select(0, lab))


@torch.no_grad()
def average_statistics(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    clusters: Clusters,
    state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Set every cluster's running statistics to their mean: in the model's buffers,
    or in ``state`` (a copy of its state_dict: what the merge keeps)."""
    for _name, blocks, local in stat_segments(model, groups, clusters):
        src = [state[r.key] if state is not None else r.tensor for r in blocks]
        rows = [t.narrow(0, r.row, r.n) for t, r in zip(src, blocks, strict=True)]
        _average(rows, *_labels(rows, local))


class StatSync:
    """Average every cluster's running statistics, in place (one ``index_add_`` per
    segment). Views are re-read when ``model.to(...)`` replaced the buffers."""

    def __init__(
        self, model: nn.Module, groups: Sequence[ChannelGroup], clusters: Clusters
    ) -> None:
        self.model, self.groups, self.clusters = model, groups, clusters
        self._build()

    def _build(self) -> None:
        # labels and sizes made once, on the buffers' device: no copy to it per step
        self.parts = []
        for _, blocks, local in stat_segments(self.model, self.groups, self.clusters):
            rows = [r.tensor.narrow(0, r.row, r.n) for r in blocks]
            self.parts.append((rows, *_labels(rows, local)))
        self._bufs = [t for t in self.model.buffers() if t.dim() == 1][:1]

    def _live(self) -> bool:
        """The views still alias the model's buffers (``model.to`` may replace them)."""
        now = next((t for t in self.model.buffers() if t.dim() == 1), None)
        return self._bufs == [] if now is None else bool(self._bufs) and now is self._bufs[0]

    @torch.no_grad()
    def __call__(self) -> None:
        if not self._live():
            self._build()
        for rows, lab, size in self.parts:
            _average(rows, lab, size)


@torch.no_grad()
def deviation(
    model: nn.Module, groups: Sequence[ChannelGroup], clusters: Clusters
) -> dict[str, float]:
    """Per group, the running statistics' spread inside clusters relative to their size:
    sqrt(sum ||s_i - mean_H s||^2 / sum ||s_i||^2) (0 when they agree)."""
    dev: dict[str, list[float]] = {}
    for name, blocks, local in stat_segments(model, groups, clusters):
        k = torch.stack([r.tensor.narrow(0, r.row, r.n).double() for r in blocks], 1)
        lab = torch.tensor(cluster_labels(local, k.shape[0]), device=k.device)
        size = torch.tensor([len(c) for c in local], device=k.device, dtype=k.dtype)
        mean = torch.zeros(len(local), k.shape[1], device=k.device, dtype=k.dtype)
        mean.index_add_(0, lab, k).div_(size[:, None])
        d = dev.setdefault(name, [0.0, 0.0])
        d[0] += float((k - mean[lab]).pow(2).sum())
        d[1] += float(k.pow(2).sum())
    return {n: (a / max(b, 1e-30)) ** 0.5 for n, (a, b) in dev.items()}
