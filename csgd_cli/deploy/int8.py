"""INT8 in onnxruntime: static quantization of the exported float32 ONNX file.

QDQ format (QuantizeLinear/DequantizeLinear pairs around each op, which onnxruntime
fuses into integer kernels), weights signed INT8 per output channel, activations
unsigned INT8 per tensor with ranges calibrated (MinMax) on batches of real data:
``calibration`` is a list of input batches (the CLI takes ``deploy.calib_batches`` of
them from the run's data set). Without it, random inputs stand in, which is enough
for timing (a latency target, ``backend=onnxruntime-int8`` timings) but not for top-1.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..common.errors import CsgdError
from ..common.files import atomic_path


def _quantization() -> Any:
    try:
        from onnxruntime import quantization
    except ImportError:
        raise CsgdError(
            "onnxruntime is not installed", 'install the deploy extra: pip install "csgd[deploy]"'
        ) from None
    return quantization


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a list of batches."""

    def __init__(self, name: str, batches: Sequence[torch.Tensor]) -> None:
        self._it = iter([{name: b.detach().cpu().float().numpy()} for b in batches])

    def get_next(self) -> dict[str, Any] | None:
        return next(self._it, None)


def quantize_onnx(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    calibration: Sequence[torch.Tensor],
) -> Path:
    """``src`` (float32 ONNX) statically quantized to INT8 at ``dst`` (QDQ, per-channel
    weights), its activation ranges calibrated on ``calibration`` batches."""
    q = _quantization()
    if not calibration:
        raise CsgdError(
            "INT8 needs at least one calibration batch", "pass deploy.calib_batches >= 1"
        )
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="csgd-int8-") as d:
        pre = Path(d) / "pre.onnx"
        try:  # shape inference and graph cleanup first, as onnxruntime recommends
            from onnxruntime.quantization.shape_inference import quant_pre_process

            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        except Exception:  # an older onnxruntime or a graph it cannot pre-process
            pre = Path(src)
        import onnx

        name = onnx.load(str(pre)).graph.input[0].name
        tmp = Path(d) / "int8.onnx"
        root = logging.getLogger()
        level = root.level
        root.setLevel(max(level, logging.WARNING))  # its per-bias INFO lines go to the root
        try:
            q.quantize_static(
                str(pre),
                str(tmp),
                _Reader(name, calibration),
                quant_format=q.QuantFormat.QDQ,
                per_channel=True,
                activation_type=q.QuantType.QUInt8,
                weight_type=q.QuantType.QInt8,
                calibrate_method=q.CalibrationMethod.MinMax,
            )
        finally:
            root.setLevel(level)
        with atomic_path(dst) as out:  # every rank: each times its own copy
            out.write_bytes(tmp.read_bytes())
    return dst


def random_calibration(sample: torch.Tensor, batches: int = 4) -> list[torch.Tensor]:
    """Stand-in calibration for timing only: normal inputs of ``sample``'s shape."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(sample.shape, generator=g) for _ in range(batches)]
