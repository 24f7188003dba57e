"""torchrun/DDP: a 2-process gloo job on the CPU equals the 1-process run of the same
config, writes one run directory, stops every rank when one fails, and resumes.

Real ``python -m torch.distributed.run --standalone --nproc_per_node=2`` jobs of the CLI
(through ``tests/run_csgd.py``, which adds a test's failure hook or float64 from outside
the library) on a tiny ResNet-20 over 256 digits images (global batch 16: 8 per rank, 16
steps per epoch), one thread per process. The C-SGD runs use lr 0.002: this tiny network
is chaotic at larger rates (two 1-process runs that differ only in their thread count
drift apart by 100% within 32 steps at lr 0.01), which would hide what is tested here.
The 1- vs 2-process comparison runs in float64, where the two differ only by rounding.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import FORCE
from conftest import TINY_DIGITS as TINY
from omegaconf import OmegaConf

import csgd_cli
from csgd_cli.api.record import PruneRecord
from csgd_cli.common.errors import CsgdError
from csgd_cli.runner.datasets import build_data

ENV = {**os.environ, "CSGD_NO_BAR": "1", "OMP_NUM_THREADS": "1"}
RUN_CSGD = str(Path(__file__).with_name("run_csgd.py"))
F64 = {"CSGD_TEST_DTYPE": "float64"}
TIMEOUT = 300
# two epochs cannot collapse the clusters: FORCE (the forecast would refuse the schedule)
TRAIN = ["schedule.epochs=2", "schedule.lr=0.002", "schedule.log_every=2", "dist.sync_bn=true",
         FORCE]  # fmt: skip
# A 2-process job whose clusters collapse, so its checkpoint merges exactly: a strong pull
# without momentum (members' differences shrink by 1 - lr * eps = 0.6 per step) and enough
# steps for the BN running statistics (momentum 0.1) to forget the early filters.

EXACT = [  # forecast to converge: no FORCE
    *TRAIN[1:-1],
    "schedule.epochs=8",
    "schedule.momentum=0",
    "epsilon=200",
    "norm_epsilon=200",
    "schedule.weight_decay=0",
]
FAIL = "CSGD_TEST_FAIL: rank failed on purpose at step 5"
VOLATILE = {"config", "time", "epoch_time"}
RUN = [  # the whole pipeline, two iterative rounds, under torchrun
    "pretrain.epochs=1",
    "schedule.epochs=1",
    "finetune.epochs=1",
    "epsilon=0.05",
    "ratios=[0.75,0.5]",
    "prune.force=true",
]


def launch(procs: int, stage: str, run_dir: Path, *args: str, **env: str) -> subprocess.Popen:
    """``csgd <stage>`` in one process, or under torchrun in ``procs``; stderr goes to
    ``<run_dir>.<stage>[.resume].err`` (readable while the job runs)."""
    head = [sys.executable, RUN_CSGD]
    if procs > 1:
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        head += [f"--nproc_per_node={procs}", RUN_CSGD]
    argv = [*head, stage, *TINY, *args, f"hydra.run.dir={run_dir}"]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    err_path = Path(f"{run_dir}.{stage}{'.resume' if 'resume=true' in args else ''}.err")
    with open(err_path, "w") as err:
        proc = subprocess.Popen(argv, env={**ENV, **env}, stdout=subprocess.DEVNULL, stderr=err)
    proc.err = err_path  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    rc = proc.wait(timeout=TIMEOUT)
    return rc, proc.err.read_text()  # type: ignore[attr-defined]


def logged_step(metrics: Path) -> int:
    if not metrics.is_file():
        return 0
    steps = [0]
    for line in metrics.read_text().splitlines():
        try:
            steps.append(json.loads(line).get("step", 0))
        except ValueError:  # a line being written
            pass
    return max(steps)


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def tensors(obj: Any, where: str = "") -> dict[str, torch.Tensor]:
    """Every floating-point tensor of a checkpoint, by path."""
    if isinstance(obj, dict):
        return {
            k: v
            for key, val in obj.items()
            if key not in VOLATILE
            for k, v in tensors(val, f"{where}/{key}").items()
        }
    if isinstance(obj, (list, tuple)):
        return {k: v for i, x in enumerate(obj) for k, v in tensors(x, f"{where}/{i}").items()}
    if isinstance(obj, torch.Tensor) and obj.is_floating_point():
        return {where: obj}
    return {}


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / a.abs().max().clamp(min=1e-12)).item()


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every job of this file, started side by side to share the 2 cores (each process
    spends most of its time importing): the same C-SGD training in 1 and in 2
    processes, a 2-process job whose rank 1 fails at step 5, and a 2-process job
    stopped by SIGTERM at step 6 and resumed; a 2-process job trained until its clusters
    collapse, then the prune of its checkpoint."""
    root = tmp_path_factory.mktemp("dist")
    t0 = time.monotonic()
    procs = {
        "one": launch(1, "train", root / "one", *TRAIN, **F64),
        "two": launch(2, "train", root / "two", *TRAIN, **F64),
        "exact": launch(2, "train", root / "exact", *EXACT),
        "run": launch(2, "run", root / "run", *RUN),
        "fail": launch(2, "train", root / "fail", *TRAIN, CSGD_TEST_FAIL="1:5"),
        "killed": launch(2, "train", root / "killed", *TRAIN, **F64),
    }
    res: dict[str, Any] = {"root": root, "failed_at": None, "signalled": False}
    later = {  # started once the job they follow has ended
        "resume": (
            "killed",
            lambda: launch(2, "train", root / "killed", *TRAIN, "resume=true", **F64),
        ),
        "prune": (
            "exact",
            lambda: launch(1, "prune", root / "pruned", f"ckpt={root / 'exact/last.pt'}"),
        ),
    }
    deadline = t0 + TIMEOUT
    while time.monotonic() < deadline:
        if res["failed_at"] is None and FAIL in procs["fail"].err.read_text():
            res["failed_at"] = time.monotonic()
        if procs["fail"].poll() is not None and "fail_ended" not in res:
            res["fail_ended"] = time.monotonic()
        k = procs["killed"]
        if (
            not res["signalled"]
            and k.poll() is None
            and logged_step(root / "killed/metrics.jsonl") >= 6
        ):
            k.send_signal(signal.SIGTERM)  # torchrun passes it on to every rank
            res["signalled"] = True
        for name, (after, start) in later.items():
            if name not in procs and procs[after].poll() is not None:
                if name == "resume":
                    res["killed_ck"] = load(root / "killed/last.pt") if res["signalled"] else None
                procs[name] = start()
        if len(procs) == 8 and all(p.poll() is not None for p in procs.values()):
            break
        time.sleep(0.02)
    for name, p in procs.items():
        res[name] = finish(p)
    print(f"\nall 2-process jobs of tests/test_distributed.py: {time.monotonic() - t0:.1f} s")
    return res


