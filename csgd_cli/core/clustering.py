"""Which channels of a group become one: k-means on kernels or an even split (C-SGD's
clusters) and the widths they give (``ratio``, ``round_to``); the baselines' criteria
choose channels at these widths in ``criteria.py``."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..common.errors import CsgdError
from ..rules.groups import ChannelGroup, Clusters, canonical
from ..rules.layers import segment_rows
from .kmeans import kmeans

# How a group's channels are split into clusters: k-means on the kernels, or contiguous
# runs (the config's ``clustering`` names come from this table)
METHODS = {"kmeans": "k-means on the kernels (seeded)", "even": "contiguous, even split"}


def check_method(method: str) -> None:
    if method not in METHODS:
        raise CsgdError(f"clustering={method} is unknown", f"pass clustering=<{'|'.join(METHODS)}>")


def num_clusters(width: int, ratio: float, round_to: int = 1) -> int:
    """k = round(ratio * n), at least 1 (ratio 0.625: 16 -> 10, 32 -> 20, 64 -> 40).

    ``round_to`` > 1: the nearest multiple of it (a tie goes down), at least ``round_to``
    and never above ``width``; a group narrower than ``round_to`` stays whole (runtimes compute channels
    in blocks of 8 or 16, so a width of 10 costs what 16 does)."""
    k = max(1, round(ratio * width))
    if round_to <= 1:
        return k
    if width < round_to:
        return width
    # ties go down: the thinner, faster network (40 -> 32, not 48, at round_to=16)
    return min(width, max(round_to, math.ceil(k / round_to - 0.5) * round_to))


def candidate_widths(width: int, step: int, min_width: int) -> list[int]:
    """The widths a target may give a group, ascending: multiples of ``step`` from
    ``min_width`` up, and its current width (a group narrower than ``min_width``, or
    than ``step``, stays whole)."""
    return [k for k in range(step, width, step) if k >= min_width] + [width]


def split_k(k: int, segments: Sequence[tuple[int, int]]) -> list[int]:
    """Split ``k`` clusters over segments in proportion to their widths (largest
    remainder), each segment getting at least 1 and at most its width."""
    widths = [b - a for a, b in segments]
    total = sum(widths)
    share = [k * w / total for w in widths]
    ks = [min(w, max(1, int(s))) for s, w in zip(share, widths, strict=True)]
    order = sorted(range(len(ks)), key=lambda i: share[i] - int(share[i]), reverse=True)
    while sum(ks) < min(k, total):
        grew = False
        for i in order:
            if sum(ks) < k and ks[i] < widths[i]:
                ks[i] += 1
                grew = True
        if not grew:
            break
    while sum(ks) > max(k, len(ks)):
        i = max(range(len(ks)), key=lambda j: ks[j])
        ks[i] -= 1
    return ks


def segment_features(model: nn.Module, group: ChannelGroup) -> list[torch.Tensor]:
    """Per segment, one row per channel: the kernels of all its producers side by side.

    Coupled producers (a residual stage) must end with identical channels in *every*
    producer for the merge to be exact, so they are clustered on their joint kernels.
    Each producer's block is scaled to unit Frobenius norm so that no layer dominates.
    """
    out = []
    for _a, _b, blocks in segment_rows(model, group, ("kernel",)):
        cols = []
        for r in blocks:
            w = r.rows(r.tensor.detach()).float().cpu()
            cols.append(w / w.norm().clamp_min(1e-12))
        out.append(torch.cat(cols, dim=1))
    return out


def distortion_curve(
    model: nn.Module, group: ChannelGroup, seed: int = 0
) -> Callable[[int], float]:
    """k -> the k-means distortion of the group at ``k`` clusters (what the centripetal
    pull must remove: squared distances to the cluster centres, on ``segment_features``),
    for every ``k`` at once from Ward's agglomerative clustering (each merge adds its
    rise in within-cluster squares); per producer segment, ``k`` split as
    ``cluster_groups`` splits it."""
    import numpy as np
    from scipy.cluster.hierarchy import linkage

    rng = np.random.default_rng(seed)
    cums = []
    for f in segment_features(model, group):
        x = f.double().numpy()
        if x.shape[1] > 512 and len(x) > 256:  # a random projection keeps distances, Ward fast
            x = x @ rng.standard_normal((x.shape[1], 256)) / 16.0
        rise = linkage(x, "ward")[:, 2] ** 2 / 2 if len(x) > 1 else np.zeros(0)
        cums.append(np.concatenate([[0.0], np.cumsum(rise)]))  # [j]: after j merges
    segs = group.segments()

    def curve(k: int) -> float:
        ks = split_k(min(k, group.width), segs)
        return float(sum(c[(b - a) - n] for (a, b), n, c in zip(segs, ks, cums, strict=True)))

    return curve


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
    """Seeded k-means (``kmeans.kmeans``: torch, seconds on the widest groups); clusters
    ordered by their smallest member (deterministic)."""
    n = features.shape[0]
    if k >= n:
        return [[i] for i in range(n)]
    labels = kmeans(features, k, seed).tolist()
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
    """Clusters (lists of channel indices) for every group in ``ks`` (name -> k); a
    group written by several producers in segments is clustered segment by segment."""
    check_method(method)
    out: Clusters = {}
    for g in groups:
        if g.name not in ks:
            continue
        segs = g.segments()
        feats = segment_features(model, g) if method == "kmeans" else [None] * len(segs)
        cl: list[list[int]] = []
        for (a, b), k, f in zip(segs, split_k(min(ks[g.name], g.width), segs), feats, strict=True):
            local = even_clusters(b - a, k) if f is None else kmeans_clusters(f, k, seed)
            cl += [[a + i for i in c] for c in local]
        out[g.name] = canonical(cl)
    return out


def target_widths(
    groups: Sequence[ChannelGroup],
    ratio: float,
    base: dict[str, int] | None = None,
    round_to: int = 1,
) -> dict[str, int]:
    """Width of each group after merging at ``ratio`` of its *original* width ``base``
    (iterative rounds prune a thinned model towards fractions of the base model),
    rounded to a multiple of ``round_to``; never wider than the group is now."""
    base = base or {}
    return {
        g.name: min(g.width, num_clusters(base.get(g.name, g.width), ratio, round_to))
        for g in groups
    }
