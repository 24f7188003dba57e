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
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from timm_table import nontrivial_, recalibrate_bn, short_reason
from torch import nn

import csgd_cli as csgd
from csgd_cli.common.errors import CsgdError
from csgd_cli.models import get_model
from csgd_cli.tracing.trace import trace_seconds

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
    ("bert", "transformers BERT", 16),
    ("hf_vit", "transformers ViT", 32),
]
QUICK = ("vit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "bert", "hf_vit")
LR, EPSILON, STEPS = 0.02, 45.0, 10  # lr * epsilon = 0.9: deviations x0.1 per step
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
    out["trace_s"] = _trace_s(model, x[:1])
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
        pruner = csgd.CSGD(model, x[:2], ratio=0.5, clustering="even")
    except CsgdError as e:  # refused before any training
        out["refused"] = str(e).split(" (")[0]
        out["time_s"] = time.perf_counter() - t0
        return out
    opt = pruner.optimizer(lr=LR, epsilon=EPSILON, norm_epsilon=EPSILON, momentum=0.0,
                           weight_decay=0.0)  # fmt: skip
    model.train()
    for steps in range(1, STEPS + 1):  # a fixed count: ready() is a whole merge check
        i = (steps * 8) % 24
        loss = F.cross_entropy(model(x[i : i + 8]), y[i : i + 8])
        opt.zero_grad()
        loss.backward()
        opt.step()
    recalibrate_bn(model, x)
    check = inputs(16)
    pruner.merge(check.double() if check.is_floating_point() else check, force=True)
    rep = pruner.merge_report or {}
    out.update(steps=steps, rel=rep["relative_logit_diff"], top1=rep["top1_agreement"],
               macs=rep["flops_reduction"], time_s=time.perf_counter() - t0)  # fmt: skip
    return out


def _trace_s(model: nn.Module, x: torch.Tensor) -> float:
    if x.is_floating_point():
        return trace_seconds(model)
    t = time.perf_counter()  # token ids: traced on the example itself
    csgd.channel_groups(model, x)
    return time.perf_counter() - t


def table(rows: list[dict]) -> str:
    lines = [
        f"{'model (family)':<44} {'input':>5} {'trace':>6} {'prunable/all':>12} "
        f"{'heads':>6} {'steps':>5} {'rel. diff':>9} {'top-1':>6} {'MACs cut':>8}  "
        "most common exclusion"
    ]
    for r in rows:
        head = (
            f"{r['model'] + ' (' + r['family'] + ')':<44} {r['size']:>5} "
            f"{r['trace_s']:>5.1f}s {str(r.get('prunable', 0)) + '/' + str(r['groups']):>12} "
            f"{r.get('heads', '-'):>6} "
        )
        if "refused" in r:
            lines.append(head + f"refused: {r['refused'][:90]}")
        else:
            lines.append(
                head + f"{r['steps']:>5} {r['rel']:>9.1e} {100 * r['top1']:>5.0f}% "
                f"{100 * r['macs']:>7.1f}%  {r['reason'][:70] or '-'}"
            )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if {"-h", "--help"} & set(argv):
        print(f"usage: {sys.argv[0]} [--quick] [MODEL ...]\nmodels: {' '.join(r[0] for r in ROWS)}")
        return 0
    torch.set_num_threads(2)
    names = [a for a in argv if not a.startswith("-")]
    rows = [r for r in ROWS if (r[0] in names if names else "--quick" not in argv or r[0] in QUICK)]
    done = []
    for r in rows:
        try:
            done.append(row(*r))
        except CsgdError as e:  # a one-line stop (tracing), counted as refused
            done.append({"model": r[0], "family": r[1], "size": r[2], "trace_s": float("nan"),
                         "groups": 0, "refused": str(e), "time_s": 0.0})  # fmt: skip
        print(table(done[-1:]).splitlines()[-1], flush=True)  # the row, as it comes
    print("\n" + table(done))
    merged = [r for r in done if "refused" not in r]
    exact = sum(r["rel"] <= 1e-4 and r["top1"] == 1.0 for r in merged)
    print(
        f"\n{len(done)} models: {exact} merged exactly (rel. diff <= 1e-4, top-1 100%), "
        f"{len(done) - len(merged)} refused, {len(merged) - exact} inexact; slowest trace "
        f"{max(r['trace_s'] for r in done):.1f} s"
    )
    return 0 if exact == len(merged) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
