"""Reliability, round 2 (issue 18): one writer per run directory, full disks, damaged
logs and files, checkpoint format versions, non-finite inputs.

The CLI cases are real ``csgd`` processes (tiny ResNet-20, 256 digits, 16 steps an epoch)
that a background thread starts with the module, in two waves, while the in-process tests
run: first two processes racing for one run directory, a run over a data set holding a
NaN image, a sweep one of whose points another process holds, and every writer under a
file-size limit; then, once the race's winner was SIGKILLed mid-run, its resume, which
takes over the dead process's lock and runs under a file-size limit (``RLIMIT_FSIZE``: a
write past it fails with EFBIG, which csgd treats as a full disk). The tests of those
runs come last and wait for them.
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
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import TINY_DIGITS as TINY

from csgd_cli.common.errors import CsgdError
from csgd_cli.runner import lock

ENV = {**os.environ, "CSGD_NO_BAR": "1", "OMP_NUM_THREADS": "1"}
TIMEOUT = 300
# csgd as the tests launch it, plus what a test asks through the environment:
# T_SLEEP (seconds slept after each step), T_NAN (this training image of digits is NaN),
# T_FSIZE (no file may grow past this many bytes: the write fails with EFBIG).
WRAPPER = """
import os, resource, signal, sys, time
import torch
from csgd_cli.runner import cli, datasets, engine
if os.environ.get("T_SLEEP"):
    engine.STEP_HOOKS.append(lambda trainer, step: time.sleep(float(os.environ["T_SLEEP"])))
if os.environ.get("T_NAN"):
    load, stats = datasets._load_digits, datasets._channel_stats
    def poisoned():
        tx, ty, vx, vy = load()
        tx = tx.to(torch.get_default_dtype())
        tx[int(os.environ["T_NAN"])] = float("nan")
        return [tx, ty, vx, vy]
    datasets._load_digits = poisoned
    datasets._channel_stats = lambda x: stats(x.nan_to_num().to(torch.uint8))
if os.environ.get("T_FSIZE"):
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limit = int(os.environ["T_FSIZE"])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
cli.main(sys.argv[1:])
"""
HOLD = """
import sys, time
from csgd_cli.runner import lock
print(lock.acquire(sys.argv[1], "train").record["token"], flush=True)
time.sleep(600)
"""
RACE = [*TINY, "pretrain.epochs=3", "pretrain.log_every=1", "checkpoint.every_steps=1"]
NAN_POS = 3 * 16 + 5  # the NaN image sits in the 4th batch of epoch 0

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
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
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


def nan_sample() -> int:
    """The digits image the NaN run poisons: position NAN_POS of epoch 0's order."""
    from omegaconf import OmegaConf

    from csgd_cli.runner.datasets import build_data

    cfg = OmegaConf.create({"name": "digits", "limit": 256, "batch_size": 16})
    order = build_data(cfg, seed=0, device=torch.device("cpu")).epoch_indices(0)
    return int(order[NAN_POS])


