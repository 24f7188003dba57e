"""Bring your own network: ``model=custom model._target_=<dotted path>`` names a callable
returning an ``nn.Module`` (Hydra's ``instantiate`` convention); its keyword arguments
go in ``model.kwargs`` (``+model.kwargs.width=32``). ``num_classes``, ``in_channels`` and
``image_size`` from the data set are passed when the callable accepts them. Groups are
traced. The dotted path is stored in checkpoints, so ``load_model`` imports it again.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from torch import nn

from ..common.errors import CsgdError
from . import register_model

SHAPE_KEYS = ("num_classes", "in_channels", "image_size")
# Callables a checkpoint may name: those the user named (``load_model(..., trust=...)``;
# on the command line model._target_ or CSGD_TRUST=a.b,c.d). A file naming any other
# callable is refused: building it would run code that the file chose.
_TRUSTED: set[str] = set()


def trust(*targets: str | None) -> None:
    _TRUSTED.update(t for t in targets if t)


def require_trusted(target: object, where: str) -> None:
    if target not in _TRUSTED:
        raise CsgdError(
            f"{where} builds its model with {target!r}, a callable named by the file; refused "
            "(csgd runs no code a checkpoint chooses)",
            f"if you trust it, pass trust=({target!r},) to load_model (csgd's CLI: "
            f"model=custom model._target_={target}, or CSGD_TRUST={target})",
        )


def resolve(target: str | None) -> Any:
    fix = "pass model._target_=<package.module.callable> importable from the working directory"
    if not target or not isinstance(target, str):
        raise CsgdError("model=custom needs model._target_", fix)
    mod_name, _, attr = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(mod_name), attr) if mod_name else None
    except (ImportError, AttributeError) as e:
        raise CsgdError(f"model._target_={target} does not import ({e})", fix) from None
    if not callable(obj):
        raise CsgdError(f"model._target_={target} is not a callable", fix)
    return obj


@register_model("custom")
def custom(target: str | None = None, **kwargs: Any) -> nn.Module:
    fn = resolve(target)
    try:
        params = inspect.signature(fn).parameters
        takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):
        params, takes_all = {}, True
    kw = {k: v for k, v in kwargs.items() if k not in SHAPE_KEYS or takes_all or k in params}
    try:
        model = fn(**kw)
    except TypeError as e:
        raise CsgdError(
            f"model._target_={target} refused its arguments ({e})", "check model.kwargs"
        ) from None
    if not isinstance(model, nn.Module):
        raise CsgdError(
            f"model._target_={target} returned a {type(model).__name__}, not an nn.Module",
            "point it at a callable (class or function) returning a torch.nn.Module",
        )
    if getattr(model, "input_shape", None) is None:
        c, s = kwargs.get("in_channels", 3), kwargs.get("image_size", 32)
        model.input_shape = (c, s, s)
    return model
