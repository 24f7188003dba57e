"""Engine training step vs a minimal hand-written PyTorch loop, compiled vs eager
training (``Trainer(compile=True)``), and augmentation speed.

    python scripts/bench_train.py [--model resnet56] [--batch 64] [--rounds 5] [--steps 10]
                                  [--no-compile]

All loops train the same model on the same batch on the CPU; rounds alternate between
them so drift in machine load hits both alike. Prints images/s and the ratios (compiled
vs eager: min/median/max of the per-round ratio, and the one-off compile time).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from csgd_cli.common.config import ScheduleConf
from csgd_cli.core.optim import plain_sgd
from csgd_cli.models import get_model
from csgd_cli.runner.data import augment_batch, normalize
from csgd_cli.runner.engine import Trainer


class _OneBatch:
    def __init__(self, n: int) -> None:
        self.n = n

    def steps_per_epoch(self) -> int:
        return self.n


def make_trainer(model: torch.nn.Module, sched, compile: bool) -> Trainer:
    trainer = Trainer(
        model,
        _OneBatch(1000),
        sched,
        plain_sgd(model, sched),
        device=torch.device("cpu"),
        out=Path("/tmp"),
        phase="bench",
        payload={},
        compile=compile,
    )
    trainer.log.enabled = False
    return trainer


def bench_compile(args: argparse.Namespace, sched, x: torch.Tensor, y: torch.Tensor) -> None:
    """Trainer(compile=True) vs Trainer(compile=False): same weights, alternating rounds."""
    m_eager, m_comp = get_model(args.model), get_model(args.model)
    m_comp.load_state_dict(m_eager.state_dict())
    trainers = {
        "eager": make_trainer(m_eager.train(), sched, compile=False),
        "compiled": make_trainer(m_comp.train(), sched, compile=True),
    }
    t0 = time.perf_counter()
    trainers["compiled"].train_step(x, y)  # compiles forward and backward
    compile_s = time.perf_counter() - t0
    for t in trainers.values():
        for _ in range(2):
            t.train_step(x, y)
    per: dict[str, list[float]] = {k: [] for k in trainers}
    names = list(trainers)
    for r in range(args.rounds):
        for name in names if r % 2 else names[::-1]:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                trainers[name].train_step(x, y)
            per[name].append((time.perf_counter() - t0) / args.steps)
    speedup = [e / c for e, c in zip(per["eager"], per["compiled"], strict=True)]
    print(f"compile (first step, forward + backward): {compile_s:.1f} s")
    for name in names:
        ts = per[name]
        print(
            f"{name:8s} training step ms: min {1e3 * min(ts):7.1f}  median "
            f"{1e3 * statistics.median(ts):7.1f}  max {1e3 * max(ts):7.1f}"
        )
    print(
        f"speed-up compiled vs eager (eager/compiled step time) per round: min "
        f"{min(speedup):.3f}  median {statistics.median(speedup):.3f}  max {max(speedup):.3f}  "
        "(target >= 1.2)"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true", help="skip compiled vs eager")
    args = ap.parse_args()
    torch.manual_seed(0)
    sched = OmegaConf.structured(ScheduleConf(epochs=1000, lr=0.1, milestones=[], log_every=0))
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    m_engine, m_hand = get_model(args.model), get_model(args.model)
    m_hand.load_state_dict(m_engine.state_dict())
    trainer = make_trainer(m_engine, sched, compile=False)
    opt = torch.optim.SGD(
        m_hand.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4
    )

    def hand() -> None:
        out = m_hand(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def engine() -> None:
        trainer.train_step(x, y)

    m_engine.train()
    m_hand.train()
    for f in (hand, engine):
        f()
        f()
    t: dict[str, list[float]] = {"hand": [], "engine": []}  # per round, seconds per step
    for r in range(args.rounds):  # which goes first alternates
        for name, f in (("hand", hand), ("engine", engine))[:: 1 if r % 2 else -1]:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                f()
            t[name].append((time.perf_counter() - t0) / args.steps)
    print(
        f"{args.model}, batch {args.batch}, CPU, {torch.get_num_threads()} threads, "
        f"{args.rounds} alternating rounds of {args.steps} steps each"
    )
    ips = {k: args.batch / statistics.median(v) for k, v in t.items()}
    print(f"hand-written loop : {ips['hand']:8.1f} img/s (median round)")
    print(f"csgd engine       : {ips['engine']:8.1f} img/s (median round)")
    ratio = [h / e for h, e in zip(t["hand"], t["engine"], strict=True)]
    print(
        f"ratio engine/hand per round: min {min(ratio):.3f}  median "
        f"{statistics.median(ratio):.3f}  max {max(ratio):.3f}  (target >= 0.97)"
    )
    if not args.no_compile:
        bench_compile(args, sched, x, y)

    # augmentation: batched uint8 tensors (csgd) vs torchvision's PIL path, per image
    imgs = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    normalize(augment_batch(imgs, 4, True, g), mean, std)
    reps = 50
    t0 = time.perf_counter()
    for _ in range(reps):
        normalize(augment_batch(imgs, 4, True, g), mean, std)
    tensor_ips = reps * 256 / (time.perf_counter() - t0)
    from PIL import Image
    from torchvision import transforms as T

    tf = T.Compose(
        [
            T.RandomCrop(32, padding=4),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
    pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in imgs]
    t0 = time.perf_counter()
    for _ in range(4):
        torch.stack([tf(im) for im in pil])
    pil_ips = 4 * 256 / (time.perf_counter() - t0)
    print(
        f"augmentation (pad-4 crop + flip + normalise), batch 256: csgd tensors {tensor_ips:,.0f} img/s, "
        f"torchvision PIL {pil_ips:,.0f} img/s"
    )


if __name__ == "__main__":
    main()