def _orchestrate(root: Path, out: dict[str, Any]) -> None:
    """Start the CLI runs in two waves (see the module's docstring); results into ``out``."""
    race, sweep, writers = root / "race", root / "sweep", root / "writers"
    out.update(race=race, sweep=sweep)
    # -- wave 1 ---------------------------------------------------------------------
    holder, out["holder_token"] = hold(sweep / "1")
    out["holder_pid"] = holder.pid
    racers = [start(root, f"racer{i}", "pretrain", race, *RACE, T_SLEEP="0.25") for i in (0, 1)]
    out["nan_k"] = nan_sample()
    nan = start(root, "nan", "pretrain", root / "nan", *TINY, "pretrain.epochs=1",
                "checkpoint.every_steps=1", T_NAN=str(out["nan_k"]))  # fmt: skip
    sweeper = start(root, "sweep", "pretrain", None, "-m", "seed=0,1", *TINY,
                    "pretrain.epochs=0", f"hydra.sweep.dir={sweep}")  # fmt: skip
    writers.mkdir()
    every = subprocess.Popen(
        [sys.executable, "-c", FULL_DISK, str(writers)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _STARTED.append(every)
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
    out["writers"] = (every.wait(timeout=TIMEOUT), *every.communicate())
    out.update(nan=finish(nan), sweep_result=finish(sweeper), resume=finish(resumed))
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


# -- 1. one writer per run directory ----------------------------------------------------
def _record(tmp: Path, **kw: Any) -> dict[str, Any]:
    """A lock record as another process would have written it."""
    rec = {**lock._me("train"), **kw}
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / lock.NAME).write_text(json.dumps(rec))
    return rec


def test_lease_renewal_and_the_takeover_rules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CSGD_LOCK_LEASE_S", "0.3")
    held = lock.acquire(tmp_path / "mine", "train")
    first = json.loads(held.path.read_text())["renewed"]
    time.sleep(0.5)
    assert json.loads(held.path.read_text())["renewed"] > first, "the lease is renewed"
    lock.release(held)
    assert not held.path.exists()
    monkeypatch.delenv("CSGD_LOCK_LEASE_S")

    def take(name: str, **kw: Any) -> str:
        _record(tmp_path / name, **kw)
        got = lock.acquire(tmp_path / name, "train")
        lock.release(got)
        return str(got.took_over)

    other = {"host": "node-b", "pid": 4242}
    with pytest.raises(lock.DirLocked, match=r"pid 4242 on host node-b, .*renewed 0 s ago"):
        take("live", **other)  # another host, its lease renewed just now
    assert "lease expired" in take("expired", **other, renewed=time.time() - 300)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # this job was requeued once
    assert "earlier run of this SLURM job 77" in take(
        "requeued", **other, slurm_job="77", slurm_restart="0"
    )
    with pytest.raises(lock.DirLocked):  # the same run of the job on another node
        take("same_job", **other, slurm_job="77", slurm_restart="1")
    parent = os.getppid()  # alive, but it started at another time than the record says
    assert "names another process" in take("reused", pid=parent, start=-1)
    assert "has restarted" in take("rebooted", pid=parent, boot_id="another-boot")
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / lock.NAME).write_text('{"pid": 1')  # cut short
    old = time.time() - 60
    os.utime(tmp_path / "damaged" / lock.NAME, (old, old))
    got = lock.acquire(tmp_path / "damaged", "train")
    assert got.took_over == "the lock file was damaged"
    lock.release(got)


RACER = """
import sys, time
from csgd_cli.runner import lock
go = float(sys.argv[2])
time.sleep(max(0.0, go - time.time()))
try:
    held = lock.acquire(sys.argv[1], "train")
    print("won", held.took_over, flush=True)
    time.sleep(3.0)  # held while the slowest starter arrives
except lock.DirLocked as e:
    print("lost", e, flush=True)
"""


def test_processes_racing_for_a_lock_exactly_one_wins(tmp_path: Path) -> None:
    """Six processes call acquire() at the same instant, on a free directory and (at the
    same time) six on one whose lock was left by a process that is gone, so that all of
    those race through the takeover."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    _record(tmp_path / "stale", pid=dead.pid)
    go = str(time.time() + 1.5)  # after every process has started
    procs = {
        kind: [
            subprocess.Popen(
                [sys.executable, "-c", RACER, str(tmp_path / kind), go],
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(6)
        ]
        for kind in ("free", "stale")
    }
    for kind, group in procs.items():
        outs = [p.communicate(timeout=60)[0].strip() for p in group]
        won = [(p.pid, o) for p, o in zip(group, outs, strict=True) if o.startswith("won")]
        assert len(won) == 1, outs
        lost = [o for o in outs if o.startswith("lost")]
        assert len(lost) == 5 and all(f"(pid {won[0][0]} on host" in o for o in lost), outs
        assert ("is gone" in won[0][1]) == (kind == "stale"), won
        leftovers = list((tmp_path / kind).glob(".csgd.lock*"))
        assert not leftovers, "the winner let go; no temporary or break files"


# -- 2. full disks ----------------------------------------------------------------------
FULL_DISK = """
import json, resource, sys, torch
from pathlib import Path
from csgd_cli.api.checkpoint import save_checkpoint
from csgd_cli.deploy.export import export_pt2
from csgd_cli.common.errors import CsgdError
from csgd_cli.common.files import atomic_write
from csgd_cli.runner.logs import MetricLog
from csgd_cli.runner.report import write_csv
d = Path(sys.argv[1])
save_checkpoint(d / "last.pt", {"arch": {"name": "x"}, "state_dict": {}, "epoch": 1})
log = MetricLog(d, "train", tensorboard=False)
log.write({"step": 1, "loss": 2.0})
atomic_write(d / "report.csv", "old report\\n")
resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))  # SIGXFSZ: ignored by Python
net = torch.nn.Sequential(torch.nn.Linear(256, 256))
jobs = {
    "last.pt": lambda: save_checkpoint(d / "last.pt", {"arch": {"name": "x"},
                                       "state_dict": {"w": torch.zeros(1 << 15)}}),
    "metrics.jsonl": lambda: log.write({"step": 2, "note": "x" * (100 << 10)}),
    "report.csv": lambda: write_csv([{"run": "r" * (100 << 10)}], d / "report.csv"),
    "pruned.pt2": lambda: export_pt2(net, torch.randn(4, 256), d / "pruned.pt2"),
}
out = {}
for name, job in jobs.items():
    try:
        job()
        out[name] = "written"
    except CsgdError as e:
        out[name] = str(e)
