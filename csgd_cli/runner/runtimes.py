"""Top-1 and loss of a model as a deployment runtime runs it (INT8 in onnxruntime,
OpenVINO; from the runtime's own logits),
always beside the float32 network's: what ``csgd eval backend=...``, ``csgd export
format=onnx-int8`` and ``csgd run``'s INT8 row (``deploy.int8=true``) report.

INT8 calibration takes ``deploy.calib_batches`` batches of the training split (never
the test split the top-1 is measured on).
"""

from __future__ import annotations

import copy
import itertools
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..deploy.export import Runner
from . import distributed

#: backends whose numbers differ from the float32 network's: top-1 is measured in them
RUNTIME_TOP1 = ("onnxruntime-int8", "openvino")


def calibration(data: Any, batches: int) -> list[torch.Tensor]:
    """The first ``batches`` training batches (epoch 0's order: seeded), on the CPU."""
    return [x.detach().cpu().float() for x, _ in itertools.islice(data.train_batches(0), batches)]


def _numpy(x: torch.Tensor) -> Any:
    return x.detach().cpu().float().numpy()


def export_int8(
    model: nn.Module, sample: torch.Tensor, path: Path, calibration: list[torch.Tensor]
) -> Path:
    """``model`` exported (BatchNorm folded) and statically quantized to INT8 at ``path``."""
    from ..deploy.export import export_onnx
    from ..deploy.int8 import quantize_onnx

    with tempfile.TemporaryDirectory(prefix="csgd-int8-") as d:
        fp32 = export_onnx(model, sample[:1], Path(d) / "fp32.onnx")
        return quantize_onnx(fp32, path, calibration)


def file_runner(path: Path, backend: str = "onnxruntime", batch: int | None = None) -> Runner:
    """An ONNX file already written (float32 or INT8 QDQ) in onnxruntime or OpenVINO."""
    if backend == "openvino":
        from ..deploy.openvino import compile_onnx

        return Runner(compile_onnx(path, batch=batch), _numpy)
    from ..deploy.export import onnx_session

    sess = onnx_session(path)
    name = sess.get_inputs()[0].name
    return Runner(lambda a: sess.run(None, {name: a})[0], _numpy)


def runtime_runner(model: nn.Module, backend: str, data: Any, calib_batches: int) -> Runner:
    """``model`` (eval mode, CPU) prepared for ``backend``, for any batch size; INT8
    calibrated on ``calib_batches`` training batches."""
    x = data.sample_batch(2)[0].detach().cpu().float()
    m = copy.deepcopy(model).cpu().float().eval()  # the caller's model stays where it is
    if backend in ("onnxruntime-int8", "openvino"):
        with tempfile.TemporaryDirectory(prefix="csgd-rt-") as d:
            if backend == "openvino":
                from ..deploy.export import export_onnx

                return file_runner(export_onnx(m, x[:1], Path(d) / "m.onnx"), backend)
            calib = calibration(data, calib_batches)
            return file_runner(export_int8(m, x, Path(d) / "int8.onnx", calib))
    from ..deploy.export import BACKENDS

    return BACKENDS[backend](m, x)


def runner_metrics(runner: Runner, data: Any, device: torch.device) -> dict[str, float]:
    """Top-1 (%) and mean cross-entropy of a runtime's own logits over the whole test
    split (every rank's shard summed): what the runtime computes, not float32's."""
    right = n = 0
    loss = 0.0
    for x, y in data.test_batches():
        with torch.no_grad():  # a torch runtime returns tensors
            out = torch.as_tensor(np.asarray(runner.run(runner.prepare(x.cpu())))).float()
        y = y.cpu()
        right += int((out.argmax(1) == y).sum())
        loss += float(F.cross_entropy(out, y, reduction="sum"))
        n += int(y.numel())
    loss, right, n = distributed.all_sum([loss, right, n], device)
    return {"acc": 100.0 * right / max(n, 1), "loss": loss / max(n, 1)}


def runner_top1(runner: Runner, data: Any, device: torch.device) -> float:
    """Top-1 (%) of a runtime over the whole test split (every rank's shard summed)."""
    return runner_metrics(runner, data, device)["acc"]


def runtime_accuracy(
    model: nn.Module,
    backend: str,
    data: Any,
    device: torch.device,
    calib_batches: int,
    float32_acc: float,
    float32_loss: float | None = None,
) -> dict[str, Any]:
    """``acc`` and ``loss`` in ``backend`` (from its logits), ``acc_float32`` (the eager
    network's), the drop, and ``loss_float32`` when given."""
    got = runner_metrics(runtime_runner(model, backend, data, calib_batches), data, device)
    res = {**got, "acc_float32": float32_acc, "acc_drop": float32_acc - got["acc"]}
    if float32_loss is not None:
        res["loss_float32"] = float32_loss
    return res


def file_top1(path: Path, data: Any, device: torch.device, backend: str = "onnxruntime") -> float:
    """Top-1 of an ONNX file already written (``csgd export``), in onnxruntime or OpenVINO."""
    return runner_top1(file_runner(path, backend), data, device)


def int8_row(
    model: nn.Module, data: Any, device: torch.device, cfg: Any, float32: dict[str, Any]
) -> dict[str, Any]:
    """``csgd run``'s INT8 row (``deploy.int8=true``): the fine-tuned network statically
    quantized in onnxruntime, its top-1 beside ``float32``'s (that row's), its latency
    timed in ``onnxruntime-int8``."""
    from .evaluate import latencies

    i = data.info
    shape = (i.in_channels, i.image_size, i.image_size)
    row = {k: float32[k] for k in ("params", "macs", "resolution") if k in float32}
    row.update(
        runtime_accuracy(
            model,
            "onnxruntime-int8",
            data,
            device,
            cfg.deploy.calib_batches,
            float32["acc"],
            float32.get("loss"),
        )
    )
    lat = latencies({"int8": model}, shape, device, cfg.eval, "onnxruntime-int8")["int8"]
    row.update({k: v for k, v in lat.items() if k != "latency_spread"})
    return row
