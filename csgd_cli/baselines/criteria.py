"""The baselines' pruning criteria: which channels of a group to keep, at given widths.

One table (``CRITERIA``) of the usual criteria. Each scores the channels of a group
*jointly* over its coupled members (every producer of a ResNet stage, every BN after
them) with Torch-Pruning's importance classes, fed the tensors csgd's group names:

- ``l1`` / ``l2``: ``MagnitudeImportance(p=1 | 2)`` on the producers' kernel rows
  (Li et al. 2017: filter norms);
- ``fpgm``: ``FPGMImportance`` on the same rows (He et al. 2019: distance to the others);
- ``taylor``: ``TaylorImportance`` (|w * dL/dw| per filter, Molchanov et al. 2019),
  summed over ``score_batches`` batches of training data;
- ``slimming``: ``BNScaleImportance`` (|gamma| of every BN over the channels, Liu et al.
  2017), after a sparsity phase trained with ``SparseGammaSGD``;
- ``random``: ``RandomImportance``, seeded.

Torch-Pruning's importances take a group of (dependency, indices) items, each with
``root_idxs``; here each item is one member module of a csgd group, its indices the
rows of that module's channel segment and its root indices the segment's channels, and
``group_reduction="sum"`` adds the members' scores (``normalizer=None``: raw sums).
A segment keeps the ``k`` best channels (``k`` split over producer segments as C-SGD's
clusters are), as singleton "clusters" that ``merge(..., partial=True)`` keeps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..common.errors import CsgdError
from ..core.clustering import split_k
from ..rules.groups import ChannelGroup, Clusters
from ..rules.layers import segment_rows
from ..rules.queries import WEIGHTED_TYPES, is_batchnorm, scored_by

GammaRows = list[tuple[torch.Tensor, int, int]]  # (BN weight, first row, rows)


def _tp() -> Any:
    """Torch-Pruning, imported when a baseline scores channels: it imports timm when
    that is installed, seconds that every csgd command would otherwise pay at startup."""
    import torch_pruning

    return torch_pruning


@dataclass(frozen=True)
class Criterion:
    name: str
    paper: str
    importance: Callable[[], Any]  # a Torch-Pruning importance: item list -> scores
    grads: bool = False  # scores need gradients of the loss (``score_batches`` batches)
    sparsity: bool = False  # a sparsity phase (L1 on BN gamma) replaces C-SGD's training


def _sum(cls: str, kernels: bool = True, **kw: Any) -> Callable[[], Any]:
    """A TP importance summing its members' raw scores; ``kernels``: over conv/linear
    kernels only (TP's magnitude and Taylor scores would add the BN gammas too)."""
    if kernels:
        kw["target_types"] = list(WEIGHTED_TYPES)
    return lambda: getattr(_tp().importance, cls)(group_reduction="sum", normalizer=None, **kw)


CRITERIA: dict[str, Criterion] = {
    c.name: c
    for c in (
        Criterion("l1", "Li et al. 2017", _sum("MagnitudeImportance", p=1)),
        Criterion("l2", "Li et al. 2017 (L2 norm)", _sum("MagnitudeImportance", p=2)),
        Criterion("fpgm", "He et al. 2019", _sum("FPGMImportance", False, p=2)),
        Criterion("taylor", "Molchanov et al. 2019", _sum("TaylorImportance"), grads=True),
        Criterion("slimming", "Liu et al. 2017", _sum("BNScaleImportance", False), sparsity=True),
        Criterion("random", "random channels", lambda: _tp().importance.RandomImportance()),
    )
}


class _Dep:
    """The parts of a TP dependency its importances read: the layer and the pruning
    function that says which of its dimensions the indices address."""

    def __init__(self, module: nn.Module, fn: Callable) -> None:
        self.layer, self.pruning_fn, self.handler = module, fn, fn
        self.target = self  # TaylorImportance reads dep.target.module
        self.module = module


@dataclass
class _Item:
    """One member of a group, as TP's importances iterate them: (dep, idxs), root_idxs."""

    dep: _Dep
    idxs: list[int]
    root_idxs: list[int]

    def __iter__(self) -> Iterator[Any]:  # unpacks as TP's GroupItem: dep, idxs = item
        return iter((self.dep, self.idxs))


def _prune_fn(m: nn.Module) -> Callable | None:
    """TP's function for "this layer's output channels" (its rule names it): selects its
    branch of each importance. None (GroupNorm, PReLU ...): no importance reads them."""
    name = scored_by(m)
    return None if name is None else getattr(_tp().pruner.function, name)


def group_items(model: nn.Module, group: ChannelGroup) -> list[tuple[int, int, list[_Item]]]:
    """Per producer segment ``(a, b)``: one TP item per member module writing or scaling
    its channels (producers' kernels, depthwise kernels, norms). A group channel of
    ``block`` rows (a whole attention head) gives ``(b - a) * block`` indices, each its
    own root: ``channel_scores`` sums them per channel."""
    mods = dict(model.named_modules())
    out = []
    for a, b, blocks in segment_rows(model, group, ("kernel", "affine")):
        items, seen = [], set()
        for r in blocks:
            name = r.key.rpartition(".")[0]
            fn = _prune_fn(mods[name])
            if fn is None or r.dim != 0 or (name, r.row) in seen:
                continue  # a BN's gamma and beta are one item (TP reads the gamma)
            seen.add((name, r.row))
            n = (b - a) * r.block
            items.append(_Item(_Dep(mods[name], fn), list(range(r.row, r.row + n)), list(range(n))))
        out.append((a, b, items))
    return out


def channel_scores(
    name: str,
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    names: Iterable[str],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]] = (),
    required: Iterable[str] | None = None,
) -> dict[str, list[torch.Tensor]]:
    """Per group in ``names``, per producer segment: criterion ``name``'s score of each
    channel (higher: kept first). ``taylor`` sums TP's score over ``batches`` (the
    model in eval mode, so scoring changes no BN statistics). A group in ``required``
    (default: all) with no layer the criterion reads is refused; others get no scores."""
    crit, names = CRITERIA[name], set(names)
    required = names if required is None else set(required)
    imp = crit.importance()
    plan = [(g, group_items(model, g)) for g in groups if g.name in names]
    acc: dict[str, list[torch.Tensor | None]] = {g.name: [None] * len(s) for g, s in plan}

    def add() -> None:
        for g, segs in plan:
            for i, (a, b, items) in enumerate(segs):
                if crit.grads:  # a frozen layer has no gradient: not scored
                    items = [it for it in items if it.dep.layer.weight.grad is not None]
                s = imp(items) if items else None
                if s is None and g.name in required:
                    raise CsgdError(
                        f"prune.method={name}: group '{g.name}' has no layer this criterion"
                        " scores (conv/linear kernels; slimming: BatchNorm)",
                        "exclude the group (prune.exclude=...) or choose another prune.method",
                    )
                prev = acc[g.name][i]
                if s is not None:  # a channel of several rows (a head): its rows' sum
                    s = s.reshape(b - a, -1).sum(1)
                    acc[g.name][i] = s.float().cpu() if prev is None else prev + s.float().cpu()

    if not crit.grads:
        add()
    else:
        was, n = model.training, 0
        model.eval()
        try:
            for x, y in batches:
                model.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    F.cross_entropy(model(x), y).backward()
                add()
                n += 1
        finally:
            model.zero_grad(set_to_none=True)
            model.train(was)
        if n == 0:
            raise CsgdError(
                f"prune.method={name} got no batch to score", "pass prune.score_batches>=1"
            )
    return {k: [s for s in v if s is not None] for k, v in acc.items()}


