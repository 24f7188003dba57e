"""The centripetal optimizer (C-SGD, Ding et al. 2019), vectorised over one flat buffer.

For a group's kernels ``K`` (one row per channel), raw gradient ``G``, weight decay
``lam`` and centripetal strength ``eps``, every member ``i`` of cluster ``H`` gets

    G'_i = mean_H G + lam K_i + eps (K_i - mean_H K) = mean_H (G - eps K) + (lam + eps) K_i

then plain momentum (optionally Nesterov) SGD runs on ``G'``. Norm gamma/beta and conv
biases of a pruned group use ``norm_epsilon`` (default 0.1 eps) and no weight decay, as
the reference code does (the ``norm_weight_decay`` argument; no config key sets it).
Parameters outside every pruned group decay by ``weight_decay``, and their 1-d tensors
by ``plain_norm_weight_decay`` (the CLI's ``schedule.norm_weight_decay``).

Why a flat buffer: torch's foreach SGD costs a few microseconds per tensor, and the
per-layer matrix products of the reference code cost 5-8x that step. Here every
parameter and gradient is a contiguous view into one buffer (so the forward pass sees
ordinary dense weights), ``G - eps K``, the decay and the momentum update are
whole-buffer operations, and the cluster mean is, per group, one ``cat`` of its tensors'
rows into an ``(n, D)`` matrix, one ``index_add_`` and one ``index_select``; one
``_foreach_copy_`` writes every group's result back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..common.config import NORM_EPSILON_SHARE
from ..common.errors import CsgdError
from ..rules.groups import ChannelGroup, Clusters, cluster_labels
from ..rules.layers import member_rows, segment_rows
from ..rules.rows import RowBlock
from .stats import StatSync


@dataclass
class _Block:
    rows: list[torch.Tensor]  # (n, d_t) row views of ``G - eps K`` for each tensor, in order
    tmp: torch.Tensor  # (n, D) scratch: the group's rows side by side
    mean: torch.Tensor  # (k, D) scratch: cluster means
    labels: torch.Tensor  # cluster index per row
    inv_size: torch.Tensor  # (k, 1): 1 / |H|


def _is_dense(p: torch.Tensor) -> bool:
    """Its entries fill ``numel`` consecutive places in some order of its dims
    (contiguous, channels-last, a transposed conv's channels outermost)."""
    step = 1
    for stride, size in sorted((s, n) for s, n in zip(p.stride(), p.shape, strict=True) if n > 1):
        if stride != step:
            return False
        step *= size
    return True


def _channels_outermost(
    model: nn.Module, groups: Sequence[ChannelGroup], clusters: Clusters
) -> None:
    """A tensor whose channels are another dim (a transposed conv's outputs, dim 1) is
    laid out with that dim outermost, so each channel's entries are one row of a view."""
    for g in (g for g in groups if g.name in clusters):
        for r in member_rows(model, g, ("kernel", "affine")):
            d, t = r.dim, r.tensor
            if d and t.dim() > 2 and t.stride(d) != max(t.stride()):
                t.data = t.data.movedim(d, 0).contiguous().movedim(0, d)


class CentripetalSGD(torch.optim.Optimizer):
    """Momentum SGD whose pruned groups receive the centripetal gradient.

    Parameters outside every pruned group train as plain SGD with ``weight_decay``
    (``plain_norm_weight_decay`` for 1-d tensors: norms and biases). Use ``zero_grad()``
    of this optimizer: gradients live in its buffer and are zeroed in place.
    """

    def __init__(
        self,
        model: nn.Module,
        groups: Sequence[ChannelGroup],
        clusters: Clusters,
        *,
        lr: float,
        epsilon: float,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 1e-4,
        norm_epsilon: float | None = None,
        norm_weight_decay: float = 0.0,
        plain_norm_weight_decay: float | None = None,
    ) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        if nesterov and momentum <= 0:
            raise CsgdError("Nesterov momentum needs momentum > 0", "set schedule.momentum")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov)
        super().__init__(params, defaults)
        norm_eps = NORM_EPSILON_SHARE * epsilon if norm_epsilon is None else norm_epsilon
        plain_wd = weight_decay if plain_norm_weight_decay is None else plain_norm_weight_decay
        _channels_outermost(model, groups, clusters)
        self._allocate(params, weight_decay, plain_wd)
        self._blocks: list[_Block] = []
        self._dst: list[torch.Tensor] = []  # gradient rows written back ...
        self._src: list[torch.Tensor] = []  # ... from these columns of the blocks' scratch
        owned: set[tuple[int, int, int]] = set()
        role_eps = {"kernel": (epsilon, weight_decay), "affine": (norm_eps, norm_weight_decay)}
        for g in groups:
            if g.name not in clusters:
                continue
            for a, b, blocks in segment_rows(model, g, ("kernel", "affine")):
                local = [[i - a for i in c] for c in clusters[g.name] if a <= c[0] < b]
                self._add_segment(g.name, b - a, blocks, local, role_eps, owned)
        self._views = self._tie(params)
        self._stats = StatSync(model, groups, clusters)
        self.state[params[0]]["flat_momentum"] = torch.zeros_like(self._flat_p)

    def _allocate(self, params: list[nn.Parameter], weight_decay: float, plain_wd: float) -> None:
        """The flat buffers, with a dense slot for every parameter in model order; every
        slot starts with plain weight decay (``plain_wd`` for 1-d tensors)."""
        self._offset: dict[int, int] = {}
        pos = 0
        for p in params:
            if not _is_dense(p):
                raise CsgdError(
                    "a parameter is not dense",
                    "call model.to(memory_format=torch.contiguous_format) first",
                )
            self._offset[id(p)] = pos
            pos += p.numel()
        dev, dtype = params[0].device, params[0].dtype
        self._flat_p = torch.zeros(pos, device=dev, dtype=dtype)
        self._flat_g = torch.zeros(pos, device=dev, dtype=dtype)
        self._a = torch.zeros(pos, device=dev, dtype=dtype)  # G - eps K
        self._neg_eps = torch.zeros(pos, device=dev, dtype=dtype)
        self._decay = torch.zeros(pos, device=dev, dtype=dtype)
        for p in params:
            o = self._offset[id(p)]
            self._decay[o : o + p.numel()] = plain_wd if p.dim() == 1 else weight_decay

    def _rows(self, buf: torch.Tensor, r: RowBlock) -> torch.Tensor:
        """The ``(n, D)`` rows of block ``r`` (one per group channel) in ``buf``: a view."""
        p = r.tensor
        if r.dim == 0:  # whole rows: a slice of the flat buffer (any memory format)
            per = p.numel() // p.shape[0]
            o = self._offset[id(p)] + r.row * per
            return buf[o : o + r.n * r.block * per].view(r.n, -1)
        return r.view(buf.as_strided(p.shape, p.stride(), self._offset[id(p)]))

    def _add_segment(
        self,
        name: str,
        n: int,
        blocks: list[Any],
        local: list[list[int]],
        role_eps: dict[str, tuple[float, float]],
        owned: set[tuple[int, int, int]],
    ) -> None:
        """One segment (``n`` channels) of group ``name``: its rows' pull and decay, and
        the scratch that averages them over the clusters ``local``."""
        for r in blocks:
            p = r.tensor
            if id(p) not in self._offset or r.row + n * r.block > p.shape[r.dim]:
                raise CsgdError(
                    f"group '{name}' does not fit its tensors (frozen or mis-sized)",
                    "check the model's channel_groups()",
                )
            for i in range(r.row, r.row + n * r.block):  # one owner per row
                if (id(p), r.dim, i) in owned:
                    raise CsgdError(
                        f"group '{name}' shares {r.key} with another group",
                        "prune one of them (prune.exclude) or check channel_groups()",
                    )
                owned.add((id(p), r.dim, i))
            e, wd = role_eps[r.role]
            self._rows(self._neg_eps, r).fill_(-e)
            self._rows(self._decay, r).fill_(e + wd)
        dev, dtype = self._a.device, self._a.dtype
        a_rows = [self._rows(self._a, r) for r in blocks]
        d = sum(x.shape[1] for x in a_rows)
        tmp = torch.zeros(n, d, device=dev, dtype=dtype)
        col = 0
        for r, x in zip(blocks, a_rows, strict=True):
            self._dst.append(self._rows(self._flat_g, r))
            self._src.append(tmp[:, col : col + x.shape[1]])
            col += x.shape[1]
        sizes = torch.tensor([len(c) for c in local], dtype=dtype, device=dev)
        labels = torch.tensor(cluster_labels(local, n), device=dev)
        mean = torch.zeros(len(local), d, device=dev, dtype=dtype)
        inv = (1.0 / sizes).unsqueeze(1)
        self._blocks.append(_Block(a_rows, tmp, mean, labels, inv))

    @torch.no_grad()
    def _tie(
        self, params: list[nn.Parameter]
    ) -> list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]]:
        """Make every parameter and its gradient a view into the flat buffers (values
        copied in); returns (parameter, its view, its gradient's view)."""
        views = []
        for p in params:
            o = self._offset[id(p)]
            pv = self._flat_p.as_strided(p.shape, p.stride(), o)
            gv = self._flat_g.as_strided(p.shape, p.stride(), o)
            pv.copy_(p)
            p.data = pv
            if p.grad is not None:
                gv.copy_(p.grad)
            p.grad = gv
            views.append((p, pv, gv))
        return views

    def zero_grad(self, set_to_none: bool = False) -> None:  # always kept in place
        self._flat_g.zero_()

    @torch.no_grad()
    def _attach(self) -> None:
        """Re-point params/grads at the buffer if something replaced them.

        ``model.zero_grad()`` (set to None) or ``model.to(...)`` replaces every tensor, so
        the first parameter tells: the hot path costs one check, not a loop."""
        p0, pv0, gv0 = self._views[0]
        g0 = p0.grad
        if g0 is not None and g0.data_ptr() == gv0.data_ptr() and p0.data_ptr() == pv0.data_ptr():
            return
        for p, pv, gv in self._views:
            if p.data_ptr() != pv.data_ptr():
                pv.copy_(p.data)
                p.data = pv
            if p.grad is None:
                gv.zero_()
                p.grad = gv
            elif p.grad.data_ptr() != gv.data_ptr():
                gv.copy_(p.grad)
                p.grad = gv

    @torch.no_grad()
    def transform_(self) -> None:
        """Replace every gradient by its C-SGD form G' (weight decay included), in place."""
        self._attach()
        g, p = self._flat_g, self._flat_p
        if self._blocks:
            torch.addcmul(g, p, self._neg_eps, out=self._a)  # G - eps K
            for blk in self._blocks:
                torch.cat(blk.rows, dim=1, out=blk.tmp)
                blk.mean.zero_().index_add_(0, blk.labels, blk.tmp).mul_(blk.inv_size)
                torch.index_select(blk.mean, 0, blk.labels, out=blk.tmp)
            torch._foreach_copy_(self._dst, self._src)  # mean_H (G - eps K) into G
        g.addcmul_(p, self._decay)  # + (lam + eps) K, or plain weight decay

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        self.transform_()
        group = self.param_groups[0]
        lr, mom = group["lr"], group["momentum"]
        g = self._flat_g
        if mom > 0:
            buf = self.state[group["params"][0]]["flat_momentum"]
            buf.mul_(mom).add_(g)
            upd = g.add_(buf, alpha=mom) if group["nesterov"] else buf
        else:
            upd = g
        self._flat_p.add_(upd, alpha=-lr)
        self._stats()  # running statistics: averaged within clusters (core.stats)
        return loss

    @torch.no_grad()
    def release(self) -> None:
        """Untie the model's parameters from this optimizer's flat buffers (each gets
        its own storage again, gradients dropped) so the buffers can be freed. The
        optimizer cannot step after this; ``CSGD.merge`` calls it."""
        for group in self.param_groups:
            for q in group["params"]:
                q.data = q.data.clone(memory_format=torch.preserve_format)
                q.grad = None
        self._flat_p = self._flat_g = torch.empty(0)
        self.state.clear()


def plain_sgd(model: nn.Module, sched: Any) -> torch.optim.SGD:
    """Momentum SGD of a ``schedule`` config; ``norm_weight_decay`` for 1-d tensors."""
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.dim() == 1 and sched.norm_weight_decay is not None else decay).append(p)
    groups = [{"params": decay, "weight_decay": sched.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": sched.norm_weight_decay})
    return torch.optim.SGD(
        groups, lr=sched.lr, momentum=sched.momentum, nesterov=sched.nesterov and sched.momentum > 0
    )


def lr_lambda(sched: Any, steps_per_epoch: int) -> Callable[[int], float]:
    """Linear warm-up, then multi-step or cosine decay; evaluated per step."""
    total, warm = sched.epochs * steps_per_epoch, sched.warmup_epochs * steps_per_epoch
    milestones = [m * steps_per_epoch for m in sched.milestones]

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if sched.kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
        return sched.gamma ** sum(step >= m for m in milestones)

    return f