print(json.dumps(out))
"""


# -- 3. damaged logs and files ----------------------------------------------------------
def test_a_new_record_never_joins_a_line_cut_by_a_killed_writer(tmp_path: Path) -> None:
    from csgd_cli.common.files import read_jsonl
    from csgd_cli.runner.logs import MetricLog

    (tmp_path / "metrics.jsonl").write_text('{"phase": "train", "step": 1}\n{"phase": "tr')
    MetricLog(tmp_path, "train", tensorboard=False).write({"step": 2})
    skipped: list[str] = []
    recs = read_jsonl(tmp_path / "metrics.jsonl", skipped)
    assert [r["step"] for r in recs] == [1, 2]
    assert skipped == [f"{tmp_path / 'metrics.jsonl'} line 2 is not a JSON record: skipped"]


def _fake_run(d: Path, stage: str = "train") -> Path:
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "config.yaml").write_text(
        f"stage: {stage}\nepsilon: 0.01\nratio: 0.5\nratios: []\nseed: 0\n"
        "model: {name: resnet20}\ndataset: {name: digits}\nschedule: {epochs: 2}\n"
    )
    return d


def _epoch(epoch: int) -> str:
    rec = {"phase": "train", "step": 4 * epoch, "epoch": epoch, "train_loss": 1.0, "chi": 1.0}
    return json.dumps(rec) + "\n"


def test_report_skips_a_cut_line_and_marks_damaged_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from csgd_cli.runner.report import write_report

    cut = _fake_run(tmp_path / "cut") / "metrics.jsonl"
    cut.write_text(_epoch(1) + _epoch(2) + '{"phase": "train", "step": 9, "epo')
    _fake_run(tmp_path / "summary").joinpath("summary.json").write_text('{"rows": {"base": {"ac')
    _fake_run(tmp_path / "rows", "run").joinpath("summary.json").write_text('{"rows": [1, 2]}')
    _fake_run(tmp_path / "status").joinpath("status.json").write_text("[]")
    _fake_run(tmp_path / "config").joinpath(".hydra", "config.yaml").write_text("a: [1\n")
    with caplog.at_level("WARNING", logger="csgd"):
        rep = write_report(tmp_path)
    recs = {r["run"]: r for r in rep["records"]}
    note = f"{cut} line 3 is cut short (its writer was killed mid-line): skipped"
    assert recs["cut"]["status"] == "ok" and recs["cut"]["epochs"] == 2
    assert recs["cut"]["message"] == note and note in caplog.text
    assert {k: recs[k]["status"] for k in ("summary", "rows", "status", "config")} == dict.fromkeys(
        ("summary", "rows", "status", "config"), "damaged"
    )
    assert recs["summary"]["message"].startswith("summary.json is damaged (JSONDecodeError")
    assert "rows are not those csgd run writes" in recs["rows"]["message"]
    assert recs["status"]["message"] == "status.json is damaged (not a JSON object)"
    assert recs["config"]["message"].startswith(".hydra/config.yaml is damaged")
    md = (tmp_path / "report.md").read_text()
    assert note in md and re.search(r"\| damaged +\|", md)


# -- 4. checkpoint format versions ------------------------------------------------------
def _trainer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: Any = None, log_every: int = 0
) -> Any:
    from csgd_cli.models import get_model
    from csgd_cli.runner.engine import Trainer

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # no TensorBoard: faster

    model = get_model("resnet20", num_classes=10, in_channels=1, widths=[4] * 3 + [8] * 9)
    sched = SimpleNamespace(
        epochs=1, warmup_epochs=0, milestones=[], kind="multistep", gamma=0.1,
        log_every=log_every, eval_every=1,
    )  # fmt: skip
    data = data or SimpleNamespace(steps_per_epoch=lambda: 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return Trainer(
        model, data, sched, opt, device=torch.device("cpu"), out=tmp_path, phase="pretrain",
        payload={"arch": model.arch}, amp=False,
    )  # fmt: skip


def test_checkpoints_carry_a_format_and_other_formats_are_refused_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from csgd_cli.api.checkpoint import FORMAT, load_checkpoint

    trainer = _trainer(tmp_path, monkeypatch)
    trainer.save("last.pt")
    ck = load_checkpoint(tmp_path / "last.pt", "run")
    assert ck["format"] == FORMAT == 2
    trainer.restore(ck)  # this version's own file resumes
    newer, older = tmp_path / "newer.pt", tmp_path / "older.pt"
    torch.save({**ck, "format": 3, "weights": ck["state_dict"]}, newer)
    with pytest.raises(CsgdError) as e:
        load_checkpoint(newer)
    assert str(e.value).startswith(
        f"ckpt={newer} was written by a newer csgd (checkpoint format 3; this csgd reads "
        "formats 1 to 2); upgrade csgd"
    )
    old = {k: v for k, v in ck.items() if k not in ("optimizer", "format")}
    torch.save({**old, "format": 1}, older)
    old_ck = load_checkpoint(older, "run")  # a model of an older csgd still loads ...
    with pytest.raises(CsgdError) as e:  # ... but cannot resume without its optimizer
        trainer.restore(old_ck)
    assert f"{tmp_path / 'last.pt'} was written by an older csgd (checkpoint format 1; this " in (
        str(e.value)
    )
    assert "format 2) and lacks optimizer" in str(e.value)
    torch.save({"arch": ck["arch"], "state_dict": ck["state_dict"]}, older)  # before formats
    assert "format" not in load_checkpoint(older)


# -- 5. non-finite inputs ---------------------------------------------------------------
@pytest.mark.parametrize("sync_free", [False, True])
def test_nan_input_found_on_the_gpu_path_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sync_free: bool
) -> None:
    """On a GPU the check keeps no per-step host sync: the first bad step is noted on the
    device and read at the next guard (here the loss log every 3 steps); it names the
    same step and sample. Run on the CPU with the GPU path forced."""
    from omegaconf import OmegaConf

    from csgd_cli.runner.datasets import build_data

    cfg = OmegaConf.create({"name": "digits", "limit": 64, "batch_size": 16, "augment": False})
    data = build_data(cfg, seed=0, device=torch.device("cpu"))
    k = int(data.epoch_indices(0)[16 + 3])  # in the 2nd batch
    data.train_x = data.train_x.float()
    data.train_x[k] = float("inf")
    trainer = _trainer(tmp_path, monkeypatch, data, log_every=3)
    trainer._sync_free = sync_free
    with pytest.raises(CsgdError, match=rf"at epoch 0 step 2 \(global step 2\).* samples \[{k}\]"):
        trainer.fit()
    stopped_at = trainer.step_in_epoch
    assert stopped_at == (3 if sync_free else 1), "GPU: at the next guard; CPU: at once"


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
    resume after a takeover finishes is ``test_reliability.py``'s SIGKILL/resume test."""
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


