"""csgd cluster: k-means (or even) clusters per pruned group, saved with the checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ..checkpoint import payload, save_checkpoint
from ..clustering import clusters_for_config
from ..session import load

log = logging.getLogger("csgd")


def main(cfg: DictConfig, out: Path) -> dict[str, Any]:
    key = "ckpt" if cfg.ckpt else "init"
    model, ck = load(cfg[key], key)
    clusters = clusters_for_config(cfg, model, ck, cfg.ratio)
    for name, cl in clusters.items():
        n = sum(len(c) for c in cl)
        log.info("%-28s %4d -> %4d clusters (largest %d)", name, n, len(cl), max(map(len, cl)))
    info = payload(cfg, model, ck, clusters=clusters, ratio=cfg.ratio, clustering=cfg.clustering)
    path = save_checkpoint(out / "clustered.pt", {**info, "state_dict": model.state_dict()})
    log.info("wrote %s (%d groups clustered)", path, len(clusters))
    return {"groups": len(clusters), "ckpt": str(path)}
