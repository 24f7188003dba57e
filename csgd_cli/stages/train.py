"""csgd train: C-SGD training; clusters come with ``init`` or are computed at the start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from .common import clusters_for, payload, setup, start_model, train_phase


def main(cfg: DictConfig, out: Path) -> dict[str, Any]:
    ctx = setup(cfg, out)
    model, ck = start_model(ctx, "init", "ckpt")
    clusters = clusters_for(cfg, model, ck)
    info = payload(cfg, model, ck, ratio=cfg.ratio, epsilon=cfg.epsilon)
    model, state = train_phase(ctx, model, cfg.schedule, "train", out, info, clusters)
    return state["metrics"]
