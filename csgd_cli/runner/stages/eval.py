"""csgd eval: top-1, loss, params, FLOPs (multiply-adds) and latency; writes eval.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ...common.files import write_json
from ..distributed import is_main
from ..evaluate import measure
from ..runtimes import RUNTIME_TOP1, runtime_accuracy
from ..session import load, setup


def main(cfg: DictConfig, out: Path) -> dict[str, Any]:
    ctx = setup(cfg, out)
    model, _ = load(cfg.ckpt, "ckpt", ctx.data.info)
    res = measure(model, ctx.data, ctx.device, cfg.eval, cfg.amp, cfg.backend)
    if cfg.backend in RUNTIME_TOP1:  # top-1 and loss from the runtime's logits, float32's beside
        res.update(
            runtime_accuracy(
                model,
                cfg.backend,
                ctx.data,
                ctx.device,
                cfg.deploy.calib_batches,
                res["acc"],
                res["loss"],
            )
        )
    res = {"ckpt": str(cfg.ckpt), "dataset": ctx.data.info.name, **res}
    write_json(out / "eval.json", res)
    if is_main():
        print(
            f"top-1 {res['acc']:.2f}%  loss {res['loss']:.4f}  params {res['params']:,}  "
            f"FLOPs {res['macs'] / 1e6:.2f}M MACs  latency {res['latency_ms']:.2f} ms "
            f"(batch {res['batch_size']}, {res['throughput']:.0f} img/s, {res['backend']} "
            f"on {res['device']})"
            + (f"; float32 top-1 {res['acc_float32']:.2f}%" if "acc_float32" in res else "")
            + (f", loss {res['loss_float32']:.4f}" if "loss_float32" in res else "")
        )
    return res
