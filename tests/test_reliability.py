"""Reliability: kill/resume bit-identity, SIGTERM, atomic checkpoints, divergence guard,
safe loading and determinism. Every run is a real ``csgd`` subprocess on a tiny
ResNet-20 (widths 4/8) over 256 digits images, 16 steps per epoch, on the CPU.

Slow parts run two processes at a time (a reference run next to the interrupted one),
with one thread each: bit-identity on the CPU is claimed for a fixed thread count.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import TINY_DIGITS as TINY

STEPS = 16  # 256 images / batch 16
ENV = {**os.environ, "CSGD_NO_BAR": "1", "OMP_NUM_THREADS": "1"}
TIMEOUT = 300
# differ between two runs for reasons that are not training state
VOLATILE = {"config", "epoch_time", "time", "pruned_from"}


_STARTED: list[subprocess.Popen] = []  # ended at module teardown if a failure left them


def cmd(stage: str, run_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "csgd_cli", stage, *TINY, *args, f"hydra.run.dir={run_dir}"]


def start(stage: str, run_dir: Path, *args: str) -> subprocess.Popen:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    err_path = run_dir.parent / f"{run_dir.name}.stderr"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            cmd(stage, run_dir, *args), env=ENV, stdout=subprocess.DEVNULL, stderr=err
        )
    proc.err_path = err_path  # type: ignore[attr-defined]
    _STARTED.append(proc)
    return proc


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    """Exit code and stderr of a process from ``start``."""
    rc = proc.wait(timeout=TIMEOUT)
    return rc, proc.err_path.read_text()  # type: ignore[attr-defined]


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


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


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


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert "Traceback" not in stderr
    return lines[0]


def digest(path: Path) -> tuple[int, str]:
    return path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()


# -- 1. kill / resume --------------------------------------------------------------------
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
    assert ck["clusters"] and "flat_momentum" in next(iter(ck["optimizer"]["state"].values()))
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


# -- 7. determinism ----------------------------------------------------------------------
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


def test_seed_reaches_python_numpy_torch_kmeans_and_data_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from omegaconf import OmegaConf

    from csgd_cli.common.seeding import seed_everything
    from csgd_cli.core import clustering
    from csgd_cli.runner.datasets import build_data

    def draw(seed: int) -> tuple[Any, ...]:
        seed_everything(seed)
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()

    assert draw(3) == draw(3) and draw(3) != draw(4)

    seen: list[Any] = []

    class Recording(clustering.KMeans):  # type: ignore[misc]
        def fit_predict(self, x: Any, *a: Any, **kw: Any) -> Any:
            seen.append(self.random_state)
            return super().fit_predict(x, *a, **kw)

    monkeypatch.setattr(clustering, "KMeans", Recording)
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(32, 9)))
    assert clustering.kmeans_clusters(x, 8, seed=5) == clustering.kmeans_clusters(x, 8, seed=5)
    assert seen == [5, 5]

    def order(seed: int, epoch: int = 0) -> list[int]:
        cfg = OmegaConf.create(
            {"name": "synthetic", "num_train": 64, "num_test": 8, "batch_size": 16}
        )
        return build_data(cfg, seed=seed, device="cpu").epoch_indices(epoch).tolist()

    assert order(0) == order(0) and order(0) != order(1) and order(0) != order(0, epoch=1)


# -- 2 + 3. atomic checkpoints ----------------------------------------------------------
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


# -- 4. divergence guard -----------------------------------------------------------------
DIVERGE = [
    "schedule.epochs=3",
    "schedule.milestones=[1]",
    "schedule.gamma=1e8",
    "schedule.log_every=0",
    "epsilon=0.05",
    "ratio=0.5",
    "checkpoint.every_steps=1",
]


def test_divergence_stops_with_a_hint_and_keeps_the_last_good_checkpoint(background: Any) -> None:
    """Epoch 1 trains normally; from epoch 2 the lr is multiplied by 1e8. Per-step logging
    is off, so the guard on every save (every step) is what catches the NaN weights."""
    run_dir = background["diverge"]
    rc, err = background["wait"]("diverge")
    assert rc == 2, err
    line = one_line(err)
    assert "non-finite" in line and "epsilon" in line and "schedule.lr" in line, line
    assert f"{run_dir / 'last.pt'} is kept" in line, line
    for name in ("last.pt", "best.pt"):
        ck = load(run_dir / name)
        assert all(
            torch.isfinite(t).all() for t in ck["state_dict"].values() if t.is_floating_point()
        )
    assert load(run_dir / "best.pt")["epoch"] == 1
    assert load(run_dir / "last.pt")["epoch"] == 1  # stopped inside epoch 2


# -- 6. safe loading ---------------------------------------------------------------------
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


def test_crafted_pickle_is_refused_by_the_cli(background: Any) -> None:
    rc, err = background["wait"]("eval")
    assert rc == 2
    line = one_line(err)
    assert "refused" in line and "posix.system" in line and str(background["evil"]) in line, line
    assert not background["marker"].exists() and not background["eval"].exists()


@pytest.fixture(scope="module", autouse=True)
def background(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Short runs that only need checking at the end, started with the first test so
    that they fill the CPU the kill/resume tests leave idle. At teardown, every process
    this module started and that still runs (a failed test's) is killed."""
    root = tmp_path_factory.mktemp("background")
    evil, marker = _crafted(root, "system")
    dirs = {"diverge": root / "diverge", "eval": root / "eval"}
    procs = {
        "diverge": start("train", dirs["diverge"], *DIVERGE),
        "eval": start("eval", dirs["eval"], f"ckpt={evil}"),
    }
    yield {**dirs, "evil": evil, "marker": marker, "wait": lambda name: finish(procs[name])}
    for proc in _STARTED:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
