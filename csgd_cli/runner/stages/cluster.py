"""csgd cluster: k-means (or even) clusters per pruned group, saved with the checkpoint;
their number at ``ratio`` of each group's width, or chosen for ``prune.target``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ...api.checkpoint import save_checkpoint
from ..pipeline import payload
from ..session import load
from ..widthconf import pruner_for_config, width_record, width_settings

log = logging.getLogger("csgd")


def main(cfg: DictConfig, out: Path) -> dict[str, Any]:
    key = "ckpt" if cfg.ckpt else "init"
    model, ck = load(cfg[key], key)
    if cfg.prune.target is not None:  # widths chosen for the target (timings cached in out)
        pruner = pruner_for_config(cfg, model, ck, step=(1, 1), cache_dir=out)
    else:
        pruner = pruner_for_config(cfg, model, ck, cfg.ratio)
    clusters = pruner.clusters
    for name, cl in clusters.items():
        n = sum(len(c) for c in cl)
        log.info("%-28s %4d -> %4d clusters (largest %d)", name, n, len(cl), max(map(len, cl)))
    record = width_record(cfg, pruner, width_settings(cfg))
    # the model itself keeps its widths until the merge
    info = payload(cfg, model, ck, record.replace(clusters=clusters, group_widths=None))
    path = save_checkpoint(out / "clustered.pt", {**info, "state_dict": model.state_dict()})
    log.info("wrote %s (%d groups clustered)", path, len(clusters))
    return {"groups": len(clusters), "ckpt": str(path)}
