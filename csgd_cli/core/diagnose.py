"""Why a merge is refused: which group, and whether its kernels, its norm gamma/beta or
its running statistics still differ inside clusters, with the fix that helps."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..rules.groups import ChannelGroup, Clusters
from .chi import chi_terms
from .stats import deviation

FIXES = {
    "kernels": "train longer or with a larger epsilon (csgd check prints the forecast)",
    "norm gamma/beta": "train longer or with a larger norm_epsilon (default 0.1 x epsilon)",
    "running statistics": (
        "train on with csgd's optimizer, which averages them within clusters every step, "
        "or set them to their cluster means first (the API: pruner.sync_statistics())"
    ),
}


def deviations(
    model: nn.Module, groups: Sequence[ChannelGroup], clusters: Clusters
) -> dict[str, dict[str, float]]:
    """Per group, the relative spread inside clusters (sqrt of deviation over size) of
    its kernels, its norm gamma/beta and biases, and its running statistics."""
    kern = chi_terms(model, groups, clusters)
    both = chi_terms(model, groups, clusters, affine=True)
    stats = deviation(model, groups, clusters)
    out = {}
    for name, k in kern.items():
        b = both[name]
        aff_chi, aff_norm = (b["chi"] - k["chi"]).item(), (b["norm"] - k["norm"]).item()
        out[name] = {
            "kernels": (k["chi"] / k["norm"].clamp_min(1e-30)).item() ** 0.5,
            "norm gamma/beta": 0.0,
            "running statistics": stats.get(name, 0.0),
        }
        if aff_norm > 0:
            out[name]["norm gamma/beta"] = (max(aff_chi, 0.0) / aff_norm) ** 0.5
    return out


def cause(model: nn.Module, groups: Sequence[ChannelGroup], clusters: Clusters) -> tuple[str, str]:
    """(what differs most, the fix) for a refused merge."""
    devs = deviations(model, groups, clusters)
    worst = max(
        ((g, kind, v) for g, d in devs.items() for kind, v in d.items()),
        key=lambda t: t[2],
        default=None,
    )
    if worst is None or worst[2] < 1e-6:
        top = 0.0 if worst is None else worst[2]
        return (
            f"kernels, norms and running statistics agree within clusters (largest relative "
            f"spread {top:.1e}), so the difference is the arithmetic's",
            "pass a larger tolerance (float16/bfloat16 models differ by ~1e-3)",
        )
    g, kind, v = worst
    return f"group '{g}': its {kind} still differ inside clusters (relative {v:.1e})", FIXES[kind]
