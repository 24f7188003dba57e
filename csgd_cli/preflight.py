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

from .checkpoint import check_arch, check_fits, need_clusters
from .config import STAGES
from .data import build_data
from .engine import pick_device
from .errors import CsgdError
from .groups import channel_groups, check_clusters, select_groups
from .session import load, new_model, trust_named_model


def preflight(
    cfg: DictConfig, explicit: Sequence[str] = (), cache: dict[Any, Any] | None = None
) -> None:
    """Check the device, data set, checkpoints and their clusters, model arguments and
    prune globs of ``cfg.stage``. ``explicit``: config keys given on the command line
    (``model`` there must agree with the checkpoint). ``cache`` (one per CLI call)
    keeps data sets and checkpoints shared by the points of a sweep."""
    cache = {} if cache is None else cache
    need = STAGES[cfg.stage]
    trust_named_model(cfg)
    if need.weights == "ckpt" and cfg.ckpt is None:
        raise CsgdError(f"csgd {cfg.stage} needs a checkpoint", f"pass {need.hint}")
    if need.weights == "ckpt|init" and cfg.ckpt is None and cfg.init is None:
        raise CsgdError(f"csgd {cfg.stage} needs weights", f"pass {need.hint}")
    if need.onnx or (need.data and cfg.backend != "eager"):
        from .deploy import require_runtime

        require_runtime("onnxruntime" if need.onnx else cfg.backend)
    loaded = []
    for key in ("init", "ckpt"):  # files first: a bad file is the likelier mistake
        path = cfg[key]
        if path is not None:
            if (key, path) not in cache:
                cache[(key, path)] = load(path, key)
            model, ck = cache[(key, path)]
            if "model" in explicit:
                check_arch(ck, path, key, cfg.model.name)
            loaded.append((key, path, model, ck))
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
            check_fits(ck, path, key, info)
        if ck.get("clusters"):
            check_clusters(channel_groups(model), ck["clusters"], f"{key}={path}")
        elif need.groups:
            select_groups(channel_groups(model), cfg.prune.include, cfg.prune.exclude)
        if key == "ckpt" and need.clusters and cfg.prune.method == "csgd":
            need_clusters(ck, path)
    if model is None and need.fresh:
        model = new_model(cfg, info)  # refuses model arguments the constructor does not take
        if need.groups:
            select_groups(channel_groups(model), cfg.prune.include, cfg.prune.exclude)
