"""One writer per run directory: ``<run dir>/.csgd.lock`` names the csgd process holding it.

The holder (the only process, or rank 0 of a torchrun job for the job) writes a JSON
record: pid, host, boot id, process start time, since, stage, SLURM job id and restart
count, a random token, and ``renewed``: a lease a thread renews every ``lease_s / 3``
(``CSGD_LOCK_LEASE_S``, default 120 s). Any other csgd process is refused while the
holder may be alive; a stale lock is taken over, with a warning saying why it is stale:

- held on this host: its process is gone (or its pid now names another process, by start
  time), or the host has restarted since (boot id);
- held on another host: its lease was not renewed for ``lease_s`` (hosts' clocks are
  assumed in sync, as NTP keeps them), or it was held by an earlier run of this very SLURM
  job (a requeued job: same ``SLURM_JOB_ID``, another ``SLURM_RESTART_COUNT``);
- the file is damaged (not a lock record) and older than a few seconds.

Creating the lock is atomic (a hard link of a complete temporary file, or ``O_EXCL`` where
links are not supported); a takeover replaces the stale file only while it holds a short
``.csgd.lock.break`` file and only if the stale file is unchanged, so two processes racing
for one directory never both win.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common.errors import CsgdError, disk_full, is_disk_full

NAME = ".csgd.lock"
LEASE_S = 120.0
_BREAK_STALE_S = 30.0  # a break file this old was left by a process killed mid-takeover
_YOUNG_S = 5.0  # an unreadable lock this young may still be being written (O_EXCL path)
_WAIT_S = 20.0  # give up taking over after this long (other takers keep winning)


class DirLocked(CsgdError):
    """The run directory is held by a live csgd process; nothing was written."""


@dataclass
class Lock:
    """A held lock: ``took_over`` says why the lock found there was stale (or None)."""

    path: Path
    record: dict[str, Any]
    took_over: str | None = None
    count: int = 1
    lost: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None


_HELD: dict[str, Lock] = {}  # run dir -> the lock this process holds there


def lease_s() -> float:
    raw = os.environ.get("CSGD_LOCK_LEASE_S", str(LEASE_S))
    with contextlib.suppress(ValueError):
        if float(raw) > 0:
            return float(raw)
    raise CsgdError(
        f"CSGD_LOCK_LEASE_S={raw} is not a positive number of seconds",
        f"unset it (default {LEASE_S:.0f} s) or set a number > 0",
    )


# -- who is this process, and is a holder alive ---------------------------------------
def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state first), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks after boot): tells a pid reused from the holder."""
    st = _proc_stat(pid)
    return int(st[19]) if st and len(st) > 19 else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    st = _proc_stat(pid)
    return not (st and st[0] == "Z")  # a zombie has exited; only its parent has not reaped it


def _me(stage: str) -> dict[str, Any]:
    now, job = time.time(), os.environ.get("SLURM_JOB_ID")
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "start": _start_time(os.getpid()),
        "stage": stage,
        "since": now,
        "renewed": now,
        "lease_s": lease_s(),
        "slurm_job": job,
        "slurm_restart": os.environ.get("SLURM_RESTART_COUNT", "0") if job else None,
        "token": uuid.uuid4().hex,
    }


def stale_reason(rec: dict[str, Any]) -> str | None:
    """Why the lock ``rec`` can be taken over, or None while its holder may be alive."""
    pid = int(rec["pid"])
    if rec["host"] == socket.gethostname():
        if rec.get("boot_id") and _boot_id() and rec["boot_id"] != _boot_id():
            return f"host {rec['host']} has restarted since pid {pid} took it"
        if pid == os.getpid():  # not in _HELD: this process took it earlier and let go
            return f"this process (pid {pid}) left it behind"
        if not _alive(pid):
            return f"its process (pid {pid}) is gone"
        if rec.get("start") is not None and _start_time(pid) not in (None, rec["start"]):
            return f"its process (pid {pid}) is gone (the pid now names another process)"
        return None
    job = os.environ.get("SLURM_JOB_ID")
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    if job and rec.get("slurm_job") == job and rec.get("slurm_restart") != restart:
        return f"it was held by an earlier run of this SLURM job {job}, which was requeued"
    age, lease = time.time() - float(rec["renewed"]), float(rec.get("lease_s", LEASE_S))
    if age > lease:
        return f"its lease expired (not renewed for {age:.0f} s, lease {lease:.0f} s)"
    return None


def describe(rec: dict[str, Any]) -> str:
    """'csgd train (pid 12, host n1, since 2024-05-01 10:00:03)'."""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(rec["since"])))
    return f"csgd {rec.get('stage', '?')} (pid {rec['pid']} on host {rec['host']}, since {since})"


def _refusal(run_dir: Path, rec: dict[str, Any]) -> DirLocked:
    note = ""
    if rec["host"] != socket.gethostname():
        age = max(0.0, time.time() - float(rec["renewed"]))
        lease = float(rec.get("lease_s", LEASE_S))
        note = f"; its lease was renewed {age:.0f} s ago (it lapses after {lease:.0f} s unrenewed)"
    return DirLocked(
        f"run directory {run_dir} is in use by {describe(rec)}{note}",
        "wait for it to end or stop it, or pass another hydra.run.dir (a lock whose "
        "process is gone is taken over automatically)",
    )


