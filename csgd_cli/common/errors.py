"""User-facing errors: one line naming the problem and the fix, exit code 2."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

# A write that cannot fit: disk full, quota exceeded, or a file-size limit (``ulimit -f``:
# the write fails with EFBIG). The user's fix is the same for each, so is the message.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class CsgdError(Exception):
    """Bad input or a state the user can fix; printed as one line, exit code 2."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None) -> None:
        msg = problem if fix is None else f"{problem}; {fix}"
        super().__init__(msg.replace("\n", " "))


class NotConverged(CsgdError):
    """`csgd check`: clusters have not collapsed yet (exit 1, not a usage error)."""

    exit_code = 1


class Preempted(CsgdError):
    """SIGTERM arrived: a checkpoint was written; resume with ``resume=true``.

    Exit code 143 (128 + SIGTERM), what schedulers expect from a job ended by SIGTERM;
    the CLI adds the resume command (it knows the run directory)."""

    exit_code = 143


def raise_preempted(*_: object) -> None:
    """SIGTERM handler outside a training loop: stop at once (every file write is atomic)."""
    raise Preempted(
        "stopped by SIGTERM outside a training loop; every file written so far is complete"
    )


def is_disk_full(e: BaseException) -> bool:
    """True for an ``OSError`` saying the data did not fit (see ``_NO_SPACE``)."""
    return isinstance(e, OSError) and e.errno in _NO_SPACE


def _size(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} bytes"
    units = ("KiB", "MiB", "GiB", "TiB")
    i = 0
    while n >= 1024 and i < len(units):
        n, i = n / 1024, i + 1
    return f"{n:.1f} {units[i - 1]}"


def disk_full(path: str | os.PathLike[str], e: OSError, need: int | None = None) -> CsgdError:
    """The one-line error for a write of ``need`` bytes to ``path`` that did not fit."""
    where = Path(path).parent
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = f"{_size(shutil.disk_usage(where).free)} free there"
    except OSError:
        free = "free space unknown"
    needs = free if need is None else f"it needs {_size(need)}, {free}"
    return CsgdError(
        f"could not write {path}: disk full or file too large ({e.strerror or e}); {needs}",
        "free space on that disk (or raise the file-size limit, `ulimit -f`) and run again;"
        " the files written before are complete (a training run continues with resume=true)",
    )
