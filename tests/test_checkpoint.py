"""Checkpoints (``csgd_cli.api.checkpoint``): atomic saves that a kill or a full disk
cannot damage, safe loading (a crafted pickle is refused), and messages that name the
file by its path or by the key that gave it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_DIGITS
from csgd_procs import ENV, TIMEOUT, one_line

from csgd_cli.api.checkpoint import load_checkpoint
from csgd_cli.common.errors import CsgdError

FAST = [*TINY_DIGITS, "schedule.epochs=1", "pretrain.epochs=1", "schedule.log_every=0"]


def sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "csgd_cli", *args], capture_output=True, text=True, env=ENV
    )


# -- messages ------------------------------------------------------------------------------
def test_messages_name_real_keys_and_paths(tmp_path: Path) -> None:
    """4: a file the run wrote is named by its path (never "pruned=..."), a file given to
    the API by its path, a config key as key=path."""
    bad = tmp_path / "base.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CsgdError) as e:
        load_checkpoint(bad, "run")
    assert str(e.value).startswith(f"{bad} is truncated") and "delete it" in str(e.value)
    with pytest.raises(CsgdError) as e:
        load_checkpoint(bad, None)
    assert "=" not in str(e.value).split(" is ")[0]
    with pytest.raises(CsgdError, match=f"init={bad} is truncated"):
        load_checkpoint(bad, "init")
    d = tmp_path / "run"
    d.mkdir()
    (d / "base.pt").write_bytes(b"garbage")
    # prune.force: one epoch cannot converge, and the preflight's forecast says so first
    r = sh("run", *FAST, "prune.force=true", "resume=true", f"hydra.run.dir={d}")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"{d / 'base.pt'} is truncated" in r.stderr and "base=" not in r.stderr


# -- atomic saves ---------------------------------------------------------------------------
_SLOW_SAVE = """
import os, sys, time, torch
from csgd_cli.api.checkpoint import save_checkpoint
os.fsync = lambda fd: time.sleep(60)  # a slow disk: the kill lands inside the save
save_checkpoint(sys.argv[1], {"arch": {"name": "x"}, "state_dict": {"w": torch.ones(8 << 20)}})
"""


def test_kill_during_save_keeps_previous_checkpoint(tmp_path: Path) -> None:
    from csgd_cli.api.checkpoint import load_checkpoint, save_checkpoint

    path = tmp_path / "last.pt"
    save_checkpoint(path, {"arch": {"name": "x"}, "state_dict": {"w": torch.zeros(4)}, "epoch": 1})
    before = path.read_bytes()
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, str(path)], env=ENV)
    deadline = time.monotonic() + TIMEOUT
    while not list(tmp_path.glob(".last.pt.*.tmp")) and time.monotonic() < deadline:
        assert proc.poll() is None, "the writer ended before it was killed"
        time.sleep(0.002)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 1
    stray = list(tmp_path.glob(".last.pt.*.tmp"))
    assert stray and all(not p.name.endswith(".pt") for p in stray), (
        "temp files never look like checkpoints"
    )
    # the next save cleans up what the dead writer left
    save_checkpoint(path, {"arch": {"name": "x"}, "state_dict": {"w": torch.zeros(4)}, "epoch": 2})
    assert load_checkpoint(path)["epoch"] == 2 and not list(tmp_path.glob(".*.tmp"))


def test_failing_save_keeps_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from csgd_cli.api import checkpoint

    path = tmp_path / "last.pt"
    checkpoint.save_checkpoint(path, {"arch": {"name": "x"}, "state_dict": {}, "epoch": 1})

    def half_then_fail(obj: Any, f: Any) -> None:
        f.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", half_then_fail)
    with pytest.raises(checkpoint.CsgdError, match="No space left"):
        checkpoint.save_checkpoint(path, {"arch": {"name": "x"}, "state_dict": {}, "epoch": 2})
    monkeypatch.undo()
    assert checkpoint.load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


# -- safe loading ---------------------------------------------------------------------------
class _RunsCode:
    def __init__(self, fn: Any, args: tuple[Any, ...]) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.fn, self.args


def _crafted(tmp_path: Path, kind: str) -> tuple[Path, Path]:
    """A checkpoint-looking file whose pickle would create ``marker`` when loaded."""
    marker = tmp_path / f"pwned_{kind}"
    evil = (
        _RunsCode(os.system, (f"touch {marker}",))
        if kind == "system"
        else _RunsCode(open, (str(marker), "w"))
    )
    path = tmp_path / f"evil_{kind}.pt"
    payload = {"arch": {"name": "resnet20", "kwargs": {}}, "state_dict": {}, "clusters": evil}
    torch.save(payload, path)  # pickling only records the call; nothing runs here
    assert not marker.exists()
    return path, marker


@pytest.mark.parametrize("kind", ["system", "open"])
def test_crafted_pickle_is_refused_by_load_model(tmp_path: Path, kind: str) -> None:
    import csgd_cli
    from csgd_cli.common.errors import CsgdError

    path, marker = _crafted(tmp_path, kind)
    with pytest.raises(CsgdError, match="could run on load; refused"):
        csgd_cli.load_model(path)
    assert not marker.exists()


def test_crafted_pickle_is_refused_by_the_cli(tmp_path: Path) -> None:
    evil, marker = _crafted(tmp_path, "system")
    run_dir = tmp_path / "eval"
    out = sh("eval", *TINY_DIGITS, f"ckpt={evil}", f"hydra.run.dir={run_dir}")
    rc, err = out.returncode, out.stderr
    assert rc == 2
    line = one_line(err)
    assert "refused" in line and "posix.system" in line and str(evil) in line, line
    assert not marker.exists() and not run_dir.exists()
