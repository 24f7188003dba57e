"""The stages (``csgd_cli.runner.stages``): each a short script of library calls, none
importing another; what a stage refuses and prints."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_DIGITS

from csgd_cli.common.config import STAGES

PKG = Path(__file__).resolve().parents[1] / "csgd_cli"
ENV = {**os.environ, "CSGD_NO_BAR": "1", "OMP_NUM_THREADS": "1"}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "csgd_cli", *args], capture_output=True, text=True, env=ENV
    )


def test_no_stage_imports_another_stage_and_stages_are_short() -> None:
    for path in sorted((PKG / "runner" / "stages").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:  # from .x import ...
                raise AssertionError(f"{path.name} imports a sibling stage: .{node.module}")
            if isinstance(node, ast.ImportFrom) and "stages" in (node.module or ""):
                raise AssertionError(f"{path.name} imports {node.module}")
        assert len(path.read_text().splitlines()) <= 80, f"{path.name} is not a short script"


@pytest.mark.parametrize("stage", [s for s, d in STAGES.items() if d.weights])
def test_every_stage_declaring_weights_refuses_to_start_without(stage: str, tmp_path) -> None:
    out = cli(stage, *TINY_DIGITS, f"hydra.run.dir={tmp_path / 'r'}")
    assert out.returncode == 2, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert STAGES[stage].hint in line and "Traceback" not in out.stderr
    assert not (tmp_path / "r").exists()


def test_groups_stage_lists_names_widths_and_members() -> None:
    out = cli("groups", "model=resnet20")
    assert out.returncode == 0, out.stderr
    assert "layer2  width 32  prunable" in out.stdout
    assert "layer2.0.shortcut.0" in out.stdout and "layer1.0.conv1  width 16" in out.stdout
    assert "12 groups, 12 prunable, 0 excluded" in out.stdout
