"""csgd cluster: k-means (or even) clusters per pruned group, saved with the checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ..checkpoint import save_checkpoint
from ..errors import CsgdError
from .common import load, make_clusters, payload

log = logging.getLogger("csgd")


def main(cfg: DictConfig, out: Path) -> dict[str, Any]:
    src = cfg.ckpt or cfg.init
    if src is None:
        raise CsgdError("csgd cluster needs weights to cluster", "pass ckpt=<base.pt> (or init=)")
    model, ck = load(src, "ckpt" if cfg.ckpt else "init")
    clusters = make_clusters(cfg, model, ck, cfg.ratio)
    for name, cl in clusters.items():
        n = sum(len(c) for c in cl)
        log.info("%-28s %4d -> %4d clusters (largest %d)", name, n, len(cl), max(map(len, cl)))
    info = payload(cfg, model, ck, clusters=clusters, ratio=cfg.ratio, clustering=cfg.clustering)
    path = save_checkpoint(out / "clustered.pt", {**info, "state_dict": model.state_dict()})
    log.info("wrote %s (%d groups clustered)", path, len(clusters))
    return {"groups": len(clusters), "ckpt": str(path)}
