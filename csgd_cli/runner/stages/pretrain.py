"""csgd pretrain: train the base model with plain SGD (the ``pretrain`` schedule)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ..pipeline import payload, train_phase
from ..session import setup, start_model


def main(cfg: DictConfig, out: Path) -> dict[str, Any]:
    ctx = setup(cfg, out)
    model, ck = start_model(ctx, "init")
    model, state = train_phase(ctx, model, cfg.pretrain, "pretrain", out, payload(cfg, model, ck))
    return state["metrics"]