# -- data: the global batch ------------------------------------------------------------


def test_ranks_batches_are_the_single_process_batch_cut_in_parts() -> None:
    """Rank r takes the r-th contiguous part of each step's single-process batch, with
    the crop and flip that sample gets in one process; eval shards cover the split."""
    cfg = OmegaConf.create(
        {"name": "synthetic", "num_train": 96, "num_test": 50, "batch_size": 12, "augment": True}
    )
    cpu = torch.device("cpu")
    one = build_data(cfg, seed=3, device=cpu)
    parts = [build_data(cfg, seed=3, device=cpu, rank=r, world=3) for r in range(3)]
    assert {d.steps_per_epoch() for d in parts} == {one.steps_per_epoch()} == {8}
    for epoch in (0, 5):
        for step, batches in enumerate(
            zip(
                one.train_batches(epoch, 2),
                *(d.train_batches(epoch, 2) for d in parts),
                strict=True,
            )
        ):
            (x, y), *mine = batches
            assert all(len(b[1]) == 4 for b in mine), step
            assert torch.equal(x, torch.cat([b[0] for b in mine]))
            assert torch.equal(y, torch.cat([b[1] for b in mine]))
    test = [torch.cat([y for _, y in d.test_batches()]) for d in parts]
    assert torch.equal(torch.cat(test), one.test_y) and [len(t) for t in test] == [16, 17, 17]


def test_a_global_batch_that_does_not_divide_is_refused() -> None:
    cfg = OmegaConf.create({"name": "synthetic", "num_train": 64, "num_test": 8, "batch_size": 16})
    with pytest.raises(CsgdError, match=r"batch_size=16 .* does not divide among 3 processes"):
        build_data(cfg, seed=0, device=torch.device("cpu"), rank=0, world=3)


# -- one job, one result -----------------------------------------------------------------


def test_two_processes_equal_one_and_write_one_checkpoint(jobs: dict[str, Any]) -> None:
    root = jobs["root"]
    for name in ("one", "two"):
        assert jobs[name][0] == 0, jobs[name][1][-4000:]
    one, two = load(root / "one/last.pt"), load(root / "two/last.pt")
    assert not any(k.startswith("module.") for k in two["state_dict"])
    assert set(two["state_dict"]) == set(one["state_dict"])
    assert PruneRecord.from_checkpoint(two).clusters == PruneRecord.from_checkpoint(one).clusters
    a, b = tensors(one), tensors(two)
    assert set(a) == set(b) and len(a) > 100
    assert all(v.dtype == torch.float64 for v in a.values())
    worst = max((rel_diff(a[k], b[k]), k) for k in a)
    assert worst[0] < 1e-10, worst  # float64: the two differ by rounding only
    for ra, rb in zip(one["history"], two["history"], strict=True):  # reduced metrics
        assert ra["test_acc"] == rb["test_acc"]
        assert abs(ra["train_loss"] - rb["train_loss"]) < 1e-4 * abs(ra["train_loss"])
        assert abs(ra["test_loss"] - rb["test_loss"]) < 1e-4 * abs(ra["test_loss"])
    # one run directory (no stray one from a second Hydra clock), written by rank 0 only
    dirs = {p.name for p in root.iterdir() if p.is_dir()}
    assert dirs == {"one", "two", "exact", "run", "fail", "killed", "pruned"}
    files = {p.name for p in (root / "two").iterdir()}
    assert {"last.pt", "best.pt", "metrics.jsonl", ".hydra"} <= files
    assert not [f for f in files if f.endswith(".tmp")]
    recs = [json.loads(x) for x in (root / "two/metrics.jsonl").open()]
    keys = [(r["step"], "train_loss" in r) for r in recs]
    assert len(keys) == len(set(keys)) == 16 + 2  # one writer: 16 log steps, 2 epochs


