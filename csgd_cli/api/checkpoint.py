"""Checkpoints: atomic writes, safe loads (``weights_only=True``), rebuilding the network
a checkpoint holds, and what stages check about one (data shape, architecture, clusters)."""

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

from ..common.errors import CsgdError
from ..common.files import atomic_write
from ..models import get_model
from ..rules.layers import fit_to_state_dict, member_tensors, with_versions
from ..tracing.trace import channel_groups
from .record import USER_ARCH, PruneRecord, upgrade

REQUIRED = ("arch", "state_dict")
# What a checkpoint's keys mean. Every file csgd writes says its format; a file without
# one is format 1 (written before formats were recorded; its keys are those of format 2).
# Change FORMAT when a key is renamed, dropped or changes meaning. Format 3 keeps what
# it says about groups, clusters, widths and targets in one record (``record.KEY``).
FORMAT = 3
# What continuing a training phase from its last.pt reads (``Trainer.restore``).
RESUME_KEYS = ("state_dict", "phase", "epoch", "step_in_epoch", "optimizer", "scheduler", "rng")


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
    """Write atomically (``files.atomic_write``): a kill or a full disk mid-save leaves the
    previous file intact; temporary files of writers killed earlier are removed first."""
    path = Path(path)
    buf = io.BytesIO()
    _remove_stale_temps(path)  # first: on a full disk, their space may be what is missing
    try:
        torch.save(_plain({**payload, "format": FORMAT}), buf)
        atomic_write(path, buf.getvalue())  # a full disk: errors.disk_full, old file kept
    except OSError as e:
        raise CsgdError(
            f"could not write checkpoint {path} ({e.strerror or e})",
            "free disk space or pass a writable hydra.run.dir",
        ) from e
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


_CACHE: dict[str, tuple[tuple[int, ...], dict[str, Any]]] = {}  # path -> (stat, checkpoint)


def _label(path: str | Path, key: str | None) -> tuple[str, str]:
    """How a message names the file, and the fix: ``ckpt=<path>`` for a config key; the
    path alone for a file passed to the API (``key=None``) or written by the run itself
    (``key="run"``)."""
    if key is None:
        return str(path), "pass the path of a complete .pt file written by csgd"
    if key == "run":
        return str(path), "this run wrote it earlier: delete it, then resume again"
    return f"{key}={path}", f"pass {key}= a complete .pt file written by csgd"


def load_checkpoint(
    path: str | Path,
    key: str | None = "ckpt",
    *,
    state_dict_ok: bool = False,
    need: tuple[str, ...] = REQUIRED,
) -> dict[str, Any]:
    """Load a csgd checkpoint without running any code from it. ``key``: the config key
    that named the file (messages say ``key=path``), None or "run" (see ``_label``).
    ``state_dict_ok``: a plain torchvision ``state_dict`` (``.pth``) is accepted too.
    ``need``: the keys the caller reads (``check_format``).

    The last checkpoints read stay in memory while their files are unchanged (size and
    mtime, inode: every csgd write is a rename), so the preflight and the stage after it read a file once; treat the returned
    dict as read-only."""
    p = Path(path)
    label, fix = _label(path, key)
    if not p.is_file():
        raise CsgdError(f"{label}: no such file", fix)
    st = p.stat()
    stamp, where = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns), str(p.resolve())
    if where in _CACHE and _CACHE[where][0] == stamp:
        ck = _CACHE[where][1]
    else:
        ck = _read(p, label, fix)
        while len(_CACHE) >= 2:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[where] = (stamp, ck)
    plain = isinstance(ck, dict) and "arch" not in ck and "format" not in ck
    if state_dict_ok and plain:  # torchvision's or timm's .pth / .safetensors
        from ..models import plain_checkpoint

        return plain_checkpoint(ck, str(path), label)
    if not isinstance(ck, dict) or ("format" not in ck and any(k not in ck for k in REQUIRED)):
        raise CsgdError(f"{label} is not a csgd checkpoint (no arch/state_dict)", fix)
    check_format(ck, label, tuple(dict.fromkeys((*REQUIRED, *need))))
    return upgrade(ck)  # an older file: a merged network's widths where they are read now


