"""One training phase (plain SGD, or C-SGD with clusters), resumable from ``last.pt``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .checkpoint import load_checkpoint, model_from_checkpoint, payload, save_checkpoint
from .clustering import clusters_for_config
from .distributed import broadcast_object, is_main
from .engine import Trainer
from .errors import CsgdError
from .groups import Clusters, channel_groups, check_clusters
from .metrics import chi_fn
from .optim import csgd_optimizer, plain_sgd
from .session import Ctx, load, new_model

log = logging.getLogger("csgd")


def _hyper(sched: Any, cfg: DictConfig, clusters: Clusters | None) -> dict[str, Any]:
    """What decides the optimizer: kept in last.pt, so a resume trains as it began."""
    h: dict[str, Any] = {"schedule": OmegaConf.to_container(sched, resolve=True)}
    if clusters:
        h.update(epsilon=cfg.epsilon, norm_epsilon=cfg.norm_epsilon)
    return h


def _resume_from(last: Path, phase: str, model: nn.Module) -> dict[str, Any]:
    ck = load_checkpoint(last, "resume")
    if ck.get("phase") != phase or ck["arch"] != model.arch:
        raise CsgdError(
            f"{last} belongs to another phase or model, not to '{phase}'",
            "resume in the run directory the interrupted run used (hydra.run.dir=...)",
        )
    return ck


def train_phase(
    ctx: Ctx,
    model: nn.Module,
    sched: DictConfig,
    phase: str,
    out: Path,
    info: dict[str, Any],
    clusters: Clusters | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train with plain SGD (no clusters) or C-SGD; resumes from ``out/last.pt``.

    On resume the clusters, the schedule, epsilon, norm_epsilon and the weight decays
    all come from ``last.pt``: values given anew on the command line are ignored (and
    a differing one is named in a warning)."""
    cfg = ctx.cfg
    out.mkdir(parents=True, exist_ok=True)
    model.to(ctx.device)
    if ctx.device.type == "cuda" and cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    last, ck = out / "last.pt", None
    hyper = _hyper(sched, cfg, clusters)
    if cfg.resume and last.is_file():
        ck = _resume_from(last, phase, model)
        if clusters and ck.get("clusters"):  # the clusters this phase was trained with
            check_clusters(channel_groups(model), ck["clusters"], str(last))
            if ck["clusters"] != clusters:
                log.info("resume: using the clusters stored in %s, not new ones", last)
            clusters = ck["clusters"]
        stored = ck.get("hyper") or hyper
        for k in sorted(set(hyper) | set(stored)):
            if hyper.get(k) != stored.get(k):
                log.warning(
                    "resume: %s comes from %s (%s), not the command line", k, last, stored.get(k)
                )
        hyper = stored
    elif cfg.resume:
        log.warning("resume=true but %s does not exist: %s starts from its beginning", last, phase)
    sched = OmegaConf.create(hyper["schedule"])
    opt = (
        csgd_optimizer(model, clusters, sched, hyper["epsilon"], hyper["norm_epsilon"])
        if clusters
        else plain_sgd(model, sched)
    )
    trainer = Trainer(
        model,
        ctx.data,
        sched,
        opt,
        device=ctx.device,
        out=out,
        phase=phase,
        payload=dict(
            info, clusters=clusters, hyper=hyper, **{k: hyper[k] for k in hyper if k != "schedule"}
        ),
        amp=cfg.amp,
        compile=cfg.compile,
        every_steps=cfg.checkpoint.every_steps,
        chi_fn=chi_fn(model, channel_groups(model), clusters) if clusters else None,
    )
    if ck is not None:
        trainer.restore(ck)
        log.info("resuming %s at epoch %d step %d", phase, trainer.epoch, trainer.step_in_epoch)
    metrics = trainer.fit()
    if sched.epochs == 0:  # nothing trained: last.pt is still the phase's result
        trainer.save("last.pt")
    state = {**trainer.state(), "metrics": metrics}
    if clusters:  # untie params from the optimizer's flat buffer so it can be freed
        with torch.no_grad():
            for p in model.parameters():
                p.data = p.data.clone(memory_format=torch.preserve_format)
                p.grad = None
    return model, state


def csgd_phase(
    ctx: Ctx,
    model: nn.Module,
    ck: dict[str, Any],
    phase: str,
    out: Path,
    ratio: float | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Cluster (rank 0, then broadcast; clusters stored in ``ck`` win unless ``ratio``
    is given) and C-SGD-train ``model`` for the ``schedule`` config."""
    cfg = ctx.cfg
    clusters = broadcast_object(clusters_for_config(cfg, model, ck, ratio) if is_main() else None)
    info = payload(cfg, model, ck, ratio=cfg.ratio if ratio is None else ratio, epsilon=cfg.epsilon)
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
        ck = load_checkpoint(path, path.stem)
        return model_from_checkpoint(ck, path.stem), ck
    model, ck = make()
    save_checkpoint(path, ck)  # rank 0 writes; nobody reads it before the next barrier
    return model, ck


def budget_schedule(cfg: DictConfig, rounds: int) -> DictConfig:
    """The L1 baseline's fine-tune: ``finetune.epochs + rounds * schedule.epochs`` epochs
    (the epochs C-SGD would train are added, so both methods train as long), with the
    ``finetune`` learning rate; multistep milestones stay put, a cosine schedule
    stretches over the longer run."""
    extra = rounds * cfg.schedule.epochs
    log.info("L1 baseline: fine-tune %d + %d epochs (C-SGD's budget)", cfg.finetune.epochs, extra)
    return OmegaConf.merge(cfg.finetune, {"epochs": cfg.finetune.epochs + extra})
