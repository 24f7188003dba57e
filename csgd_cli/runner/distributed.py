"""Multi-process training under ``torchrun``: one process group, one run directory,
rank-0 writes, and a failure on any rank that stops every rank within a second.

Everything here is a no-op in a single process (``WORLD_SIZE`` unset or 1), so the
one-process path is unchanged. What the stages call:

- ``init(device, cfg.dist)`` once per process, before any stage work (the CLI does it);
- ``broadcast_object(obj)`` for what rank 0 computes alone (clusters);
- ``on_main(fn, ...)`` / ``is_main()`` + ``barrier()`` for files other ranks then read.

``Trainer``, ``evaluate`` and ``build_data`` handle the rest (DDP, SyncBatchNorm, the
per-rank batch split, reduced metrics, rank-0 checkpoints).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from ..common.errors import CsgdError
from ..rules.queries import plain_batchnorm2d

T = TypeVar("T")
_FAIL_KEY = "csgd/failed"  # "<rank>|<exit code>|<message>" of the first rank that failed
_POLL_S = 0.2
_GRACE_S = 2.0  # lets the failing rank exit first, so torchrun names it as the root cause
_settings: dict[str, Any] = {"sync_bn": False, "store": None, "watchdog": None}
_finished = threading.Event()  # set once every rank has passed the final barrier


def rank_world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment (or a submitit SLURM job's tasks);
    (0, 1) for a single process."""
    if "RANK" not in os.environ and os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        if int(os.environ.get("SLURM_NTASKS", "1")) > 1:  # one task per GPU
            from submitit.helpers import TorchDistributedEnvironment

            TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return rank_world()[0] == 0


def active() -> bool:
    """True inside an initialised job of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init(device: torch.device, conf: Any = None) -> None:
    """Join the job torchrun started (NCCL on CUDA, gloo on the CPU; ``conf`` is
    ``cfg.dist``: backend, timeout_s, sync_bn) and start the failure watchdog."""
    rank, world = rank_world()
    if world <= 1 or dist.is_initialized():
        return
    backend = str(getattr(conf, "backend", "auto") or "auto")
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend not in ("gloo", "nccl") or (backend == "nccl" and device.type != "cuda"):
        raise CsgdError(
            f"dist.backend={backend} does not run on device {device.type}",
            "use dist.backend=auto (NCCL on CUDA, gloo on the CPU)",
        )
    timeout = timedelta(seconds=float(getattr(conf, "timeout_s", 1800)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=timeout)
    _settings["sync_bn"] = bool(getattr(conf, "sync_bn", False))
    # A second client of torchrun's store, used only by the watchdog and `fail`.
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, False, timeout=timeout
    )
    _settings["store"] = store
    _finished.clear()
    t = threading.Thread(target=_watch, args=(store, rank), name="csgd-watchdog", daemon=True)
    t.start()
    _settings["watchdog"] = t
    if rank != 0:  # only rank 0 writes the run's log file and logs progress
        root = logging.getLogger()
        for h in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
            root.removeHandler(h)
        logging.getLogger("csgd").setLevel(logging.WARNING)


def _watch(store: Any, rank: int) -> None:
    """Exit this process at once when another rank has failed: its main thread may be
    blocked in a collective that would otherwise wait for the whole timeout."""
    import time

    while not _finished.is_set():
        time.sleep(_POLL_S)
        try:
            if not store.check([_FAIL_KEY]):
                continue
            origin, code, msg = _parse(store.get(_FAIL_KEY))
        except Exception:  # the store is gone: its host (rank 0 or torchrun) has ended
            origin, code, msg = -1, 1, "the job's store is gone (its host process ended)"
        if origin != rank:
            time.sleep(_GRACE_S)  # let the failing rank exit first (and name itself)
            if _finished.is_set():  # this job ended normally meanwhile
                return
            who = f"rank {origin} failed" if origin >= 0 else "lost the job"
            print(f"csgd: rank {rank} stopped: {who}: {msg}", file=sys.stderr)
            sys.stderr.flush()
            os._exit(code)


def _parse(raw: bytes) -> tuple[int, int, str]:
    origin, code, msg = raw.decode().split("|", 2)
    return int(origin), int(code), msg


def fail(code: int, message: str) -> int | None:
    """Record that this rank failed so every rank stops. Returns None when this rank
    should report the failure (one process, or the first rank to fail), else the exit
    code of the rank that failed first (then exit quietly with it)."""
    store = _settings["store"]
    if store is None:
        return None
    rank = rank_world()[0]
    mine = f"{rank}|{code}|{message.replace(chr(10), ' ')}"
    try:
        now = store.compare_set(_FAIL_KEY, "", mine)
    except Exception:  # store unreachable: report it here
        return None
    origin, first_code, _ = _parse(now)
    return None if origin == rank else first_code


def exit_now(code: int) -> None:
    """End this process with ``code``: at once in a job (exiting with a live process
    group can take seconds, and torchrun should see the failing rank end first),
    by ``SystemExit`` otherwise."""
    if not active():
        raise SystemExit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` as rank ``src`` holds it, on every rank (picklable objects)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(fn: Callable[..., T], *args: Any, **kw: Any) -> T | None:
    """Run ``fn`` (a write) on rank 0 only; every rank continues once it is done."""
    out = fn(*args, **kw) if is_main() else None
    barrier()
    return out


def shared_run_dir(out: Path) -> Path:
    """Rank 0's run directory, on every rank. Hydra resolves ``${now:...}`` per process,
    so ranks started across a second boundary would disagree; a directory this rank's
    Hydra created and nobody else uses (only its log file in it) is removed."""
    if not active():
        return out
    chosen = broadcast_object(Path(out))
    if Path(out).resolve() != chosen.resolve() and Path(out).is_dir():
        if all(p.suffix == ".log" or p.name == ".hydra" for p in Path(out).iterdir()):
            shutil.rmtree(out, ignore_errors=True)
    return chosen


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums of ``values`` over every rank (float64; identical on every rank)."""
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device(device))
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on one of them."""
    if not active():
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32, device=_comm_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _comm_device(device: torch.device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def shutdown() -> None:
    """Leave the process group after the stage has finished on every rank."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        _finished.set()
        watchdog = _settings.get("watchdog")
        if watchdog is not None:  # a thread left inside a store call aborts the exit
            watchdog.join(timeout=10 * _POLL_S)
            _settings["watchdog"] = None
        dist.destroy_process_group()
    _settings["store"] = None


