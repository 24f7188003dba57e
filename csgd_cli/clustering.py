"""Cluster the channels of every pruned group: k-means on kernels, or an even split."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from sklearn.cluster import KMeans
from torch import nn

from .errors import CsgdError
from .groups import ChannelGroup, Clusters

METHODS = ("kmeans", "even")


def num_clusters(width: int, ratio: float) -> int:
    """k = round(ratio * n), at least 1 (ratio 0.625: 16 -> 10, 32 -> 20, 64 -> 40)."""
    return max(1, round(ratio * width))


def group_features(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """One row per channel: the kernels of all the group's producers, side by side.

    Coupled producers (a residual stage) must end with identical channels in *every*
    producer for the merge to be exact, so they are clustered on their joint kernels.
    Each producer's block is scaled to unit Frobenius norm so that no layer dominates.
    """
    mods = dict(model.named_modules())
    blocks = []
    for p in group.producers:
        w = mods[p.conv].weight.detach().float().reshape(group.width, -1).cpu()
        blocks.append(w / w.norm().clamp_min(1e-12))
    return torch.cat(blocks, dim=1)


def even_clusters(width: int, k: int) -> list[list[int]]:
    """Contiguous split; the first ``width % k`` clusters are one larger."""
    size, extra = divmod(width, k)
    out, start = [], 0
    for c in range(k):
        n = size + (1 if c < extra else 0)
        out.append(list(range(start, start + n)))
        start += n
    return out


def kmeans_clusters(features: torch.Tensor, k: int, seed: int) -> list[list[int]]:
    """Seeded k-means; clusters ordered by their smallest member (deterministic)."""
    n = features.shape[0]
    if k >= n:
        return [[i] for i in range(n)]
    x = features.double().numpy()
    with warnings.catch_warnings():
        # Duplicate kernels (e.g. a model that is already converged) are fine here.
        warnings.simplefilter("ignore")
        labels = KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(x)
    groups: dict[int, list[int]] = {}
    for i, lab in enumerate(labels):
        groups.setdefault(int(lab), []).append(i)
    out = sorted(groups.values(), key=lambda c: c[0])
    while len(out) < k:  # k-means may leave a cluster empty on degenerate data
        big = max(range(len(out)), key=lambda c: len(out[c]))
        out.append([out[big].pop()])
        out.sort(key=lambda c: c[0])
    return out


def cluster_groups(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    ks: dict[str, int],
    method: str = "kmeans",
    seed: int = 0,
) -> Clusters:
    """Clusters (lists of channel indices) for every group in ``ks`` (name -> k)."""
    if method not in METHODS:
        raise CsgdError(f"unknown clustering '{method}'", f"use one of: {', '.join(METHODS)}")
    out: Clusters = {}
    for g in groups:
        if g.name not in ks:
            continue
        k = min(ks[g.name], g.width)
        if method == "even":
            out[g.name] = even_clusters(g.width, k)
        else:
            out[g.name] = kmeans_clusters(group_features(model, g), k, seed)
    return out


def target_widths(
    groups: Sequence[ChannelGroup], ratio: float, base: dict[str, int] | None = None
) -> dict[str, int]:
    """Width of each group after merging at ``ratio`` of its *original* width ``base``
    (iterative rounds prune a thinned model towards fractions of the base model)."""
    base = base or {}
    return {g.name: num_clusters(base.get(g.name, g.width), ratio) for g in groups}
