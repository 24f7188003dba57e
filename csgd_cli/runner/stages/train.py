"""csgd train: C-SGD training; clusters come with ``init`` or are computed at the start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ..pipeline import csgd_phase
from ..session import setup, start_model


def main(cfg: DictConfig, out: Path) -> dict[str, Any]:
    ctx = setup(cfg, out)
    model, ck = start_model(ctx, "init", "ckpt")
    model, state = csgd_phase(ctx, model, ck, "train", out)
    return state["metrics"]
