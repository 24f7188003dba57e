"""Deployment: ONNX export with BatchNorm folded, an onnxruntime check, and latency per runtime.

``onnx``/``onnxruntime`` are an optional extra (``pip install "csgd[deploy]"``) imported
inside the functions that need them, so ``import csgd_cli.deploy`` stays cheap.

Runtimes (``BACKENDS``, CPU): ``eager`` (the model as is), ``channels_last`` (NHWC
memory format, what oneDNN prefers), ``compile`` (``torch.compile`` of the channels_last
model, static shapes, inductor freezing), ``onnxruntime`` (the exported file, every graph
optimisation on, including the blocked NCHWc layouts that make widths in multiples of
8/16 pay off, as many intra-op threads as torch uses), ``onnxruntime-int8`` (that file
statically quantized, ``deploy/int8.py``), ``openvino`` (the file compiled by OpenVINO,
``deploy/openvino.py``).
"""

from __future__ import annotations

import copy
import io
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..common.errors import CsgdError
from ..common.files import atomic_path, atomic_write
from ..rules.queries import is_batchnorm, is_plain_conv
from .timer import interleaved

OPSET = 17
_EXTRA = 'pip install "csgd[deploy]"'


def require_runtime(backend: str = "onnxruntime") -> None:
    """Refuse, before any work, a runtime whose packages are not installed."""
    if backend in ("onnxruntime", "onnxruntime-int8", "openvino"):
        _require("onnx")
    if backend in ("onnxruntime", "onnxruntime-int8"):
        _require("onnxruntime")
    if backend == "openvino":
        from .openvino import require_openvino

        require_openvino()


def _require(name: str) -> Any:
    """Import ``onnx`` or ``onnxruntime`` or raise a one-line CsgdError naming the extra."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise CsgdError(f"{name} is not installed", f"install the deploy extra: {_EXTRA}") from e


# -- BatchNorm folding ----------------------------------------------------------------------
def _set_module(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every BatchNorm that directly follows a conv
    folded into that conv (weights ``W * g / s``, bias ``b' = (b - mu) g / s + beta``).

    Generic over any ``torch.fx``-traceable model: a conv->BN pair is folded when the
    conv's output feeds only the BN and neither module is called twice. BNs that follow
    something else (DenseNet's pre-activation BNs over a concatenation) stay. ``model``
    itself is not modified; the result is a ``torch.fx.GraphModule``.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    m = copy.deepcopy(model).eval()
    gm = torch.fx.symbolic_trace(m)
    mods = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        bn = mods.get(node.target) if node.op == "call_module" else None
        if bn is None or not is_batchnorm(bn) or bn.running_mean is None:
            continue
        src = node.args[0]
        conv = mods.get(src.target) if isinstance(src, torch.fx.Node) else None
        if (
            src.op != "call_module"
            or conv is None
            or not is_plain_conv(conv)
            or len(src.users) != 1
            or calls[src.target] != 1
            or calls[node.target] != 1
        ):
            continue
        _set_module(gm, src.target, fuse_conv_bn_eval(conv, bn))
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm.eval()


# -- ONNX -----------------------------------------------------------------------------------
def export_onnx(
    model: nn.Module, sample: torch.Tensor, path: str | os.PathLike[str], opset: int = OPSET
) -> Path:
    """Write ``model`` (eval mode, BatchNorm folded) to ``path`` as ONNX, batch axis dynamic.

    ``sample`` is one input batch (any batch size; only its shape/dtype matter). The file
    is written to a temporary name beside ``path`` and renamed, so a failed export leaves
    no partial file. Uses the TorchScript-based exporter (``dynamo=False``): for these
    CNNs it is exact and ~10x faster than the dynamo exporter (ResNet-56: 0.8 s vs 7.4 s).
    A model ``torch.fx`` cannot trace is exported unfolded; the exporter then folds the
    conv->BN pairs itself.
    """
    _require("onnx")
    import warnings

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        folded = fold_batchnorm(model).cpu().float()
    except Exception:  # not fx-traceable (data-dependent control flow): the TorchScript
        # exporter's own eval-mode pass still folds every conv->BN pair it can see
        folded = copy.deepcopy(model).cpu().float().eval()
    with atomic_path(path) as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(
            folded,
            (sample.detach().cpu().float(),),
            tmp,
            dynamo=False,
            opset_version=opset,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=True,
        )  # a full disk: the one-line error, not the exporter's traceback
    return path


def onnx_session(path: str | os.PathLike[str], threads: int | None = None) -> Any:
    """An onnxruntime CPU session with every graph optimisation on (incl. the blocked
    NCHWc layouts) and ``threads`` intra-op threads (default: torch's thread count)."""
    ort = _require("onnxruntime")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or torch.get_num_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@torch.no_grad()
def check_onnx(path: str | os.PathLike[str], model: nn.Module, x: torch.Tensor) -> float:
    """Max |logits_onnx - logits_torch| / max |logits_torch| on batch ``x`` (eval mode)."""
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters(), None)
        ref = model(x.to(p.device) if p is not None else x).float().cpu()
    finally:
        model.train(was_training)
    sess = onnx_session(path)
    out = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.cpu().float().numpy()})[0])
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def onnx_node_types(path: str | os.PathLike[str]) -> list[str]:
    """The op types of an ONNX file's graph, in order (e.g. to check BN was folded)."""
    onnx = _require("onnx")
    return [n.op_type for n in onnx.load(str(path)).graph.node]


