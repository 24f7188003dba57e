"""What stages do with their Hydra config, besides its widths (``widthconf``): the
checkpoint payload, the training phases (plain SGD or C-SGD, resumable from ``last.pt``)
and the prune step. The C-SGD parts go through the public API (``api.CSGD``), as a user's own
training loop would.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..api.checkpoint import (
    base_widths,
    load_checkpoint,
    model_from_checkpoint,
    need_clusters,
    save_checkpoint,
)
from ..api.pruner import CSGD
from ..api.record import PruneRecord
from ..common.device import use_channels_last
from ..common.errors import CsgdError
from ..common.files import write_json
from ..core.chi import chi_fn
from ..core.optim import plain_sgd
from ..core.surgery import merge_checked, merge_summary
from ..deploy.export import export_onnx_if_installed, export_pt2
from ..rules.groups import Clusters
from ..tracing.trace import channel_groups
from .distributed import broadcast_object, is_main, on_main
from .engine import Trainer
from .forecasting import chi_logging
from .session import Ctx, load, new_model
from .widthconf import pruner_for_config, width_record, width_settings

log = logging.getLogger("csgd")


def payload(
    cfg: Any, model: nn.Module, ck: dict[str, Any], record: PruneRecord | None = None, **extra: Any
) -> dict[str, Any]:
    """Fields every checkpoint carries besides the training state; ``record`` (clusters,
    widths, target) over the original widths and target base cost ``ck`` keeps across
    rounds."""
    kept = PruneRecord.from_checkpoint(ck)
    record = record or PruneRecord()
    record = record.replace(
        base_widths=record.base_widths or base_widths(model, ck),
        target_base=record.target_base or kept.target_base,
    )
    return {
        "arch": model.arch,
        "config": OmegaConf.to_yaml(cfg, resolve=True),
        "stage": cfg.stage,
        "seed": cfg.seed,
        **extra,
        **record.into({}),
    }


# -- training phases -----------------------------------------------------------------------
def _hyper(sched: Any, cfg: DictConfig, clusters: Clusters | None) -> dict[str, Any]:
    """What decides the optimizer: kept in last.pt, so a resume trains as it began."""
    h: dict[str, Any] = {"schedule": OmegaConf.to_container(sched, resolve=True)}
    if clusters:
        h.update(epsilon=cfg.epsilon, norm_epsilon=cfg.norm_epsilon)
    return h


def _resume_from(last: Path, phase: str, model: nn.Module) -> dict[str, Any]:
    ck = load_checkpoint(last, "run")
    if ck.get("phase") != phase or ck["arch"] != model.arch:
        raise CsgdError(
            f"{last} belongs to another phase or model, not to '{phase}'",
            "resume in the run directory the interrupted run used (hydra.run.dir=...)",
        )
    return ck


def _resumed(
    last: Path,
    phase: str,
    model: nn.Module,
    clusters: Clusters | None,
    info: dict[str, Any],
    hyper: dict[str, Any],
) -> tuple[dict[str, Any], Clusters | None, dict[str, Any], dict[str, Any]]:
    """Continuing from ``last``: its checkpoint, then the clusters, their record and the
    hyper-parameters it was trained with (a value given anew is named in a warning)."""
    ck = _resume_from(last, phase, model)
    stored_record = PruneRecord.from_checkpoint(ck)
    if clusters and stored_record.clusters:  # the clusters this phase was trained with
        if stored_record.clusters != clusters:
            log.info("resume: using the clusters stored in %s, not new ones", last)
        clusters = stored_record.clusters
        # and so does what the checkpoint records about them (widths, settings, target)
        info = stored_record.into(info)
    stored = ck.get("hyper") or hyper
    for k in sorted(set(hyper) | set(stored)):
        if hyper.get(k) != stored.get(k):
            log.warning(
                "resume: %s comes from %s (%s), not the command line", k, last, stored.get(k)
            )
    return ck, clusters, info, stored


def _optimizer(
    model: nn.Module,
    sched: DictConfig,
    hyper: dict[str, Any],
    clusters: Clusters | None,
    make_opt: Callable[[nn.Module, Any], torch.optim.Optimizer] | None,
) -> tuple[torch.optim.Optimizer, CSGD | None]:
    """C-SGD's optimizer (and its pruner) when there are clusters, else plain SGD or
    ``make_opt``'s."""
    if not clusters:
        return (make_opt or plain_sgd)(model, sched), None
    pruner = CSGD(model, clusters=clusters)  # checks them against the model's groups
    opt = pruner.optimizer(
        sched.lr,
        epsilon=hyper["epsilon"],
        norm_epsilon=hyper["norm_epsilon"],
        momentum=sched.momentum,
        nesterov=sched.nesterov,
        weight_decay=sched.weight_decay,
        plain_norm_weight_decay=sched.norm_weight_decay,
    )
    return opt, pruner


