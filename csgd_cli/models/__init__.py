"""Model registry: ``register_model``, ``get_model(name, **cfg)``, ``list_models``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from ..common.errors import CsgdError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding a model constructor to the registry under ``name``."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = fn
        return fn

    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def registry_name(name: str, kwargs: Any = None) -> str:
    """The registry name of ``model.name`` given its ``model.kwargs``: ``source: timm``
    (the ``model=timm`` config) means timm's network of that name, ``timm.<name>``."""
    source = (kwargs or {}).get("source")
    if source not in (None, "timm"):
        raise CsgdError(f"model.kwargs.source={source} is unknown", "drop it, or pass timm")
    if source == "timm" and not name.startswith(timm_models.PREFIX):
        return timm_models.PREFIX + name
    return name


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model; the result remembers ``arch`` so it can be rebuilt."""
    name = registry_name(name, kwargs)
    kwargs.pop("source", None)
    if name.startswith(timm_models.PREFIX):
        builder = functools.partial(timm_models.build, name)  # traced groups
    elif name not in _REGISTRY:
        if torchvision_models.builder_name(name) is None:
            raise CsgdError(
                f"unknown model '{name}'",
                f"choose one of: {', '.join(list_models())}, or a torchvision builder",
            )
        builder = functools.partial(torchvision_models.build, name)  # traced groups
    else:
        builder = _REGISTRY[name]
    widths = kwargs.get("widths")
    if widths is not None and any(int(w) < 1 for w in widths):
        raise CsgdError(
            f"model '{name}' widths={list(widths)} has a group of width 0",
            "every group keeps at least one channel: pass widths >= 1",
        )
    try:
        model = builder(**kwargs)
    except TypeError as e:
        raise CsgdError(f"bad arguments for model '{name}': {e}", "check the model config") from e
    kw = dict(kwargs, widths=list(model.widths)) if hasattr(model, "widths") else dict(kwargs)
    model.arch = {"name": name, "kwargs": kw}  # declared models: rebuilt from ``widths``
    return model


def known_model(name: str) -> bool:
    """A registered model, a torchvision classification builder or ``timm.<name>``."""
    if name.startswith(timm_models.PREFIX):
        return timm_models.known(name)
    return name in _REGISTRY or torchvision_models.builder_name(name) is not None


def plain_checkpoint(sd: dict[str, Any], path: str, label: str) -> dict[str, Any]:
    """A plain ``state_dict`` file (``init=``) as a checkpoint: of the timm model the
    config names, else of the torchvision builder its name or tensors fit."""
    return timm_models.plain_checkpoint(sd, label) or {
        "arch": torchvision_models.arch_of_state_dict(sd, path, label),
        "state_dict": dict(sd),
    }


def kaiming_init(model: nn.Module) -> None:
    """He-normal (fan_out, ReLU) init of every conv, as the CIFAR ResNet papers do."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


# Importing the families registers them.
from . import (  # noqa: E402, F401
    custom,
    densenet,
    resnet_cifar,
    resnet_preact,
    timm_models,
    torchvision_models,
    vgg,
)
