"""Transformers and hybrids through csgd: trace, a short C-SGD and the exact merge, per
family; prints the table docs/transformers.md carries.

    python scripts/transformer_table.py            # every family (minutes on 2 cores)
    python scripts/transformer_table.py --quick    # four of them
    python scripts/transformer_table.py vit_tiny_patch16_224 bert   # the rows named

Per model: tracing time (uncached, float32), groups prunable / all with the most common
exclusion, attention head-channel groups found and prunable, ten C-SGD steps (lr x epsilon
= 0.9: the members' differences x0.1 a step), the merge check (relative logit difference, top-1 agreement on a
held-out batch) and the MACs cut at ratio 0.5. As ``timm_table.py`` (whose helpers it
uses): float64, ``even`` clusters, a large epsilon, weights made non-trivial first.
transformers' BERT and ViT are built from small configurations (nothing downloaded).
"""

from __future__ import annotations

import collections
import math
import os
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from _tables import (
    Column,
    markdown,
    merge_cell,
    nontrivial_,
    print_row,
    recalibrate_bn,
    run_here,
    run_isolated,
    select,
    short_reason,
    summary,
)
from torch import nn

import csgd_cli as csgd
from csgd_cli.common.errors import CsgdError
from csgd_cli.models import get_model
from csgd_cli.tracing import trace

