"""OpenVINO: the exported ONNX file (float32, or the INT8 QDQ file) compiled for the CPU.

``openvino`` reads ONNX directly, so the runtime is the same file onnxruntime runs.
Inference precision is pinned to f32: on CPUs with bf16 units OpenVINO would otherwise
choose bf16 by itself, and its logits would no longer be the float32 network's.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..common.errors import CsgdError
from .export import Runner, export_onnx

EXTRA = 'pip install "csgd[deploy]" openvino'


def require_openvino() -> Any:
    """The ``openvino`` package, or a one-line CsgdError with its install line."""
    try:
        import openvino
    except ImportError:
        raise CsgdError("openvino is not installed", f"install it: {EXTRA}") from None
    return openvino


def compile_onnx(
    path: str | os.PathLike[str], threads: int | None = None, batch: int | None = None
) -> Any:
    """An OpenVINO CPU compiled model of an ONNX file, latency hint, ``threads`` threads
    (default torch's), f32 inference; ``batch``: the batch axis fixed (faster), else dynamic."""
    ov = require_openvino()
    core = ov.Core()
    net = core.read_model(str(path))
    if batch is not None:
        shape = net.input(0).get_partial_shape()
        shape[0] = batch
        net.reshape({net.input(0): shape})
    config = {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
        "INFERENCE_PRECISION_HINT": "f32",
    }
    return core.compile_model(net, "CPU", config)


def _runner(compiled: Any) -> Runner:
    request = compiled.create_infer_request()
    out = compiled.output(0)

    def run(a: Any) -> Any:
        return request.infer({0: a})[out]

    return Runner(run, lambda x: x.detach().cpu().float().numpy())


def openvino_runner(model: nn.Module, sample: torch.Tensor, static: bool = True) -> Runner:
    """``model`` exported to ONNX (BatchNorm folded) and compiled by OpenVINO
    (``deploy.BACKENDS['openvino']``); ``static``: at ``sample``'s batch size."""
    require_openvino()
    with tempfile.TemporaryDirectory(prefix="csgd-ov-") as d:
        path = export_onnx(model, sample[:1], Path(d) / "model.onnx")
        compiled = compile_onnx(path, batch=sample.shape[0] if static else None)
    return _runner(compiled)


def openvino_file_runner(path: str | os.PathLike[str], batch: int | None = None) -> Runner:
    """An ONNX file already written (float32 or INT8 QDQ) in OpenVINO."""
    return _runner(compile_onnx(path, batch=batch))
