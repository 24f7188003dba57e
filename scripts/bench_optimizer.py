"""Centripetal optimizer vs torch's foreach SGD, and a whole C-SGD step vs plain SGD.

    python scripts/bench_optimizer.py [--model resnet56] [--ratio 0.625] [--batch 64]

Same model, same parameters, every conv group clustered at ``ratio`` (5/8: every conv
pruned as in the paper). Rounds alternate between the two so load drift hits both.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from csgd_cli.clustering import cluster_groups, target_widths
from csgd_cli.models import get_model
from csgd_cli.optim import CentripetalSGD


def timed(f, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--ratio", type=float, default=0.625)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=40, help="whole training steps per kind")
    args = ap.parse_args()
    torch.manual_seed(0)
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))

    def build(kind: str):
        m = get_model(args.model)
        groups = m.channel_groups()
        if kind == "csgd":
            cl = cluster_groups(m, groups, target_widths(groups, args.ratio), "kmeans", 0)
            opt = CentripetalSGD(m, groups, cl, lr=0.03, epsilon=3e-3, weight_decay=1e-4)
        else:
            opt = torch.optim.SGD(
                m.parameters(),
                lr=0.03,
                momentum=0.9,
                nesterov=True,
                weight_decay=1e-4,
                foreach=True,
            )
        return m, opt

    (m_sgd, sgd), (m_cs, cs) = build("sgd"), build("csgd")
    for m, opt in ((m_sgd, sgd), (m_cs, cs)):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()

    # 1) optimizer step alone (gradients in place)
    opt_t = {"sgd": [], "csgd": []}
    for _ in range(args.rounds):
        opt_t["sgd"].append(timed(sgd.step, 200))
        opt_t["csgd"].append(timed(cs.step, 200))
    o_sgd, o_cs = statistics.median(opt_t["sgd"]), statistics.median(opt_t["csgd"])

    # 2) whole training step: forward, backward, optimizer
    def step(m, opt):
        def f() -> None:
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()

        return f

    # steps alternate one by one so that load drift hits both alike; medians per kind
    step_t = {"sgd": [], "csgd": []}
    f_sgd, f_cs = step(m_sgd, sgd), step(m_cs, cs)
    for i in range(args.steps):  # which goes first alternates too
        for kind in ("sgd", "csgd") if i % 2 else ("csgd", "sgd"):
            step_t[kind].append(timed(f_sgd if kind == "sgd" else f_cs, 1))
    s_sgd, s_cs = statistics.median(step_t["sgd"]), statistics.median(step_t["csgd"])
    n_groups = len(m_cs.channel_groups())
    print(
        f"{args.model}, {n_groups} groups clustered at ratio {args.ratio}, batch {args.batch}, CPU, "
        f"{torch.get_num_threads()} threads, median of {args.rounds} alternating rounds"
    )
    print(
        f"optimizer step : foreach SGD {1e3 * o_sgd:7.3f} ms | C-SGD {1e3 * o_cs:7.3f} ms | "
        f"ratio {o_cs / o_sgd:.2f} (target <= 1.5)"
    )
    print(
        f"training step  : plain SGD   {1e3 * s_sgd:7.1f} ms | C-SGD {1e3 * s_cs:7.1f} ms | "
        f"ratio {s_cs / s_sgd:.3f} (target <= 1.02)"
    )


if __name__ == "__main__":
    main()