# -- runtimes and latency -------------------------------------------------------------------
@dataclass
class Runner:
    """A model prepared for one runtime: ``prepare`` converts an input batch once (memory
    format, NumPy), ``run`` does one forward on a prepared input."""

    run: Callable[[Any], Any]
    prepare: Callable[[torch.Tensor], Any]


def _eager(model: nn.Module, sample: torch.Tensor) -> Runner:
    return Runner(model, lambda x: x)


def _channels_last(model: nn.Module, sample: torch.Tensor) -> Runner:
    m = copy.deepcopy(model).to(memory_format=torch.channels_last)
    return Runner(m, lambda x: x.contiguous(memory_format=torch.channels_last))


def _compile(model: nn.Module, sample: torch.Tensor) -> Runner:
    # Static shapes: otherwise a second model (other widths) or batch size recompiles
    # with symbolic sizes, which on CPU runs slower than eager. Freezing: inference only,
    # weights become constants (oneDNN prepacks them).
    m = copy.deepcopy(model).to(memory_format=torch.channels_last)
    compiled = torch.compile(m, dynamic=False, options={"freezing": True})
    return Runner(compiled, lambda x: x.contiguous(memory_format=torch.channels_last))


def _onnxruntime(
    model: nn.Module, sample: torch.Tensor, convert: Callable[[Path], Path] | None = None
) -> Runner:
    _require("onnxruntime")
    with tempfile.TemporaryDirectory(prefix="csgd-onnx-") as d:
        path = export_onnx(model, sample[:1], Path(d) / "model.onnx")
        sess = onnx_session(convert(path) if convert else path)  # convert: e.g. to INT8
    name = sess.get_inputs()[0].name
    return Runner(
        lambda a: sess.run(None, {name: a})[0], lambda x: x.detach().cpu().float().numpy()
    )


def _onnxruntime_int8(model: nn.Module, sample: torch.Tensor) -> Runner:
    from .int8 import quantize_onnx, random_calibration  # random inputs: for timing only

    calib = random_calibration(sample)
    return _onnxruntime(model, sample, lambda f: quantize_onnx(f, f.with_name("q.onnx"), calib))


def _openvino(model: nn.Module, sample: torch.Tensor) -> Runner:
    from .openvino import compile_onnx

    with tempfile.TemporaryDirectory(prefix="csgd-ov-") as d:
        path = export_onnx(model, sample[:1], Path(d) / "model.onnx")
        run = compile_onnx(path, batch=sample.shape[0])
    return Runner(run, lambda x: x.detach().cpu().float().numpy())


