"""runner/lock.py: one writer per run directory (a kernel lock plus the holder's record).

The race tests start many real processes at one instant; the rest hold the lock from a
helper process and try it from this one."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from csgd_cli.common.errors import CsgdError
from csgd_cli.runner import lock

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
HOST = socket.gethostname()
REFUSAL = re.compile(
    r"^run directory (?P<dir>\S+) is in use by csgd train \(pid (?P<pid>\d+) on host "
    r"(?P<host>\S+), since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\); wait for it to end or stop it, "
    r"or pass another hydra.run.dir"
)

# A racer: from `go` on, tries the lock again and again until `end`. While it holds the
# lock it marks `inside` (O_EXCL: a second holder would find the mark), then lets go, or
# (odd seeds, on their second hold) dies without letting go (os._exit: no atexit, no
# release), so that the next holder takes over a dead one's record.
RACER = """
import os, random, sys, time
from csgd_cli.runner import lock
run_dir, go, end, seed = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
rng, holds = random.Random(seed), 0
time.sleep(max(0.0, go - time.time()))
while time.time() < end:
    try:
        held = lock.acquire(run_dir, "train")
    except lock.DirLocked as e:
        print("lost", str(e), flush=True)
        time.sleep(rng.uniform(0.0, 0.03))
        continue
    try:
        os.close(os.open(os.path.join(run_dir, "inside"), os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        print("OVERLAP", flush=True)
    print("won", held.took_over, flush=True)
    time.sleep(0.02)
    os.unlink(os.path.join(run_dir, "inside"))
    holds += 1
    if seed % 2 and holds == 2:
        print("died", flush=True)
        os._exit(0)
    lock.release(held)
    time.sleep(rng.uniform(0.0, 0.03))
"""

# One try at `go`; a winner holds the lock until the test creates `<run dir>/done`.
ONE_TRY = """
import os, sys, time
from csgd_cli.runner import lock
run_dir, go = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, go - time.time()))
try:
    held = lock.acquire(run_dir, "train")
except lock.DirLocked as e:
    print("lost", str(e), flush=True)
    sys.exit(0)
print("won", held.took_over, flush=True)
while not os.path.exists(os.path.join(run_dir, "done")):
    time.sleep(0.02)
"""

HOLD = """
import json, sys, time
from csgd_cli.runner import lock
held = lock.acquire(sys.argv[1], "train")
if len(sys.argv) > 2:  # pose as a process of another host
    rec = {**held.record, "host": sys.argv[2]}
    (held.path).write_text(json.dumps(rec))
print("held", flush=True)
time.sleep(600)
"""


def _hold(run_dir: Path, *args: str, **env: str) -> subprocess.Popen:
    """A live process holding ``run_dir`` until killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir), *args],
        env={**ENV, **env},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _stale_record(run_dir: Path, **kw: Any) -> dict[str, Any]:
    """A record as a holder that is gone would have left it."""
    rec = {**lock._me("train"), **kw}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / lock.NAME).write_text(json.dumps(rec))
    return rec


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_many_processes_racing_exactly_one_holds_it_at_a_time(tmp_path: Path) -> None:
    """12 processes try the lock over and over for 3 s (six die holding it on their second
    hold), starting on a dead holder's record: at no time do two hold it, every refusal is
    the one line naming a racer, and each dead holder's record was taken over once."""
    run_dir = tmp_path / "run"
    pid = _dead_pid()
    _stale_record(run_dir, pid=pid)  # the first holder takes over a dead one's too
    go = time.time() + 2.0  # after every racer has started
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(run_dir), str(go), str(go + 3.0), str(seed)],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in range(12)
    ]
    outs = {p.pid: p.communicate(timeout=60) for p in racers}
    assert all(err == "" for _, err in outs.values()), outs
    lines = [(pid, ln) for pid, (out, _) in outs.items() for ln in out.splitlines()]
    assert not [ln for _, ln in lines if ln == "OVERLAP"], "two processes held it at once"
    wins = [(p, ln) for p, ln in lines if ln.startswith("won")]
    deaths = [p for p, ln in lines if ln == "died"]
    refusals = [ln[len("lost ") :] for _, ln in lines if ln.startswith("lost")]
    assert len(wins) >= 12 and deaths and refusals, lines
    for text in refusals:
        m = REFUSAL.match(text)
        assert m and "\n" not in text, text
        assert int(m["pid"]) in outs and m["host"] == HOST, text
    assert not (run_dir / "inside").exists()
    last = lock.acquire(run_dir, "train")  # takes over when the last holder died
    lock.release(last)
    taken_over = [ln for _, ln in lines if "is gone; it was held by csgd train" in ln]
    taken_over += [last.took_over] if last.took_over else []
    # the stale record at the start, then one per holder that died holding the lock (a
    # holder killed before it wrote its record leaves none to take over): every takeover
    # names a dead holder or the stale start, never a live racer
    assert 1 <= len(taken_over) <= 1 + len(deaths), (taken_over, deaths)
    gone = [int(re.search(r"pid (\d+)\) is gone", t)[1]) for t in taken_over]  # type: ignore[index]
    assert all(g in deaths or g not in outs for g in gone), (gone, deaths)


