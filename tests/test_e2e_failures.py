"""End to end: what stops a run, and what it leaves. A diverging run, a data set holding a
NaN image, and every writer on a full disk (``RLIMIT_FSIZE``: a write past it fails with
EFBIG, which csgd treats as a full disk). Each is a real process (tiny ResNet-20, 256
digits, 16 steps an epoch, on the CPU), all started together with the module's first
test; each test waits for its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from conftest import FORCE
from conftest import TINY_DIGITS as TINY
from csgd_procs import ENV, STARTED, TIMEOUT, finish, kill_leftovers, load, one_line, start

# csgd as the NaN test launches it: training image T_NAN of digits is NaN.
NAN_WRAPPER = """
import os, sys
import torch
from csgd_cli.runner import cli, datasets
load, stats = datasets._load_digits, datasets._channel_stats
def poisoned():
    tx, ty, vx, vy = load()
    tx = tx.to(torch.get_default_dtype())
    tx[int(os.environ["T_NAN"])] = float("nan")
    return [tx, ty, vx, vy]
datasets._load_digits = poisoned
datasets._channel_stats = lambda x: stats(x.nan_to_num().to(torch.uint8))
cli.main(sys.argv[1:])
"""


DIVERGE = [
    "schedule.epochs=3",
    "schedule.milestones=[1]",
    "schedule.gamma=1e8",
    "schedule.log_every=0",
    "epsilon=0.05",
    "ratio=0.5",
    "checkpoint.every_steps=1",
    FORCE,
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


NAN_POS = 3 * 16 + 5  # the NaN image sits in the 4th batch of epoch 0


def nan_sample() -> int:
    """The digits image the NaN run poisons: position NAN_POS of epoch 0's order."""
    from omegaconf import OmegaConf

    from csgd_cli.runner.datasets import build_data

    cfg = OmegaConf.create({"name": "digits", "limit": 256, "batch_size": 16})
    order = build_data(cfg, seed=0, device=torch.device("cpu")).epoch_indices(0)
    return int(order[NAN_POS])


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


@pytest.fixture(scope="module", autouse=True)
def background(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Every run of this module, started with its first test; ``wait(name)`` gives a
    run's exit code and stderr. At teardown, every process still running is killed."""
    root = tmp_path_factory.mktemp("failures")
    dirs = {"diverge": root / "diverge"}
    nan_k = nan_sample()
    procs = {
        "diverge": start(
            [
                sys.executable,
                "-m",
                "csgd_cli",
                "train",
                *TINY,
                *DIVERGE,
                f"hydra.run.dir={dirs['diverge']}",
            ],
            root / "diverge.stderr",
        ),
        "nan": start(
            [
                sys.executable,
                "-c",
                NAN_WRAPPER,
                "pretrain",
                *TINY,
                "pretrain.epochs=1",
                "checkpoint.every_steps=1",
                f"hydra.run.dir={root / 'nan'}",
            ],
            root / "nan.err",
            T_NAN=str(nan_k),
        ),
    }
    (root / "writers").mkdir()
    writers = subprocess.Popen(
        [sys.executable, "-c", FULL_DISK, str(root / "writers")],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    STARTED.append(writers)
    yield {
        **dirs,
        "root": root,
        "nan_k": nan_k,
        "wait": lambda name: finish(procs[name]),
        "writers_proc": writers,
    }
    kill_leftovers()


@pytest.fixture
def cli_runs(background: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    """Waits for the NaN run and the writers; their results as the tests read them."""

    def results() -> dict[str, Any]:
        if "nan" not in background:
            every = background["writers_proc"]
            background["writers"] = (every.wait(timeout=TIMEOUT), *every.communicate())
            background["nan"] = background["wait"]("nan")
        return background

    return results
