"""Checkpoints: atomic writes, safe loads (``weights_only=True``), ``load_model``."""

from __future__ import annotations

import io
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CsgdError
from .files import atomic_write
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
    """Write atomically (``files.atomic_write``): a kill mid-save leaves the previous
    file intact; temporary files of writers killed earlier are removed."""
    path = Path(path)
    buf = io.BytesIO()
    try:
        torch.save(_plain(payload), buf)
        atomic_write(path, buf.getvalue())
    except OSError as e:
        raise CsgdError(
            f"could not write checkpoint {path} ({e.strerror or e})",
            "free disk space or pass a writable hydra.run.dir",
        ) from e
    _remove_stale_temps(path)
    return path


def _remove_stale_temps(path: Path) -> None:
    """Delete ``.<name>.<pid>.tmp`` files left by writers that were killed mid-save."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 : -4]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:  # its writer is gone: an incomplete file
            tmp.unlink(missing_ok=True)
        except PermissionError:  # alive, another user's
            continue


def load_checkpoint(path: str | Path, key: str = "ckpt") -> dict[str, Any]:
    """Load a csgd checkpoint without running any code from it."""
    p = Path(path)
    if not p.is_file():
        raise CsgdError(f"{key}={path}: no such file", f"pass {key}= a .pt file written by csgd")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise for users
            warnings.simplefilter("ignore")
            ck = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found:  # the pickle names a callable or class: loading it could run code
            raise CsgdError(
                f"{key}={path} refers to Python code ({found.group(1)}), which could run on load; "
                "refused (csgd loads with weights_only=True and runs no code from a file)",
                "only load checkpoints written by csgd",
            ) from e
        raise CsgdError(
            f"{key}={path} is truncated, damaged or not a checkpoint (a pickle csgd cannot read safely)",
            f"pass {key}= a complete .pt file written by csgd",
        ) from e
    except Exception as e:  # zip, pickle and storage errors of a cut or foreign file
        raise CsgdError(
            f"{key}={path} is truncated, damaged or not a checkpoint ({type(e).__name__})",
            f"pass {key}= a complete .pt file written by csgd",
        ) from e
    if key == "init" and isinstance(ck, dict) and "arch" not in ck:  # torchvision's .pth
        from .models.torchvision_models import arch_of_state_dict

        return {"arch": arch_of_state_dict(ck, str(path), key), "state_dict": dict(ck)}
    if not isinstance(ck, dict) or any(k not in ck for k in REQUIRED):
        raise CsgdError(
            f"{key}={path} is not a csgd checkpoint (no arch/state_dict)",
            f"pass {key}= a .pt file written by csgd",
        )
    return ck


def build_model(arch: dict[str, Any]) -> nn.Module:
    return get_model(arch["name"], **arch.get("kwargs", {}))


def model_from_checkpoint(ck: dict[str, Any], key: str = "ckpt") -> nn.Module:
    arch = ck["arch"]
    if not (
        isinstance(arch, dict)
        and isinstance(arch.get("name"), str)
        and isinstance(ck["state_dict"], dict)
    ):
        raise CsgdError(
            f"{key}: the checkpoint's arch or state_dict is malformed",
            "use a checkpoint written by csgd",
        )
    if arch["name"] == "custom":
        from .models.custom import require_trusted

        require_trusted(arch.get("kwargs", {}).get("target"), key)
    try:
        model = build_model(arch)
    except CsgdError:
        raise
    except Exception as e:  # widths or kwargs no constructor accepts
        raise CsgdError(
            f"{key}: cannot rebuild architecture {arch['name']} from the checkpoint ({type(e).__name__}: {e})",
            "the checkpoint is damaged or was edited; use one written by csgd",
        ) from e
    want, got = model.state_dict(), ck["state_dict"]
    shape_ok = arch.get("group_widths") is not None  # a merged traced model: resized below
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    shape = [k for k in want if k in got and getattr(got[k], "shape", None) != want[k].shape]
    if shape_ok:
        shape = []
    if missing or extra or shape:
        first = (missing or extra or shape)[0]
        raise CsgdError(
            f"{key}: weights do not fit architecture {arch['name']} ({len(missing)} missing, "
            f"{len(extra)} unexpected, {len(shape)} of another shape; first: {first})",
            "the checkpoint is damaged or was edited; use one written by csgd",
        )
    try:
        if shape_ok:
            from .surgery import fit_to_state_dict

            fit_to_state_dict(model, got)
            model.arch = arch
        else:
            model.load_state_dict(got)
    except (RuntimeError, TypeError) as e:
        raise CsgdError(
            f"{key}: weights do not load into architecture {arch['name']} ({str(e).splitlines()[0]})",
            "the checkpoint is damaged or was edited; use one written by csgd",
        ) from e
    return model


def load_model(path: str | Path, trust: tuple[str, ...] = ()) -> nn.Module:
    """Rebuild any checkpoint csgd writes (base, C-SGD, pruned) in eval mode. A
    ``model=custom`` checkpoint names the callable that builds it: pass that dotted path
    in ``trust`` to allow it (no callable a file names is run otherwise)."""
    from .models.custom import trust as trust_targets

    trust_targets(*trust)
    return model_from_checkpoint(load_checkpoint(path)).eval()


# -- what a stage reads from and writes into checkpoints -------------------------------
def payload(cfg: Any, model: nn.Module, ck: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Fields every checkpoint carries besides the training state."""
    from omegaconf import OmegaConf

    return {
        "arch": model.arch,
        "config": OmegaConf.to_yaml(cfg, resolve=True),
        "stage": cfg.stage,
        "seed": cfg.seed,
        "base_widths": base_widths(model, ck),
        "clusters": None,
        **extra,
    }


def base_widths(model: nn.Module, ck: dict[str, Any]) -> dict[str, int]:
    """Original width of every group (kept across iterative rounds)."""
    if ck.get("base_widths"):
        return dict(ck["base_widths"])
    from .groups import channel_groups

    return {g.name: g.width for g in channel_groups(model)}


def check_fits(ck: dict[str, Any], path: str, key: str, info: Any) -> None:
    """Refuse a model built for another data shape (classes, input channels)."""
    kw = ck["arch"].get("kwargs", {})
    for name, want in (("num_classes", info.num_classes), ("in_channels", info.in_channels)):
        if name in kw and kw[name] != want:
            raise CsgdError(
                f"{key}={path} was built for {name}={kw[name]} but dataset {info.name} has {want}",
                "pass the dataset= the checkpoint was trained on",
            )


def check_arch(ck: dict[str, Any], path: str, key: str, model_name: str) -> None:
    """Refuse weights of another architecture than an explicit ``model=``."""
    have = ck["arch"].get("name")
    if have != model_name:
        raise CsgdError(
            f"{key}={path} holds a {have} but model={model_name} was given",
            f"drop model= to continue the {have}, or pass {key}= a {model_name} checkpoint",
        )


def need_clusters(ck: dict[str, Any], path: str) -> dict[str, list[list[int]]]:
    """The checkpoint's clusters, or a one-line error saying which stage makes them."""
    if ck.get("clusters"):
        return ck["clusters"]
    if ck.get("pruned_from") is not None:
        raise CsgdError(
            f"ckpt={path} is a pruned (already merged) model: it has no clusters to check",
            "pass the C-SGD checkpoint it came from (csgd.pt or last.pt of csgd train)",
        )
    raise CsgdError(
        f"ckpt={path} has no clusters (it was not C-SGD trained)",
        "run `csgd train init=<this file>` first",
    )
