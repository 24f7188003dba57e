"""csgd: prune deep CNNs with Centripetal SGD (Ding et al., CVPR 2019).

The public names load lazily, so ``csgd --help`` and a bad override never import torch.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CSGD",
    "ChannelGroup",
    "CsgdError",
    "WidthPlan",
    "channel_groups",
    "get_model",
    "list_models",
    "load_model",
    "plan_widths",
    "register_model",
    "save",
]
__version__ = "0.1.0"

_WHERE = {
    "CSGD": "api.pruner",
    "save": "api.pruner",
    "load_model": "api.pruner",
    "ChannelGroup": "rules.groups",
    "plan_widths": "targets.plan",
    "WidthPlan": "targets.plan",
    "CsgdError": "common.errors",
    "channel_groups": "tracing.trace",
    "get_model": "models",
    "list_models": "models",
    "register_model": "models",
}


# The trainer integrations live in api/ (the top level stays at 12 entries); these names
# make ``from csgd_cli.lightning import CSGDCallback`` work as well as ``csgd_cli.api.lightning``.
_ALIASES = {"lightning": "api.lightning", "huggingface": "api.huggingface"}


def __getattr__(name: str) -> Any:
    import importlib

    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    if name in _ALIASES:
        return importlib.import_module(f".{_ALIASES[name]}", __name__)
    raise AttributeError(f"module 'csgd_cli' has no attribute {name!r}")


class _AliasFinder:
    """``import csgd_cli.lightning`` (``.huggingface``): the ``csgd_cli.api`` module itself."""

    @staticmethod
    def find_spec(name: str, path: Any = None, target: Any = None) -> Any:
        pkg, _, sub = name.partition(".")
        if pkg != __name__ or sub not in _ALIASES:
            return None
        import importlib.util

        return importlib.util.spec_from_loader(name, _AliasLoader(_ALIASES[sub]))


class _AliasLoader:
    def __init__(self, where: str) -> None:
        self.where = where

    def create_module(self, spec: Any) -> Any:
        import importlib
        import sys

        real = importlib.import_module(f".{self.where}", __name__)
        sys.modules[spec.name] = real
        self.spec = real.__spec__  # the import machinery sets the alias's: put it back
        return real

    def exec_module(self, module: Any) -> None:  # the real module ran already
        module.__spec__ = self.spec


def _install_aliases() -> None:
    import sys

    if not any(f is _AliasFinder for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder)  # type: ignore[arg-type]


_install_aliases()
