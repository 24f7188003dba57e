"""OpenVINO: the exported ONNX file (float32, or the INT8 QDQ file) compiled for the CPU.

``openvino`` reads ONNX directly, so the runtime is the same file onnxruntime runs.
Inference precision is pinned to f32: on CPUs with bf16 units OpenVINO would otherwise
choose bf16 by itself, and its logits would no longer be the float32 network's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from ..common.errors import CsgdError

EXTRA = 'pip install "csgd[openvino]"'


def require_openvino() -> Any:
    """The ``openvino`` package, or a one-line CsgdError with its install line."""
    try:
        import openvino
    except ImportError:
        raise CsgdError("openvino is not installed", f"install it: {EXTRA}") from None
    return openvino


def compile_onnx(
    path: str | os.PathLike[str], threads: int | None = None, batch: int | None = None
) -> Callable[[Any], Any]:
    """An ONNX file compiled by OpenVINO for the CPU (latency hint, ``threads`` threads,
    default torch's; f32 inference; ``batch``: the batch axis fixed, else dynamic), as a
    function: a NumPy batch in, the first output (NumPy) out."""
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
    compiled = core.compile_model(net, "CPU", config)
    request, out = compiled.create_infer_request(), compiled.output(0)
    return lambda a: request.infer({0: a})[out]
