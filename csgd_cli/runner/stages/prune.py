"""csgd prune: merge clusters into a thinner network; verified on real data first.

A baseline (``prune.method=l1|...``) keeps its criterion's channels at C-SGD's widths
instead (``baselines.prune_step``; ``slimming`` prunes the checkpoint by |gamma|)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ...common.files import write_json
from ..baselines import prune_step
from ..pipeline import save_pruned
from ..session import load, setup

log = logging.getLogger("csgd")


def main(cfg: DictConfig, out: Path) -> dict[str, Any]:
    ctx = setup(cfg, out)
    model, ck = load(cfg.ckpt, "ckpt", ctx.data.info)
    x, _ = ctx.data.sample_batch(256)
    thin, rep = prune_step(ctx, model.to(ctx.device), ck, x, cfg.ratio, str(cfg.ckpt))
    save_pruned(cfg, thin, ck, rep, str(cfg.ckpt), out / "pruned.pt", x)
    write_json(out / "prune.json", rep)
    log.info("wrote %s", out / "pruned.pt")
    return rep