def select(
    name: str,
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    ks: dict[str, int],
    *,
    seed: int = 0,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]] = (),
) -> Clusters:
    """Keep the ``ks[g]`` best channels of every group in ``ks`` by criterion ``name``
    (``k`` split over producer segments as C-SGD's clusters split it), as singletons."""
    if name not in CRITERIA:
        raise CsgdError(f"prune.method={name} is not a criterion", f"pass {'|'.join(CRITERIA)}")
    with torch.random.fork_rng(devices=[]):  # ``random`` draws from torch's generator
        torch.manual_seed(seed)
        cut = [g.name for g in groups if ks.get(g.name, g.width) < g.width]
        scores = channel_scores(name, model, groups, ks, batches, required=cut)
    out: Clusters = {}
    for g in groups:
        if g.name not in ks:
            continue
        if g.name not in cut:  # kept whole (a target may leave a group's width)
            out[g.name] = [[i] for i in range(g.width)]
            continue
        segs = g.segments()
        keep: list[int] = []
        per_seg = split_k(min(ks[g.name], g.width), segs)
        for (a, _b), k, s in zip(segs, per_seg, scores[g.name], strict=True):
            keep += [a + int(i) for i in torch.topk(s, k).indices.sort().values]
        out[g.name] = [[i] for i in keep]
    return out


# -- Network Slimming's sparsity phase --------------------------------------------------------
def gamma_rows(model: nn.Module, groups: Sequence[ChannelGroup], names: Iterable[str]) -> GammaRows:
    """(gamma, first row, rows) of every BatchNorm scaling the channels of groups ``names``."""
    names, mods = set(names), dict(model.named_modules())
    rows: GammaRows = []
    for g in groups:
        if g.name in names:
            for _a, _b, blocks in segment_rows(model, g, ("affine",)):
                for r in blocks:
                    mod, _, attr = r.key.rpartition(".")
                    if attr == "weight" and is_batchnorm(mods[mod]):
                        rows.append((r.tensor, r.row, r.n))
    return rows


class SparseGammaSGD(torch.optim.SGD):
    """Momentum SGD plus Network Slimming's penalty ``lam * |gamma|`` on the given BN
    scale rows: its subgradient ``lam * sign(gamma)`` joins their gradient before each
    step (after DDP's averaging and GradScaler's unscaling, as every rank does the same)."""

    def __init__(self, base: torch.optim.SGD, rows: GammaRows, lam: float) -> None:
        super().__init__(base.param_groups, **base.defaults)
        self.rows, self.lam = rows, float(lam)
        self._gammas = [t.detach().narrow(0, a, n) for t, a, n in rows]  # views, made once

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> Any:
        pairs = zip(self.rows, self._gammas, strict=True)
        grads, gammas = [], []
        for (t, a, n), v in pairs:
            if t.grad is not None:
                grads.append(t.grad.narrow(0, a, n))
                gammas.append(v)
        if grads:  # one fused sign and add over every row, not two kernels per row
            torch._foreach_add_(grads, torch._foreach_sign(gammas), alpha=self.lam)
        return super().step(closure)