#: runtime name -> factory(model in eval mode, sample batch) -> Runner
BACKENDS: dict[str, Callable[[nn.Module, torch.Tensor], Runner]] = {
    "eager": _eager,
    "channels_last": _channels_last,
    "compile": _compile,
    "onnxruntime": _onnxruntime,
    "onnxruntime-int8": _onnxruntime_int8,  # deploy/int8.py
    "openvino": _openvino,  # deploy/openvino.py
}


@torch.no_grad()
def measure_latencies(
    models: Sequence[nn.Module],
    backend: str = "eager",
    input_shape: Sequence[int] = (3, 32, 32),
    batch: int = 1,
    rounds: int | None = None,
    warmup: int | None = None,
    device: torch.device | str = "cpu",
) -> list[dict[str, Any]]:
    """Forward time of one batch of ``batch`` random inputs for every model, timed side
    by side by the one timer (``timer.interleaved``) in ``backend`` (``eager`` on
    ``device``, the others on the CPU).

    Per model: ``latency_ms`` (the first model's fastest time times this one's ratio to
    it, so two equal networks read the same), ``latency_spread`` (that ratio's spread),
    ``latency_clock`` (``cpu`` on one CPU thread, else ``wall``), ``throughput``
    (images/s), ``batch_size``, ``backend``. The backends are prepared
    (copied, compiled, exported) before timing starts; ``models`` are not modified."""
    if backend not in BACKENDS:
        raise CsgdError(f"unknown backend '{backend}'", f"choose one of: {', '.join(BACKENDS)}")
    dev = torch.device(device) if backend == "eager" else torch.device("cpu")
    x = torch.randn(batch, *input_shape, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    calls = []
    for model in models:
        runner = BACKENDS[backend](copy.deepcopy(model).to(dev).float().eval(), x)
        a = runner.prepare(x)
        if dev.type == "cuda" and a.dim() == 4:
            a = a.contiguous(memory_format=torch.channels_last)
        calls.append(lambda r=runner, a=a: (r.run(a), sync()))
    if backend == "compile":  # the first call compiles
        warmup = max(warmup if warmup is not None else 1, 1)
    one = dev.type == "cpu" and torch.get_num_threads() == 1  # its CPU time (``timer``)
    t = interleaved(calls, rounds=rounds, warmup=warmup, min_calls=1, cpu=one)
    return [
        {
            "latency_ms": t.ms[0] * r,
            "latency_spread": None if s is None else round(s, 4),
            "latency_clock": t.clock,
            "throughput": batch / (t.ms[0] * r / 1e3),
            "batch_size": batch,
            "backend": backend,
        }
        for r, s in zip(t.ratios, t.spread, strict=True)
    ]


def measure_latency(
    model: nn.Module,
    backend: str = "eager",
    input_shape: Sequence[int] = (3, 32, 32),
    batch: int = 1,
    iters: int = 10,
    warmup: int = 3,
) -> dict[str, Any]:
    """One model's ``measure_latencies`` (``iters`` rounds): ``{"latency_ms",
    "latency_spread", "throughput" (images/s), "batch_size", "backend"}``."""
    return measure_latencies([model], backend, input_shape, batch, max(iters, 1), warmup)[0]


def export_onnx_if_installed(thin: nn.Module, x: torch.Tensor, path: Path) -> Path | None:
    """``pruned.onnx`` (BN folded, dynamic batch), checked in onnxruntime, when the
    ``deploy`` extra is installed; a note saying how to get it otherwise."""
    import importlib.util
    import logging

    log = logging.getLogger("csgd")
    if not all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime")):
        log.info('no %s: pip install "csgd[deploy]" to export ONNX', path.name)
        return None
    from .export import check_onnx, export_onnx

    export_onnx(thin, x[:2], path)
    log.info("wrote %s (onnxruntime logits within %.1e relative)", path, check_onnx(path, thin, x))
    return path


def export_pt2(thin: nn.Module, x: torch.Tensor, path: Path) -> Path:
    """A standalone ``torch.export`` program (loads with torch.export.load, no csgd)."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    ep = torch.export.export(thin.eval(), (x[:2],), dynamic_shapes=({0: batch},))
    buf = io.BytesIO()  # in memory first: a full disk then names the size it needed
    torch.export.save(ep, buf)
    atomic_write(path, buf.getvalue())
    return path
