"""What csgd measures on a model: chi (kernel deviation), top-1 and loss, parameters,
FLOPs (multiply-adds) and latency."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..common.device import amp_dtype
from ..common.nets import count_macs, count_params
from . import distributed


@torch.no_grad()
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


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Any, device: torch.device, amp: bool = False
) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy over the whole test split.

    Under torchrun each rank evaluates its shard and the sums are reduced, so every
    rank returns the whole split's figures: call it on every rank."""
    model.eval()
    loss, correct, n = torch.zeros((), device=device), torch.zeros((), device=device), 0
    on = amp and device.type == "cuda"
    for x, y in data.test_batches():
        with torch.autocast(device.type, dtype=amp_dtype(device), enabled=on):
            out = model(x)
        loss += F.cross_entropy(out.float(), y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
        n += y.numel()
    loss_sum, right, n = distributed.all_sum([loss.item(), correct.item(), n], device)
    return {"acc": 100.0 * right / max(n, 1), "loss": loss_sum / max(n, 1)}


def measure(
    model: nn.Module,
    data: Any,
    device: torch.device,
    eval_cfg: Any,
    amp: bool = False,
    backend: str = "eager",
) -> dict[str, Any]:
    """Everything eval.json reports: top-1, loss, params, MACs, latency, throughput."""
    i = data.info
    model.to(device).eval()
    shape = (i.in_channels, i.image_size, i.image_size)
    res: dict[str, Any] = dict(evaluate(model, data, device, amp))
    res.update(params=count_params(model), macs=count_macs(model, shape))
    batch, iters = eval_cfg.latency_batch, eval_cfg.latency_iters
    if backend == "eager":  # on the training device
        res.update(latency(model, shape, batch, device, iters=iters), backend=backend)
    else:  # a deployment runtime (CPU): see csgd_cli.deploy.BACKENDS
        from ..deploy.export import measure_latency

        res.update(measure_latency(model, backend, shape, batch, iters))
    res["device"] = str(device) if backend == "eager" else "cpu"
    return res
