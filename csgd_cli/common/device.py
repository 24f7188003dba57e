"""Device choice, mixed precision and loss scaling: the few CUDA-only branches live here."""

from __future__ import annotations

import os

import torch

from .errors import CsgdError


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA (this process's ``LOCAL_RANK`` under torchrun) when present, else CPU."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise CsgdError(
                "device=cuda but no CUDA device is available", "use device=auto or device=cpu"
            )
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def use_channels_last(wanted: bool, device: torch.device) -> bool:
    """NHWC inputs when the config asks (``channels_last``) and the device gains from it
    (CUDA tensor cores; on the CPU the default layout is kept)."""
    return bool(wanted) and device.type == "cuda"


def compile_for_training(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``torch.compile`` for a training forward/backward on ``device``."""
    if device.type == "cpu":
        # Inductor turns CPU convs channels_last, and oneDNN's channels_last weight
        # gradient of a strided 1x1 conv is wrong on some AVX2 CPUs (torch 2.14: eager
        # channels_last shows it too, and the compiled backward even corrupted memory).
        torch._inductor.config.layout_optimization = False
    return torch.compile(model)


def amp_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the GPU has it (no loss scaling needed), else fp16 with a GradScaler."""
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16 else torch.float16


class FlatGradScaler(torch.amp.GradScaler):
    """fp16 loss scaling whose unscale and inf/NaN check is one kernel over the
    optimizer's flat gradient buffer when it has one (``CentripetalSGD._flat_g``: every
    ``param.grad`` is a view into it); other optimizers go tensor by tensor."""

    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):  # type: ignore[override]
        flat = getattr(optimizer, "_flat_g", None)
        if flat is None:
            return super()._unscale_grads_(optimizer, inv_scale, found_inf, allow_fp16)
        with torch.no_grad():
            torch._amp_foreach_non_finite_check_and_unscale_([flat], found_inf, inv_scale)
        return {flat.device: found_inf}
