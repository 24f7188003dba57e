"""How a stage ends, as the CLI reports it: a one-line error or a preemption on stderr,
``status.json`` in the run directory, a crashed sweep point's traceback in
``error.txt``, the other ranks of a job stopped, every lock let go before the exit."""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from pathlib import Path

from ..common.config import cli_words
from ..common.errors import CsgdError, Preempted
from ..common.files import write_json
from . import lock


def stop_others(code: int, message: str) -> None:
    """Under torchrun: stop every rank; only the first rank to fail reports."""
    from . import distributed

    first = distributed.fail(code, message)
    if first is not None:  # another rank failed first and said why
        distributed.exit_now(first)


def leave(code: int) -> None:
    """Let go of every lock, then exit (``os._exit`` in a job skips every ``finally``)."""
    from . import distributed

    lock.release_all()
    distributed.exit_now(code)


def preempted(stage: str, e: Preempted, out: Path, multirun: bool) -> None:
    stop_others(e.exit_code, str(e))
    print(
        f"csgd {stage}: preempted: {e}; continue with `csgd {stage} <the same overrides> "
        f"resume=true hydra.run.dir={out}`",
        file=sys.stderr,
    )
    if multirun:  # a preempted sweep stops: the scheduler wants the machine back
        status(out, "preempted", str(e))
    leave(e.exit_code)


def failed(stage: str, e: CsgdError, out: Path, multirun: bool) -> None:
    stop_others(e.exit_code, str(e))
    print(f"csgd {stage}: error: {cli_words(e)}", file=sys.stderr)
    if not multirun:
        leave(e.exit_code)
    if not isinstance(e, lock.DirLocked):  # the directory is another process's
        status(out, "failed", cli_words(e))
    _record_failure(out)


def point_crashed(stage: str, e: Exception, out: Path) -> None:
    """One failed sweep point must not stop the others; keep its traceback."""
    with contextlib.suppress(OSError):
        (out / "error.txt").write_text(traceback.format_exc())
    print(f"csgd {stage}: run {out} failed: {type(e).__name__}: {e}", file=sys.stderr)
    status(out, "failed", f"{type(e).__name__}: {e}")
    _record_failure(out)


def _record_failure(out: Path) -> None:
    """Name the failed point in the file ``cli.main`` reads after the sweep: a launcher
    may run the points in other processes, and the sweep's exit code must say so."""
    log = os.environ.get("CSGD_FAIL_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{out}\n")


def status(out: Path, state: str, message: str) -> None:
    """``status.json``: ``ok``, ``failed`` or ``preempted``, with the one line that says why."""
    try:
        write_json(out / "status.json", {"status": state, "message": message})
    except CsgdError as e:  # a full disk: the failure is on stderr already
        print(f"csgd: warning: {e}", file=sys.stderr)
