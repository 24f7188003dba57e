"""What every stage shares: device and data set-up, model loading, one training phase."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from ..checkpoint import load_checkpoint, model_from_checkpoint
from ..clustering import cluster_groups, target_widths
from ..config import to_yaml
from ..data import Data, build_data
from ..engine import Trainer, dist_info, pick_device, seed_everything
from ..errors import CsgdError
from ..groups import ChannelGroup, Clusters, channel_groups, check_clusters, select_groups
from ..metrics import chi_terms
from ..models import get_model
from ..optim import CentripetalSGD

log = logging.getLogger("csgd")


@dataclass
class Ctx:
    cfg: DictConfig
    out: Path
    device: torch.device
    data: Data


def setup(cfg: DictConfig, out: Path) -> Ctx:
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    rank, world = dist_info()
    data = build_data(cfg.dataset, seed=cfg.seed, device=device, rank=rank, world=world)
    return Ctx(cfg, out, device, data)


def new_model(cfg: DictConfig, data: Data) -> nn.Module:
    i = data.info
    return get_model(
        cfg.model.name,
        num_classes=i.num_classes,
        in_channels=i.in_channels,
        image_size=i.image_size,
        **cfg.model.kwargs,
    )


def load(path: str, key: str, data: Data | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Model and checkpoint dict; refuses a model built for another data shape."""
    ck = load_checkpoint(path, key)
    model = model_from_checkpoint(ck, key)
    if data is not None:
        check_fits(ck, path, key, data)
    return model, ck


def check_fits(ck: dict[str, Any], path: str, key: str, data: Data) -> None:
    kw, i = ck["arch"].get("kwargs", {}), data.info
    for name, want in (("num_classes", i.num_classes), ("in_channels", i.in_channels)):
        if name in kw and kw[name] != want:
            raise CsgdError(
                f"{key}={path} was built for {name}={kw[name]} but dataset {i.name} has {want}",
                "pass the dataset= the checkpoint was trained on",
            )


_DATA_STAGES = ("pretrain", "train", "finetune", "eval", "prune", "run")
_NEEDS_CKPT = {
    "eval": "ckpt=<file.pt>",
    "finetune": "ckpt=<pruned.pt>",
    "prune": "ckpt=<csgd.pt or last.pt of csgd train>",
    "check": "ckpt=<csgd.pt or last.pt>",
}


def preflight(cfg: DictConfig, cache: dict[str, Any] | None = None) -> None:
    """Check what a stage will read (device, data set, checkpoints and their clusters,
    model arguments, prune globs) before Hydra creates or touches the run directory,
    so that bad input changes no file. Raises CsgdError.

    ``cache`` (one per CLI call) keeps data sets and checkpoints shared by sweep points."""
    cache = {} if cache is None else cache
    stage = cfg.stage
    if stage in _NEEDS_CKPT and cfg.ckpt is None:
        raise CsgdError(f"csgd {stage} needs a checkpoint", f"pass {_NEEDS_CKPT[stage]}")
    if stage == "cluster" and cfg.ckpt is None and cfg.init is None:
        raise CsgdError("csgd cluster needs weights to cluster", "pass ckpt=<base.pt> (or init=)")
    loaded = []
    for key in ("init", "ckpt"):  # files first: a bad file is the likelier mistake
        path = cfg[key]
        if path is not None:
            if (key, path) not in cache:
                cache[(key, path)] = load(path, key)
            loaded.append((key, path, *cache[(key, path)]))
    data = None
    if stage in _DATA_STAGES:
        pick_device(cfg.device)
        dkey = "data:" + to_yaml(cfg.dataset)
        if dkey not in cache:
            cache[dkey] = build_data(cfg.dataset, seed=0, device=torch.device("cpu"))
        data = cache[dkey]
    model = None
    for key, path, model, ck in loaded:
        if data is not None:
            check_fits(ck, path, key, data)
        if ck.get("clusters"):
            check_clusters(channel_groups(model), ck["clusters"], f"{key}={path}")
        elif stage in ("train", "run", "cluster"):
            pruned_groups(cfg, model)  # prune.include/exclude must match a group
        if key == "ckpt" and (
            stage == "check" or (stage == "prune" and cfg.prune.method == "csgd")
        ):
            from .check import need_clusters

            need_clusters(ck, path)
    if model is None and stage in ("pretrain", "train", "run") and data is not None:
        model = new_model(cfg, data)  # refuses model arguments the constructor does not take
        if stage != "pretrain":
            pruned_groups(cfg, model)  # prune.include/exclude must match a group


def start_model(ctx: Ctx, *keys: str) -> tuple[nn.Module, dict[str, Any]]:
    """The model a stage starts from: the first of ``keys`` given, else a fresh one."""
    for key in keys:
        if ctx.cfg[key] is not None:
            return load(ctx.cfg[key], key, ctx.data)
    return new_model(ctx.cfg, ctx.data), {}