def check_format(ck: dict[str, Any], label: str, need: tuple[str, ...] = REQUIRED) -> None:
    """Refuse a checkpoint of a newer format (its keys may mean other things), or of an
    older one without a key in ``need``, with one line naming both formats."""
    v = ck.get("format", 1)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise _damaged(label, f"its format version {v!r} is not a positive integer")
    if v > FORMAT:
        raise CsgdError(
            f"{label} was written by a newer csgd (checkpoint format {v}; this csgd reads "
            f"formats 1 to {FORMAT})",
            "upgrade csgd (pip install -U csgd), or use a checkpoint written by this version",
        )
    missing = [k for k in need if k not in ck]
    if missing and v < FORMAT:
        raise CsgdError(
            f"{label} was written by an older csgd (checkpoint format {v}; this csgd writes "
            f"format {FORMAT}) and lacks {', '.join(missing)}",
            "use it with the csgd version that wrote it, or start anew from a checkpoint "
            "this version wrote",
        )
    if missing:
        raise _damaged(label, f"format {v} checkpoint without {', '.join(missing)}")


def _read(p: Path, label: str, fix: str) -> Any:
    if p.suffix == ".safetensors":  # tensors only (timm's weight files): no code to run
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CsgdError(
                f"{label} needs the safetensors package", "pip install safetensors"
            ) from None
        try:
            return load_file(str(p))
        except Exception as e:  # a cut or foreign file
            raise CsgdError(
                f"{label} is not a readable .safetensors file ({type(e).__name__})", fix
            ) from e
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise for users
            warnings.simplefilter("ignore")
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found:  # the pickle names a callable or class: loading it could run code
            raise CsgdError(
                f"{label} refers to Python code ({found.group(1)}), which could run on load; "
                "refused (csgd loads with weights_only=True and runs no code from a file)",
                "only load checkpoints written by csgd",
            ) from e
        raise CsgdError(
            f"{label} is truncated, damaged or not a checkpoint (a pickle csgd cannot read safely)",
            fix,
        ) from e
    except Exception as e:  # zip, pickle and storage errors of a cut or foreign file
        raise CsgdError(
            f"{label} is truncated, damaged or not a checkpoint ({type(e).__name__})", fix
        ) from e


def build_model(arch: dict[str, Any]) -> nn.Module:
    return get_model(arch["name"], **arch.get("kwargs", {}))


def _damaged(where: str, what: str, e: BaseException | None = None) -> CsgdError:
    detail = f" ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})" if e else ""
    return CsgdError(
        f"{where}: {what}{detail}",
        "the checkpoint is damaged or was edited; use one written by csgd",
    )


def model_from_checkpoint(ck: dict[str, Any], where: str = "the checkpoint") -> nn.Module:
    """Rebuild the network a checkpoint holds (csgd's registry only: no callable named by
    the file runs unless the user trusted it). ``where`` names the file in messages."""
    arch = ck["arch"]
    if not (
        isinstance(arch, dict)
        and isinstance(arch.get("name"), str)
        and isinstance(ck["state_dict"], dict)
    ):
        raise _damaged(where, "the checkpoint's arch or state_dict is malformed")
    if arch["name"] == USER_ARCH:
        cls = str(arch.get("class", "YourNet"))
        raise CsgdError(
            f"{where} holds a network of your own class ({cls}), which csgd does not build",
            f"pass a fresh instance: load_model(path, model={cls.rsplit('.', 1)[-1]}(...))",
        )
    if arch["name"] == "custom":
        from ..models.custom import require_trusted

        require_trusted(arch.get("kwargs", {}).get("target"), where)
    try:
        model = build_model(arch)
    except CsgdError:
        raise
    except Exception as e:  # widths or kwargs no constructor accepts
        raise _damaged(where, f"cannot rebuild architecture {arch['name']}", e) from e
    merged = arch.get("group_widths") is not None  # a merged traced model: resized by rules
    if merged:  # only what the merge cut may differ from the architecture it names
        check_shapes(
            model, ck, where, "the checkpoint is damaged or was edited; use one written by csgd"
        )
    load_into(model, ck["state_dict"], where, resize=merged, widths=arch.get("group_widths"))
    if merged:
        model.arch = arch
    return model


