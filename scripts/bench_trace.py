"""Tracing speed: the uncached trace of each network (``trace_seconds``), each in a fresh
process on 2 threads, with the load average beside it; prints the slowest last.

    python scripts/bench_trace.py                  # issue 23's transformers and hybrids
    python scripts/bench_trace.py --cnn            # timm's and torchvision's small CNNs
    python scripts/bench_trace.py --all            # both
    python scripts/bench_trace.py fastvit_t8@224 torchvision.resnet18   # the ones named

A name without a prefix is timm's (``timm.``); ``@SIZE`` sets the input (default 64).
Imports are not timed (torch_pruning imports timm: seconds on busy cores, once per
process). Timings on a shared machine vary with its load: compare runs made side by side.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

# issue 23's table: (name, input size)
TRANSFORMERS = [
    ("deit_tiny_patch16_224", 64),
    ("swin_tiny_patch4_window7_224", 64),
    ("levit_128s", 64),
    ("pvt_v2_b0", 64),
    ("efficientformerv2_s0", 64),
    ("mobilevit_xxs", 64),
    ("mobilevitv2_050", 64),
    ("maxvit_nano_rw_256", 64),
    ("coat_lite_tiny", 64),
    ("twins_pcpvt_small", 64),
    ("fastvit_t8", 224),
    ("efficientvit_b0", 224),
    ("efficientformer_l1", 224),
    ("vit_tiny_patch16_224", 64),
]
CNNS = [
    *(
        (n, 64)
        for n in (
            "resnet18 efficientnet_b0 mobilenetv3_small_050 ghostnet_050 regnetx_002 "
            "repvgg_a0 dla34 cspresnet50 res2net50_26w_4s rexnet_100 mixnet_s "
            "ese_vovnet19b_dw dpn68 hrnet_w18_small nf_resnet26 densenet121 convnext_atto"
        ).split()
    ),
    *(
        (f"torchvision.{n}", 64)
        for n in (
            "resnet18 mobilenet_v3_small shufflenet_v2_x0_5 squeezenet1_1 densenet121 "
            "efficientnet_b0 regnet_x_400mf mnasnet0_5 googlenet convnext_tiny"
        ).split()
    ),
]
TIMEOUT_S = 300


def one(name: str, size: int) -> None:
    """In the child: build, trace once uncached, print the seconds."""
    import torch
    import torch_pruning  # noqa: F401  (its import, timm's too, is once per process: not timed)

    from csgd_cli.models import get_model
    from csgd_cli.tracing.trace import trace_seconds

    torch.set_num_threads(2)
    torch.manual_seed(0)
    full = name if "." in name else f"timm.{name}"
    model = get_model(full, num_classes=10, in_channels=3, image_size=size).eval()
    model.input_shape = (3, size, size)
    print(f"TRACE {trace_seconds(model):.3f}")


def measure(name: str, size: int) -> tuple[float | None, str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", name, str(size)]
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, f"killed after {TIMEOUT_S} s"
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("TRACE ")]
    if lines:
        return float(lines[-1].split()[1]), ""
    err = (p.stderr.strip().splitlines() or ["?"])[-1]
    return None, f"{err[:100]} (after {time.perf_counter() - t:.0f} s)"


def main(argv: list[str]) -> int:
    if argv[:1] == ["--one"]:
        one(argv[1], int(argv[2]))
        return 0
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return 0
    names = [a for a in argv if not a.startswith("-")]
    if names:
        rows = [(n.split("@")[0], int(n.split("@")[1]) if "@" in n else 64) for n in names]
    else:
        rows = CNNS if "--cnn" in argv else TRANSFORMERS
        rows = TRANSFORMERS + CNNS if "--all" in argv else rows
    done = []
    print(f"{'network':<36} {'input':>5} {'trace':>8} {'load':>5}")
    for name, size in rows:
        secs, why = measure(name, size)
        load = os.getloadavg()[0]
        shown = f"{secs:7.2f}s" if secs is not None else "  failed"
        print(f"{name:<36} {size:>5} {shown} {load:>5.1f} {why}", flush=True)
        done.append((secs if secs is not None else float("inf"), name, size))
    worst = max(done)
    over = sum(s > 10 for s, _, _ in done)
    print(f"\nslowest: {worst[1]} ({worst[2]}) {worst[0]:.2f} s; {over} of {len(done)} over 10 s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
