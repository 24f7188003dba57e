"""Merge clustered channels into a physically thinner network of the same class.

Per pruned group, each cluster keeps its first member: producers (conv rows, bias, the
norm's affine and running stats) are sliced to the kept channels; ``input`` consumers
get the input slices of a cluster *summed* into the kept one (the removed channels
carried the same feature map, so the thin network computes the same function);
``norm`` consumers are sliced like producers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .errors import CsgdError
from .groups import ChannelGroup, Clusters, check_clusters
from .models import get_model

_NORM_KEYS = ("weight", "bias", "running_mean", "running_var")


def _reduce_dim(
    t: torch.Tensor, dim: int, segments: list[tuple[int, int, list[list[int]]]], summed: bool
) -> torch.Tensor:
    """Rebuild ``t`` along ``dim``: listed segments are merged by cluster, the rest copied."""
    pieces, pos = [], 0
    for offset, width, clusters in sorted(segments, key=lambda s: s[0]):
        if offset > pos:
            pieces.append(t.narrow(dim, pos, offset - pos))
        for members in clusters:
            idx = torch.tensor([offset + i for i in members], device=t.device)
            sel = t.index_select(dim, idx)
            pieces.append(sel.sum(dim, keepdim=True) if summed else sel.narrow(dim, 0, 1))
        pos = offset + width
    if pos < t.shape[dim]:
        pieces.append(t.narrow(dim, pos, t.shape[dim] - pos))
    return torch.cat(pieces, dim)


def l1_selection(model: nn.Module, groups: Sequence[ChannelGroup], ks: dict[str, int]) -> Clusters:
    """L1-norm filter pruning (Li et al. 2017): keep the ``k`` channels whose kernels have
    the largest L1 norm, summed over all producers of a (coupled) group; as singleton
    "clusters" so that ``merge(..., partial=True)`` drops the rest."""
    mods, out = dict(model.named_modules()), {}
    for g in groups:
        if g.name not in ks:
            continue
        score = sum(
            mods[p.conv].weight.detach().abs().reshape(g.width, -1).sum(1) for p in g.producers
        )
        keep = torch.topk(score, min(ks[g.name], g.width)).indices.sort().values
        out[g.name] = [[int(i)] for i in keep]
    return out


def merge_state_dict(
    model: nn.Module, groups: Sequence[ChannelGroup], clusters: Clusters, partial: bool = False
) -> tuple[list[int], dict[str, torch.Tensor]]:
    """New widths (one per group, in order) and the thin model's state_dict.

    ``partial``: clusters need not cover every channel; uncovered channels are dropped
    (used by the L1 baseline, where nothing is merged)."""
    if not partial:
        check_clusters(groups, clusters)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    mods = dict(model.named_modules())
    out_rows: dict[str, list] = {}  # module -> segments on its output channels
    in_cols: dict[str, list] = {}  # module -> segments on its input channels (summed)
    norm_cols: dict[str, list] = {}  # norm over a concatenation -> segments (sliced)
    widths = []
    for g in groups:
        cl = clusters.get(g.name)
        widths.append(len(cl) if cl else g.width)
        if not cl or (len(cl) == g.width and not partial):
            continue
        for p in g.producers:
            out_rows.setdefault(p.conv, []).append((0, g.width, cl))
            if p.norm is not None:
                out_rows.setdefault(p.norm, []).append((0, g.width, cl))
        for c in g.consumers:
            target = in_cols if c.kind == "input" else norm_cols
            target.setdefault(c.module, []).append((c.offset, g.width, cl))
    for name, segs in out_rows.items():
        mod = mods[name]
        keys = _NORM_KEYS if isinstance(mod, nn.modules.batchnorm._NormBase) else ("weight", "bias")
        for k in keys:
            if f"{name}.{k}" in sd and sd[f"{name}.{k}"] is not None:
                sd[f"{name}.{k}"] = _reduce_dim(sd[f"{name}.{k}"], 0, segs, summed=False)
    for name, segs in norm_cols.items():
        for k in _NORM_KEYS:
            if f"{name}.{k}" in sd:
                sd[f"{name}.{k}"] = _reduce_dim(sd[f"{name}.{k}"], 0, segs, summed=False)
    for name, segs in in_cols.items():
        mod = mods[name]
        if getattr(mod, "groups", 1) != 1:
            raise CsgdError(f"layer '{name}' is a grouped conv", "exclude its group from pruning")
        sd[f"{name}.weight"] = _reduce_dim(sd[f"{name}.weight"], 1, segs, summed=True)
    return widths, sd


def merge(
    model: nn.Module, groups: Sequence[ChannelGroup], clusters: Clusters, partial: bool = False
) -> nn.Module:
    """The thin model: same class rebuilt with the merged widths, weights loaded."""
    widths, sd = merge_state_dict(model, groups, clusters, partial)
    arch = model.arch
    thin = get_model(arch["name"], **dict(arch["kwargs"], widths=widths))
    p = next(model.parameters())
    thin.to(device=p.device, dtype=p.dtype).load_state_dict(sd)
    return thin.train(model.training)