# -- the model under DDP ------------------------------------------------------------------


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose gradient is the sum over ranks of the incoming gradients."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        g = g.clone()
        dist.all_reduce(g)
        return g


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the global batch (every rank).

    Works on the CPU (gloo) and on CUDA, unlike ``nn.SyncBatchNorm``. Each rank's
    mean and variance are exchanged with one all-reduce and merged exactly (Chan's
    parallel formula); the all-reduce is differentiable, so gradients flow through the
    global statistics as in one process. Modules are switched by class, so parameters,
    buffers and the module tree stay the same objects."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(x)
        c, w, r = x.shape[1], dist.get_world_size(), dist.get_rank()
        # statistics in float32 for half/bfloat16 inputs; float32/float64 stay as they are
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        var, mean = torch.var_mean(xf, dim=(0, 2, 3), correction=0)
        n = xf.new_full((1,), x.numel() // c)
        row = torch.cat([mean, var, n]).unsqueeze(0)
        rows = _AllReduceSum.apply(
            torch.cat([row.new_zeros(r, 2 * c + 1), row, row.new_zeros(w - r - 1, 2 * c + 1)])
        )
        ns, means, vars_ = rows[:, -1:], rows[:, :c], rows[:, c : 2 * c]
        total = ns.sum()
        g_mean = (ns * means).sum(0) / total
        g_var = (ns * (vars_ + (means - g_mean) ** 2)).sum(0) / total
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (
                    1.0 / float(self.num_batches_tracked)
                    if self.momentum is None
                    else self.momentum
                )
                unbiased = g_var * (total / (total - 1).clamp(min=1))
                self.running_mean.mul_(1 - m).add_(g_mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach(), alpha=m)
        shape = (1, c, 1, 1)
        y = (xf - g_mean.view(shape)) * torch.rsqrt(g_var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The module to run the forward pass with: DDP over ``model`` (its BatchNorm2d
    switched to SyncBatchNorm2d with ``dist.sync_bn``) in a job, ``model`` alone
    otherwise. Build the optimizer first: DDP keeps its gradients in ``param.grad``
    (``gradient_as_bucket_view=False``), so they land, averaged over ranks, in the
    tensors the optimizer already holds (CentripetalSGD's flat buffer) before ``step``."""
    if not active():
        return model
    if _settings["sync_bn"]:
        for m in model.modules():
            if plain_batchnorm2d(m):
                m.__class__ = SyncBatchNorm2d
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids, gradient_as_bucket_view=False)


def unwrap(model: nn.Module) -> None:
    """Undo ``wrap``'s SyncBatchNorm switch (drop the DDP object to free its hooks)."""
    for m in model.modules():
        if type(m) is SyncBatchNorm2d:
            m.__class__ = nn.BatchNorm2d


def sync_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers after training: without SyncBatchNorm each rank's
    last forward updated its BN running statistics from its own samples, and what comes
    next (the merge check, evaluation) must see the model rank 0 saved."""
    if active():
        with torch.no_grad():
            for b in model.buffers():
                dist.broadcast(b, src=0)
