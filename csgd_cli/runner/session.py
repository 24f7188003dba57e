"""What a stage sets up: seeds, device, data, and the model it starts from."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from ..api.checkpoint import check_fits, load_checkpoint, model_from_checkpoint
from ..common.device import pick_device
from ..common.seeding import seed_everything
from ..models import get_model
from .data import Data, DataInfo
from .datasets import build_data


@dataclass
class Ctx:
    cfg: DictConfig
    out: Path
    device: torch.device
    data: Data


def trust_named_model(cfg: DictConfig) -> None:
    """A ``model._target_`` given in the config is the user's: checkpoints may name it;
    so may those in ``CSGD_TRUST`` (comma-separated: the CLI's word for the API's
    ``trust=``); a ``model=timm`` names what a plain ``init=`` state dict holds."""
    from ..models.custom import trust

    trust(*os.environ.get("CSGD_TRUST", "").split(","))
    if cfg.model.name == "custom":
        trust(cfg.model.get("_target_"))
    from ..models.timm_models import name_plain_state_dicts

    name_plain_state_dicts(cfg.model.name, dict(cfg.model.get("kwargs") or {}))


def setup(cfg: DictConfig, out: Path) -> Ctx:
    """Seeded RNGs, the device, and this process's view of the data set."""
    trust_named_model(cfg)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    data = build_data(cfg.dataset, seed=cfg.seed, device=device)  # this rank's part
    return Ctx(cfg, out, device, data)


def new_model(cfg: DictConfig, info: DataInfo | None = None) -> nn.Module:
    """A fresh ``model=`` network shaped for the data set (``info``), or for its
    config's defaults when no data set is read (``csgd groups``)."""
    shape = (
        {
            "num_classes": info.num_classes,
            "in_channels": info.in_channels,
            "image_size": info.image_size,
        }
        if info is not None
        else {}
    )
    return get_model(cfg.model.name, **{**shape, **cfg.model.kwargs})


def load(path: str, key: str, info: DataInfo | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Model and checkpoint dict; refuses a model built for another data shape. ``key``:
    the config key that named the file, or "run" for a file the run wrote itself."""
    ck = load_checkpoint(path, key, state_dict_ok=key == "init")  # init= takes torchvision's
    where = str(path) if key == "run" else f"{key}={path}"
    model = model_from_checkpoint(ck, where)
    if info is not None:
        check_fits(ck, where, info)
    return model, ck


def start_model(ctx: Ctx, *keys: str) -> tuple[nn.Module, dict[str, Any]]:
    """The model a stage starts from: the first of ``keys`` given, else a fresh one."""
    for key in keys:
        if ctx.cfg[key] is not None:
            return load(ctx.cfg[key], key, ctx.data.info)
    return new_model(ctx.cfg, ctx.data.info), {}
