"""Checkpoints: atomic writes, safe loads (``weights_only=True``), ``load_model``."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CsgdError
from .models import get_model

REQUIRED = ("arch", "state_dict")


def _plain(obj: Any) -> Any:
    """Detach tensors into compact, contiguous copies (params may be buffer views)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write to a temporary file in the same directory, fsync, then rename over ``path``:
    a kill mid-save leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(_plain(payload), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(path: str | Path, key: str = "ckpt") -> dict[str, Any]:
    """Load a csgd checkpoint without running any code from it."""
    p = Path(path)
    if not p.is_file():
        raise CsgdError(f"{key}={path}: no such file", f"pass {key}= a .pt file written by csgd")
    try:
        ck = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CsgdError(
            f"{key}={path} holds objects other than tensors and plain containers; refused to "
            "load it (weights_only=True runs no code from a file)",
            "only load checkpoints written by csgd",
        ) from e
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise CsgdError(
            f"{key}={path} is truncated or not a checkpoint ({type(e).__name__})",
            f"pass {key}= a complete .pt file written by csgd",
        ) from e
    if not isinstance(ck, dict) or any(k not in ck for k in REQUIRED):
        raise CsgdError(
            f"{key}={path} is not a csgd checkpoint (no arch/state_dict)",
            f"pass {key}= a .pt file written by csgd",
        )
    return ck


def build_model(arch: dict[str, Any]) -> nn.Module:
    return get_model(arch["name"], **arch.get("kwargs", {}))


def model_from_checkpoint(ck: dict[str, Any], key: str = "ckpt") -> nn.Module:
    model = build_model(ck["arch"])
    try:
        model.load_state_dict(ck["state_dict"])
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise CsgdError(
            f"{key}: weights do not fit architecture {ck['arch']['name']} ({first})",
            "the checkpoint is damaged or was edited; use one written by csgd",
        ) from e
    return model


def load_model(path: str | Path) -> nn.Module:
    """Rebuild any checkpoint csgd writes (base, C-SGD, pruned) in eval mode."""
    return model_from_checkpoint(load_checkpoint(path)).eval()
