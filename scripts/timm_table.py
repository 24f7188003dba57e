"""timm networks through csgd: trace, a short C-SGD (large epsilon) and the merge, per
family, on CIFAR-sized synthetic data; prints the Markdown table docs/networks.md carries.

    python scripts/timm_table.py            # every family (a few minutes on 2 cores)
    python scripts/timm_table.py --quick    # five of them
    python scripts/timm_table.py dla34 vit_tiny_patch16_224   # the rows named

Per model: tracing time (uncached), groups and excluded groups with the most common
reason, C-SGD steps until ``pruner.ready()``, the merge check (relative logit difference
and top-1 agreement on a held-out batch), FLOPs cut at ratio 0.5 and the wall time. It
trains in float64, as the tests do: float32 leaves the members of a cluster apart by its
rounding (about 1e-7 each), which deep nets amplify to about 1e-5 in the logits. Clusters
are ``even`` (k-means gives the same widths, so the same FLOPs and merge, and its
k-means++ start costs minutes per net on 2 busy cores). A model with no
prunable group is refused before any training, in one line (``csgd run`` says the same).
Weights are made non-trivial first (BN statistics, zero-initialised gammas and layer
scales), or a wrong merge could hide behind a branch that outputs zeros.
"""

from __future__ import annotations

import collections
import re
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import csgd_cli as csgd
from csgd_cli.common.errors import CsgdError
from csgd_cli.models import get_model
from csgd_cli.tracing.trace import trace_seconds

# (timm name, family, input size, extra kwargs)
ROWS = [
    ("resnet18", "resnet", 32, {}),
    ("resnet26d", "resnet-d", 32, {}),
    ("resnext26ts", "resnext", 32, {}),
    ("seresnet18", "seresnet", 32, {}),
    ("efficientnet_b0", "efficientnet", 32, {}),
    ("mobilenetv3_small_050", "mobilenetv3", 32, {}),
    ("ghostnet_050", "ghostnet", 32, {}),
    ("regnetx_002", "regnet", 32, {}),
    ("repvgg_a0", "repvgg", 32, {}),
    ("dla34", "dla", 32, {}),
    ("cspresnet50", "cspnet", 32, {}),
    ("res2net50_26w_4s", "res2net", 32, {}),
    ("rexnet_100", "rexnet", 32, {}),
    ("mixnet_s", "mixnet", 32, {}),
    ("ese_vovnet19b_dw", "vovnet", 32, {}),
    ("dpn68", "dpn", 32, {}),
    ("hrnet_w18_small", "hrnet", 64, {}),
    ("nf_resnet26", "nfnet", 32, {}),
    ("densenet121", "densenet", 32, {}),
    ("convnext_atto", "convnext", 32, {}),
    ("vit_tiny_patch16_224", "vit", 32, {}),
]
QUICK = ("resnet18", "mobilenetv3_small_050", "ghostnet_050", "mixnet_s", "convnext_atto")
LR, EPSILON, MAX_STEPS = 0.02, 45.0, 40  # lr * epsilon = 0.9: deviations x0.1 per step


@torch.no_grad()
def nontrivial_(model: nn.Module, seed: int = 0) -> None:
    """BN statistics and affine terms away from (1, 0), zero or tiny gammas and layer
    scales (timm's zero-init residual branches, ConvNeXt's 1e-6) set to O(1)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    for name, p in model.named_parameters():
        if p.dim() <= 1 and p.abs().max() < 1e-3:  # zero-init norm weights, layer scales
            weightish = name.endswith(("weight", "gamma", "gain")) or "scale" in name
            p.copy_(torch.rand(p.shape, generator=g) + 0.5 if weightish else p + 0.01)
        elif name.endswith("gamma"):
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)


def recalibrate_bn(model: nn.Module, x: torch.Tensor) -> None:
    """Re-estimate BN statistics as a plain average over a few batches (what a long run
    does anyway): channels made identical then see identical statistics."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        if m.track_running_stats:
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(3):
            model(x[i::3])
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom


def short_reason(why: str) -> str:
    """A reason with layer names and numbers replaced, so that reasons can be counted."""
    return re.sub(r"'[^']*'", "'...'", re.sub(r"\d+", "N", why))


