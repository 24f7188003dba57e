"""End to end, the run-directory lock: one writer per run directory (racing processes,
a killed run's lock taken over by its resume, a sweep locking each point), and a full
disk in a resumed run. The lock's unit tests are in test_lock.py.

The CLI cases are real ``csgd`` processes (tiny ResNet-20, 256 digits, 16 steps an epoch)
that a background thread starts with the module, in two waves: first two processes
racing for one run directory and a sweep one of whose points another process holds;
then, once the race's winner was SIGKILLed mid-run, its resume, which takes over the
dead process's lock and runs under a file-size limit (``RLIMIT_FSIZE``: a write past it
fails with EFBIG, which csgd treats as a full disk). The tests of those runs wait for
them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY_DIGITS as TINY

from csgd_cli.runner import lock

ENV = {**os.environ, "CSGD_NO_BAR": "1", "OMP_NUM_THREADS": "1"}
TIMEOUT = 300
# csgd as the tests launch it, plus what a test asks through the environment:
# T_SLEEP (seconds slept after each step), T_FSIZE (no file may grow past this many bytes: the write fails with EFBIG).
WRAPPER = """
import os, resource, signal, sys, time
from csgd_cli.runner import cli, engine
if os.environ.get("T_SLEEP"):
    step = engine.Trainer.train_step
    def slow_step(self, x, y):
        out = step(self, x, y)
        time.sleep(float(os.environ["T_SLEEP"]))
        return out
    engine.Trainer.train_step = slow_step
if os.environ.get("T_FSIZE"):
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limit = int(os.environ["T_FSIZE"])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
cli.main(sys.argv[1:])
"""
# a CLI warning line (csgd train: a schedule that cannot converge) is not the error line
WARNING = re.compile(r"^csgd \w+: warning: ")
HOLD = r"""
import sys, time
from csgd_cli.runner import lock

print(lock.acquire(sys.argv[1], "train").record["token"], flush=True)
time.sleep(600)
"""
RACE = [*TINY, "pretrain.epochs=3", "pretrain.log_every=1", "checkpoint.every_steps=1"]
_STARTED: list[subprocess.Popen] = []


def start(root: Path, name: str, stage: str, run_dir: Path | None, *args: str, **env: str) -> Any:
    run = [f"hydra.run.dir={run_dir}"] if run_dir is not None else []
    err = root / f"{name}.err"
    with open(err, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-c", WRAPPER, stage, *args, *run],
            env={**ENV, **env},
            stdout=subprocess.DEVNULL,
            stderr=f,
        )
    proc.err = err  # type: ignore[attr-defined]
    _STARTED.append(proc)
    return proc


def finish(proc: Any) -> tuple[int, str]:
    rc = proc.wait(timeout=TIMEOUT)
    return rc, proc.err.read_text()


def hold(run_dir: Path, **env: str) -> tuple[subprocess.Popen, str]:
    """A live process holding ``run_dir`` (until killed), and its lock's token."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)],
        env={**ENV, **env},
        stdout=subprocess.PIPE,
        text=True,
    )
    _STARTED.append(proc)
    return proc, proc.stdout.readline().strip()  # type: ignore[union-attr]


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not WARNING.match(ln)]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def steps(metrics: Path) -> list[int]:
    """The global steps of metrics.jsonl's per-step records ([] before it exists)."""
    out: list[int] = []
    if not metrics.is_file():
        return out
    for line in metrics.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line being written
            continue
        if "loss" in rec:
            out.append(rec["step"])
    return out


def _orchestrate(root: Path, out: dict[str, Any]) -> None:
    """Start the CLI runs in two waves (see the module's docstring); results into ``out``."""
    race, sweep = root / "race", root / "sweep"
    out.update(race=race, sweep=sweep)
    # -- wave 1 ---------------------------------------------------------------------
    holder, out["holder_token"] = hold(sweep / "1")
    out["holder_pid"] = holder.pid
    racers = [start(root, f"racer{i}", "pretrain", race, *RACE, T_SLEEP="0.25") for i in (0, 1)]
    sweeper = start(root, "sweep", "pretrain", None, "-m", "seed=0,1", *TINY,
                    "pretrain.epochs=0", f"hydra.sweep.dir={sweep}")  # fmt: skip
    # The race: one is refused while the other runs; that one is then SIGKILLed mid-run.
    deadline = time.monotonic() + TIMEOUT
    while all(p.poll() is None for p in racers) and time.monotonic() < deadline:
        time.sleep(0.05)
    loser = next(p for p in racers if p.poll() is not None)
    winner = racers[1 - racers.index(loser)]
    out["winner_alive"] = winner.poll() is None
    out["loser"], out["winner_pid"] = finish(loser), winner.pid
    out["lock"] = json.loads((race / lock.NAME).read_text())
    while winner.poll() is None and len(steps(race / "metrics.jsonl")) < 3:
        time.sleep(0.02)
    out["killed_mid_run"] = winner.poll() is None
    winner.kill()
    out["winner_rc"] = winner.wait()
    out["race_steps"] = steps(race / "metrics.jsonl")
    # -- wave 2: its resume takes over the lock, then meets a full disk ---------------
    out["last_before"] = (race / "last.pt").read_bytes()
    limit = str(len(out["last_before"]) // 2)  # above every other file the run writes
    resumed = start(root, "resume", "pretrain", race, *RACE, "resume=true", T_FSIZE=limit)
    out.update(sweep_result=finish(sweeper), resume=finish(resumed))
    holder.kill()
    holder.wait()


@pytest.fixture(scope="module", autouse=True)
def cli_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], dict[str, Any]]]:
    """Starts the CLI runs with the module's first test; call it to wait for them."""
    root = tmp_path_factory.mktemp("r2")
    out: dict[str, Any] = {"root": root}

    def run() -> None:
        try:
            _orchestrate(root, out)
        except BaseException as e:  # reported by every test that waits
            out["error"] = repr(e)

    thread = threading.Thread(target=run, name="cli-runs", daemon=True)
    thread.start()

    def results() -> dict[str, Any]:
        thread.join(timeout=2 * TIMEOUT)
        assert not thread.is_alive() and "error" not in out, out.get("error", "timed out")
        return out

    yield results
    for proc in _STARTED:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- 1. one writer per run directory: tests/test_lock.py (the CLI runs are below) --------


