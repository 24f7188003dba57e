"""Held-out networks (timm and torchvision models the other tables do not name) through
the public API as a new user would run them: trace, one C-SGD step at lr x epsilon = 1
on a zero loss (every cluster collapses to its mean), the merge, and our own comparison of
the outputs.

    OMP_NUM_THREADS=1 python scripts/field_sweep.py                 # every row
    OMP_NUM_THREADS=1 python scripts/field_sweep.py lcnet_050 tv.squeezenet1_1

Each row runs in a process of its own (a traceback, crash or hang costs that row only).
``SWEEP_FLOAT32=1``: in float32, as a user trains (the merge's own 1e-4 check decides).
Per row: trace seconds, groups (excluded), the merge report's relative difference and our
own (max |merged - collapsed| / max |collapsed| on a held-out batch), top-1 agreement, and
the outcome: ``exact`` (<= 1e-4 and top-1 100%), ``INEXACT``, ``refused`` (a one-line
CsgdError before training: fine), ``MERGE REFUSED`` (a CsgdError after the step: a bug)
or ``TRACEBACK``. Float64 after the trace, weights made non-trivial (BN statistics,
zero-init gammas), so a wrong merge cannot hide in rounding or behind a zero branch.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import torch
from _tables import nontrivial_, print_row, run_isolated

# (name, input size): "tv." names are torchvision classification builders, others timm
ROWS: list[tuple[str, int]] = [
    ("lcnet_050", 32),
    ("tinynet_e", 32),
    ("mobilenetv4_conv_small", 32),
    ("tf_efficientnetv2_b0", 32),
    ("efficientnetv2_rw_t", 32),
    ("semnasnet_050", 32),
    ("fbnetc_100", 32),
    ("hardcorenas_a", 32),
    ("regnety_002", 32),
    ("gernet_s", 32),
    ("resnest14d", 32),
    ("skresnet18", 32),
    ("selecsls42b", 32),
    ("repghostnet_050", 32),
    ("poolformerv2_s12", 32),
    ("efficientformer_l1", 224),  # this and the next two: transformer_table rows with layer
    ("efficientformerv2_s0", 64),  # scales, rerun after rules/scales.py
    ("fastvit_t8", 64),
    ("mambaout_femto", 32),
    ("starnet_s050", 32),
    ("vgg11_bn", 32),
    ("inception_v3", 128),
    ("xception41", 64),
    ("resnetv2_50x1_bit", 32),
    ("inception_next_tiny", 32),
    ("poolformer_s12", 32),
    ("convformer_s18", 32),
    ("repvit_m0_9", 64),
    ("deit3_small_patch16_224", 32),
    ("caformer_s18", 32),
    ("ecaresnet26t", 32),
    ("gcresnext26ts", 64),
    ("resnetblur18", 32),
    ("gcvit_xxtiny", 224),
    ("halonet26t", 256),
    ("lambda_resnet26t", 64),
    ("tresnet_m", 64),
    ("cspdarknet53", 64),
    ("mobilenetv4_hybrid_medium", 64),
    ("nextvit_small", 64),
    ("rdnet_tiny", 64),
    ("focalnet_tiny_srf", 64),
    ("efficientvit_m0", 224),
    ("visformer_tiny", 224),
    ("tv.squeezenet1_1", 64),
    ("tv.shufflenet_v2_x0_5", 32),
    ("tv.googlenet", 64),
    ("tv.mobilenet_v3_small", 32),
    ("tv.regnet_y_400mf", 32),
    ("tv.efficientnet_v2_s", 32),
    ("tv.mnasnet0_5", 32),
    ("tv.inception_v3", 96),
    ("tv.alexnet", 64),
    ("tv.densenet121", 32),
    ("tv.resnext50_32x4d", 32),
    ("tv.convnext_tiny", 32),
    ("tv.swin_t", 64),
]
SIZES = dict(ROWS)
CLASSES, TOL, TIMEOUT = 5, 1e-4, 150
FLOAT32 = os.environ.get("SWEEP_FLOAT32") == "1"  # as a user trains: the merge's default check


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name.startswith("tv."):
        import torchvision

        kw: dict[str, Any] = {"weights": None, "num_classes": CLASSES}
        if name in ("tv.googlenet", "tv.inception_v3"):
            kw.update(aux_logits=False, init_weights=True)
        return torchvision.models.get_model(name[3:], **kw)
    import timm

    kw = {"num_classes": CLASSES}
    if name.startswith(("levit", "efficientformer", "swin", "deit3", "xcit")):
        kw["img_size"] = SIZES[name]
    return timm.create_model(name, **kw)


@torch.no_grad()
def scales_(model: torch.nn.Module) -> None:
    """Tiny layer scales of any shape (torchvision's ConvNeXt keeps 1e-6 as (C, 1, 1),
    which ``nontrivial_`` leaves): set to O(1), or their branches hide a wrong merge."""
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if ("scale" in name or "gamma" in name) and p.abs().max() < 1e-3:
            p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.5)


def logits(out: Any) -> torch.Tensor:
    if isinstance(out, dict):
        out = next(iter(out.values()))
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out


def row(name: str) -> dict:
    import csgd_cli as csgd
    from csgd_cli.common.errors import CsgdError

    size = SIZES[name]
    out: dict[str, Any] = {"model": name, "size": size}
    model = build(name).eval()
    x = torch.randn(2, 3, size, size)
    t0 = time.perf_counter()
    try:
        groups = csgd.channel_groups(model, x)
    except CsgdError as e:
        return {**out, "outcome": "refused at trace", "why": str(e)}
    out["trace_s"] = time.perf_counter() - t0
    out["groups"] = len(groups)
    out["excluded"] = sum(g.excluded is not None for g in groups)
    reasons = sorted({g.excluded.split(" (")[0] for g in groups if g.excluded})
    out["reasons"] = reasons[:6]
    dtype = torch.float32 if FLOAT32 else torch.float64
    model.to(dtype)
    nontrivial_(model)
    scales_(model)
    x = x.to(dtype)
    try:
        pruner = csgd.CSGD(model, x, ratio=0.5, clustering="even")
    except CsgdError as e:
        return {**out, "outcome": "refused", "why": str(e)}
    opt = pruner.optimizer(lr=1.0, epsilon=1.0, norm_epsilon=1.0, momentum=0.0,
                           weight_decay=0.0, plain_norm_weight_decay=0.0)  # fmt: skip
    opt.zero_grad()
    (logits(model(x)) * 0.0).sum().backward()  # eval mode: BN statistics stay put
    opt.step()
    check = torch.randn(8, 3, size, size, dtype=dtype)
    with torch.no_grad():
        before = logits(model(check)).clone()
    try:
        thin = pruner.merge(check)
    except CsgdError as e:
        return {**out, "outcome": "MERGE REFUSED", "why": str(e)}
    with torch.no_grad():
        after = logits(thin.eval()(check))
    rep = pruner.merge_report or {}
    out["rel"] = float((after - before).abs().max() / before.abs().max())
    out["report_rel"] = float(rep.get("relative_logit_diff", float("nan")))
    out["top1"] = float((after.argmax(-1) == before.argmax(-1)).double().mean())
    out["params"] = [rep.get("params_before"), rep.get("params_after")]
    ok = out["rel"] <= TOL and out["top1"] == 1.0
    out["outcome"] = "exact" if ok else "INEXACT"
    return out


def one(name: str) -> None:
    t0 = time.perf_counter()
    try:
        out = row(name)
    except Exception as e:  # the bug this sweep looks for: report, do not stop the sweep
        import traceback

        traceback.print_exc()
        line = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        out = {"model": name, "outcome": "TRACEBACK", "why": f"{type(e).__name__}: {line}"}
    out["time_s"] = time.perf_counter() - t0
    print_row(out)


def cell(r: dict) -> str:
    g = f"{r['groups']}/{r['excluded']}" if "excluded" in r else "-"
    tr = f"{r['trace_s']:.1f}" if r.get("trace_s", float("nan")) == r.get("trace_s") else "-"
    rel = f"{r['rel']:.1e}" if "rel" in r else "-"
    top = f"{100 * r['top1']:.0f}%" if "top1" in r else "-"
    why = f": {r['why']}" if "why" in r else ""
    return f"| {r['model']} | {g} | {tr} | {rel} | {top} | {r.get('outcome', '?')}{why} |"


def main(argv: list[str]) -> int:
    if argv[:1] == ["--row"]:
        torch.set_num_threads(1)
        one(argv[1])
        return 0
    names = [a for a in argv if not a.startswith("-")] or [n for n, _ in ROWS]
    done = run_isolated(__file__, [(n, "", SIZES[n]) for n in names], TIMEOUT)
    print("| model | groups/excluded | trace s | merge rel diff | top-1 | outcome |")
    print("|---|---|---|---|---|---|")
    for r in done:
        r.setdefault("outcome", "TIMEOUT/CRASH")
        if "refused" in r:
            r.setdefault("why", r["refused"])
        print(cell(r))
    bad = [r for r in done if r["outcome"] not in ("exact", "refused", "refused at trace")]
    print(f"\n{len(done)} models: {len(done) - len(bad)} exact or refused up-front, {len(bad)} bad")
    return int(bool(bad))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
