"""One writer per run directory: a kernel lock, and a record naming its holder.

``<run dir>/.csgd.lock.flock`` is locked with ``flock`` (through ``filelock``): the kernel
holds it for the process that took it and lets go when that process ends, however it ends
(a kill, a crash, an out-of-memory kill). On a shared disk (NFS v4, GPFS, Lustre mounted
with ``flock``) the file server does the same for a host that went down, once that host's
lease on the server lapses. The file stays in place (empty): removing it would let two
processes lock two different files of one name.

``<run dir>/.csgd.lock`` is the holder's record (pid, host, stage, since when, SLURM job):
only the process holding the kernel lock writes it (atomically) or removes it, so nothing
reads it and then writes on a stale reading. Another process that finds the kernel lock
taken reads the record only to say who holds the directory. A record found while taking
the kernel lock was left by a holder that is gone: it is taken over, with a warning
naming it. A requeued SLURM job (the same ``SLURM_JOB_ID``, another
``SLURM_RESTART_COUNT``) waits up to ``REQUEUE_WAIT_S`` for its earlier run's lock, which
the scheduler has ended but whose host may still be going down.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock

from ..common.errors import CsgdError
from ..common.files import read_json_checked, write_json

NAME = ".csgd.lock"  # the holder's record
KERNEL = NAME + ".flock"  # the file the kernel lock is taken on
REQUEUE_WAIT_S = 180.0  # an NFS v4 server frees a dead client's locks after its lease (90 s)
_RECORD_WAIT_S = 10.0  # the holder writes its record just after taking the kernel lock


class DirLocked(CsgdError):
    """The run directory is held by a live csgd process; nothing was written."""


@dataclass
class Lock:
    """A held lock: ``took_over`` says why the record found there was stale (or None)."""

    path: Path
    record: dict[str, Any]
    kernel: filelock.BaseFileLock
    took_over: str | None = None
    count: int = 1


_HELD: dict[str, Lock] = {}  # run dir -> the lock this process holds there


def _me(stage: str) -> dict[str, Any]:
    job = os.environ.get("SLURM_JOB_ID")
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "stage": stage,
        "since": time.time(),
        "slurm_job": job,
        "slurm_restart": os.environ.get("SLURM_RESTART_COUNT", "0") if job else None,
        "token": uuid.uuid4().hex,
    }


def describe(rec: dict[str, Any]) -> str:
    """'csgd train (pid 12 on host n1, since 2024-05-01 10:00:03)'."""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(rec["since"])))
    return f"csgd {rec.get('stage', '?')} (pid {rec['pid']} on host {rec['host']}, since {since})"


def _read(path: Path) -> tuple[dict[str, Any] | None, bool]:
    """(the record, whether a file was there): (None, True) for a damaged one."""
    rec, damaged = read_json_checked(path)
    try:
        int(rec["pid"]), float(rec["since"]), str(rec["host"])
    except (TypeError, KeyError, ValueError):
        return None, bool(damaged) or rec is not None
    return rec, True


def _alive_here(rec: dict[str, Any]) -> bool:
    """False when ``rec`` names a process of this host that has ended (a stale record
    the kernel lock's new holder is about to replace)."""
    if rec["host"] != socket.gethostname():
        return True
    pid = int(rec["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    with contextlib.suppress(OSError, IndexError):  # a zombie has exited: only not reaped
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] != "Z"
    return True


def _requeued(rec: dict[str, Any]) -> bool:
    """Whether ``rec`` was written by an earlier run of this (requeued) SLURM job."""
    job, restart = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_RESTART_COUNT", "0")
    return bool(job) and rec.get("slurm_job") == job and rec.get("slurm_restart") != restart


def _stale_reason(rec: dict[str, Any] | None) -> str:
    """Why a record found under a free kernel lock is stale (its holder let go)."""
    if rec is None:
        return "the lock file was damaged"
    pid, host = int(rec["pid"]), rec["host"]
    if _requeued(rec):
        job = rec["slurm_job"]
        why = f"it was held by an earlier run of this SLURM job {job}, which was requeued"
    elif host == socket.gethostname() and not _alive_here(rec):
        why = f"its process (pid {pid}) is gone"
    elif host == socket.gethostname():
        why = f"its process (pid {pid}) no longer holds it"
    else:
        why = f"its process (pid {pid} on host {host}) has ended, or that host went down"
    return f"{why}; it was held by {describe(rec)}"


def _refusal(run_dir: Path, rec: dict[str, Any] | None) -> DirLocked:
    who = describe(rec) if rec else "another process (its record is not written yet)"
    note = ""
    if rec and rec["host"] != socket.gethostname():
        note = (
            f"; if host {rec['host']} is down, the file server frees its lock once that "
            "host's lease lapses (about 90 s on NFS)"
        )
    return DirLocked(
        f"run directory {run_dir} is in use by {who}{note}",
        "wait for it to end or stop it, or pass another hydra.run.dir (the lock of a "
        "process that is gone is taken over automatically)",
    )


def _kernel_lock(path: Path) -> filelock.BaseFileLock:
    # fallback_to_soft=False: a lock that survives its holder is what this module replaces
    return filelock.UnixFileLock(path, thread_local=False, fallback_to_soft=False)


def _take(kernel: filelock.BaseFileLock, wait_s: float) -> bool:
    try:
        kernel.acquire(timeout=wait_s, poll_interval=0.05)
    except filelock.Timeout:
        return False
    except OSError as e:
        if e.errno in (errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOLCK):
            raise CsgdError(
                f"the file system of {kernel.lock_file} does not support file locks ({e.strerror})",
                "pass a hydra.run.dir on a local disk, or mount the shared one with locks "
                "(Lustre: -o flock)",
            ) from e
        raise
    return True


# -- holding ----------------------------------------------------------------------------
def acquire(run_dir: str | os.PathLike[str], stage: str) -> Lock:
    """Hold ``run_dir`` for this process (again, if it holds it already), or raise
    ``DirLocked`` naming the live holder. Creates the directory."""
    run_dir = Path(run_dir).resolve()
    held = _HELD.get(str(run_dir))
    if held is not None:
        held.count += 1
        return held
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        kernel = _kernel_lock(run_dir / KERNEL)
        took = _claim(run_dir, kernel)
        rec = _me(stage)
        try:
            write_json(run_dir / NAME, rec)
        except BaseException:
            kernel.release()
            raise
    except OSError as e:  # read-only, no permission (a full disk is a CsgdError already)
        msg = f"cannot lock run directory {run_dir} ({e.strerror or e})"
        raise CsgdError(msg, "pass a writable hydra.run.dir") from e
    lock = Lock(run_dir / NAME, rec, kernel, took_over=took)
    _HELD[str(run_dir)] = lock
    return lock


def _claim(run_dir: Path, kernel: filelock.BaseFileLock) -> str | None:
    """Take the kernel lock: None when the directory was free, why the record found
    there was stale when one was (a holder that is gone), or raise ``DirLocked``."""
    deadline = time.monotonic() + _RECORD_WAIT_S
    while not _take(kernel, 0):
        rec, _ = _read(run_dir / NAME)
        if rec is not None and _requeued(rec):
            print(
                f"csgd: waiting up to {REQUEUE_WAIT_S:.0f} s for the earlier run of SLURM job "
                f"{rec['slurm_job']} to let go of {run_dir}",
                file=sys.stderr,
            )
            if _take(kernel, REQUEUE_WAIT_S):
                break
            raise _refusal(run_dir, rec)
        if rec is not None and _alive_here(rec):
            raise _refusal(run_dir, rec)
        # No record, or a dead one's: the new holder is writing its own; read it again.
        if time.monotonic() > deadline:
            raise _refusal(run_dir, None)
        time.sleep(0.02)
    rec, there = _read(run_dir / NAME)
    return _stale_reason(rec) if there else None


def release(lock: Lock) -> None:
    """Let go of ``lock`` (its last holder in this process removes the record, while it
    still holds the kernel lock, then lets go of that)."""
    if _HELD.get(str(lock.path.parent)) is not lock:  # let go of already
        return
    lock.count -= 1
    if lock.count > 0:
        return
    _HELD.pop(str(lock.path.parent), None)
    try:
        with contextlib.suppress(OSError):
            lock.path.unlink(missing_ok=True)
    finally:
        lock.kernel.release(force=True)


def release_all() -> None:
    """Let go of every lock this process holds (before ``os._exit``, and at exit)."""
    for lock in list(_HELD.values()):
        lock.count = 1
        release(lock)


atexit.register(release_all)
