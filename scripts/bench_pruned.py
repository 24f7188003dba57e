"""What pruning buys where a network is deployed: ResNet-56 base vs C-SGD 5/8 widths.

    python scripts/bench_pruned.py [--iters 7] [--batches 1,256] [--backends eager,onnxruntime]

Variants are built from their width specs (latency depends on widths only): the base
(16/32/64), C-SGD 5/8 (10/20/40) and 5/8 with every group's cluster count rounded to a
multiple of 8 and of 16 (``clustering.num_clusters``: nearest multiple, ties down, at least N, at most the original
width). For every runtime and batch the variants' runners are prepared first and then
timed in alternating rounds, so machine-load drift hits all of them alike; the figure is
the median. Columns: FLOPs speed-up (multiply-adds, base / variant), latency speed-up in
the same runtime, their fraction, and the speed-up over the base's *best* runtime.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from csgd_cli.common.nets import count_macs
from csgd_cli.core.clustering import num_clusters
from csgd_cli.deploy.export import BACKENDS
from csgd_cli.models import get_model

BASE = (16, 32, 64)


def resnet56_widths(ratio: float, round_to: int = 1) -> list[int]:
    """[stage1, stage2, stage3] + the 27 inner widths, every conv pruned at ``ratio``."""
    stage = [num_clusters(w, ratio, round_to) if ratio < 1 else w for w in BASE]
    return stage + [s for s in stage for _ in range(9)]


def variants(ratio: float) -> dict[str, list[int]]:
    out = {
        "base": resnet56_widths(1.0),
        "csgd-5/8": resnet56_widths(ratio),
        "5/8 round_to=8": resnet56_widths(ratio, 8),
        "5/8 round_to=16": resnet56_widths(ratio, 16),
    }
    return out


@torch.no_grad()
def time_backend(models, backend: str, batch: int, iters: int, warmup: int) -> dict[str, float]:
    """Median latency (ms) of every model in ``backend``, rounds alternating between models."""
    x = torch.randn(batch, 3, 32, 32)
    if backend == "compile":
        torch._dynamo.reset()  # a fresh cache: no recompile limit, no dynamic sizes
    runners = {name: BACKENDS[backend](m, x) for name, m in models.items()}
    inputs = {name: r.prepare(x) for name, r in runners.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    reps = max(1, 32 // batch)  # small batches: time several forwards per sample
    for i in range(warmup + iters):
        for name in names if i % 2 else names[::-1]:
            run, a = runners[name].run, inputs[name]
            t0 = time.perf_counter()
            for _ in range(reps):
                run(a)
            if i >= warmup:
                times[name].append((time.perf_counter() - t0) / reps)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=7, help="timed forwards per model")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batches", default="1,256")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--ratio", type=float, default=0.625)
    args = ap.parse_args()
    torch.manual_seed(0)
    specs = variants(args.ratio)
    models = {k: get_model("resnet56", widths=w).eval() for k, w in specs.items()}
    macs = {k: count_macs(m, (3, 32, 32)) for k, m in models.items()}
    batches = [int(b) for b in args.batches.split(",")]
    backends = args.backends.split(",")
    print(
        f"ResNet-56, CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"median of {args.iters} alternating rounds (after {args.warmup} warm-up)"
    )
    for k, w in specs.items():
        print(
            f"  {k:16s} stage widths {w[:3]}, inner {sorted(set(w[3:]))}, {macs[k] / 1e6:.1f}M MACs"
        )
    lat: dict[tuple[str, int, str], float] = {}
    for batch in batches:
        for be in backends:
            t0 = time.perf_counter()
            for name, ms in time_backend(models, be, batch, args.iters, args.warmup).items():
                lat[(be, batch, name)] = ms
            print(f"  [{be} batch {batch}: {time.perf_counter() - t0:.0f}s]", flush=True)
    head = (
        f"| {'variant':16s} | batch | {'runtime':13s} | latency ms | FLOPs x | latency x "
        f"| fraction | x vs best base |"
    )
    print()
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for batch in batches:
        best_base = min(lat[(be, batch, "base")] for be in backends)
        for name in specs:
            for be in backends:
                ms = lat[(be, batch, name)]
                fx = macs["base"] / macs[name]
                lx = lat[(be, batch, "base")] / ms
                print(
                    f"| {name:16s} | {batch:5d} | {be:13s} | {ms:10.2f} | {fx:6.2f}x | {lx:8.2f}x "
                    f"| {lx / fx:8.2f} | {best_base / ms:13.2f}x |"
                )
    print()
    for batch in batches:
        best_base = min((lat[(be, batch, "base")], be) for be in backends)
        for name in specs:
            best = min((lat[(be, batch, name)], be) for be in backends)
            print(
                f"batch {batch:3d} {name:16s}: best runtime {best[1]:13s} {best[0]:8.2f} ms, "
                f"{best_base[0] / best[0]:.2f}x over the base's best ({best_base[1]})"
            )


if __name__ == "__main__":
    main()