# -- the CLI runs (the module fixture's) ------------------------------------------------
def test_two_processes_racing_for_one_run_dir_one_is_refused(
    cli_runs: Callable[[], dict[str, Any]],
) -> None:
    """Started together with one hydra.run.dir: one trains, the other exits 2 at once with
    one line naming the holder (pid, host, since when); the log holds one run."""
    runs = cli_runs()
    rc, err = runs["loser"]
    assert rc == 2, err
    assert runs["winner_alive"], "the refused process must be refused while the other runs"
    line = one_line(err)
    pid, host = runs["winner_pid"], socket.gethostname()
    assert line.startswith("csgd pretrain: error: run directory "), line
    assert f"is in use by csgd pretrain (pid {pid} on host {host}, since 20" in line, line
    assert "another hydra.run.dir" in line, line
    held = runs["lock"]
    assert (held["pid"], held["host"], held["stage"]) == (pid, host, "pretrain")
    assert runs["killed_mid_run"] and runs["winner_rc"] == -signal.SIGKILL
    logged = runs["race_steps"]
    assert logged == list(range(1, len(logged) + 1)), f"two writers interleaved: {logged}"


def test_a_killed_runs_lock_is_taken_over_by_its_resume(
    cli_runs: Callable[[], dict[str, Any]],
) -> None:
    """The SIGKILLed winner left its lock; its resume takes it over with one warning and
    goes on (until the full disk of the next test), then lets go of the directory. That a
    resume after a takeover finishes is ``test_e2e_resume.py``'s SIGKILL/resume test."""
    runs = cli_runs()
    _, err = runs["resume"]
    warnings = [ln for ln in err.splitlines() if "warning: took over" in ln]
    assert len(warnings) == 1, err
    pid = runs["winner_pid"]
    assert warnings[0].startswith(f"csgd pretrain: warning: took over {runs['race'] / lock.NAME}")
    assert (
        f"its process (pid {pid}) is gone; it was held by csgd pretrain (pid {pid}" in (warnings[0])
    )
    assert "could not write" in err, "it got as far as writing a checkpoint"
    assert not (runs["race"] / lock.NAME).exists(), "a run that stops lets go of its directory"


def test_a_sweep_locks_each_point(cli_runs: Callable[[], dict[str, Any]]) -> None:
    """Point 1 is held by another live process: it is refused (and its directory gets no
    status.json of this sweep), point 0 runs, the sweep exits 1 naming point 1."""
    runs = cli_runs()
    rc, err = runs["sweep_result"]
    sweep = runs["sweep"]
    assert rc == 1, err
    assert "Traceback" not in err, err
    assert f"run directory {sweep / '1'} is in use by csgd train (pid {runs['holder_pid']}" in err
    assert f"1 sweep run(s) failed: {sweep / '1'}" in err, err
    assert json.loads((sweep / "0" / "status.json").read_text())["status"] == "ok"
    assert not (sweep / "1" / "status.json").exists()
    assert not (sweep / "0" / lock.NAME).exists() and not (sweep / lock.NAME).exists()
    # the holder's lock was never touched (it was killed, so it is still there)
    assert json.loads((sweep / "1" / lock.NAME).read_text())["token"] == runs["holder_token"]


def test_full_disk_during_a_run_keeps_the_previous_last_pt(
    cli_runs: Callable[[], dict[str, Any]],
) -> None:
    """No file may grow past half a checkpoint: the resumed run's first save fails. One
    error line (after the takeover warning) names last.pt and the size it needed; the
    previous last.pt is untouched and loads; no temporary file or partial record."""
    runs = cli_runs()
    rc, err = runs["resume"]
    race = runs["race"]
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 2 and "warning: took over" in lines[0] and "Traceback" not in err, err
    line = lines[1]
    assert line.startswith(f"csgd pretrain: error: could not write {race / 'last.pt'}: "), line
    assert "disk full or file too large (File too large)" in line and "ulimit -f" in line, line
    need = float(re.search(r"it needs ([\d.]+) KiB", line).group(1))  # type: ignore[union-attr]
    assert abs(need - len(runs["last_before"]) / 1024) < 1, line  # a checkpoint's size
    assert (race / "last.pt").read_bytes() == runs["last_before"]
    from csgd_cli.api.checkpoint import load_checkpoint

    assert load_checkpoint(race / "last.pt", "run")["step_in_epoch"] >= 2
    assert not list(race.glob(".*.tmp")), "no temporary file (the killed run's was removed too)"
    for ln in (race / "metrics.jsonl").read_text().splitlines():
        json.loads(ln)  # no partial record
