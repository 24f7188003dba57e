"""C-SGD over any torch optimizer (AdamW, SGD, Lion, ...): ``CentripetalWrap`` (``CSGD.wrap``
puts one on an optimizer).

C-SGD's update splits into a part every member of a cluster shares and a part that
shrinks the members' differences (``core.optim``):

    G'_i = mean_H G  +  lam K_i  +  eps (K_i - mean_H K)

``CentripetalWrap`` keeps the optimizer's own update for the shared part and adds the pull
itself:

- before the optimizer's step, every member's gradient is replaced by its cluster's
  mean, so the members' moment estimates (Adam's ``exp_avg``/``exp_avg_sq``, momentum
  buffers) stay identical and the members move by the same amount;
- after the step, each member moves ``lr * eps`` of its pre-step distance towards the
  pre-step centre: ``K_i -= lr * eps * (K_i - mean_H K)``.

The optimizer's own weight decay shrinks the differences by ``(1 - lr * lam)`` (SGD's
L2 and AdamW's decoupled decay alike), so together they fall by ``1 - lr * (lam + eps)``
a step, C-SGD's rate; with plain SGD (no momentum) the trajectory is C-SGD's exactly.
Norm gamma/beta and biases of a pruned group are pulled with ``norm_epsilon``; BatchNorm
running statistics are set to their cluster's mean after each step (``core.stats``).
An optimizer that already holds state gets its members' state rows averaged once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..common.errors import CsgdError
from ..rules.groups import ChannelGroup, Clusters, cluster_labels
from ..rules.layers import segment_rows
from ..rules.rows import RowBlock
from .stats import StatSync

_ATTR = "_csgd_wrap"


@dataclass
class _Rows:
    blk: RowBlock  # the tensor's entries of one segment's channels (``blk.rows``: one a row)
    labels: torch.Tensor  # cluster index per row
    inv_size: torch.Tensor  # (k, 1): 1 / |H|
    eps: float


def _cluster_mean(x: torch.Tensor, r: _Rows) -> torch.Tensor:
    """(n, d) rows -> each row replaced by its cluster's mean."""
    mean = torch.zeros(r.inv_size.shape[0], x.shape[1], device=x.device, dtype=x.dtype)
    return mean.index_add_(0, r.labels, x).mul_(r.inv_size).index_select(0, r.labels)


class CentripetalWrap:
    """The hooks ``wrap`` puts on one optimizer (``optimizer._csgd_wrap``); ``remove()``
    restores the optimizer's own ``step``."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        groups: Sequence[ChannelGroup],
        clusters: Clusters,
        epsilon: float,
        norm_epsilon: float | None = None,
    ) -> None:
        if getattr(optimizer, _ATTR, None) is not None:
            raise CsgdError("this optimizer is wrapped already", "wrap each optimizer once")
        self.optimizer = optimizer
        # the group's index, not the dict: load_state_dict() replaces the group dicts
        group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
        norm_eps = 0.1 * epsilon if norm_epsilon is None else norm_epsilon
        self._rows: list[tuple[_Rows, int]] = []
        seen: set[tuple[int, int]] = set()
        for g in groups:
            if g.name not in clusters:
                continue
            for a, b, blocks in segment_rows(model, g, ("kernel", "affine")):
                local = [[i - a for i in c] for c in clusters[g.name] if a <= c[0] < b]
                for blk in blocks:
                    p = blk.tensor
                    if id(p) not in group_of or (id(p), blk.dim, blk.row) in seen:
                        continue  # frozen, or owned by another optimizer
                    seen.add((id(p), blk.dim, blk.row))
                    dev = p.device
                    sizes = torch.tensor([len(c) for c in local], dtype=p.dtype, device=dev)
                    rows = _Rows(
                        blk,
                        torch.tensor(cluster_labels(local, b - a), device=dev),
                        (1.0 / sizes).unsqueeze(1),
                        epsilon if blk.role == "kernel" else norm_eps,
                    )
                    self._rows.append((rows, group_of[id(p)]))
        self._average_state()
        self._stats = StatSync(model, groups, clusters)  # running statistics, as CentripetalSGD
        self._own_step: Callable[..., Any] = optimizer.step

        def step(closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
            return self.step(closure, **kwargs)

        if hasattr(self._own_step, "_wrapped_by_lr_sched"):  # a scheduler's counting wrapper
            step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]  # is still called
        optimizer.step = step  # type: ignore[method-assign]
        setattr(optimizer, _ATTR, self)

    @property
    def tensors(self) -> int:
        """How many row blocks of the model's tensors this optimizer pulls together."""
        return len(self._rows)

    @torch.no_grad()
    def _average_state(self) -> None:
        """Members of a cluster start from the same optimizer state (a no-op when fresh)."""
        for r, _ in self._rows:
            for v in self.optimizer.state.get(r.blk.tensor, {}).values():
                if isinstance(v, torch.Tensor) and v.shape == r.blk.tensor.shape:
                    r.blk.put(_cluster_mean(r.blk.rows(v), r), v)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        """The closure (Lightning passes one: forward and backward), the gradients'
        cluster means, the optimizer's own step, then the centripetal pull."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pulls = []
        # once per param group, not per row block: a tensor lr (capturable Adam) syncs
        lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
        for r, gi in self._rows:
            w = r.blk.slab(r.blk.tensor.detach())  # a view, channel dimension first
            flat = w.reshape(r.blk.n, -1)
            lr = lrs[gi]
            if r.eps and lr:
                pulls.append((w, (flat - _cluster_mean(flat, r)).mul_(-lr * r.eps)))
            g = r.blk.tensor.grad
            if g is not None:
                r.blk.put(_cluster_mean(r.blk.rows(g), r), g)
        self._own_step(**kwargs)
        for w, d in pulls:
            w.add_(d.view(w.shape))
        self._stats()  # BatchNorm running statistics: each cluster's set to their mean
        return loss

    def remove(self) -> None:
        """Back to the plain optimizer."""
        self.optimizer.step = self._own_step  # type: ignore[method-assign]
        setattr(self.optimizer, _ATTR, None)


def wrapped(optimizer: torch.optim.Optimizer) -> CentripetalWrap | None:
    """The wrap on ``optimizer``, or None."""
    return getattr(optimizer, _ATTR, None)
