"""csgd finetune: plain SGD on a checkpoint, typically ``pruned.pt`` (0 epochs allowed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ..pipeline import payload, train_phase
from ..session import load, setup


def main(cfg: DictConfig, out: Path) -> dict[str, Any]:
    ctx = setup(cfg, out)
    model, ck = load(cfg.ckpt, "ckpt", ctx.data.info)
    info = payload(cfg, model, ck, pruned_from=ck.get("pruned_from"))
    model, state = train_phase(ctx, model, cfg.finetune, "finetune", out, info)
    return state["metrics"]
