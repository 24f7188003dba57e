"""csgd groups: every channel group of a model (name, width, members by kind, excluded
or not and why): the names that ``prune.include``/``prune.exclude`` globs match."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ..groups import describe
from ..session import load, new_model
from ..tracing import channel_groups


def main(cfg: DictConfig, out: Path) -> dict[str, Any]:
    del out  # prints only
    key = "ckpt" if cfg.ckpt else "init" if cfg.init else None
    model = load(cfg[key], key)[0] if key else new_model(cfg)
    groups = channel_groups(model)
    print(describe(groups))
    pruned = sum(g.excluded is None for g in groups)
    print(f"\n{len(groups)} groups, {pruned} prunable, {len(groups) - pruned} excluded")
    return {"groups": len(groups), "prunable": pruned}
