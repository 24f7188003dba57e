"""The baselines of ``csgd run`` and ``csgd prune`` (``prune.method`` = a criterion of
``criteria.CRITERIA``), built so that nothing but the method differs from C-SGD:

- the same widths: one pruner of the config chooses them (``widthconf.pruner_for_config``,
  the function C-SGD's clusters come from), on the model C-SGD would cluster;
- the same budget: C-SGD's training epochs are added to the fine-tune
  (``pipeline.budget_schedule``), except for ``slimming``, whose sparsity phase trains
  them (C-SGD's ``schedule``, with plain momentum SGD plus the L1 penalty on BN gamma);
- the same seed, so the same base model, data order and augmentation.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..api.record import PruneRecord
from ..baselines.criteria import CRITERIA, SparseGammaSGD, gamma_rows, select
from ..common.errors import CsgdError
from ..common.files import write_json
from ..core.optim import plain_sgd
from ..rules.groups import Clusters
from ..tracing.trace import channel_groups
from .distributed import broadcast_object, is_main
from .pipeline import budget_schedule, payload, prune_for_config, train_phase
from .session import Ctx
from .widthconf import pruner_for_config, width_record, width_settings

Step = tuple[int, int] | None


def baseline_widths(
    cfg: DictConfig,
    model: nn.Module,
    ck: dict[str, Any],
    ratio: float | None,
    step: Step,
    cache_dir: Path | None,
) -> tuple[dict[str, int], PruneRecord]:
    """The widths C-SGD would give ``model`` (its pruner's; even clusters, as only their
    count is used) and what widths.json records about them."""
    pruner = pruner_for_config(cfg, model, ck, ratio, step, cache_dir, clustering="even")
    return pruner.widths, width_record(cfg, pruner, width_settings(cfg, ratio))


def score_batches(ctx: Ctx) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``prune.score_batches`` training batches (this rank's part), epoch after epoch."""
    epochs = (ctx.data.train_batches(e) for e in itertools.count())
    return itertools.islice(itertools.chain.from_iterable(epochs), ctx.cfg.prune.score_batches)


def prune_step(
    ctx: Ctx,
    model: nn.Module,
    ck: dict[str, Any],
    x: torch.Tensor,
    ratio: float | None,
    src: str,
    step: Step = None,
    cache_dir: Path | None = None,
    widths: dict[str, int] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """C-SGD's merge (``prune.method=csgd``), or the criterion's channels kept at C-SGD's
    widths (``widths``: chosen earlier, e.g. before slimming's sparsity phase), chosen on
    rank 0 and sent to every rank; verified on the real batch ``x``."""
    cfg = ctx.cfg
    if cfg.prune.method == "csgd":
        return prune_for_config(cfg, model, ck, x, src)
    chosen = None
    if is_main():
        ks = widths or baseline_widths(cfg, model, ck, ratio, step, cache_dir)[0]
        crit = CRITERIA[cfg.prune.method]
        batches = score_batches(ctx) if crit.grads else ()
        groups = channel_groups(model)
        chosen = select(cfg.prune.method, model, groups, ks, seed=cfg.seed, batches=batches)
    selection: Clusters = broadcast_object(chosen)
    return prune_for_config(cfg, model, ck, x, src, selection=selection)


def sparsity_phase(
    ctx: Ctx,
    model: nn.Module,
    ck: dict[str, Any],
    phase: str,
    out: Path,
    ratio: float | None,
    step: Step,
) -> tuple[nn.Module, dict[str, Any]]:
    """Network Slimming's sparsity phase, as long as C-SGD's training and on its
    ``schedule``: momentum SGD plus ``prune.slimming_lambda * |gamma|`` on the BN scales
    of the groups to prune. The widths are chosen first, on the model C-SGD would
    cluster, and travel with the checkpoint (``group_widths``) to the prune step."""
    cfg = ctx.cfg
    made = baseline_widths(cfg, model, ck, ratio, step, ctx.out)[1] if is_main() else None
    record = broadcast_object(made)
    write_json(out / "widths.json", record.widths_json())
    info = payload(cfg, model, ck, record)
    # the penalty rides in the schedule, so a resumed phase keeps the one it began with
    sched = OmegaConf.to_container(cfg.schedule, resolve=True)
    sched = OmegaConf.create({**sched, "slimming_lambda": cfg.prune.slimming_lambda})

    def make_opt(m: nn.Module, s: Any) -> torch.optim.Optimizer:
        groups, ks = channel_groups(m), record.group_widths
        for g in groups:  # before training: a group to cut must have a BN to score
            if ks.get(g.name, g.width) < g.width and not gamma_rows(m, groups, [g.name]):
                raise CsgdError(
                    f"prune.method=slimming: group '{g.name}' has no BatchNorm to score",
                    "exclude the group (prune.exclude=...) or choose another prune.method",
                )
        return SparseGammaSGD(plain_sgd(m, s), gamma_rows(m, groups, ks), s.slimming_lambda)

    return train_phase(ctx, model, sched, phase, out, info, make_opt=make_opt)


def _adds_epochs(cfg: DictConfig) -> bool:
    """Whether the method trains C-SGD's epochs after its cut (a criterion with no
    sparsity phase of its own)."""
    crit = CRITERIA.get(cfg.prune.method)
    return crit is not None and not crit.sparsity


def retrain_schedule(cfg: DictConfig, rounds: int) -> DictConfig | None:
    """With ``prune.baseline_schedule=csgd``, a criterion trains the epochs C-SGD would
    on C-SGD's own ``schedule`` (plain momentum SGD, same learning rates) before the
    configured fine-tune, so both see the same learning-rate sequence; else None."""
    if not _adds_epochs(cfg) or cfg.prune.baseline_schedule != "csgd":
        return None
    return OmegaConf.merge(cfg.schedule, {"epochs": rounds * cfg.schedule.epochs})


def finetune_schedule(cfg: DictConfig, rounds: int) -> DictConfig:
    """The fine-tune after the last merge: C-SGD's and slimming's as configured (they
    trained ``schedule.epochs`` per round already), and a criterion's too when it
    retrained on C-SGD's schedule first; else the criterion's with those epochs added at
    the fine-tune learning rate (``prune.baseline_schedule=finetune``)."""
    if not _adds_epochs(cfg) or retrain_schedule(cfg, rounds) is not None:
        return cfg.finetune
    return budget_schedule(cfg, rounds)