def pruned_groups(cfg: DictConfig, model: nn.Module) -> list[ChannelGroup]:
    return select_groups(channel_groups(model), list(cfg.prune.include), list(cfg.prune.exclude))


def base_widths(model: nn.Module, ck: dict[str, Any]) -> dict[str, int]:
    """Original width of every group (kept across iterative rounds)."""
    return dict(ck.get("base_widths") or {g.name: g.width for g in channel_groups(model)})


def make_clusters(cfg: DictConfig, model: nn.Module, ck: dict[str, Any], ratio: float) -> Clusters:
    groups = pruned_groups(cfg, model)
    ks = target_widths(groups, ratio, base_widths(model, ck))
    return cluster_groups(model, groups, ks, cfg.clustering, cfg.seed)


def clusters_for(cfg: DictConfig, model: nn.Module, ck: dict[str, Any]) -> Clusters:
    """Clusters given with the checkpoint (checked against the model), else new ones."""
    cl = ck.get("clusters")
    if cl:
        check_clusters(channel_groups(model), cl, "clusters given with the checkpoint")
        return cl
    return make_clusters(cfg, model, ck, cfg.ratio)


def payload(cfg: DictConfig, model: nn.Module, ck: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Fields every checkpoint carries besides the training state."""
    return {
        "arch": model.arch,
        "config": to_yaml(cfg),
        "stage": cfg.stage,
        "seed": cfg.seed,
        "base_widths": base_widths(model, ck),
        "clusters": None,
        **extra,
    }


def plain_sgd(model: nn.Module, sched: DictConfig) -> torch.optim.SGD:
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.dim() == 1 and sched.norm_weight_decay is not None else decay).append(p)
    groups = [{"params": decay, "weight_decay": sched.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": sched.norm_weight_decay})
    return torch.optim.SGD(
        groups, lr=sched.lr, momentum=sched.momentum, nesterov=sched.nesterov and sched.momentum > 0
    )


def csgd_optimizer(cfg: DictConfig, model: nn.Module, clusters: Clusters) -> CentripetalSGD:
    s = cfg.schedule
    return CentripetalSGD(
        model,
        channel_groups(model),
        clusters,
        lr=s.lr,
        epsilon=cfg.epsilon,
        momentum=s.momentum,
        nesterov=s.nesterov and s.momentum > 0,
        weight_decay=s.weight_decay,
        norm_epsilon=cfg.norm_epsilon,
        plain_norm_weight_decay=s.norm_weight_decay,
    )


def chi_fn(model: nn.Module, clusters: Clusters):
    groups = channel_groups(model)

    def f() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        terms = chi_terms(model, groups, clusters)
        per = {k: v["chi"] for k, v in terms.items()}
        total = torch.stack(list(per.values())).sum() if per else torch.zeros(())
        return total, per

    return f


def train_phase(
    ctx: Ctx,
    model: nn.Module,
    sched: DictConfig,
    phase: str,
    out: Path,
    info: dict[str, Any],
    clusters: Clusters | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train with plain SGD (no clusters) or C-SGD; resumes from ``out/last.pt``."""
    out.mkdir(parents=True, exist_ok=True)
    model.to(ctx.device)
    if ctx.device.type == "cuda" and ctx.cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    last, ck = out / "last.pt", None
    if ctx.cfg.resume and last.is_file():
        ck = load_checkpoint(last, "resume")
        if ck.get("phase") != phase or ck["arch"] != model.arch:
            raise CsgdError(
                f"{last} belongs to another phase or model, not to '{phase}'",
                "resume in the run directory the interrupted run used (hydra.run.dir=...)",
            )
        if clusters and ck.get("clusters"):  # the clusters this phase was trained with
            check_clusters(channel_groups(model), ck["clusters"], str(last))
            if ck["clusters"] != clusters:
                log.info("resume: using the clusters stored in %s, not new ones", last)
            clusters = ck["clusters"]
    opt = csgd_optimizer(ctx.cfg, model, clusters) if clusters else plain_sgd(model, sched)
    trainer = Trainer(
        model,
        ctx.data,
        sched,
        opt,
        device=ctx.device,
        out=out,
        phase=phase,
        payload=dict(info, clusters=clusters),
        amp=ctx.cfg.amp,
        every_steps=ctx.cfg.checkpoint.every_steps,
        chi_fn=chi_fn(model, clusters) if clusters else None,
    )
    if ctx.cfg.resume and ck is None:
        log.warning("resume=true but %s does not exist: %s starts from its beginning", last, phase)
    if ck is not None:
        trainer.restore(ck)
        log.info("resuming %s at epoch %d step %d", phase, trainer.epoch, trainer.step_in_epoch)
    metrics = trainer.fit()
    state = {**trainer.state(), "metrics": metrics}
    if clusters:  # untie params from the optimizer's flat buffer so it can be freed
        with torch.no_grad():
            for p in model.parameters():
                p.data = p.data.clone(memory_format=torch.preserve_format)
                p.grad = None
    return model, state


def write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)
