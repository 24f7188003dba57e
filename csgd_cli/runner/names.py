"""The names a config accepts, each list derived from the table that acts on it.

Checked before any file is written, after the range checks of ``common.config`` (those
need no torch, so ``csgd --help`` and a bad number never import it; these tables do)."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from ..common.errors import CsgdError


def accepted() -> dict[str, tuple[str, ...]]:
    """Config key -> the names its table knows."""
    from ..baselines.criteria import CRITERIA
    from ..core.clustering import METHODS
    from ..deploy.export import BACKENDS
    from ..targets.widths import RULES
    from .datasets import DATASETS
    from .stages.export import FORMATS

    return {
        "dataset.name": tuple(DATASETS),
        "clustering": tuple(METHODS),
        "prune.method": ("csgd", *CRITERIA),
        "prune.rule": tuple(RULES),
        "backend": tuple(BACKENDS),
        "format": tuple(FORMATS),
    }


def check_names(cfg: DictConfig) -> None:
    """One line naming the key, the unknown name and the names accepted."""
    for key, names in accepted().items():
        value = OmegaConf.select(cfg, key)
        if value not in names:
            label = key.removesuffix(".name")
            raise CsgdError(f"unknown {label} '{value}'", f"choose {label}=<{'|'.join(names)}>")
