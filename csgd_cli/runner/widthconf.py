"""What a stage's config says about widths: the settings that decide clusters (recorded
with them), the pruner they make, and the record of the widths chosen and reached."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..api.checkpoint import base_widths
from ..api.pruner import CSGD
from ..api.record import PruneRecord
from ..common.target import Target
from ..deploy.latency import Runtime
from ..rules.groups import select_groups
from ..targets.plan import WidthPlan, plan_widths
from ..targets.problem import width_share
from ..tracing.trace import channel_groups
from .tables import target_rows

# the settings that decide clusters, as given on a command line; recorded with them
WIDTH_KEYS = (
    "ratio",
    "prune.target",
    "prune.min_width",
    "prune.rule",
    "prune.round_to",
    "prune.include",
    "prune.exclude",
    "clustering",
)


def width_settings(cfg: DictConfig, ratio: float | None = None) -> dict[str, Any]:
    """The ``WIDTH_KEYS`` values of ``cfg`` (``ratio`` overriding), as plain data."""
    out = {k: OmegaConf.select(cfg, k) for k in WIDTH_KEYS}
    out = {k: OmegaConf.to_object(v) if OmegaConf.is_config(v) else v for k, v in out.items()}
    if cfg.prune.target is not None:
        return {**out, "ratio": None}  # the target chose the widths
    return {**out, "ratio": cfg.ratio if ratio is None else ratio}


def pruner_for_config(
    cfg: DictConfig,
    model: nn.Module,
    ck: dict[str, Any],
    ratio: float | None = None,
    step: tuple[int, int] | None = None,
    cache_dir: Path | None = None,
    clustering: str | None = None,
) -> CSGD:
    """The pruner of a config: clusters stored in ``ck`` when it has them and neither
    ``ratio`` nor a target round ``step`` is forced (iterative rounds force theirs), else
    new ones for ``prune.include``/``exclude``: at ``prune.target`` (round ``step``, its
    latency timings cached under ``cache_dir``) or at ``ratio`` (default ``cfg.ratio``) of
    the original widths, clustered by ``clustering`` (default ``cfg.clustering``)."""
    original, record = base_widths(model, ck), PruneRecord.from_checkpoint(ck)
    if record.clusters and ratio is None and step is None:
        kept = WidthPlan({k: len(v) for k, v in record.clusters.items()}, original)
        return CSGD(model, clusters=record.clusters, widths=kept)
    p = cfg.prune
    how: dict[str, Any] = {"ratio": cfg.ratio if ratio is None else ratio}
    if p.target is not None:  # round ``step``; later rounds: of the first round's base cost
        target = Target.parse(p.target).round(*(step or (1, 1)))
        how = dict(
            target=target,
            min_width=p.min_width,
            rule=p.rule,
            cache_dir=cache_dir,
            runtime=Runtime(cfg.backend, p.latency_batch, p.latency_threads),
            original_cost=(record.target_base or {}).get(target.kind),
            resolution=p.resolution,
        )
    plan = plan_widths(
        model,
        None,
        include=list(p.include),
        exclude=list(p.exclude),
        round_to=p.round_to,
        seed=cfg.seed,
        original=original,
        **how,
    )
    return CSGD(model, widths=plan, clustering=clustering or cfg.clustering, seed=cfg.seed)


def width_record(cfg: DictConfig, pruner: CSGD, settings: dict[str, Any]) -> PruneRecord:
    """What widths.json and the checkpoint say about the widths: the settings, each
    group's width, and with a target what it reached and its base cost."""
    rep = pruner.target_report
    return PruneRecord(
        base_widths=dict(pruner.plan.original),
        group_widths=dict(pruner.widths),
        settings=settings,
        target_report=rep,
        target_base=None if rep is None else {rep["kind"]: rep["base"]},
    )


def widths_reached(cfg: DictConfig, base: nn.Module, final: nn.Module, info: Any) -> dict:
    """``csgd run``'s summary: each group's width ``before`` and ``after``; with a target,
    the target against what ``final`` reached (``metrics.target_rows``) and ``ratio``, the
    pruned groups' share of their original widths (what reports plot against)."""
    before = {g.name: g.width for g in channel_groups(base)}
    out: dict[str, Any] = {"widths": {"before": before}}
    out["widths"]["after"] = after = {g.name: g.width for g in channel_groups(final)}
    p = cfg.prune
    if p.target is not None:
        side = p.resolution or info.image_size  # the resolution the target counted at
        shape = (info.in_channels, side, side)
        rt = Runtime(cfg.backend, p.latency_batch, p.latency_threads)
        out["target"] = target_rows(p.target, base, final, shape, rt)
        chosen = [g.name for g in select_groups(channel_groups(base), p.include, p.exclude)]
        out["ratio"] = width_share(before, {g: after[g] for g in chosen})
    return out
