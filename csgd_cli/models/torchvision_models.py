"""torchvision classification networks (built with ``weights=None``), groups traced.

``resnet18``, ``resnet50`` and ``mobilenet_v2`` are registered by name; any other
classification builder of ``torchvision.models`` is reached through ``get_model``'s
fallback (``model=torchvision model.name=<builder>``; ``torchvision.<builder>`` picks
torchvision's even where csgd has a model of that name, e.g. ``torchvision.vgg16``).
``num_classes`` sizes the classifier, ``in_channels`` != 3 replaces the stem conv, and
``image_size`` is the input the groups are traced with (these nets pool globally).
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

from ..common.errors import CsgdError
from . import register_model

PREFIX = "torchvision."


@functools.cache
def builders() -> tuple[str, ...]:
    """Every classification builder of torchvision.models."""
    from torchvision import models

    return tuple(models.list_models(module=models))


def builder_name(name: str) -> str | None:
    """The torchvision builder ``name`` refers to, or None."""
    bare = name.removeprefix(PREFIX)
    return bare if bare in builders() else None


def _replace_stem(model: nn.Module, in_channels: int) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            new = nn.Conv2d(
                in_channels,
                m.out_channels,
                m.kernel_size,
                m.stride,
                m.padding,
                m.dilation,
                m.groups if m.groups == 1 else in_channels,
                m.bias is not None,
            )
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, new)
            return


def build(
    builder: str,
    num_classes: int = 1000,
    in_channels: int = 3,
    image_size: int = 224,
    **kwargs: Any,
) -> nn.Module:
    """torchvision's ``builder`` with random weights, shaped for the data set."""
    from torchvision import models

    name = builder_name(builder)
    if name is None:
        raise CsgdError(
            f"unknown model '{builder}' (neither a csgd model nor a torchvision classification builder)",
            "pass model.name=<a csgd model or a builder listed by torchvision.models.list_models()>",
        )
    try:
        model = models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError) as e:
        raise CsgdError(
            f"bad arguments for torchvision model '{name}': {e}", "check model.kwargs"
        ) from None
    if in_channels != 3:
        _replace_stem(model, in_channels)
    model.input_shape = (in_channels, image_size, image_size)
    return model


for _name in ("resnet18", "resnet50", "mobilenet_v2"):
    register_model(_name)(functools.partial(build, _name))


def arch_of_state_dict(sd: dict[str, Any], path: str, label: str) -> dict[str, Any]:
    """The csgd ``arch`` of a plain torchvision ``state_dict`` (as torchvision publishes
    its weights, e.g. ``resnet50-0676ba61.pth``): the builder named by the file, else the
    registered torchvision families, whose layers the tensors fit exactly. ``label``
    names the file in messages (``init=<path>``)."""
    from pathlib import Path

    import torch

    from . import get_model

    stem = Path(path).name.split("-")[0].split(".")[0]
    named = sorted((b for b in builders() if stem.startswith(b)), key=len, reverse=True)
    if not all(isinstance(v, torch.Tensor) for v in sd.values()) or not sd:
        raise CsgdError(
            f"{label} is neither a csgd checkpoint nor a state_dict", "pass a csgd checkpoint"
        )
    convs = [v for v in sd.values() if v.dim() == 4]
    linears = [v for k, v in sd.items() if k.endswith("weight") and v.dim() == 2]
    kw = {
        "num_classes": int(linears[-1].shape[0]) if linears else 1000,
        "in_channels": int(convs[0].shape[1]) if convs else 3,
    }
    tried = []
    for name in [*named, *(n for n in ("resnet18", "resnet50", "mobilenet_v2") if n not in named)]:
        tried.append(name)
        try:
            want = get_model(name, **kw).state_dict()
        except CsgdError:
            continue
        if want.keys() == sd.keys() and all(want[k].shape == sd[k].shape for k in sd):
            return {"name": name, "kwargs": kw}
    raise CsgdError(
        f"{label} is a plain state_dict that fits none of {', '.join(tried)} "
        f"(num_classes={kw['num_classes']})",
        "name the file after its torchvision builder (e.g. resnet50-<hash>.pth) or pass a "
        "csgd checkpoint",
    )
