"""One preflight for every stage: check what it will read before any file is written.

Each stage declares its needs in ``config.STAGES`` (data set, ``ckpt=`` or ``init=``,
clusters, a fresh model, prune globs); this module reads the declaration, never the
stage's name, and raises ``CsgdError`` with the fix on the first problem.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..api.checkpoint import check_arch, check_fits, need_clusters
from ..api.record import PruneRecord
from ..common.config import STAGES, Stage, default_min_width
from ..common.device import pick_device
from ..common.errors import CsgdError
from ..common.target import Target
from ..deploy.export import require_runtime
from ..deploy.latency import Runtime
from ..models import known_model, list_models, registry_name, timm_models
from ..rules.groups import check_clusters, select_groups
from ..targets.resolution import at_resolution
from ..targets.widths import Problem, check_reachable
from ..tracing.trace import channel_groups, example_input
from .datasets import build_data
from .forecasting import check_forecast
from .session import load, new_model, trust_named_model
from .widthconf import WIDTH_KEYS, width_settings


def check_model_name(cfg: DictConfig) -> None:
    name = registry_name(cfg.model.name, cfg.model.kwargs)
    if name.startswith(timm_models.PREFIX):  # timm missing: the install command, in one line
        timm_models.require_known(name)
    elif not known_model(name):
        raise CsgdError(
            f"unknown model '{cfg.model.name}'",
            f"choose model=<{'|'.join(list_models())}>, or model=torchvision "
            "model.name=<a torchvision.models classification builder>",
        )


def check_width_keys(cfg: DictConfig, ck: dict[str, Any], where: str, explicit: Any) -> None:
    """``csgd train`` with clusters that come with the checkpoint: a command line asking
    for other widths (ratio, round_to, include/exclude, clustering) is refused, not
    silently ignored."""
    record = PruneRecord.from_checkpoint(ck)
    have = record.settings or {"ratio": record.ratio}
    want = width_settings(cfg)
    for key in WIDTH_KEYS:
        if key in explicit and want[key] != have.get(key):
            shown = have.get(key, "not recorded")
            raise CsgdError(
                f"{where} carries its own clusters (made with {key}={shown}), but "
                f"{key}={want[key]} asks for other widths",
                f"drop {key}= to train its clusters, or pass init= a checkpoint without "
                "clusters (the base model) to cluster anew",
            )


def check_target(
    cfg: DictConfig, model: nn.Module, ck: dict[str, Any], explicit: Sequence[str]
) -> None:
    """``prune.target``: no ratio given beside it, the runtime of a latency target
    installed, and a value the allowed groups can reach (a latency floor is timed: the
    stage reuses the timing)."""
    p = cfg.prune
    if p.target is None:
        return
    if "ratio" in explicit:
        raise CsgdError(
            f"ratio={cfg.ratio} and prune.target={p.target} both given",
            "pass one: prune.target chooses each group's width, ratio one fraction for all",
        )
    target = Target.parse(p.target)
    if target.kind == "latency":
        require_runtime(cfg.backend)
    groups = channel_groups(model)
    chosen = select_groups(groups, p.include, p.exclude)
    problem = Problem(
        model,
        groups,
        [g.name for g in chosen],
        at_resolution(example_input(model), p.resolution),
        p.round_to,
        p.min_width or default_min_width(p.round_to),
        Runtime(cfg.backend, p.latency_batch, p.latency_threads),
        None,
    )
    base_cost = (PruneRecord.from_checkpoint(ck).target_base or {}).get(target.kind)
    check_reachable(problem, target, base_cost)


def preflight(
    cfg: DictConfig, explicit: Sequence[str] = (), cache: dict[Any, Any] | None = None
) -> None:
    """Check the device, data set, checkpoints and their clusters, model arguments and
    prune globs of ``cfg.stage``. ``explicit``: config keys given on the command line
    (``model`` there must agree with the checkpoint). ``cache`` (one per CLI call)
    keeps data sets and checkpoints shared by the points of a sweep."""
    cache = {} if cache is None else cache
    need = STAGES[cfg.stage]
    _check_needs(cfg, need)
    loaded = _load_files(cfg, explicit, cache)
    info = None
    if need.data:
        pick_device(cfg.device)
        dkey = "data:" + OmegaConf.to_yaml(cfg.dataset, resolve=True)
        if dkey not in cache:
            cache[dkey] = build_data(cfg.dataset, seed=0, device=torch.device("cpu"))
        info = cache[dkey].info
    model = None
    for key, path, model, ck in loaded:
        if info is not None:
            check_fits(ck, f"{key}={path}", info)
        clusters = PruneRecord.from_checkpoint(ck).clusters
        if clusters:
            check_clusters(channel_groups(model), clusters, f"{key}={path}")
            if need.keeps_clusters:
                check_width_keys(cfg, ck, f"{key}={path}", explicit)
        elif need.groups:
            select_groups(channel_groups(model), cfg.prune.include, cfg.prune.exclude)
        if key == "ckpt" and need.clusters and cfg.prune.method == "csgd":
            need_clusters(ck, path)
    ck = loaded[-1][3] if loaded else {}
    if model is None and need.fresh:
        model = new_model(cfg, info)  # refuses model arguments the constructor does not take
        if need.groups:
            select_groups(channel_groups(model), cfg.prune.include, cfg.prune.exclude)
    kept = PruneRecord.from_checkpoint(ck).clusters
    if need.target and model is not None and not (need.keeps_clusters and kept):
        check_target(cfg, model, ck, explicit)
    if cfg.stage in ("train", "run") and need.data:  # the schedule against the merge
        check_forecast(cfg, cache[dkey].steps_per_epoch())


def _check_needs(cfg: DictConfig, need: Stage) -> None:
    """What the stage needs before any file is read: the model's name, the weights it
    starts from, the runtimes it will use."""
    trust_named_model(cfg)
    check_model_name(cfg)
    if need.weights == "ckpt" and cfg.ckpt is None:
        raise CsgdError(f"csgd {cfg.stage} needs a checkpoint", f"pass {need.hint}")
    if need.weights == "ckpt|init" and cfg.ckpt is None and cfg.init is None:
        raise CsgdError(f"csgd {cfg.stage} needs weights", f"pass {need.hint}")
    if need.onnx or (need.data and cfg.backend != "eager"):
        require_runtime("onnxruntime" if need.onnx else cfg.backend)
    if cfg.stage == "run" and cfg.deploy.int8:
        require_runtime("onnxruntime-int8")
    if need.target and cfg.prune.target is not None:
        if Target.parse(cfg.prune.target).kind == "latency":
            require_runtime(cfg.backend)


def _load_files(
    cfg: DictConfig, explicit: Sequence[str], cache: dict[Any, Any]
) -> list[tuple[str, str, Any, dict[str, Any]]]:
    """(key, path, model, checkpoint) for ``init`` and ``ckpt`` (files first: a bad file is
    the likelier mistake); ``model`` given on the command line must agree with each."""
    loaded = []
    for key in ("init", "ckpt"):
        path = cfg[key]
        if path is not None:
            if (key, path) not in cache:
                cache[(key, path)] = load(path, key)
            model, ck = cache[(key, path)]
            if "model" in explicit:
                check_arch(ck, path, key, registry_name(cfg.model.name, cfg.model.kwargs))
            loaded.append((key, path, model, ck))
    return loaded
