"""ResNet-56 base, C-SGD-pruned, and pruned + INT8, in onnxruntime and in OpenVINO, at
batch 1 and 64, side by side: latency, top-1 and file size (the figures in docs/deploy.md).

The networks are trained on scikit-learn's digits (8x8, one channel) on the CPU: the base
with SGD (cosine schedule), then C-SGD (ratio 5/8, constant learning rate) until the
clusters collapse, merged (exactly) and fine-tuned for one epoch. Top-1 is on the digits
test split (360 images), in each runtime; INT8 is onnxruntime's static quantization (QDQ,
per-channel weights) calibrated on training batches, and OpenVINO runs the same QDQ file
as INT8. Latency is timed at 1x32x32 (CIFAR's
resolution: at 8x8 every runtime times its own overhead) by the one timer
(``deploy.timer.interleaved``: every file of a batch size side by side, rounds rotating).

    python scripts/bench_deploy_int8.py                # about 6 minutes on 2 busy cores
    python scripts/bench_deploy_int8.py --epochs 2 --csgd-epochs 2 --rounds 3   # quicker

``--only target``: latency targets in INT8 instead (``prune.target=latency:X
backend=onnxruntime-int8``): per network, batch and target, the ratio the search
reports (its chosen widths' whole INT8 network timed beside the base, re-checked), its
calibrated model's promise, and the chosen widths measured again independently: base and
thin network exported and quantised anew, timed side by side by the one timer with three
times the rounds. Random weights (widths, not accuracy, set the speed); one thread.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import csgd_cli as csgd
from csgd_cli.common.files import table
from csgd_cli.deploy.export import export_onnx
from csgd_cli.deploy.timer import interleaved
from csgd_cli.runner.datasets import build_data
from csgd_cli.runner.runtimes import calibration, export_int8, file_runner, runner_top1


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, data, epochs: int,
          cosine: bool = False) -> None:  # fmt: skip
    """``epochs`` of plain training; ``cosine``: the learning rate decays to 0 by step."""
    steps = epochs * len(list(data.train_batches(0)))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if cosine else None
    for epoch in range(epochs):
        model.train()
        for x, y in data.train_batches(epoch):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            if sched is not None:
                sched.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=6, help="base training epochs")
    ap.add_argument("--csgd-epochs", type=int, default=3)
    ap.add_argument("--epsilon", type=float, default=7.5, help="C-SGD's pull (large: few epochs)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5, help="timer rounds per batch size")
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--only", choices=["table", "target"], default="table",
                    help="table: the deployment table; target: INT8 latency targets")  # fmt: skip
    a = ap.parse_args()
    if a.only == "target":
        torch.set_num_threads(1)
        return targets(3)
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    cpu = torch.device("cpu")
    data = build_data(OmegaConf.create({"name": "digits", "batch_size": 32}), seed=0, device=cpu)
    t0 = time.time()
    base = csgd.get_model("resnet56", num_classes=10, in_channels=1)
    train(base, torch.optim.SGD(base.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4),
          data, a.epochs, cosine=True)  # fmt: skip
    x = data.sample_batch(64)[0]
    trained = csgd.load_model(_save(base), model=csgd.get_model("resnet56", num_classes=10,
                                                               in_channels=1))  # fmt: skip
    pruner = csgd.CSGD(trained, x, ratio=0.625)
    opt = pruner.optimizer(lr=0.02, epsilon=a.epsilon, norm_epsilon=a.epsilon, weight_decay=1e-4)
    train(trained, opt, data, a.csgd_epochs)
    thin = pruner.merge(tolerance=1e-3)
    rep = pruner.merge_report
    train(thin, torch.optim.SGD(thin.parameters(), lr=0.01, momentum=0.9), data, 1, cosine=True)
    print(f"trained in {time.time() - t0:.0f} s; merge check: relative logit difference "
          f"{rep['relative_logit_diff']:.1e}, top-1 agreement {100 * rep['top1_agreement']:.1f}%, "
          f"MACs -{100 * rep['flops_reduction']:.1f}%")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as d:
        d = Path(d)
        calib = calibration(data, a.calib_batches)
        files = {
            "base": export_onnx(base.eval(), x[:1], d / "base.onnx"),
            "pruned": export_onnx(thin.eval(), x[:1], d / "pruned.onnx"),
            "pruned INT8": export_int8(thin.eval(), x, d / "pruned.int8.onnx", calib),
        }
        rows = []
        for name, f in files.items():
            for rt in ("onnxruntime", "openvino"):
                acc = runner_top1(file_runner(f, rt), data, cpu)
                rows.append([name, rt, f"{acc:.2f}", f"{f.stat().st_size / 1e6:.2f}"])
        # the same networks exported at 32x32 for timing (ONNX fixes the spatial size)
        big = torch.randn(1, 1, 32, 32)
        up = [F.interpolate(c, size=32, mode="bilinear") for c in calib]
        timed = [export_onnx(base, big, d / "b32.onnx"), export_onnx(thin, big, d / "p32.onnx"),
                 export_int8(thin, big, d / "p32.int8.onnx", up)]  # fmt: skip
        ms = {}
        for batch in (1, 64):
            inp = torch.randn(batch, 1, 32, 32).numpy()
            runners = [file_runner(f, rt, batch) for f in timed
                       for rt in ("onnxruntime", "openvino")]  # fmt: skip
            t = interleaved([lambda r=r, a=inp: r.run(a) for r in runners], rounds=a.rounds,
                            block_s=0.1, min_calls=3)  # fmt: skip
            ms[batch] = [t.ms[0] * r for r in t.ratios]
        for i, row in enumerate(rows):
            row[2:2] = [f"{ms[1][i]:.3f}", f"{ms[64][i]:.2f}"]
    head = ["network", "runtime", "ms batch 1", "ms batch 64", "top-1 %", "file MB"]
    print(f"ResNet-56 on digits, latency at 1x32x32, {a.threads} thread(s), "
          f"INT8 calibrated on {a.calib_batches} training batches")  # fmt: skip
    print(table(head, rows, [False, False, True, True, True, True]))


TARGETS = [  # (network, its widths (None: the zoo's), batch, targets)
    ("resnet20", [64] * 12, 1, (0.8, 0.6)),
    ("resnet20", None, 16, (0.95,)),
]


def targets(rounds: int) -> None:
    """The INT8 latency-target table (``--only target``); see the module."""
    import os

    from csgd_cli.deploy import latency
    from csgd_cli.deploy.latency import Runtime, prepare, timed

    print(f"load average before: {os.getloadavg()[0]:.1f} (1 min) on {os.cpu_count()} cores")
    rows = []
    for name, widths, batch, wants in TARGETS:
        torch.manual_seed(0)
        kw = {"widths": widths} if widths else {}
        model = csgd.get_model(name, num_classes=10, **kw).eval()
        x, rt = torch.randn(1, 3, 32, 32), Runtime("onnxruntime-int8", batch, 1)
        label = f"{name}" + (f" (width {widths[0]})" if widths else "")
        for want in wants:
            t0 = time.time()
            try:
                plan = csgd.plan_widths(model, x, target=f"latency:{want}", runtime=rt)
            except csgd.CsgdError as e:
                rows.append([label, str(batch), f"{want}", str(e).split(";")[0], "", "", "", ""])
                continue
            rep, s = plan.report, time.time() - t0
            thin = csgd.CSGD(model, x, widths=plan).merge(force=True)
            again = timed([prepare(model, rt, (3, 32, 32)), prepare(thin, rt, (3, 32, 32))], rt,
                          rounds * latency.ROUNDS)  # fmt: skip
            rows.append([label, str(batch), f"{want}", f"{rep['ratio']:.3f}",
                         "yes" if rep["met"] else "NOT MET", f"{rep['modelled_ratio']:.3f}",
                         f"{again.ratios[1]:.3f} +-{again.spread[1]:.3f}", f"{s:.0f}"])  # fmt: skip
            print(
                f"  {label} batch {batch} latency:{want}: widths {rep['widths']}; "
                f"networks timed (modelled, INT8 ratio): {rep['networks_timed']}",
                flush=True,
            )
    head = ["network", "batch", "target", "reported INT8 ratio", "met", "modelled",
            "measured again", "search s"]  # fmt: skip
    print(table(head, rows, [False, True, True, True, False, True, True, True]))
    print(f"load average after: {os.getloadavg()[0]:.1f} (1 min)")


def _save(model: torch.nn.Module) -> Path:
    path = Path(tempfile.mkdtemp(prefix="bench-int8-")) / "base.pt"
    csgd.save(model, path)
    return path


if __name__ == "__main__":
    main()