def test_the_two_process_checkpoint_prunes_and_loads_in_one_process(jobs: dict[str, Any]) -> None:
    """The DDP checkpoint is an ordinary one: it merges exactly (no prune.force: the
    1e-4 logit check passed) and loads in one process."""
    root = jobs["root"]
    assert jobs["prune"][0] == 0, jobs["prune"][1][-4000:]
    assert jobs["exact"][0] == 0, jobs["exact"][1][-4000:]
    wide = csgd_cli.load_model(root / "exact/last.pt")
    thin = csgd_cli.load_model(root / "pruned/pruned.pt")
    data = OmegaConf.create({"name": "digits", "batch_size": 16, "limit": 256})
    x = build_data(data, seed=0, device=torch.device("cpu")).sample_batch(64)[0]
    with torch.no_grad():
        lw, lt = wide(x), thin(x)
    assert rel_diff(lw, lt) < 1e-4 and torch.equal(lw.argmax(1), lt.argmax(1))
    assert json.loads((root / "pruned/prune.json").read_text())["relative_logit_diff"] < 1e-4
    assert sum(p.numel() for p in thin.parameters()) < sum(p.numel() for p in wide.parameters())


# -- failures ----------------------------------------------------------------------------


def test_a_failing_rank_ends_every_rank_within_seconds(jobs: dict[str, Any]) -> None:
    rc, err = jobs["fail"]
    assert rc != 0 and FAIL in err, err[-3000:]
    # rank 1 reports; rank 0 leaves quietly (torchrun's SIGTERM, or the watchdog's line)
    assert err.count(f"RuntimeError: {FAIL}") == 1 + err.count("rank 0 stopped: rank 1 failed")
    root_cause = err.split("Root Cause (first observed failure):")[1]
    assert "rank      : 1 " in root_cause.split("=====")[0]
    assert jobs["failed_at"] is not None
    # the job ended on its own while the fixture watched (within its TIMEOUT), not after
    # the collective timeout (dist.timeout_s=1800) the ranks would otherwise wait out
    assert "fail_ended" in jobs, "the job went on after rank 1 failed"
    took = jobs["fail_ended"] - jobs["failed_at"]
    print(f"\nthe failed job ended {took:.1f} s after rank 1 failed")
    assert not (jobs["root"] / "fail/last.pt").exists()


def test_sigterm_then_resume_under_torchrun_equals_an_uninterrupted_job(
    jobs: dict[str, Any],
) -> None:
    root = jobs["root"]
    assert jobs["signalled"], "the job ended before it could be interrupted"
    rc, err = jobs["killed"]
    assert rc != 0 and "preempted" in err, err[-3000:]
    ck = jobs["killed_ck"]
    assert 6 <= ck["epoch"] * 16 + ck["step_in_epoch"] < 32
    assert jobs["resume"][0] == 0, jobs["resume"][1][-4000:]
    a, b = tensors(load(root / "two/last.pt")), tensors(load(root / "killed/last.pt"))
    assert set(a) == set(b)
    for k in a:
        if "epoch_stats" not in k:
            assert torch.equal(a[k], b[k]), k


def test_csgd_run_under_torchrun_writes_one_set_of_outputs(jobs: dict[str, Any]) -> None:
    """Every stage-level write (checkpoints, pruned.pt2/.onnx, summary.json) happens once,
    on rank 0, and every rank merges the same model (rank 0's BN statistics)."""
    rc, err = jobs["run"]
    assert rc == 0, err[-4000:]
    run = jobs["root"] / "run"
    names = {p.name for p in run.iterdir()}
    want = {"base.pt", "csgd_r1.pt", "pruned_r1.pt", "pruned_r2.pt", "finetuned.pt"}
    assert want | {"summary.json", "pruned_r2.pt2"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    summary = json.loads((run / "summary.json").read_text())
    assert list(summary["rows"]) == [
        "base", "csgd_r1", "pruned_r1", "csgd_r2", "pruned_r2", "finetuned",
    ]  # fmt: skip
    thin = csgd_cli.load_model(run / "pruned_r2.pt")
    assert thin.widths[:3] == [2, 4, 4]