def load_into(
    model: nn.Module, sd: dict[str, Any], where: str, resize: bool = True, widths: Any = None
) -> nn.Module:
    """Load ``sd`` into ``model``; ``resize``: first give its layers a merged state dict's
    shapes by their rules (``widths``: the groups', e.g. heads). Names the first misfit."""
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    extra = [k for k in sd if k not in want]
    shape = [k for k in want if k in sd and getattr(sd[k], "shape", None) != want[k].shape]
    if resize:
        shape = []
    if missing or extra or shape:
        first = (missing or extra or shape)[0]
        if not (missing or extra):  # both shapes: another class count reads at once
            first += f" is {list(sd[first].shape)} in the file, {list(want[first].shape)} here"
        name = (getattr(model, "arch", None) or {}).get("name", type(model).__name__)
        raise _damaged(
            where,
            f"weights do not fit architecture {name} ({len(missing)} missing, "
            f"{len(extra)} unexpected, {len(shape)} of another shape; first: {first})",
        )
    dtypes = {v.dtype for v in sd.values() if torch.is_tensor(v) and v.is_floating_point()}
    if len(dtypes) == 1:  # the file's precision (a float64 model loads as float64)
        model.to(dtype=dtypes.pop())
    try:
        if resize:
            fit_to_state_dict(model, sd, widths)
        else:
            model.load_state_dict(with_versions(sd, want))
    except (RuntimeError, TypeError) as e:
        raise _damaged(where, "weights do not load into the network", e) from e
    return model


def check_shapes(model: nn.Module, ck: dict[str, Any], where: str, fix: str = "") -> None:
    """Refuse, in one line, a file whose tensors differ from ``model``'s anywhere a merge
    cannot have changed them (another class count, another stem): only the dimensions
    the merged groups cut (the file's ``group_widths``) may differ."""
    want, sd = model.state_dict(), ck["state_dict"]
    cut: set[tuple[str, int]] = set()
    merged = (ck.get("arch") or {}).get("group_widths") or {}  # a merge's (``record.upgrade``)
    if merged:
        try:
            groups = channel_groups(model)
        except CsgdError:  # not traceable without an input: the rules resize as before
            return
        mods = dict(model.named_modules())
        for g in groups:
            for m in g.members if g.name in merged else ():
                p = f"{m.module}." if m.module else ""
                cut.update(
                    (p + attr, dim) for attr, dim, _ in member_tensors(mods[m.module], m.kind)
                )
    for k, v in sd.items():
        w = want.get(k)
        if w is None or not torch.is_tensor(v) or v.shape == w.shape:
            continue
        dims = range(max(v.dim(), w.dim()))
        if v.dim() != w.dim() or any(v.shape[d] != w.shape[d] and (k, d) not in cut for d in dims):
            raise CsgdError(
                f"{where}: {k} is {list(v.shape)} in the file but {list(w.shape)} in the "
                "model passed",
                fix
                or "pass a model built as the file's network was (its class count, its "
                "layers), or load_model(path) without model=",
            )


def base_widths(model: nn.Module, ck: dict[str, Any]) -> dict[str, int]:
    """Original width of every group (kept across iterative rounds)."""
    if original := PruneRecord.from_checkpoint(ck).base_widths:
        return dict(original)
    return {g.name: g.width for g in channel_groups(model)}


def check_fits(ck: dict[str, Any], where: str, info: Any) -> None:
    """Refuse a model built for another data shape (classes, input channels)."""
    kw = ck["arch"].get("kwargs", {})
    for name, want in (("num_classes", info.num_classes), ("in_channels", info.in_channels)):
        if name in kw and kw[name] != want:
            raise CsgdError(
                f"{where} was built for {name}={kw[name]} but dataset {info.name} has {want}",
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


def need_clusters(ck: dict[str, Any], path: str | Path) -> dict[str, list[list[int]]]:
    """The checkpoint's clusters, or a one-line error saying which stage makes them."""
    if clusters := PruneRecord.from_checkpoint(ck).clusters:
        return clusters
    if ck.get("pruned_from") is not None:
        raise CsgdError(
            f"ckpt={path} is a pruned (already merged) model: it has no clusters to check",
            "pass the C-SGD checkpoint it came from (csgd.pt or last.pt of csgd train)",
        )
    raise CsgdError(
        f"ckpt={path} has no clusters (it was not C-SGD trained)",
        "run `csgd train init=<this file>` first",
    )