# -- the file ---------------------------------------------------------------------------
def _read(path: Path) -> tuple[str | None, dict[str, Any] | None]:
    """(raw text, record); (None, None) when there is no lock; (raw, None) when damaged."""
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError):
        return "", None
    try:
        rec = json.loads(raw)
        int(rec["pid"]), float(rec["renewed"]), float(rec["since"]), str(rec["host"])
    except (ValueError, TypeError, KeyError):
        return raw, None
    return raw, rec


def _write_tmp(path: Path, rec: dict[str, Any]) -> Path:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise disk_full(path, e, len(json.dumps(rec)) + 1) from e
        raise
    return tmp


def _create(path: Path, rec: dict[str, Any]) -> bool:
    """Create the lock holding ``rec``; False when one exists already."""
    tmp = _write_tmp(path, rec)
    try:
        os.link(tmp, path)  # atomic, and the file is complete once it is visible
        return True
    except FileExistsError:
        return False
    except OSError as e:  # no hard links here (some FUSE / SMB mounts)
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
    finally:
        tmp.unlink(missing_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(rec) + "\n")
    return True


def _take_over(path: Path, seen: str, rec: dict[str, Any]) -> bool:
    """Replace the stale lock (text ``seen``) by ``rec``; False when another process
    is taking over too, or the lock changed meanwhile (the caller judges it again)."""
    brk = path.with_name(path.name + ".break")
    try:
        os.close(os.open(brk, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        try:
            if time.time() - brk.stat().st_mtime > _BREAK_STALE_S:
                brk.unlink()
        except FileNotFoundError:
            pass
        time.sleep(0.05)
        return False
    try:
        now, _ = _read(path)
        if now != seen:  # released, renewed or taken over meanwhile
            return False
        os.replace(_write_tmp(path, rec), path)
        return True
    finally:
        brk.unlink(missing_ok=True)


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
        rec, took = _claim(run_dir / NAME, _me(stage))
    except OSError as e:  # read-only, no permission (a full disk is a CsgdError already)
        msg = f"cannot lock run directory {run_dir} ({e.strerror or e})"
        raise CsgdError(msg, "pass a writable hydra.run.dir") from e
    lock = Lock(run_dir / NAME, rec, took_over=took)
    lock._thread = threading.Thread(target=_renew, args=(lock,), name="csgd-lock", daemon=True)
    lock._thread.start()
    _HELD[str(run_dir)] = lock
    return lock


def _claim(path: Path, rec: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """Create the lock file, or take over a stale one: (``rec``, why it was stale)."""
    deadline = time.monotonic() + _WAIT_S
    while not _create(path, rec):
        raw, old = _read(path)
        if raw is None:  # released meanwhile: try again
            continue
        if old is None:
            try:
                young = time.time() - path.stat().st_mtime < _YOUNG_S
            except FileNotFoundError:
                continue
            if young:  # being written by an O_EXCL creator
                time.sleep(0.05)
                continue
            why = "the lock file was damaged"
        else:
            why = stale_reason(old)
            if why is None:
                raise _refusal(path.parent, old)
        if _take_over(path, raw, rec):
            return rec, why + (f"; it was held by {describe(old)}" if old else "")
        if time.monotonic() > deadline:
            raise CsgdError(
                f"could not take over the stale lock {path}: other processes keep taking it",
                "run one csgd process per run directory",
            )
    return rec, None


def _renew(lock: Lock) -> None:
    """Renew the lease until released. A lock found taken over is never renewed again
    (a warning says so); one deleted by hand is made anew."""
    rec = lock.record
    while not lock._stop.wait(float(rec["lease_s"]) / 3):
        try:
            raw, now = _read(lock.path)
            if raw is None and _create(lock.path, {**rec, "renewed": time.time()}):
                continue
            if now is None or now.get("token") != rec["token"]:
                lock.lost = True
                who = f" to {describe(now)}" if now else ""
                print(
                    f"csgd: warning: lost the lock of {lock.path.parent}{who} (this process's "
                    "lease lapsed): two processes may now write there",
                    file=sys.stderr,
                )
                return
            os.replace(_write_tmp(lock.path, {**rec, "renewed": time.time()}), lock.path)
        except (OSError, CsgdError):  # a full disk or a network-disk hiccup: next period
            continue


def release(lock: Lock) -> None:
    """Let go of ``lock`` (its last holder in this process removes the file)."""
    if _HELD.get(str(lock.path.parent)) is not lock:  # let go of already
        return
    lock.count -= 1
    if lock.count > 0:
        return
    lock._stop.set()
    if lock._thread is not None:
        lock._thread.join(timeout=10)  # never renew after the file is gone
    _HELD.pop(str(lock.path.parent), None)
    _, now = _read(lock.path)
    if now is not None and now.get("token") == lock.record["token"]:
        lock.path.unlink(missing_ok=True)


def release_all() -> None:
    """Let go of every lock this process holds (before ``os._exit``, and at exit)."""
    for lock in list(_HELD.values()):
        lock.count = 1
        release(lock)


atexit.register(release_all)
