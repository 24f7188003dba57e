"""csgd eval: top-1, loss, params, FLOPs (multiply-adds) and latency; writes eval.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch import nn

from ..engine import evaluate
from ..errors import CsgdError
from ..metrics import count_macs, count_params, latency
from .common import Ctx, load, setup, write_json


def measure(ctx: Ctx, model: nn.Module) -> dict[str, Any]:
    """Everything eval.json reports, for one model on the context's test split."""
    i = ctx.data.info
    model.to(ctx.device).eval()
    shape = (i.in_channels, i.image_size, i.image_size)
    res: dict[str, Any] = dict(evaluate(model, ctx.data, ctx.device, ctx.cfg.amp))
    res.update(params=count_params(model), macs=count_macs(model, shape))
    e = ctx.cfg.eval
    res.update(latency(model, shape, e.latency_batch, ctx.device, iters=e.latency_iters))
    res["device"] = str(ctx.device)
    return res


def main(cfg: DictConfig, out: Path) -> dict[str, Any]:
    if cfg.ckpt is None:
        raise CsgdError("csgd eval needs a checkpoint", "pass ckpt=<file.pt>")
    ctx = setup(cfg, out)
    model, _ = load(cfg.ckpt, "ckpt", ctx.data)
    res = {"ckpt": str(cfg.ckpt), "dataset": ctx.data.info.name, **measure(ctx, model)}
    write_json(out / "eval.json", res)
    print(
        f"top-1 {res['acc']:.2f}%  loss {res['loss']:.4f}  params {res['params']:,}  "
        f"FLOPs {res['macs'] / 1e6:.2f}M MACs  latency {res['latency_ms']:.2f} ms "
        f"(batch {res['batch_size']}, {res['throughput']:.0f} img/s on {res['device']})"
    )
    return res
