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
import sys
import time

import torch
import torch.nn.functional as F
from _tables import (
    Column,
    markdown,
    merge_cell,
    nontrivial_,
    recalibrate_bn,
    run_here,
    select,
    short_reason,
    summary,
)

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
TOL = 1e-5  # the merge check: relative logit difference at most this, top-1 100%


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


HEAD: list[Column] = [
    ("model (family)", lambda r: f"{r['model']} ({r['family']})"),
    ("input", lambda r: f"{r['size']}x{r['size']}"),
    ("trace", lambda r: f"{r['trace_s']:.1f} s"),
    ("groups (excluded)", lambda r: f"{r['groups']} ({r.get('excluded', 0)})"),
    ("most common exclusion", lambda r: r.get("reason") or "-"),
]
TAIL: list[Column] = [
    ("C-SGD steps", lambda r: str(r["steps"])),
    merge_cell(TOL),
    ("FLOPs at 0.5", lambda r: f"-{100 * r['flops']:.1f}%"),
]


def main(argv: list[str]) -> int:
    torch.set_num_threads(2)
    done = run_here(select(ROWS, argv, QUICK), row, CsgdError)
    print(markdown(done, HEAD, TAIL, TOL))
    line, status = summary(done, TOL)
    cut = sum(r["flops"] >= 0.3 for r in done if "refused" not in r)
    print(f"\n{line}; {cut} with FLOPs -30% or more")
    return status


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
