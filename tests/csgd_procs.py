"""``csgd`` processes that the end-to-end tests start in the background: stderr goes to a
file (readable while the process runs), and ``kill_leftovers`` ends, at a module's
teardown, every process that a failing test left running."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import torch

# a CLI warning line (a forced schedule that cannot converge) is not the error line
WARNING = re.compile(r"^csgd \w+: warning: ")

ENV = {**os.environ, "CSGD_NO_BAR": "1", "OMP_NUM_THREADS": "1"}
TIMEOUT = 300
STARTED: list[subprocess.Popen] = []


def start(argv: list[str], err_path: Path, **env: str) -> subprocess.Popen:
    """Start ``argv`` with stdout discarded and stderr written to ``err_path``."""
    err_path.parent.mkdir(parents=True, exist_ok=True)
    with open(err_path, "w") as err:
        proc = subprocess.Popen(argv, env={**ENV, **env}, stdout=subprocess.DEVNULL, stderr=err)
    proc.err_path = err_path  # type: ignore[attr-defined]
    STARTED.append(proc)
    return proc


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    """Exit code and stderr of a process from ``start``."""
    rc = proc.wait(timeout=TIMEOUT)
    return rc, proc.err_path.read_text()  # type: ignore[attr-defined]


def kill_leftovers() -> None:
    for proc in STARTED:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not WARNING.match(ln)]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert "Traceback" not in stderr
    return lines[0]


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)
