"""The test session's own guards (tests/conftest.py): an in-process Hydra job under
``capsys`` leaves pytest's capture open for the tests after it (issue 21: two xdist
workers failed every later test of a worker with "I/O operation on closed file")."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

MINI_SUITE = """
import logging.config

import pytest

pytest.importorskip("absl.logging")  # at collection, as `import openvino` does


def test_an_in_process_hydra_job_under_capsys(capsys):
    logging.config.dictConfig({"version": 1})  # what Hydra does to the whole process


def test_the_next_test_is_still_captured():
    print("captured")
"""


def test_an_in_process_hydra_job_leaves_pytests_capture_open(tmp_path: Path) -> None:
    """absl's handler, made at collection on pytest's capture file, closes that file
    when Hydra closes every handler while ``capsys`` holds ``sys.stderr``; the conftest
    binds it to the real stderr. Run as a session of its own, with this conftest."""
    pytest.importorskip("absl.logging")
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_mini.py").write_text(MINI_SUITE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_mini.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "2 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr
