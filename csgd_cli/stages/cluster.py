"""csgd cluster: k-means (or even) clusters per pruned group, saved with the checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ..checkpoint import save_checkpoint
from ..pipeline import payload, pruner_for_config, width_settings
from ..session import load

log = logging.getLogger("csgd")


def main(cfg: DictConfig, out: Path) -> dict[str, Any]:
    key = "ckpt" if cfg.ckpt else "init"
    model, ck = load(cfg[key], key)
    clusters = pruner_for_config(cfg, model, ck, cfg.ratio).clusters
    for name, cl in clusters.items():
        n = sum(len(c) for c in cl)
        log.info("%-28s %4d -> %4d clusters (largest %d)", name, n, len(cl), max(map(len, cl)))
    settings = width_settings(cfg)
    info = payload(cfg, model, ck, clusters=clusters, ratio=cfg.ratio, width_settings=settings)
    path = save_checkpoint(out / "clustered.pt", {**info, "state_dict": model.state_dict()})
    log.info("wrote %s (%d groups clustered)", path, len(clusters))
    return {"groups": len(clusters), "ckpt": str(path)}