# (name, family, input size): timm names, and "bert" / "hf_vit" for transformers
ROWS = [
    ("vit_tiny_patch16_224", "vit", 64),
    ("deit_tiny_patch16_224", "deit", 64),
    ("swin_tiny_patch4_window7_224", "swin", 64),
    ("levit_128s", "levit", 64),
    ("pvt_v2_b0", "pvt_v2", 64),
    ("efficientformer_l1", "efficientformer", 224),  # its forward needs 224
    ("efficientformerv2_s0", "efficientformerv2", 64),
    ("mobilevit_xxs", "mobilevit", 64),
    ("mobilevitv2_050", "mobilevitv2", 64),
    ("maxvit_nano_rw_256", "maxvit", 64),
    ("coat_lite_tiny", "coat", 64),
    ("twins_pcpvt_small", "twins", 64),
    ("efficientvit_b0", "efficientvit", 64),
    ("fastvit_t8", "fastvit", 64),
    ("convit_tiny", "convit", 64),
    ("xcit_nano_12_p16_224", "xcit", 64),
    ("cait_xxs24_224", "cait", 64),
    ("tiny_vit_5m_224", "tiny_vit", 64),
    ("pit_ti_224", "pit", 64),
    ("edgenext_xx_small", "edgenext", 64),
    ("eva02_tiny_patch14_224", "eva02", 64),
    ("bert", "transformers BERT", 16),
    ("hf_vit", "transformers ViT", 32),
]
QUICK = ("vit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "bert", "hf_vit")
LR, EPSILON, STEPS = 0.02, 45.0, 10  # lr * epsilon = 0.9: deviations x0.1 per step
TOL = 1e-4  # the merge check: relative logit difference at most this, top-1 100%
HF = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


def build(name: str, size: int) -> tuple[nn.Module, Any]:
    """The model and a function of a batch size giving inputs."""
    if name == "bert":
        import transformers

        cfg = transformers.BertConfig(vocab_size=100, max_position_embeddings=size,
                                      num_labels=10, **HF)  # fmt: skip
        model = transformers.BertForSequenceClassification(cfg)
        return _Logits(model), lambda n: torch.randint(0, 100, (n, size))
    if name == "hf_vit":
        import transformers

        cfg = transformers.ViTConfig(image_size=size, patch_size=8, num_labels=10, **HF)
        model = transformers.ViTForImageClassification(cfg)
    else:
        model = get_model("timm." + name, num_classes=10, in_channels=3, image_size=size)
    return _Logits(model), lambda n: torch.randn(n, 3, size, size)


class _Logits(nn.Module):
    """transformers' outputs are dataclasses: the logits only."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out if isinstance(out, torch.Tensor) else out.logits


def row(name: str, family: str, size: int) -> dict:
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model, inputs = build(name, size)
    x = inputs(24)
    out: dict[str, Any] = {"model": name, "family": family, "size": size}
    model.eval()
    model.input_shape = tuple(x.shape[1:])
    if not x.is_floating_point():  # token ids: the tracer takes the example given
        model.net.input_shape = model.input_shape
    out["trace_s"], out["trace_cpu_s"] = _trace_s(model, x[:1])
    model.double()
    nontrivial_(model)
    if x.is_floating_point():
        x = x.double()
    groups = csgd.channel_groups(model, x[:1])
    excluded = [g.excluded for g in groups if g.excluded]
    heads = [g for g in groups if any(m.summed for m in g.members)]
    out["groups"], out["prunable"] = len(groups), len(groups) - len(excluded)
    out["heads"] = f"{sum(g.excluded is None for g in heads)}/{len(heads)}"
    common = collections.Counter(short_reason(w) for w in excluded).most_common(1)
    out["reason"] = common[0][0] if common else ""
    y = torch.randint(0, 10, (24,))
    try:
        c = time.process_time()
        pruner = csgd.CSGD(model, x[:2], ratio=0.5, clustering="even")
        out["cpu_s"] = {"groups": time.process_time() - c}
    except CsgdError as e:  # refused before any training
        out["refused"] = "before training: " + str(e).split(" (")[0]
        out["time_s"] = time.perf_counter() - t0
        return out
    opt = pruner.optimizer(lr=LR, epsilon=EPSILON, norm_epsilon=EPSILON, momentum=0.0,
                           weight_decay=0.0)  # fmt: skip
    model.train()
    c = time.process_time()
    for steps in range(1, STEPS + 1):  # a fixed count: ready() is a whole merge check
        i = (steps * 8) % 24
        loss = F.cross_entropy(model(x[i : i + 8]), y[i : i + 8])
        opt.zero_grad()
        loss.backward()
        opt.step()
    recalibrate_bn(model, x)
    out["cpu_s"]["train"], c = time.process_time() - c, time.process_time()
    check = inputs(16)
    try:
        pruner.merge(check.double() if check.is_floating_point() else check, force=True)
    except CsgdError as e:  # what the issue forbids: refused once trained
        out["refused"] = "after training: " + str(e).split(" (")[0]
        out["time_s"] = time.perf_counter() - t0
        return out
    out["cpu_s"]["merge"] = time.process_time() - c  # where a slow row spends its CPU
    rep = pruner.merge_report or {}
    out["heads_merged"] = str(rep.get("heads_merged", "-"))  # whole heads: "-" if not counted
    out.update(steps=steps, rel=rep["relative_logit_diff"], top1=rep["top1_agreement"],
               macs=rep["flops_reduction"], time_s=time.perf_counter() - t0,
               cpu_total_s=time.process_time())  # fmt: skip
    return out


def _trace_s(model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Wall and CPU seconds of one uncached trace. The library's 60-s deadline is wall
    time; on a machine shared by many jobs a trace of a few CPU seconds can take minutes,
    so it is lifted here and the CPU time, which load does not inflate, is reported too."""
    trace.TRACE_SECONDS = float("inf")
    c = time.process_time()
    if x.is_floating_point():
        return trace.trace_seconds(model), time.process_time() - c
    t = time.perf_counter()  # token ids: traced on the example itself
    csgd.channel_groups(model, x)
    return time.perf_counter() - t, time.process_time() - c


HEAD: list[Column] = [
    ("model (family)", lambda r: f"{r['model']} ({r['family']})"),
    ("input", lambda r: str(r["size"])),
    (
        "trace: wall (CPU)",
        lambda r: f"{r['trace_s']:.1f} s ({r.get('trace_cpu_s', math.nan):.1f} s)",
    ),
    ("prunable / all groups", lambda r: f"{r.get('prunable', 0)} / {r['groups']}"),
    ("head-channel groups prunable / found", lambda r: r.get("heads", "-")),
]
TAIL: list[Column] = [
    ("heads merged", lambda r: r.get("heads_merged", "-")),
    ("steps", lambda r: str(r["steps"])),
    merge_cell(TOL),
    ("MACs cut at 0.5", lambda r: f"{100 * r['macs']:.1f}%"),
    ("most common exclusion", lambda r: _clip(r["reason"]) or "-"),
]


def _clip(why: str, n: int = 80) -> str:
    return why if len(why) <= n else why[: n - 3] + "..."


def main(argv: list[str]) -> int:
    if {"-h", "--help"} & set(argv):
        print(f"usage: {sys.argv[0]} [--quick] [--here] [--jobs N] [--timeout S] [MODEL ...]\n"
              f"models: {' '.join(r[0] for r in ROWS)}")  # fmt: skip
        return 0
    torch.set_num_threads(2)
    if "--row" in argv:  # one row, in the process run_isolated started
        r = next(r for r in ROWS if r[0] == argv[argv.index("--row") + 1])
        print_row(run_here([r], row, CsgdError)[0])
        return 0
    opts = {k: float(argv[argv.index(k) + 1]) for k in ("--timeout", "--jobs") if k in argv}
    argv = [a for i, a in enumerate(argv) if i == 0 or argv[i - 1] not in opts]
    rows = select(ROWS, argv, QUICK)
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)  # fmt: skip
    if "--here" in argv:
        done = run_here(rows, row, CsgdError)
    else:
        done = run_isolated(__file__, rows, opts.get("--timeout", 1800), int(opts.get("--jobs", 1)))
    print(markdown(done, HEAD, TAIL, TOL))
    line, status = summary(done, TOL)
    print(f"\n{line}; load average at the end "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")  # fmt: skip
    return status


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