def _trainer(
    ctx: Ctx,
    model: nn.Module,
    sched: DictConfig,
    opt: torch.optim.Optimizer,
    out: Path,
    phase: str,
    info: dict[str, Any],
    clusters: Clusters | None,
    hyper: dict[str, Any],
    chi: Callable[[], Any] | None,
) -> Trainer:
    """The phase's training loop; every checkpoint it writes carries the clusters and the
    hyper-parameters a resume reads back."""
    cfg = ctx.cfg
    record = PruneRecord.from_checkpoint(info).replace(clusters=clusters)
    return Trainer(
        model,
        ctx.data,
        sched,
        opt,
        device=ctx.device,
        out=out,
        phase=phase,
        payload=dict(
            record.into(info), hyper=hyper, **{k: hyper[k] for k in hyper if k != "schedule"}
        ),
        amp=cfg.amp,
        compile=cfg.compile,
        channels_last=cfg.channels_last,
        every_steps=cfg.checkpoint.every_steps,
        chi_fn=chi,
    )


def train_phase(
    ctx: Ctx,
    model: nn.Module,
    sched: DictConfig,
    phase: str,
    out: Path,
    info: dict[str, Any],
    clusters: Clusters | None = None,
    make_opt: Callable[[nn.Module, Any], torch.optim.Optimizer] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train with plain SGD (no clusters; ``make_opt(model, schedule)`` instead: a
    baseline's own, e.g. slimming's) or C-SGD; resumes from ``out/last.pt``.

    On resume the clusters, the schedule, epsilon, norm_epsilon and the weight decays
    all come from ``last.pt``: values given anew on the command line are ignored (and
    a differing one is named in a warning)."""
    cfg = ctx.cfg
    out.mkdir(parents=True, exist_ok=True)
    model.to(ctx.device)
    if use_channels_last(cfg.channels_last, ctx.device):
        model.to(memory_format=torch.channels_last)
    last, ck = out / "last.pt", None
    hyper = _hyper(sched, cfg, clusters)
    if cfg.resume and last.is_file():
        ck, clusters, info, hyper = _resumed(last, phase, model, clusters, info, hyper)
    elif cfg.resume:
        log.warning("resume=true but %s does not exist: %s starts from its beginning", last, phase)
    sched = OmegaConf.create(hyper["schedule"])
    opt, pruner = _optimizer(model, sched, hyper, clusters, make_opt)
    chi = chi_fn(model, pruner.groups, pruner.clusters) if pruner else None
    if chi is not None:  # the forecast logged beside it; the checkpoint keeps its start
        info = {**info, **chi_logging(chi, sched, hyper, ctx.data.steps_per_epoch(), ck)}
    trainer = _trainer(ctx, model, sched, opt, out, phase, info, clusters, hyper, chi)
    if ck is not None:
        trainer.restore(ck)
        log.info("resuming %s at epoch %d step %d", phase, trainer.epoch, trainer.step_in_epoch)
    metrics = trainer.fit()
    if sched.epochs == 0:  # nothing trained: last.pt is still the phase's result
        trainer.save("last.pt")
    state = {**trainer.state(), "metrics": metrics}
    if clusters:  # the flat buffers can be freed: every parameter gets its own storage
        opt.release()  # type: ignore[attr-defined]
    return model, state


def csgd_phase(
    ctx: Ctx,
    model: nn.Module,
    ck: dict[str, Any],
    phase: str,
    out: Path,
    ratio: float | None = None,
    step: tuple[int, int] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Cluster (rank 0, then broadcast; clusters stored in ``ck`` win unless ``ratio``
    or a target round ``step`` is given) and C-SGD-train ``model`` for the ``schedule``
    config. The checkpoint records what the clusters are: their widths, and the
    settings that made them (the checkpoint's own when the clusters came with it)."""
    cfg = ctx.cfg
    made = None
    kept = PruneRecord.from_checkpoint(ck)
    given = bool(kept.clusters) and ratio is None and step is None
    if is_main():
        pruner = pruner_for_config(cfg, model, ck, ratio, step, ctx.out)
        if given:  # as the checkpoint that brought the clusters says
            settings = kept.settings or {"ratio": kept.ratio}
            record = kept.replace(group_widths=pruner.widths, settings=dict(settings))
        else:
            record = width_record(cfg, pruner, width_settings(cfg, ratio))
        made = (pruner.clusters, record)
    clusters, record = broadcast_object(made)
    write_json(out / "widths.json", record.widths_json())  # the report's ratio column
    info = payload(cfg, model, ck, record, epsilon=cfg.epsilon)  # a round's target base wins
    return train_phase(ctx, model, cfg.schedule, phase, out, info, clusters)


def base_phase(ctx: Ctx, out: Path) -> tuple[nn.Module, dict[str, Any]]:
    """``csgd run``'s base model: the ``init=`` weights, else a fresh model pretrained."""
    cfg = ctx.cfg
    if cfg.init is not None:
        model, ck = load(cfg.init, "init", ctx.data.info)
        return model, {**payload(cfg, model, ck), "state_dict": model.state_dict()}
    model = new_model(cfg, ctx.data.info)
    return train_phase(ctx, model, cfg.pretrain, "pretrain", out, payload(cfg, model, {}))


def once(
    ctx: Ctx, path: Path, make: Callable[[], tuple[nn.Module, dict[str, Any]]]
) -> tuple[nn.Module, dict[str, Any]]:
    """``csgd run``'s phases: the checkpoint at ``path`` when a resumed run already wrote
    it, else ``make()``'s model and checkpoint, saved at ``path``."""
    if ctx.cfg.resume and path.is_file():
        ck = load_checkpoint(path, "run")
        return model_from_checkpoint(ck, str(path)), ck
    model, ck = make()
    save_checkpoint(path, ck)  # rank 0 writes; nobody reads it before the next barrier
    return model, ck


def budget_schedule(cfg: DictConfig, rounds: int) -> DictConfig:
    """A baseline's fine-tune: ``finetune.epochs + rounds * schedule.epochs`` epochs
    (the epochs C-SGD would train are added, so all methods train as long), with the
    ``finetune`` learning rate; multistep milestones stay put, a cosine schedule
    stretches over the longer run."""
    extra = rounds * cfg.schedule.epochs
    log.info("%s: fine-tune %d + %d epochs (C-SGD's)", cfg.prune.method, cfg.finetune.epochs, extra)
    return OmegaConf.merge(cfg.finetune, {"epochs": cfg.finetune.epochs + extra})


# -- the prune step: choose clusters, merge, verify, write -----------------------------------
def prune_for_config(
    cfg: Any,
    model: nn.Module,
    ck: dict[str, Any],
    x: torch.Tensor,
    src: str,
    selection: Clusters | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Merge ``ck``'s clusters (``src`` names the file), or keep a baseline's
    ``selection`` (singletons at C-SGD's widths: ``baselines.prune_step``), verified on
    the real batch ``x``. The widths come with the clusters or the selection."""
    if selection is not None:
        groups = channel_groups(model)
        thin, rep = merge_checked(
            model, groups, selection, x, tolerance=cfg.prune.tolerance, partial=True
        )
        rep["method"] = cfg.prune.method
    else:
        clusters = need_clusters(ck, src)
        pruner = CSGD(model, x, clusters=clusters)
        thin, rep = (
            pruner.merge(x, tolerance=cfg.prune.tolerance, force=cfg.prune.force),
            pruner.merge_report,
        )
    if is_main():
        print(merge_summary(rep))
    return thin, rep


def save_pruned(
    cfg: Any,
    thin: nn.Module,
    ck: dict[str, Any],
    rep: dict[str, Any],
    src: str,
    path: Path,
    x: torch.Tensor,
) -> None:
    """``pruned.pt`` (csgd checkpoint) and, with ``prune.export``, ``pruned.pt2``
    (torch.export) and ``pruned.onnx`` (when onnx is installed) beside it."""
    info = payload(cfg, thin, ck, pruned_from=src, merge_check=rep, metrics=rep)
    save_checkpoint(path, {**info, "state_dict": thin.state_dict()})
    if cfg.prune.export:
        on_main(export_pt2, thin, x[:2], path.with_suffix(".pt2"))  # then every rank goes on
        on_main(export_onnx_if_installed, thin, x, path.with_suffix(".onnx"))