def test_processes_racing_for_a_dead_holders_lock_one_takes_it_over(tmp_path: Path) -> None:
    """Eight processes at one instant on a directory whose holder was SIGKILLed: one takes
    it over naming the dead one, seven are refused naming that one."""
    run_dir = tmp_path / "run"
    dead = _hold(run_dir)
    _kill(dead)
    go = time.time() + 1.5
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", ONE_TRY, str(run_dir), str(go)],
            env=ENV,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    deadline = time.monotonic() + 60
    while sum(p.poll() is not None for p in racers) < 7 and time.monotonic() < deadline:
        time.sleep(0.05)  # the refused ones exit; the winner holds on
    (run_dir / "done").touch()
    outs = [(p.pid, p.communicate(timeout=60)[0]) for p in racers]
    won = [(pid, out) for pid, out in outs if out.startswith("won")]
    assert len(won) == 1, outs
    assert f"its process (pid {dead.pid}) is gone; it was held by csgd train" in won[0][1]
    lost = [out.strip() for _, out in outs if out.startswith("lost")]
    assert len(lost) == 7 and all(f"(pid {won[0][0]} on host {HOST}," in t for t in lost), outs


def test_refusal_names_the_holder_and_changes_nothing(tmp_path: Path) -> None:
    holder = _hold(tmp_path)
    try:
        before = (tmp_path / lock.NAME).read_bytes()
        with pytest.raises(lock.DirLocked) as info:
            lock.acquire(tmp_path, "train")
        m = REFUSAL.match(str(info.value))
        assert m and int(m["pid"]) == holder.pid and m["host"] == HOST, str(info.value)
        assert info.value.exit_code == 2
        assert (tmp_path / lock.NAME).read_bytes() == before
    finally:
        _kill(holder)
    got = lock.acquire(tmp_path, "train")  # the kernel let go when the holder died
    try:
        assert f"its process (pid {holder.pid}) is gone" in str(got.took_over)
    finally:
        lock.release(got)


def test_held_again_by_its_holder_and_let_go(tmp_path: Path) -> None:
    first = lock.acquire(tmp_path, "train")
    again = lock.acquire(tmp_path, "pretrain")
    assert again is first and first.count == 2 and first.took_over is None
    rec = json.loads((tmp_path / lock.NAME).read_text())
    assert (rec["pid"], rec["host"], rec["stage"]) == (os.getpid(), HOST, "train")
    lock.release(again)
    assert (tmp_path / lock.NAME).exists(), "still held once"
    lock.release(first)
    lock.release(first)  # a second release is a no-op
    assert not (tmp_path / lock.NAME).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [lock.KERNEL], "only the empty lock file"
    lock.release(lock.acquire(tmp_path, "train"))  # free again


def test_a_live_holder_on_another_host_is_refused_with_a_note(tmp_path: Path) -> None:
    holder = _hold(tmp_path, "node-b")
    try:
        with pytest.raises(lock.DirLocked, match=r"pid \d+ on host node-b, .*lease lapses"):
            lock.acquire(tmp_path, "train")
    finally:
        _kill(holder)


def test_resume_from_another_host_takes_over_once_the_kernel_let_go(tmp_path: Path) -> None:
    """A record of another host under a free kernel lock: that process ended (or its host
    went down and the file server freed its lock): a resume from here takes over."""
    _stale_record(tmp_path, host="node-b", pid=4242)
    got = lock.acquire(tmp_path, "train")
    try:
        assert got.took_over is not None
        assert got.took_over.startswith("its process (pid 4242 on host node-b) has ended")
    finally:
        lock.release(got)


def test_damaged_record_is_taken_over(tmp_path: Path) -> None:
    (tmp_path / lock.NAME).write_text('{"pid": 1')
    got = lock.acquire(tmp_path, "train")
    try:
        assert got.took_over == "the lock file was damaged"
        assert json.loads((tmp_path / lock.NAME).read_text())["token"] == got.record["token"]
    finally:
        lock.release(got)


def test_a_requeued_slurm_job_waits_for_its_earlier_runs_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The earlier run of job 77 still holds the lock (its host is going down): the same
    run of the job elsewhere is refused at once; its requeued run waits and takes over."""
    holder = _hold(tmp_path, "node-b", SLURM_JOB_ID="77", SLURM_RESTART_COUNT="0")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    try:
        with pytest.raises(lock.DirLocked, match="on host node-b"):
            lock.acquire(tmp_path, "train")
    except BaseException:
        _kill(holder)
        raise
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # requeued once
    killer = threading.Timer(0.5, _kill, args=(holder,))
    killer.start()
    try:
        got = lock.acquire(tmp_path, "train")
    finally:
        killer.join()
    try:
        assert str(got.took_over).startswith("it was held by an earlier run of this SLURM job 77")
        assert got.record["slurm_restart"] == "1"
        assert "waiting up to 180 s for the earlier run of SLURM job 77" in capsys.readouterr().err
    finally:
        lock.release(got)


def test_a_file_system_without_locks_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class NoLocks:
        lock_file = str(tmp_path / lock.KERNEL)

        def acquire(self, **_: Any) -> None:
            raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(lock, "_kernel_lock", lambda path: NoLocks())
    with pytest.raises(CsgdError, match=r"does not support file locks .*Lustre: -o flock"):
        lock.acquire(tmp_path, "train")
    assert not (tmp_path / lock.NAME).exists()
