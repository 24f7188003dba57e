"""End to end: kill/resume bit-identity (SIGKILL, SIGTERM, a whole ``csgd run``) and
seeded determinism. Every run is a real ``csgd`` subprocess on a tiny ResNet-20 (widths
4/8) over 256 digits images, 16 steps per epoch, on the CPU.

Runs go two processes at a time (a reference run next to the interrupted one), with one
thread each: bit-identity on the CPU is claimed for a fixed thread count.
"""

from __future__ import annotations

import hashlib
import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import FORCE
from conftest import TINY_DIGITS as TINY
from csgd_procs import TIMEOUT, finish, kill_leftovers, load, one_line
from csgd_procs import start as start_argv

from csgd_cli.api.record import PruneRecord

STEPS = 16  # 256 images / batch 16
# differ between two runs for reasons that are not training state
VOLATILE = {"config", "epoch_time", "time", "pruned_from"}


@pytest.fixture(scope="module", autouse=True)
def _end_leftovers() -> Iterator[None]:
    yield
    kill_leftovers()


def cmd(stage: str, run_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "csgd_cli", stage, *TINY, *args, f"hydra.run.dir={run_dir}"]


def start(stage: str, run_dir: Path, *args: str) -> Any:
    return start_argv(cmd(stage, run_dir, *args), run_dir.parent / f"{run_dir.name}.stderr")


def run(stage: str, run_dir: Path, *args: str) -> tuple[int, str]:
    return finish(start(stage, run_dir, *args))


def last_step(metrics: Path) -> int:
    """Global step of the newest complete record in metrics.jsonl (0 if none)."""
    if not metrics.is_file():
        return 0
    step = 0
    for line in metrics.read_text().splitlines():
        try:
            step = max(step, json.loads(line).get("step", 0))
        except ValueError:  # a line being written
            pass
    return step


def interrupt_at(proc: subprocess.Popen, metrics: Path, step: int, sig: int) -> tuple[int, str]:
    """Send ``sig`` once ``metrics`` logs ``step``; the process must not have finished."""
    deadline = time.monotonic() + TIMEOUT
    while proc.poll() is None and last_step(metrics) < step and time.monotonic() < deadline:
        time.sleep(0.003)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(sig)
    return finish(proc)


def assert_identical(a: Any, b: Any, where: str = "") -> None:
    """Bit-for-bit equality of two checkpoints (tensors, numbers, containers)."""
    if isinstance(a, dict):
        assert isinstance(b, dict), where
        keys = set(a) - VOLATILE
        assert keys == set(b) - VOLATILE, f"{where}: keys differ"
        for k in keys:
            assert_identical(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}/{i}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: tensors differ"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def records(metrics: Path) -> list[dict[str, Any]]:
    return [
        {k: v for k, v in json.loads(line).items() if k not in VOLATILE}
        for line in metrics.read_text().splitlines()
    ]


def digest(path: Path) -> tuple[int, str]:
    return path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()


# -- kill / resume ------------------------------------------------------------------------
PRETRAIN = [
    "pretrain.epochs=2",
    "pretrain.log_every=1",
    "pretrain.lr=0.05",
    "checkpoint.every_steps=1",
]


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path: Path) -> None:
    """Plain SGD: model, momentum buffers, scheduler, RNG, BN statistics, best.pt, the
    epoch's running loss and metrics.jsonl all continue exactly."""
    target = random.Random(5).choice(
        [s for s in range(2, 2 * STEPS) if 2 <= s % STEPS <= 8]  # >= 7 steps to spare
    )
    ref = start("pretrain", tmp_path / "ref", *PRETRAIN)
    run_dir = tmp_path / "killed"
    rc, _ = interrupt_at(
        start("pretrain", run_dir, *PRETRAIN), run_dir / "metrics.jsonl", target, signal.SIGKILL
    )
    assert rc == -signal.SIGKILL
    ck = load(run_dir / "last.pt")  # loadable: every save is atomic
    assert ck["epoch"] * STEPS + ck["step_in_epoch"] >= target - 1
    assert 0 < ck["step_in_epoch"] < STEPS, "the kill should land mid-epoch"
    rc, err = run("pretrain", run_dir, *PRETRAIN, "resume=true")
    assert rc == 0, err
    assert finish(ref)[0] == 0
    a, b = load(tmp_path / "ref" / "last.pt"), load(run_dir / "last.pt")
    assert a["epoch"] == 2 and a["optimizer"]["state"], "momentum buffers expected"
    assert_identical(a, b, "last.pt")
    assert_identical(load(tmp_path / "ref" / "best.pt"), load(run_dir / "best.pt"), "best.pt")
    assert records(tmp_path / "ref" / "metrics.jsonl") == records(run_dir / "metrics.jsonl")


CSGD = [
    "schedule.epochs=2",
    "schedule.log_every=1",
    "schedule.lr=0.05",
    "epsilon=0.05",
    "ratio=0.5",
    "checkpoint.every_steps=3",
    FORCE,
]


