"""The one latency timer (``csgd_cli.deploy.timer``), quiet and beside a CPU hog.

    python scripts/bench_timer.py [--batch 4] [--threads 1] [--target 0.5] [--backend eager]
                                  [--only equal,search]

1. equal: two copies of one ResNet-56 (the quickstart table's base and C-SGD rows are
   the same architecture) timed side by side by ``measure_latencies``: the ratio and its
   spread, quiet and with a busy process spinning on a core; beside them, the same two
   timed one after the other by separate calls (what the run table used to do).
2. search: ResNet-56's widths for ``latency:<target>`` chosen quiet and under the hog;
   then both choices timed side by side on the quiet machine: the hogged choice's
   latency relative to the quiet one, and each choice's ratio to the base.

Random weights (only shapes matter for speed). Prints the machine's load: on a shared
machine the "quiet" figures carry other users' load too. One thread by default: on an
overloaded machine a parallel region waits for its slowest thread (ResNet-56 at batch 16
took 0.75 s a call on one thread, 8.8 s on two, at load 18 on 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import torch

import csgd_cli as csgd
from csgd_cli.deploy import latency
from csgd_cli.deploy.export import measure_latencies, measure_latency
from csgd_cli.deploy.latency import Runtime
from csgd_cli.models import get_model

print = functools.partial(print, flush=True)  # a log read while it runs


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.2f}, {five:.2f} (1, 5 min), {os.cpu_count()} cores"


@contextlib.contextmanager
def hog(on: bool) -> Iterator[None]:
    """A subprocess spinning on a core while the block runs."""
    if not on:
        yield
        return
    p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.5)  # let it get going
    try:
        yield
    finally:
        p.kill()
        p.wait()


def equal(batch: int, backend: str) -> None:
    torch.manual_seed(0)
    a = get_model("resnet56").eval()
    b = get_model("resnet56").eval()
    shape = (3, 32, 32)
    for busy in (False, True):
        with hog(busy):
            t0 = time.perf_counter()
            r = measure_latencies([a, b], backend, shape, batch, rounds=10)
            s = time.perf_counter() - t0
            one = measure_latency(a, backend, shape, batch, iters=10)["latency_ms"]
            two = measure_latency(b, backend, shape, batch, iters=10)["latency_ms"]
        sp = r[0]["latency_ms"] / r[1]["latency_ms"]
        print(
            f"equal ResNet-56 x2, {backend} batch {batch}, {'HOG' if busy else 'quiet'}: "
            f"side by side {r[0]['latency_ms']:.2f} / {r[1]['latency_ms']:.2f} ms -> "
            f"{sp:.2f}x +-{r[1]['latency_spread']:.3f} ({s:.1f} s); one after the other "
            f"{one:.2f} / {two:.2f} ms -> {one / two:.2f}x   [{load()}]"
        )


def search(batch: int, backend: str, target: float) -> None:
    torch.manual_seed(0)
    model = get_model("resnet56").eval()
    x = torch.randn(1, 3, 32, 32)
    rt = Runtime(backend, batch, torch.get_num_threads())
    plans = {}
    for busy in (False, True):
        latency._MEMO.clear()  # each search times afresh
        with hog(busy):
            t0 = time.perf_counter()
            plan = csgd.plan_widths(model, x, target=f"latency:{target}", runtime=rt)
            s = time.perf_counter() - t0
        rep = plan.report or {}
        plans[busy] = plan
        print(
            f"search latency:{target} {backend} batch {batch} {'HOG' if busy else 'quiet'}: "
            f"timed {rep.get('ratio', float('nan')):.3f}, modelled "
            f"{rep.get('modelled_ratio', float('nan')):.3f}, met={rep.get('met')}, "
            f"share of widths {plan.share:.3f}, {s:.0f} s   [{load()}]"
        )
        for note in rep.get("notes", []):
            print("  note:", note)
    nets = [model] + [
        csgd.CSGD(model, x, widths=plans[b]).merge(force=True).eval() for b in (False, True)
    ]
    r = measure_latencies(nets, backend, (3, 32, 32), batch, rounds=10)
    q, h = r[1]["latency_ms"], r[2]["latency_ms"]
    print(
        f"re-timed quiet, side by side: quiet choice {q / r[0]['latency_ms']:.3f} of the "
        f"base, hogged choice {h / r[0]['latency_ms']:.3f}; hogged / quiet = {h / q:.3f} "
        f"(+-{r[2]['latency_spread']:.3f})   [{load()}]"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--backend", default="eager")
    p.add_argument("--only", default="equal,search")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch threads {torch.get_num_threads()}   [{load()}]")
    if "equal" in a.only:
        equal(a.batch, a.backend)
    if "search" in a.only:
        search(a.batch, a.backend, a.target)


if __name__ == "__main__":
    main()
