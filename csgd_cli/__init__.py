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


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'csgd_cli' has no attribute {name!r}")