def test_csgd_sigterm_then_resume_is_bit_identical(tmp_path: Path) -> None:
    """C-SGD: SIGTERM writes last.pt at that very step and exits 143 with one line; the
    resumed run restores the flat momentum buffer and takes the clusters, epsilon and
    weight decays from last.pt (it even asks for others, which must be ignored)."""
    stop_at = random.Random(7).randrange(STEPS + 2, STEPS + 9)  # mid epoch 2
    ref = start("train", tmp_path / "ref", *CSGD)
    run_dir = tmp_path / "stopped"
    metrics = run_dir / "metrics.jsonl"
    rc, err = interrupt_at(start("train", run_dir, *CSGD), metrics, stop_at, signal.SIGTERM)
    assert rc == 143, err
    line = one_line(err)
    assert "SIGTERM" in line and "resume=true" in line and str(run_dir) in line, line
    ck = load(run_dir / "last.pt")
    assert ck["epoch"] * STEPS + ck["step_in_epoch"] == last_step(metrics), (
        "last.pt is at the stop step"
    )
    assert 0 < ck["step_in_epoch"] < STEPS
    assert PruneRecord.from_checkpoint(ck).clusters
    assert "flat_momentum" in next(iter(ck["optimizer"]["state"].values()))
    # Were clusters recomputed on resume, `clustering=even` would change them; epsilon,
    # norm_epsilon and the weight decays come from last.pt too, not the command line.
    changed = ["epsilon=0.5", "norm_epsilon=0.2", "schedule.weight_decay=0.01"]
    rc, err = run("train", run_dir, *CSGD, "resume=true", "clustering=even", *changed)
    log = (run_dir / "train.log").read_text()  # Hydra's job log
    assert "resume: epsilon comes from" in log and "resume: schedule comes from" in log, log
    assert rc == 0, err
    assert finish(ref)[0] == 0
    a, b = load(tmp_path / "ref" / "last.pt"), load(run_dir / "last.pt")
    assert_identical(a, b, "last.pt")  # includes optimizer/state/0/flat_momentum, clusters
    assert_identical(load(tmp_path / "ref" / "best.pt"), load(run_dir / "best.pt"), "best.pt")
    assert records(tmp_path / "ref" / "metrics.jsonl") == records(metrics)


RUN_PRETRAIN = ["pretrain.epochs=1", "pretrain.lr=0.05"]


RUN = [
    *RUN_PRETRAIN,
    "schedule.epochs=2",
    "finetune.epochs=1",
    "schedule.log_every=1",
    "epsilon=0.05",
    "ratio=0.5",
    "prune.force=true",
    "prune.export=false",
    "checkpoint.every_steps=0",  # resume from the last epoch end: the killed epoch is redone
]


OUTPUTS = ("base.pt", "csgd.pt", "pruned.pt", "finetuned.pt")


@pytest.fixture(scope="module")
def seed0_run(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """An uninterrupted ``csgd run`` with seed 0, started in the background."""
    run_dir = tmp_path_factory.mktemp("run") / "seed0"
    proc = start("run", run_dir, *RUN)

    def wait() -> Path:
        rc, err = finish(proc)
        assert rc == 0, err
        return run_dir

    return wait


def test_run_resumes_in_the_phase_it_stopped(tmp_path: Path, seed0_run: Any) -> None:
    run_dir = tmp_path / "killed"
    kill_at = STEPS + random.Random(11).randrange(2, 9)  # mid C-SGD epoch 2
    rc, _ = interrupt_at(
        start("run", run_dir, *RUN), run_dir / "train" / "metrics.jsonl", kill_at, signal.SIGKILL
    )
    assert rc == -signal.SIGKILL
    base = digest(run_dir / "base.pt")
    assert not (run_dir / "csgd.pt").exists()
    rc, err = run("run", run_dir, *RUN, "resume=true")
    assert rc == 0, err
    assert digest(run_dir / "base.pt") == base, "a finished phase must be skipped, not redone"
    ref = seed0_run()
    for name in OUTPUTS:
        assert_identical(load(ref / name), load(run_dir / name), name)


# -- determinism --------------------------------------------------------------------------
def test_same_seed_gives_identical_checkpoints_other_seed_differs(
    tmp_path: Path, seed0_run: Any
) -> None:
    same = start("run", tmp_path / "again", *RUN)
    other = start("pretrain", tmp_path / "seed1", *RUN_PRETRAIN, "seed=1")
    ref = seed0_run()
    assert finish(same)[0] == 0 and finish(other)[0] == 0
    for name in OUTPUTS:
        assert_identical(load(ref / name), load(tmp_path / "again" / name), name)
    a, b = load(ref / "base.pt")["state_dict"], load(tmp_path / "seed1" / "last.pt")["state_dict"]
    assert not torch.equal(a["conv1.weight"], b["conv1.weight"]), "seed must reach the weights"
