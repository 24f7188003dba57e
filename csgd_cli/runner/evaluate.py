"""What csgd measures on a model: chi (kernel deviation), top-1 and loss, parameters,
FLOPs (multiply-adds) and latency."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..common.device import amp_dtype
from ..common.nets import count_macs, count_params
from . import distributed


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


def latencies(
    models: dict[str, nn.Module],
    shape: Sequence[int],
    device: torch.device,
    eval_cfg: Any,
    backend: str = "eager",
) -> dict[str, dict[str, Any]]:
    """Every model's latency from the one timer, side by side (``deploy.export.
    measure_latencies``): ``eager`` on the training device, the others on the CPU."""
    from ..deploy.export import measure_latencies

    res = measure_latencies(
        list(models.values()),
        backend,
        shape,
        eval_cfg.latency_batch,
        eval_cfg.latency_iters,
        device=device,
    )
    dev = str(device) if backend == "eager" else "cpu"
    return {name: {**r, "device": dev} for name, r in zip(models, res, strict=True)}


def measure(
    model: nn.Module,
    data: Any,
    device: torch.device,
    eval_cfg: Any,
    amp: bool = False,
    backend: str = "eager",
    timed: bool = True,
) -> dict[str, Any]:
    """Everything eval.json reports: top-1, loss, params, MACs, latency, throughput;
    ``timed=False``: no latency (``latencies`` times several models side by side)."""
    i = data.info
    model.to(device).eval()
    shape = (i.in_channels, i.image_size, i.image_size)
    res: dict[str, Any] = dict(evaluate(model, data, device, amp))
    res.update(params=count_params(model), macs=count_macs(model, shape))
    res["resolution"] = list(shape[1:])
    if timed:
        res.update(latencies({"m": model}, shape, device, eval_cfg, backend)["m"])
    return res
