"""csgd export: any csgd checkpoint (base, C-SGD, pruned) to ONNX, checked in onnxruntime;
``format=onnx-int8``: statically quantized to INT8, its top-1 beside float32's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ...common.files import write_json
from ..session import load, setup


def main(cfg: DictConfig, out: Path) -> dict[str, Any]:
    ctx = setup(cfg, out)
    model, _ = load(cfg.ckpt, "ckpt", ctx.data.info)
    return FORMATS[cfg.format](cfg, ctx, model, out)


def _onnx(cfg: DictConfig, ctx: Any, model: Any, out: Path) -> dict[str, Any]:
    """``<ckpt>.onnx`` with BN folded, its logits checked in onnxruntime."""
    from ...deploy.export import check_onnx, export_onnx

    x, _ = ctx.data.sample_batch(8)
    path = export_onnx(model.eval().cpu(), x.cpu(), out / f"{Path(cfg.ckpt).stem}.onnx")
    diff = check_onnx(path, model, x.cpu())
    print(f"wrote {path}: onnxruntime logits within {diff:.2e} (relative) of PyTorch")
    return {"path": str(path), "relative_logit_diff": diff}


def _int8(cfg: DictConfig, ctx: Any, model: Any, out: Path) -> dict[str, Any]:
    """``<ckpt>.int8.onnx``: static INT8 (QDQ, per-channel weights), calibrated on
    ``deploy.calib_batches`` training batches; its top-1 beside float32's."""
    from ..evaluate import evaluate
    from ..runtimes import calibration, export_int8, file_top1

    fp32 = evaluate(model.to(ctx.device), ctx.data, ctx.device)["acc"]
    calib = calibration(ctx.data, cfg.deploy.calib_batches)
    model = model.eval().cpu().float()
    path = export_int8(model, calib[0], out / f"{Path(cfg.ckpt).stem}.int8.onnx", calib)
    acc = file_top1(path, ctx.data, ctx.device)
    res = {
        "path": str(path),
        "format": cfg.format,
        "acc": acc,
        "acc_float32": fp32,
        "acc_drop": fp32 - acc,
        "calib_batches": len(calib),
        "bytes": path.stat().st_size,
    }
    write_json(out / "export.json", res)
    print(
        f"wrote {path} ({res['bytes'] / 1e6:.2f} MB, {len(calib)} calibration batches): "
        f"top-1 {acc:.2f}% in onnxruntime INT8, float32 {fp32:.2f}%"
    )
    return res


FORMATS = {"onnx": _onnx, "onnx-int8": _int8}  # format= -> how it is written
