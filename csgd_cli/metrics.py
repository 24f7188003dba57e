"""Chi (kernel deviation), parameter count, FLOPs (multiply-adds) and latency."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .groups import ChannelGroup, Clusters, cluster_labels


@torch.no_grad()
def group_kernels(model: nn.Module, group: ChannelGroup, affine: bool = False) -> torch.Tensor:
    """The group's producer kernels, one row per channel (all producers side by side);
    with ``affine`` also their biases and norm gamma/beta (all must match to merge)."""
    mods = dict(model.named_modules())
    cols = []
    for p in group.producers:
        conv = mods[p.conv]
        cols.append(conv.weight.detach().reshape(group.width, -1))
        if affine:
            extra = [conv.bias] if getattr(conv, "bias", None) is not None else []
            if p.norm is not None:
                extra += [mods[p.norm].weight, mods[p.norm].bias]
            cols += [t.detach().reshape(group.width, 1) for t in extra]
    return torch.cat(cols, dim=1)


@torch.no_grad()
def chi_terms(
    model: nn.Module, groups: Sequence[ChannelGroup], clusters: Clusters, affine: bool = False
) -> dict[str, dict[str, torch.Tensor]]:
    """Per group: ``chi`` = sum_H sum_i ||K_i - mean_H K||^2, ``norm`` = ||K||^2 and
    ``max`` = the largest member distance to its cluster centre (tensors: no host sync).
    ``affine`` adds biases and norm gamma/beta to the rows (see ``group_kernels``)."""
    out = {}
    for g in groups:
        if g.name not in clusters:
            continue
        k = group_kernels(model, g, affine).double()
        lab = torch.tensor(cluster_labels(clusters[g.name], g.width), device=k.device)
        size = torch.tensor([len(c) for c in clusters[g.name]], device=k.device, dtype=k.dtype)
        mean = torch.zeros(len(size), k.shape[1], device=k.device, dtype=k.dtype)
        mean.index_add_(0, lab, k).div_(size.unsqueeze(1))
        dev = (k - mean.index_select(0, lab)).pow(2).sum(1)
        out[g.name] = {"chi": dev.sum(), "norm": k.pow(2).sum(), "max": dev.max().sqrt()}
    return out


def chi(model: nn.Module, groups: Sequence[ChannelGroup], clusters: Clusters) -> torch.Tensor:
    """Total kernel deviation over every clustered group (a 0-d tensor)."""
    terms = chi_terms(model, groups, clusters)
    if not terms:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack([t["chi"] for t in terms.values()]).sum()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-adds of one forward pass on one sample, by torch's own flop counter."""
    p = next(model.parameters())
    x = torch.zeros(1, *input_shape, device=p.device, dtype=p.dtype)
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as fc:
        model(x)
    model.train(was_training)
    return fc.get_total_flops() // 2


@torch.no_grad()
def latency(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_size: int,
    device: torch.device,
    warmup: int = 3,
    iters: int = 10,
) -> dict[str, float]:
    """Median forward time of one batch (ms) and throughput (images/s)."""
    model.eval()
    x = torch.randn(batch_size, *input_shape, device=device)
    if device.type == "cuda":
        x = x.to(memory_format=torch.channels_last)
    times = []
    for i in range(warmup + iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    med = sorted(times)[len(times) // 2]
    return {"latency_ms": med * 1e3, "throughput": batch_size / med, "batch_size": batch_size}
