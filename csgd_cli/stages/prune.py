"""csgd prune: merge clusters into a thinner network; verified on real data first."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from ..checkpoint import save_checkpoint
from ..clustering import target_widths
from ..errors import CsgdError
from ..groups import Clusters, channel_groups
from ..metrics import count_macs, count_params
from ..surgery import l1_selection, merge
from .check import need_clusters
from .common import Ctx, base_widths, check_fits, load, payload, pruned_groups, setup, write_json

log = logging.getLogger("csgd")


@torch.no_grad()
def merge_checked(
    ctx: Ctx, model: nn.Module, ck: dict[str, Any], clusters: Clusters | None
) -> tuple[nn.Module, dict[str, Any]]:
    """Thin model and its check against ``model`` on a batch of real test data.

    ``clusters=None`` means the L1 baseline (keep the largest-norm filters). A C-SGD merge
    whose logits differ beyond ``prune.tolerance`` is refused unless ``prune.force``."""
    cfg, l1 = ctx.cfg, clusters is None
    model.to(ctx.device).eval()
    if l1:
        groups = pruned_groups(cfg, model)
        clusters = l1_selection(
            model, groups, target_widths(groups, cfg.ratio, base_widths(model, ck))
        )
    thin = merge(model, channel_groups(model), clusters, partial=l1).eval()
    x, _ = ctx.data.sample_batch(256)
    a, b = model(x).double(), thin(x).double()
    diff = (a - b).abs().max().item()
    i = ctx.data.info
    shape = (i.in_channels, i.image_size, i.image_size)
    rep = {
        "method": "l1" if l1 else "csgd",
        "max_abs_logit_diff": diff,
        "relative_logit_diff": diff / max(a.abs().max().item(), 1e-30),
        "top1_agreement": (a.argmax(1) == b.argmax(1)).double().mean().item(),
        "check_samples": int(x.shape[0]),
        "params_before": count_params(model),
        "params_after": count_params(thin),
        "macs_before": count_macs(model, shape),
        "macs_after": count_macs(thin, shape),
        "widths": list(thin.widths),
    }
    rep["flops_reduction"] = 1 - rep["macs_after"] / rep["macs_before"]
    print(
        f"params {rep['params_before']:,} -> {rep['params_after']:,}  "
        f"FLOPs {rep['macs_before'] / 1e6:.2f}M -> {rep['macs_after'] / 1e6:.2f}M MACs "
        f"(-{100 * rep['flops_reduction']:.2f}%)  merge check: max |logit diff| {diff:.3e} "
        f"(relative {rep['relative_logit_diff']:.2e}), top-1 agreement {100 * rep['top1_agreement']:.2f}%"
    )
    if not l1 and rep["relative_logit_diff"] > cfg.prune.tolerance and not cfg.prune.force:
        raise CsgdError(
            f"merge check failed: relative logit difference {rep['relative_logit_diff']:.2e} > "
            f"prune.tolerance={cfg.prune.tolerance:g} (clusters have not collapsed); nothing written",
            "train longer or with a larger epsilon, or pass prune.force=true",
        )
    return thin, rep


def export(thin: nn.Module, x: torch.Tensor, path: Path) -> Path:
    """A standalone ``torch.export`` program (loads with torch.export.load, no csgd)."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    ep = torch.export.export(thin.eval(), (x[:2],), dynamic_shapes=({0: batch},))
    torch.export.save(ep, str(path))
    return path


def save_pruned(
    ctx: Ctx, thin: nn.Module, ck: dict[str, Any], rep: dict[str, Any], src: str, path: Path
) -> None:
    info = payload(ctx.cfg, thin, ck, pruned_from=src, merge_check=rep, metrics=rep)
    save_checkpoint(path, {**info, "state_dict": thin.state_dict()})
    if ctx.cfg.prune.export:
        x, _ = ctx.data.sample_batch(2)
        export(thin, x, path.with_suffix(".pt2"))


def main(cfg: DictConfig, out: Path) -> dict[str, Any]:
    if cfg.ckpt is None:
        raise CsgdError(
            "csgd prune needs a checkpoint", "pass ckpt=<csgd.pt or last.pt of csgd train>"
        )
    model, ck = load(cfg.ckpt, "ckpt")
    clusters = need_clusters(ck, cfg.ckpt) if cfg.prune.method == "csgd" else None
    ctx = setup(cfg, out)
    check_fits(ck, cfg.ckpt, "ckpt", ctx.data)
    thin, rep = merge_checked(ctx, model, ck, clusters)
    save_pruned(ctx, thin, ck, rep, str(cfg.ckpt), out / "pruned.pt")
    write_json(out / "prune.json", rep)
    log.info("wrote %s", out / "pruned.pt")
    return rep
