"""What csgd measures on a model: chi (kernel deviation), top-1 and loss, parameters,
FLOPs (multiply-adds) and latency."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..rules.groups import ChannelGroup, Clusters, cluster_labels
from ..rules.layers import segment_rows


@torch.no_grad()
@torch.no_grad()
def chi_terms(
    model: nn.Module, groups: Sequence[ChannelGroup], clusters: Clusters, affine: bool = False
) -> dict[str, dict[str, torch.Tensor]]:
    """Per group: ``chi`` = sum_H sum_i ||K_i - mean_H K||^2, ``norm`` = ||K||^2 and
    ``max`` = the largest member distance to its cluster centre (tensors: no host sync).

    ``K`` holds exactly the rows the optimizer pulls together: every kernel of the
    group's producers and per-channel members (``affine``: also their biases and norm
    gamma/beta, a BN over a concatenation at its offset included; all must match for
    the merge to be exact)."""
    roles = ("kernel", "affine") if affine else ("kernel",)
    out = {}
    for g in groups:
        if g.name not in clusters:
            continue
        chi = norm = mx = None
        for a, b, blocks in segment_rows(model, g, roles):
            n = b - a
            k = torch.cat([r.rows(r.tensor.detach()).double() for r in blocks], 1)
            local = [[i - a for i in c] for c in clusters[g.name] if a <= c[0] < b]
            lab = torch.tensor(cluster_labels(local, n), device=k.device)
            size = torch.tensor([len(c) for c in local], device=k.device, dtype=k.dtype)
            mean = torch.zeros(len(local), k.shape[1], device=k.device, dtype=k.dtype)
            mean.index_add_(0, lab, k).div_(size.unsqueeze(1))
            dev = (k - mean.index_select(0, lab)).pow(2).sum(1)
            c, nn_, m = dev.sum(), k.pow(2).sum(), dev.max().sqrt()
            chi, norm = (c, nn_) if chi is None else (chi + c, norm + nn_)
            mx = m if mx is None else torch.maximum(mx, m)
        out[g.name] = {"chi": chi, "norm": norm, "max": mx}
    return out


def chi_report(
    model: nn.Module, groups: Sequence[ChannelGroup], clusters: Clusters, affine: bool = False
) -> dict[str, Any]:
    """Total chi, chi relative to the kernels' squared norm, the largest deviation,
    and the same per group (plain floats, for check.json and logs)."""
    terms = chi_terms(model, groups, clusters, affine)
    per = {
        k: {
            "chi": v["chi"].item(),
            "relative": (v["chi"] / v["norm"]).item(),
            "max_dev": v["max"].item(),
        }
        for k, v in terms.items()
    }
    total = sum(v["chi"] for v in per.values())
    norm = sum(v["norm"].item() for v in terms.values())
    return {
        "chi": total,
        "relative": total / max(norm, 1e-30),
        "max_dev": max((v["max_dev"] for v in per.values()), default=0.0),
        "groups": per,
    }


def chi_fn(
    model: nn.Module, groups: Sequence[ChannelGroup], clusters: Clusters
) -> Callable[[], tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """(total, per-group) chi as tensors, for the training loop's logs."""

    def f() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        per = {k: v["chi"] for k, v in chi_terms(model, groups, clusters).items()}
        total = torch.stack(list(per.values())).sum() if per else torch.zeros(())
        return total, per

    return f
