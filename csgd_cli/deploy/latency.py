"""Measured latency for width choice: one layer, or whole networks side by side, in a
runtime (``deploy.BACKENDS``), cached per model, runtime, batch and threads.

- ``layer_ms``: one conv (+ its BatchNorm, folded in onnxruntime) + ReLU at given
  channel counts, alone (the entries of a NetAdapt-style lookup table);
- ``ratios``: networks timed side by side with the first one (the base) by the one
  timer (``timer.interleaved``: one ratio per round, the median of them), so load that
  comes and goes on a shared machine hits base and candidate alike;
- ``Timings``: both kinds of result, kept for the process (a preflight's measurement
  is reused by the stage that follows) and in ``<cache_dir>/latency/<key>.json``.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..common.files import read_json, write_json
from .export import BACKENDS, Runner, onnx_session
from .timer import Timed, interleaved, time_one

#: runtimes whose layers timed alone do not add up to the network: INT8's quantize/
#: dequantize pairs fuse across layers (a layer alone pays its own at input and output)
#: and its kernels take channels in blocks; OpenVINO fuses layers. A latency target in
#: them calibrates its per-layer model on whole networks (``targets.timed``).
WHOLE_NETWORK = ("onnxruntime-int8", "openvino")
LAYER_S = 0.03  # least time spent timing one layer (its fastest call is kept)
NETWORK_S = 0.1  # least time per network per round when networks are compared
ROUNDS = 7  # rounds of a comparison (the median of the per-round ratios is kept)
LayerSig = tuple[int, ...]  # (cin, cout, kh, kw, stride, pad, dilation, depthwise, h, w)
_MEMO: dict[str, dict[str, dict[str, float]]] = {}  # cache key -> the file's content


@dataclass(frozen=True)
class Runtime:
    backend: str = "eager"
    batch: int = 1
    threads: int | None = None  # None: torch's thread count

    @property
    def nthreads(self) -> int:
        return self.threads or torch.get_num_threads()


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _best_ms(
    run: Callable[[Any], Any], a: Any, budget_s: float, min_iters: int, cpu: bool = False
) -> float:
    """Fastest time (ms) of ``run(a)``: the one timer (``timer.time_one``), one round."""
    return time_one(lambda: run(a), rounds=1, block_s=budget_s, min_calls=min_iters, cpu=cpu)


def _onnx_layer(sig: LayerSig, batch: int, threads: int, tmp: Path) -> Runner:
    """The layer as a two-node ONNX graph (Conv with bias + Relu: what BN folding and
    onnxruntime's fusion make of conv -> BN -> ReLU), built without an exporter."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    cin, cout, kh, kw, stride, pad, dil, dw, h, w = sig
    groups = cin if dw else 1
    rng = np.random.default_rng(0)
    wt = rng.standard_normal((cout, cin // groups, kh, kw)).astype(np.float32) * 0.1
    inits = [numpy_helper.from_array(wt, "w"), numpy_helper.from_array(np.zeros(cout, "f4"), "b")]
    conv = helper.make_node(
        "Conv",
        ["x", "w", "b"],
        ["c"],
        kernel_shape=[kh, kw],
        strides=[stride] * 2,
        pads=[pad] * 4,
        dilations=[dil] * 2,
        group=groups,
    )
    graph = helper.make_graph(
        [conv, helper.make_node("Relu", ["c"], ["y"])],
        "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, cin, h, w])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp / "layer.onnx"
    onnx.save(model, str(path))
    sess = onnx_session(path, threads)
    return Runner(lambda a: sess.run(None, {"x": a}), lambda x: x.numpy())


def layer_module(sig: LayerSig) -> nn.Module:
    """The layer as torch modules: conv -> BatchNorm -> ReLU, eval mode."""
    cin, cout, kh, kw, stride, pad, dil, dw, _h, _w = sig
    conv = nn.Conv2d(cin, cout, (kh, kw), stride, pad, dil, cin if dw else 1, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU()).eval()


@torch.no_grad()
def layer_ms(sig: LayerSig, rt: Runtime) -> float:
    """Fastest time (ms) of one layer alone in ``rt``. ``compile`` is timed as
    ``channels_last`` (the layout it compiles to): one compilation per table entry
    would take longer than the choice is worth; the network is still confirmed compiled."""
    x = torch.randn(rt.batch, sig[0], sig[8], sig[9])
    with _threads(rt.nthreads), tempfile.TemporaryDirectory(prefix="csgd-layer-") as d:
        if rt.backend == "onnxruntime":
            runner = _onnx_layer(sig, rt.batch, rt.nthreads, Path(d))
        else:
            backend = "channels_last" if rt.backend == "compile" else rt.backend
            runner = BACKENDS[backend](layer_module(sig), x)
        a = runner.prepare(x)
        return _best_ms(runner.run, a, budget_s=LAYER_S, min_iters=5, cpu=rt.nthreads == 1)


Prepared = tuple[Runner, Any]  # a runner and its input, converted once


@torch.no_grad()
def prepare(model: nn.Module, rt: Runtime, input_shape: Sequence[int]) -> Prepared:
    """``model`` ready to time in ``rt`` (a copy: the caller's model stays as it is)."""
    x = torch.randn(rt.batch, *input_shape)
    with _threads(rt.nthreads):
        r = BACKENDS[rt.backend](copy.deepcopy(model).cpu().float().eval(), x)
        return r, r.prepare(x)


@torch.no_grad()
def timed(runners: Sequence[Prepared], rt: Runtime, rounds: int | None = None) -> Timed:
    """Every runner timed side by side by the one timer (``timer.interleaved``):
    ``rounds`` (default ``ROUNDS``) rounds, ``NETWORK_S`` per runner per round."""
    with _threads(rt.nthreads):
        calls = [lambda r=r, a=a: r.run(a) for r, a in runners]
        one = rt.nthreads == 1  # one thread: its CPU time (``timer``)
        n = rounds or ROUNDS
        return interleaved(calls, rounds=n, block_s=NETWORK_S, min_calls=3, cpu=one)


def compare(runners: Sequence[Prepared], rt: Runtime) -> tuple[list[float], float]:
    """Latency of every runner relative to the first, and the first's time (ms)."""
    t = timed(runners, rt)
    return list(t.ratios), t.ms[0]


def ratios(
    models: Sequence[nn.Module], rt: Runtime, input_shape: Sequence[int]
) -> tuple[list[float], float]:
    """``compare`` for models (each prepared once)."""
    return compare([prepare(m, rt, input_shape) for m in models], rt)


class Timings:
    """Measured times of one model in one runtime: layer times (ms) by signature and
    network ratios (to the base) by width key, in the process and, with ``cache_dir``,
    in ``<cache_dir>/latency/<model>-<backend>-b<batch>-t<threads>.json``."""

    def __init__(self, model_name: str, rt: Runtime, cache_dir: str | Path | None = None) -> None:
        self.rt = rt
        self.key = f"{model_name}-{rt.backend}-b{rt.batch}-t{rt.nthreads}"
        self.path = Path(cache_dir) / "latency" / f"{self.key}.json" if cache_dir else None
        self.data = _MEMO.setdefault(
            self.key, {"layers": {}, "ratios": {}, "base_ms": {}, "spread": {}}
        )
        if self.path is not None and self.path.is_file():
            stored = read_json(self.path)
            if isinstance(stored, dict):
                for part in self.data:  # what this process measured wins
                    self.data[part] = {**stored.get(part, {}), **self.data[part]}
        self._base: tuple[int, Prepared] | None = None  # the base, exported once
        self._runners: dict[str, Prepared] = {}  # candidates timed against it

    def layer(self, sig: LayerSig) -> float:
        k = ",".join(map(str, sig))
        if k not in self.data["layers"]:
            self.data["layers"][k] = layer_ms(sig, self.rt)
        return self.data["layers"][k]

    def ratio(
        self,
        base: nn.Module,
        build: Callable[[], nn.Module],
        key: str,
        shape: Sequence[int],
        again: bool = False,
        rounds: int | None = None,
    ) -> float:
        """The network ``build()`` gives relative to ``base`` (cached under ``key``);
        ``again``: timed once more, and the larger ratio kept (a lucky round on a busy
        machine must not pass a candidate)."""
        if key not in self.data["ratios"] or again:
            if self._base is None or self._base[0] != id(base):
                self._base, self._runners = (id(base), prepare(base, self.rt, shape)), {}
            if key not in self._runners:
                self._runners[key] = prepare(build(), self.rt, shape)
            t = timed([self._base[1], self._runners[key]], self.rt, rounds)
            self.data["ratios"][key] = max(t.ratios[1], self.data["ratios"].get(key, 0.0))
            self.data["base_ms"][key] = t.ms[0]
            self.data["spread"][key] = t.spread[1]
        return self.data["ratios"][key]

    def save(self) -> None:
        if self.path is not None:
            write_json(self.path, self.data)


# -- a layer's table: measured on a grid of channel counts, interpolated --------------------
GRID = 8  # measured channel counts per dimension of a layer's table


def _grid(values: set[int]) -> list[int]:
    """At most ``GRID`` of ``values``, the smallest and largest included."""
    v = sorted(values)
    if len(v) <= GRID:
        return v
    return sorted({v[round(i * (len(v) - 1) / (GRID - 1))] for i in range(GRID)})


def _interp(grid: list[int], v: int) -> tuple[int, int, float]:
    """Indices of the grid points around ``v`` and the weight of the upper one."""
    j = min(max(bisect.bisect_left(grid, v), 1), len(grid) - 1) if len(grid) > 1 else 0
    if len(grid) == 1:
        return 0, 0, 0.0
    lo, hi = grid[j - 1], grid[j]
    return j - 1, j, min(max((v - lo) / (hi - lo), 0.0), 1.0)


class LayerTable:
    """A 2-d conv's time over (input, output) channel counts: measured on a grid,
    bilinear in between."""

    def __init__(self, sig: LayerSig, cins: set[int], couts: set[int], timings: Timings) -> None:
        self.sig, self.timings = sig, timings
        self.dw = bool(sig[7])
        self.cin, self.cout = _grid(cins), _grid(couts)

    def _at(self, cin: int, cout: int) -> float:
        s = self.sig
        return self.timings.layer((cin, cout, *s[2:]))

    def __call__(self, dims: list[int]) -> float:
        cout = dims[0]
        if self.dw:  # one channel count: in = out
            i, j, w = _interp(self.cout, cout)
            a, b = self.cout[i], self.cout[j]
            return (1 - w) * self._at(a, a) + w * self._at(b, b)
        cin = dims[1]
        i0, i1, wi = _interp(self.cin, cin)
        o0, o1, wo = _interp(self.cout, cout)
        f = self._at
        c, d = self.cin, self.cout
        return (1 - wi) * ((1 - wo) * f(c[i0], d[o0]) + wo * f(c[i0], d[o1])) + wi * (
            (1 - wo) * f(c[i1], d[o0]) + wo * f(c[i1], d[o1])
        )
