"""Model registry: ``register_model``, ``get_model(name, **cfg)``, ``list_models``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import CsgdError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding a model constructor to the registry under ``name``."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = fn
        return fn

    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model; the result remembers ``arch`` so it can be rebuilt."""
    if name not in _REGISTRY:
        raise CsgdError(f"unknown model '{name}'", f"choose one of: {', '.join(list_models())}")
    try:
        model = _REGISTRY[name](**kwargs)
    except TypeError as e:
        raise CsgdError(f"bad arguments for model '{name}': {e}", "check the model config") from e
    model.arch = {"name": name, "kwargs": dict(kwargs, widths=list(model.widths))}
    return model


# Importing the families registers them.
from . import densenet, resnet_cifar, vgg  # noqa: E402,F401