def row(name: str, family: str, size: int, kw: dict) -> dict:
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = get_model("timm." + name, num_classes=10, in_channels=3, image_size=size, **kw)
    out = {"model": name, "family": family, "size": size}
    out["trace_s"] = trace_seconds(model)  # float32, as a user traces; cached from here on
    model.double()
    nontrivial_(model)
    groups = csgd.channel_groups(model)
    excluded = [g.excluded for g in groups if g.excluded]
    out["groups"], out["excluded"] = len(groups), len(excluded)
    common = collections.Counter(short_reason(w) for w in excluded).most_common(1)
    out["reason"] = common[0][0] if common else ""
    x = torch.randn(48, 3, size, size, dtype=torch.float64)
    y = torch.randint(0, 10, (48,))
    try:
        pruner = csgd.CSGD(model, x[:2], ratio=0.5, clustering="even")
    except CsgdError as e:  # refused before any training
        out["refused"] = str(e).split(" (")[0]  # the first clause; the row has the rest
        out["time_s"] = time.perf_counter() - t0
        return out
    opt = pruner.optimizer(lr=LR, epsilon=EPSILON, norm_epsilon=EPSILON, momentum=0.0,
                           weight_decay=0.0)  # fmt: skip
    model.train()
    steps = 0
    while steps < MAX_STEPS and (steps % 4 or not pruner.ready(1e-9)):
        i = (steps * 16) % 48
        loss = F.cross_entropy(model(x[i : i + 16]), y[i : i + 16])
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    recalibrate_bn(model, x)
    check = torch.randn(32, 3, size, size, dtype=torch.float64)
    pruner.merge(check, force=True)  # checked below against the 1e-5 and 100%
    rep = pruner.merge_report or {}
    out.update(
        steps=steps,
        rel=rep["relative_logit_diff"],
        top1=rep["top1_agreement"],
        flops=rep["flops_reduction"],
        time_s=time.perf_counter() - t0,
    )
    return out


def table(rows: list[dict]) -> str:
    lines = [
        "| model (family) | input | trace | groups (excluded) | most common exclusion "
        "| C-SGD steps | merge: rel. diff, top-1 | FLOPs at 0.5 | time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = (
            f"| {r['model']} ({r['family']}) | {r['size']}x{r['size']} | {r['trace_s']:.1f} s "
            f"| {r['groups']} ({r['excluded']}) | {r['reason'] or '-'} "
        )
        if "refused" in r:
            lines.append(head + f"| refused before training: {r['refused']} | - | - | "
                         f"{r['time_s']:.0f} s |")  # fmt: skip
        else:
            ok = "exact" if r["rel"] <= 1e-5 and r["top1"] == 1.0 else "NOT EXACT"
            lines.append(
                head + f"| {r['steps']} | {r['rel']:.1e}, {100 * r['top1']:.0f}% ({ok}) "
                f"| -{100 * r['flops']:.1f}% | {r['time_s']:.0f} s |"
            )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    torch.set_num_threads(2)
    names = [a for a in argv if not a.startswith("-")]
    rows = [r for r in ROWS if (r[0] in names if names else "--quick" not in argv or r[0] in QUICK)]
    done = []
    for r in rows:
        try:
            done.append(row(*r))
        except CsgdError as e:  # a one-line stop (tracing), counted as refused
            done.append({"model": r[0], "family": r[1], "size": r[2], "trace_s": float("nan"),
                         "groups": 0, "excluded": 0, "reason": "", "refused": str(e),
                         "time_s": 0.0})  # fmt: skip
        print(f"{r[0]}: done", file=sys.stderr, flush=True)
    print(table(done))
    merged = [r for r in done if "refused" not in r]
    exact = sum(r["rel"] <= 1e-5 and r["top1"] == 1.0 for r in merged)
    cut = sum(r["flops"] >= 0.3 for r in merged)
    print(
        f"\n{len(done)} models: {exact} merged exactly, {len(done) - len(merged)} refused "
        f"before training, {len(merged) - exact} inexact; {cut} with FLOPs -30% or more; "
        f"slowest trace {max(r['trace_s'] for r in done):.1f} s"
    )
    return 0 if exact == len(merged) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
