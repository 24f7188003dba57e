"""timm networks (an optional extra: ``pip install "csgd[timm]"``), groups traced.

``model=timm model.name=<timm model name> +model.kwargs.<k>=<v>`` builds
``timm.create_model(name, pretrained=False, num_classes=..., in_chans=..., **kwargs)``
shaped by the data set (``in_channels`` -> ``in_chans``; ``image_size`` is the input
the groups are traced with, and the input size of a net that has a fixed one, as ViT).
Nothing is downloaded: timm weights come in as ``init=<file.safetensors|file.pth>``, a
plain ``state_dict`` of the architecture the config names. In the registry a timm
network is ``timm.<name>`` (the ``model=timm`` config says so with ``kwargs.source``).
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

from ..common.errors import CsgdError

PREFIX = "timm."
INSTALL = 'pip install "csgd[timm]" (or pip install timm)'
_PLAIN: dict[str, Any] = {}  # the timm model a config names: what a plain init= file is


@functools.cache
def available() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def require_timm() -> Any:
    """The timm module, or a one-line refusal with the install command."""
    if not available():
        raise CsgdError("model=timm needs the timm package, which is not installed", INSTALL)
    import timm

    return timm


def known(name: str) -> bool:
    return name.startswith(PREFIX) and require_timm().is_model(name.removeprefix(PREFIX))


def require_known(name: str) -> Any:
    """The timm module, or one line: timm missing (the install command), or no such model."""
    timm, bare = require_timm(), name.removeprefix(PREFIX)
    if not timm.is_model(bare):
        near = timm.list_models(f"*{bare.split('_')[0]}*")[:5] or ["resnet18", "convnext_atto"]
        raise CsgdError(
            f"unknown timm model '{bare}'",
            f"pass model.name=<a timm model, e.g. {', '.join(near)}>",
        )
    return timm


def build(
    name: str,
    num_classes: int = 1000,
    in_channels: int = 3,
    image_size: int = 224,
    **kwargs: Any,
) -> nn.Module:
    """timm's ``name`` with random weights, shaped for the data set."""
    timm, bare = require_known(name), name.removeprefix(PREFIX)
    if kwargs.get("pretrained"):
        raise CsgdError(
            "csgd builds timm models without downloading (pretrained=true was given)",
            "download the weights once and pass init=<file.safetensors|file.pth>",
        )
    kw = {**kwargs, "pretrained": False, "num_classes": num_classes, "in_chans": in_channels}
    try:
        model = timm.create_model(bare, **kw)
        if model.pretrained_cfg.get("fixed_input_size") and "img_size" not in kwargs:
            model = timm.create_model(bare, **kw, img_size=image_size)  # ViT-like nets
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CsgdError(
            f"bad arguments for timm model '{bare}': {first[:200]}", "check model.kwargs"
        ) from None
    model.input_shape = (in_channels, image_size, image_size)
    return model


def name_plain_state_dicts(name: str, kwargs: dict[str, Any]) -> None:
    """The config's model (``model=timm``) is what a plain ``init=`` state dict holds."""
    _PLAIN.clear()
    if kwargs.get("source") == "timm" or name.startswith(PREFIX):
        extra = {k: v for k, v in kwargs.items() if k != "source"}
        _PLAIN.update(name=PREFIX + name.removeprefix(PREFIX), kwargs=extra)


def plain_checkpoint(sd: dict[str, Any], label: str) -> dict[str, Any] | None:
    """A plain state dict as a checkpoint of the timm model the config names (None when
    it names none): classes and input channels read from the file's own tensors, keys
    and shapes checked against the architecture (one line naming the misfit)."""
    if not _PLAIN:
        return None
    name, kw = _PLAIN["name"], dict(_PLAIN["kwargs"])
    cfg = build(name, **kw).pretrained_cfg
    for key, arg, dim in (
        (cfg.get("classifier"), "num_classes", 0),
        (cfg.get("first_conv"), "in_channels", 1),
    ):
        w = sd.get(f"{key}.weight") if isinstance(key, str) else None
        if w is not None and w.dim() > dim:
            kw[arg] = int(w.shape[dim])
    want = build(name, **kw).state_dict()
    counters = {k: v for k, v in want.items() if k.endswith("num_batches_tracked")}
    sd = {**counters, **sd}  # timm's published weights leave BN's step counters out
    missing = [k for k in want if k not in sd]
    extra = [k for k in sd if k not in want]
    shapes = [k for k in want if k in sd and tuple(sd[k].shape) != tuple(want[k].shape)]
    if missing or extra or shapes:
        k = (missing or extra or shapes)[0]
        raise CsgdError(
            f"{label} is not a state dict of timm model {name.removeprefix(PREFIX)} "
            f"({len(missing)} keys missing, {len(extra)} unexpected, {len(shapes)} of "
            f"another shape; e.g. {k})",
            "pass the weights of the model.name you give (timm's .safetensors or .pth)",
        )
    return {"arch": {"name": name, "kwargs": kw}, "state_dict": sd}
