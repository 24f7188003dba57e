"""csgd export: any csgd checkpoint (base, C-SGD, pruned) to ONNX, checked in onnxruntime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ..session import load, setup


def main(cfg: DictConfig, out: Path) -> dict[str, Any]:
    from ...deploy.export import check_onnx, export_onnx

    ctx = setup(cfg, out)
    model, _ = load(cfg.ckpt, "ckpt", ctx.data.info)
    x, _ = ctx.data.sample_batch(8)
    path = export_onnx(model.eval().cpu(), x.cpu(), out / f"{Path(cfg.ckpt).stem}.onnx")
    diff = check_onnx(path, model, x.cpu())
    print(f"wrote {path}: onnxruntime logits within {diff:.2e} (relative) of PyTorch")
    return {"path": str(path), "relative_logit_diff": diff}
