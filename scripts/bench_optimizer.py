"""Centripetal optimizer vs torch's foreach SGD: optimizer step, whole step, peak memory.

    python scripts/bench_optimizer.py [--model resnet56] [--ratio 0.625] [--batch 64]
                                      [--rounds 9] [--steps 8] [--no-memory]

Same model, same parameters, every conv group clustered at ``ratio`` (5/8: every conv
pruned as in the paper). Timings come in rounds that alternate between the two (and
which goes first), so drift in machine load hits both alike; each round gives one
C-SGD/SGD ratio, and the figures are the min/median/max over rounds. The whole step is
split into zero_grad, forward, backward and optimizer so an extra cost shows where it
goes. Peak memory: each optimizer trains in its own fresh subprocess; the figure is the
peak resident set (``ru_maxrss``) and its growth over the process before the model was
built (imports, input batch).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from csgd_cli.core.clustering import cluster_groups, target_widths
from csgd_cli.core.optim import CentripetalSGD
from csgd_cli.models import get_model
from csgd_cli.tracing.trace import channel_groups

KINDS = ("sgd", "csgd")
clock = time.perf_counter  # --clock cpu: time.process_time (immune to being descheduled)
PHASES = ("zero_grad", "forward", "backward", "optimizer")


def build(kind: str, args: argparse.Namespace):
    torch.manual_seed(0)
    m = get_model(args.model)
    if kind == "csgd":
        groups = channel_groups(m)
        cl = cluster_groups(m, groups, target_widths(groups, args.ratio), "kmeans", 0)
        opt = CentripetalSGD(m, groups, cl, lr=0.03, epsilon=3e-3, weight_decay=1e-4)
    else:
        opt = torch.optim.SGD(
            m.parameters(), lr=0.03, momentum=0.9, nesterov=True, weight_decay=1e-4, foreach=True
        )
    return m.train(), opt


def step_phases(m, opt, x, y) -> list[float]:
    """One training step; seconds spent in each of PHASES."""
    t0 = clock()
    opt.zero_grad()
    t1 = clock()
    loss = F.cross_entropy(m(x), y)
    t2 = clock()
    loss.backward()
    t3 = clock()
    opt.step()
    t4 = clock()
    return [t1 - t0, t2 - t1, t3 - t2, t4 - t3]


def spread(xs: list[float], scale: float = 1.0, fmt: str = "8.3f") -> str:
    return "  ".join(
        f"{name} {scale * v:{fmt}}"
        for name, v in (("min", min(xs)), ("median", statistics.median(xs)), ("max", max(xs)))
    )


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def memory_child(kind: str, args: argparse.Namespace) -> None:
    """Runs in a fresh process: peak RSS of ``--mem-steps`` training steps of one kind."""
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    start = rss_kib()
    m, opt = build(kind, args)
    for _ in range(args.mem_steps):
        step_phases(m, opt, x, y)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"start": start, "peak": peak}))


def memory(args: argparse.Namespace) -> None:
    res: dict[str, list[dict[str, int]]] = {k: [] for k in KINDS}
    for i in range(args.mem_runs):
        for kind in KINDS if i % 2 == 0 else KINDS[::-1]:
            out = subprocess.run(
                [sys.executable, __file__, "--memory-child", kind, *sys.argv[1:]],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            res[kind].append(json.loads(out.strip().splitlines()[-1]))
    peak = {k: statistics.median(r["peak"] for r in v) / 1024 for k, v in res.items()}
    grow = {k: statistics.median(r["peak"] - r["start"] for r in v) / 1024 for k, v in res.items()}
    print(
        f"peak memory    : plain SGD {peak['sgd']:7.1f} MiB | C-SGD {peak['csgd']:7.1f} MiB | "
        f"ratio {peak['csgd'] / peak['sgd']:.3f} (target <= 1.05; whole process, "
        f"median of {args.mem_runs} fresh processes each, {args.mem_steps} steps)"
    )
    print(
        f"  of which the training itself (peak - RSS before the model): plain SGD "
        f"{grow['sgd']:7.1f} MiB | C-SGD {grow['csgd']:7.1f} MiB | ratio "
        f"{grow['csgd'] / grow['sgd']:.3f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--ratio", type=float, default=0.625)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=9, help="alternating rounds")
    ap.add_argument("--steps", type=int, default=8, help="whole training steps per kind per round")
    ap.add_argument("--opt-steps", type=int, default=100, help="optimizer steps per round")
    ap.add_argument("--mem-runs", type=int, default=3, help="fresh processes per kind")
    ap.add_argument("--mem-steps", type=int, default=3)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="cpu",
        help="cpu (default): process CPU time, which other jobs on the cores barely touch; "
        "wall: elapsed time (use on an idle machine, e.g. with --threads 2)",
    )
    ap.add_argument("--memory-child", choices=KINDS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args.memory_child, args)
    global clock
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.manual_seed(0)
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    built = {k: build(k, args) for k in KINDS}
    for m, opt in built.values():  # warm-up: allocator, oneDNN primitive caches
        for _ in range(2):
            step_phases(m, opt, x, y)
    n_groups = len(channel_groups(built["csgd"][0]))
    print(
        f"{args.model}, {n_groups} groups clustered at ratio {args.ratio}, batch {args.batch}, "
        f"CPU, {torch.get_num_threads()} threads, {args.rounds} alternating rounds, "
        f"{args.clock} clock, load average {os.getloadavg()[0]:.1f}"
    )

    # 1) the optimizer step alone (gradients in place)
    opt_t: dict[str, list[float]] = {k: [] for k in KINDS}
    for i in range(args.rounds):
        for kind in KINDS if i % 2 else KINDS[::-1]:
            opt = built[kind][1]
            t0 = clock()
            for _ in range(args.opt_steps):
                opt.step()
            opt_t[kind].append((clock() - t0) / args.opt_steps)
    ratios = [c / s for s, c in zip(opt_t["sgd"], opt_t["csgd"], strict=True)]
    for kind, label in (("sgd", "foreach SGD"), ("csgd", "C-SGD")):
        print(f"optimizer step : {label:11s} ms  {spread(opt_t[kind], 1e3)}")
    print(f"  C-SGD / SGD per round      {spread(ratios, fmt='8.3f')}   (target median <= 1.3)")

    # 2) whole training steps: rounds of ``steps`` steps per kind, phases timed
    ph: dict[str, list[list[float]]] = {k: [] for k in KINDS}  # per round: median per phase
    tot: dict[str, list[float]] = {k: [] for k in KINDS}  # per round: median whole step
    for i in range(args.rounds):
        for kind in KINDS if i % 2 else KINDS[::-1]:
            m, opt = built[kind]
            rows = [step_phases(m, opt, x, y) for _ in range(args.steps)]
            tot[kind].append(statistics.median(sum(r) for r in rows))
            ph[kind].append([statistics.median(r[j] for r in rows) for j in range(len(PHASES))])
    ratios = [c / s for s, c in zip(tot["sgd"], tot["csgd"], strict=True)]
    for kind, label in (("sgd", "plain SGD"), ("csgd", "C-SGD")):
        print(f"training step  : {label:11s} ms  {spread(tot[kind], 1e3, '8.1f')}")
    print(f"  C-SGD / SGD per round      {spread(ratios, fmt='8.3f')}   (target median <= 1.02)")
    print("  where the time goes (median over rounds, ms):")
    for j, name in enumerate(PHASES):
        s = statistics.median(r[j] for r in ph["sgd"])
        c = statistics.median(r[j] for r in ph["csgd"])
        print(
            f"    {name:10s} plain SGD {1e3 * s:8.2f} | C-SGD {1e3 * c:8.2f} | "
            f"C-SGD - SGD {1e3 * (c - s):+7.2f}"
        )
    if not args.no_memory:
        memory(args)


if __name__ == "__main__":
    main()