def test_a_nan_image_stops_the_run_at_its_batch(cli_runs: Callable[[], dict[str, Any]]) -> None:
    runs = cli_runs()
    rc, err = runs["nan"]
    assert rc == 2, err
    line = one_line(err)
    k, step = runs["nan_k"], NAN_POS // 16 + 1
    run = runs["root"] / "nan"
    assert (
        f"non-finite input (NaN/inf) in phase pretrain at epoch 0 step {step} (global step "
        f"{step}): its batch holds training samples [{k}] of data set digits; the last good "
        f"checkpoint {run / 'last.pt'} is kept" in line
    ), line
    ck = torch.load(run / "last.pt", weights_only=True)
    assert ck["step_in_epoch"] == step - 1, "stopped before training on the batch"
    assert all(torch.isfinite(t).all() for t in ck["state_dict"].values() if t.is_floating_point())


def test_every_writer_on_a_full_disk_stops_with_one_line_and_keeps_the_old_file(
    cli_runs: Callable[[], dict[str, Any]],
) -> None:
    """checkpoints, metrics.jsonl, the report and pruned.pt2 under a 64 KiB file-size
    limit: one line naming the file and the size it needed; the old file is intact and no
    temporary file or partial line is left."""
    rc, stdout, stderr = cli_runs()["writers"]
    tmp_path = cli_runs()["root"] / "writers"
    assert rc == 0, stderr
    msgs = json.loads(stdout.splitlines()[-1])
    for name, msg in msgs.items():
        assert msg.startswith(f"could not write {tmp_path / name}: disk full or file too large"), (
            msg
        )
        assert "it needs " in msg and "\n" not in msg, msg
    assert "it needs 12" in msgs["last.pt"]  # 128 KiB of zeros and the zip around them
    from csgd_cli.api.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["step"] == 1
    assert (tmp_path / "report.csv").read_text() == "old report\n"
    assert not (tmp_path / "pruned.pt2").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "metrics.jsonl", "report.csv"]
