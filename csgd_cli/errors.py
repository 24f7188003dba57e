"""User-facing errors: one line naming the problem and the fix, exit code 2."""

from __future__ import annotations


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
