"""csgd groups: every channel group of a model (name, width, members by kind, excluded
or not and why): the names that ``prune.include``/``prune.exclude`` globs match. With
``prune.target``, each group's width before and after the widths chosen for it, and the
target against what they reach."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ...core.surgery import merge
from ...deploy.latency import Runtime
from ...rules.groups import describe
from ...targets.resolution import at_resolution
from ...tracing.trace import channel_groups, example_input
from ..session import load, new_model
from ..tables import target_rows, target_table, widths_table
from ..widthconf import pruner_for_config


def main(cfg: DictConfig, out: Path) -> dict[str, Any]:
    key = "ckpt" if cfg.ckpt else "init" if cfg.init else None
    model, ck = load(cfg[key], key) if key else (new_model(cfg), {})
    groups = channel_groups(model)
    print(describe(groups))
    pruned = sum(g.excluded is None for g in groups)
    print(f"\n{len(groups)} groups, {pruned} prunable, {len(groups) - pruned} excluded")
    result: dict[str, Any] = {"groups": len(groups), "prunable": pruned}
    if cfg.prune.target is not None:  # widths only: even clusters, no k-means
        pruner = pruner_for_config(cfg, model, ck, step=(1, 1), cache_dir=out, clustering="even")
        before = {g.name: g.width for g in groups}
        print("\n" + widths_table(before, {**before, **pruner.widths}))
        thin = merge(model, groups, pruner.clusters)  # the widths' network (untrained)
        p = cfg.prune
        x = at_resolution(example_input(model), p.resolution)
        rt = Runtime(cfg.backend, p.latency_batch, p.latency_threads)
        result["target"] = target_rows(p.target, model, thin, tuple(x.shape[1:]), rt)
        print("\n" + target_table(result["target"]))
        result["choice"] = pruner.target_report
    return result
