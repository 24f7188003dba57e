"""How a stage ends as the CLI reports it (``csgd_cli.runner.outcome``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from csgd_cli.common.errors import CsgdError, Preempted
from csgd_cli.runner import lock, outcome


def _status(out: Path) -> dict:
    return json.loads((out / "status.json").read_text())


def test_status_is_written_with_its_message(tmp_path: Path) -> None:
    outcome.status(tmp_path, "ok", "")
    assert _status(tmp_path) == {"status": "ok", "message": ""}
    outcome.status(tmp_path, "failed", "bad lr")  # a later outcome replaces the earlier
    assert _status(tmp_path) == {"status": "failed", "message": "bad lr"}


def test_status_on_a_full_disk_is_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def full(*_: object) -> None:
        raise CsgdError("could not write status.json: disk full", "free space")

    monkeypatch.setattr(outcome, "write_json", full)
    outcome.status(tmp_path, "failed", "x")  # no exception: the failure is on stderr already
    err = capsys.readouterr().err
    assert err.startswith("csgd: warning: could not write status.json: disk full")
    assert not (tmp_path / "status.json").exists()


def test_a_failed_sweep_point_says_so_and_is_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "failed.txt"
    monkeypatch.setenv("CSGD_FAIL_LOG", str(log))
    out = tmp_path / "point0"
    out.mkdir()
    outcome.failed("train", CsgdError("epsilon=-1 is out of range", "pass epsilon > 0"), out, True)
    err = capsys.readouterr().err
    assert err.startswith("csgd train: error: epsilon=-1 is out of range") and "\n" == err[-1]
    assert _status(out)["status"] == "failed" and "epsilon=-1" in _status(out)["message"]
    assert log.read_text().split() == [str(out)]


def test_a_locked_directory_is_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The directory belongs to the process that holds it: no status.json written there."""
    monkeypatch.setenv("CSGD_FAIL_LOG", str(tmp_path / "failed.txt"))
    outcome.failed("train", lock.DirLocked("run directory x is in use", "wait"), tmp_path, True)
    assert "is in use" in capsys.readouterr().err
    assert not (tmp_path / "status.json").exists()


def test_a_single_run_that_failed_exits_with_the_errors_code(tmp_path: Path) -> None:
    err = CsgdError("no checkpoint", "pass ckpt=")
    with pytest.raises(SystemExit) as info:
        outcome.failed("prune", err, tmp_path, False)
    assert info.value.code == err.exit_code != 0
    assert not (tmp_path / "status.json").exists()  # a single run reports on stderr only


def test_a_crashed_point_keeps_its_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CSGD_FAIL_LOG", str(tmp_path / "failed.txt"))
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError as e:
        outcome.point_crashed("run", e, tmp_path)
    assert "Traceback" in (tmp_path / "error.txt").read_text()
    assert "ZeroDivisionError: division by zero" in capsys.readouterr().err
    assert _status(tmp_path) == {
        "status": "failed",
        "message": "ZeroDivisionError: division by zero",
    }


def test_a_preempted_sweep_says_how_to_continue_and_exits_143(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        outcome.preempted("train", Preempted("SIGTERM at epoch 3"), tmp_path, True)
    assert info.value.code == Preempted("x").exit_code == 143
    err = capsys.readouterr().err
    assert f"resume=true hydra.run.dir={tmp_path}`" in err
    assert _status(tmp_path)["status"] == "preempted"


def test_leave_lets_go_of_every_lock(tmp_path: Path) -> None:
    held = lock.acquire(tmp_path / "run", "train")
    with pytest.raises(SystemExit):
        outcome.leave(3)
    again = lock.acquire(tmp_path / "run", "train")  # free: not "held again" by this process
    assert again.count == 1 and again.took_over is None
    lock.release(again)
    assert held.path == again.path and os.getpid() == held.record["pid"]
