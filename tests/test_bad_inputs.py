"""Bad-input matrix: every case runs the real CLI and must exit 2 with exactly one line
on stderr naming the problem and the fix, print no traceback, and change no file of an
earlier run (each case passes ``hydra.run.dir=<that run>``).

Cases run three at a time in one module fixture; the config and data cases start while
the earlier ``csgd run`` that the file and stage-order cases need is still training.
Meanwhile another live process holds the fake earlier run's directory (its lock), as a
csgd run still writing there would: only the case that gets that far is refused for it.

Failures that can only happen once a stage runs (a full disk, a NaN image in the data)
change Hydra's record of the command in the run directory, so they cannot keep this
contract; ``tests/test_e2e_lock.py`` checks them for one line and exit 2 instead.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_DIGITS as TINY

EARLIER = [
    *TINY,
    "pretrain.epochs=1",
    "schedule.epochs=1",
    "finetune.epochs=0",
    "epsilon=0.05",
    "ratio=0.5",
    "prune.force=true",
    "prune.export=false",
]
ENV = {**os.environ, "CSGD_NO_BAR": "1", "OMP_NUM_THREADS": "1"}
TIMEOUT = 300
# a CLI warning line (csgd train: a schedule that cannot converge) is not the error line
WARNING = re.compile(r"^csgd \w+: warning: ")
HOLD = r"""
import sys, time
from csgd_cli.runner import lock

lock.acquire(sys.argv[1], "train")
print("held", flush=True)
time.sleep(1200)  # the fixture kills it; this ends it if pytest itself was killed
"""


@dataclass(frozen=True)
class Case:
    stage: str
    args: tuple[str, ...]  # "{name}" is replaced by the path of input file `name`
    expect: tuple[str, ...]  # substrings of the one stderr line
    needs_run: bool = False  # reads files of the real earlier run


CASES: dict[str, Case] = {
    # -- configs --------------------------------------------------------------------------
    "unknown_model": Case(
        "train", ("model=resnet9000",), ("unknown model 'resnet9000'", "model=<", "resnet20")
    ),
    "unknown_dataset": Case(
        "pretrain", ("dataset=svhn",), ("unknown dataset 'svhn'", "digits", "mnist")
    ),
    "epsilon_not_a_number": Case(
        "train", ("epsilon=abc",), ("epsilon", "'abc'", "Float", "right type")
    ),
    "epsilon_negative": Case("train", ("epsilon=-0.1",), ("epsilon=-0.1", "out of range", ">= 0")),
    "ratio_zero": Case("train", ("ratio=0",), ("ratio=0", "out of range", "(0, 1]")),
    "ratio_above_one": Case("train", ("ratio=1.5",), ("ratio=1.5", "out of range", "(0, 1]")),
    "epochs_negative": Case(
        "train", ("schedule.epochs=-1",), ("schedule.epochs=-1", "out of range", ">= 0")
    ),
    "unknown_key": Case(
        "train", ("epsilonn=0.1",), ("unknown key 'epsilonn'", "spelling", "--cfg job")
    ),
    "widths_of_wrong_length": Case(
        "pretrain", ("+model.kwargs.widths=[4,8]",), ("resnet20", "widths needs 12 entries")
    ),
    "widths_with_a_zero": Case(
        "pretrain", ("+model.kwargs.widths=[4,8,0,4,4,4,8,8,8,8,8,8]",), ("width 0", ">= 1")
    ),
    "init_and_ckpt_together": Case(
        "train", ("init={fake_ckpt}", "ckpt={fake_ckpt}"), ("both init= and ckpt=", "pass one")
    ),
    # -- the run directory ----------------------------------------------------------------
    "run_dir_in_use": Case(
        "pretrain",
        (),
        ("is in use by csgd train (pid {holder_pid} on host", "since", "another hydra.run.dir"),
    ),
    # -- data -----------------------------------------------------------------------------
    "cifar10_absent_offline": Case(
        "pretrain",
        ("dataset=cifar10", "dataset.root={no_data}", "dataset.download=false"),
        ("CIFAR-10 not found", "dataset.download=true"),
    ),
    "imagenet_folder_empty": Case(
        "pretrain",
        ("dataset=imagenet", "dataset.root={empty_imagenet}"),
        ("no ImageNet images", "root/train/<class>"),
    ),
    # -- files ----------------------------------------------------------------------------
    "ckpt_missing": Case("eval", ("ckpt={missing}",), ("no such file", "pass ckpt="), True),
    "ckpt_truncated": Case(
        "eval",
        ("ckpt={truncated}",),
        ("truncated, damaged or not a checkpoint", "complete .pt"),
        True,
    ),
    "ckpt_not_a_checkpoint": Case(
        "eval", ("ckpt={notes}",), ("not a checkpoint", "pass ckpt="), True
    ),
    "ckpt_for_other_data_shape": Case(
        "eval",
        ("ckpt={base}", "dataset=synthetic"),
        ("built for in_channels=1", "synthetic has 3", "dataset="),
        True,
    ),
    "ckpt_weights_of_other_arch": Case(
        "eval", ("ckpt={relabelled}",), ("do not fit architecture resnet32",), True
    ),
    "ckpt_of_a_newer_format": Case(
        "eval",
        ("ckpt={newer}",),
        ("written by a newer csgd", "format 99", "reads formats 1 to 3", "upgrade csgd"),
        True,
    ),
    "ckpt_of_an_older_format_with_other_keys": Case(
        "eval",
        ("ckpt={older}",),
        ("written by an older csgd", "format 1", "writes format 3", "lacks state_dict"),
        True,
    ),
    "clusters_do_not_fit": Case(
        "prune", ("ckpt={bad_clusters}",), ("do not partition", "csgd cluster"), True
    ),
    "pruned_ckpt_of_another_class_count": Case(  # issue 22.8: never silently resized
        "eval",
        ("ckpt={other_classes}",),
        ("first: fc.weight is [5,", "in the file, [10,", "damaged or was edited"),
        True,
    ),
    # -- reports (issue 22.6: a damaged file in a run is reported, see test_report_damage) --
    "report_of_a_dir_without_runs": Case(
        "report", ("dir={no_data}",), ("no runs found", "pass the directory of a csgd run")
    ),
    # -- stage order ----------------------------------------------------------------------
    "prune_before_train": Case(
        "prune", ("ckpt={base}",), ("has no clusters", "csgd train init="), True
    ),
    "check_on_pruned_model": Case(
        "check", ("ckpt={pruned}",), ("pruned (already merged) model", "csgd.pt"), True
    ),
}


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """mtime and SHA-256 of every file under ``root`` (hidden ones included)."""
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def csgd(stage: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "csgd_cli", stage, *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def make_fake_run(root: Path) -> Path:
    """What an earlier run leaves behind, for the cases that need no real checkpoint."""
    (root / ".hydra").mkdir(parents=True)
    (root / ".hydra" / "config.yaml").write_text("stage: train\n")
    (root / "metrics.jsonl").write_text('{"phase": "train", "step": 1, "loss": 2.3}\n')
    (root / "train.log").write_text("earlier run\n")
    torch.save({"arch": {"name": "resnet20"}, "state_dict": {}}, root / "last.pt")
    return root / "last.pt"


def make_inputs(run: Path, inputs: Path) -> dict[str, Path]:
    """Broken files derived from the real earlier run's checkpoints."""
    from csgd_cli.api.checkpoint import save_checkpoint
    from csgd_cli.api.record import PruneRecord

    csgd_pt = run / "csgd.pt"
    blob = csgd_pt.read_bytes()
    (inputs / "truncated.pt").write_bytes(blob[: len(blob) // 2])
    (inputs / "notes.txt").write_text("not a checkpoint\n")
    ck = torch.load(csgd_pt, weights_only=True)
    clusters = PruneRecord.from_checkpoint(ck).clusters
    group = next(iter(clusters))
    bad = {**clusters, group: [[0, 999], *clusters[group][1:]]}
    bad_ck = PruneRecord.from_checkpoint(ck).replace(clusters=bad).into(ck)
    save_checkpoint(inputs / "bad_clusters.pt", bad_ck)
    base = torch.load(run / "base.pt", weights_only=True)
    arch = {
        "name": "resnet32",
        "kwargs": {k: v for k, v in base["arch"]["kwargs"].items() if k != "widths"},
    }
    save_checkpoint(inputs / "relabelled.pt", {**base, "arch": arch})
    torch.save({**base, "format": 99}, inputs / "newer.pt")  # as a later csgd would write
    older = {k: v for k, v in base.items() if k != "state_dict"}
    torch.save({**older, "format": 1, "weights": base["state_dict"]}, inputs / "older.pt")
    pruned = torch.load(run / "pruned.pt", weights_only=True)
    five = {k: v[:5] if k.startswith("fc.") else v for k, v in pruned["state_dict"].items()}
    save_checkpoint(inputs / "other_classes.pt", {**pruned, "state_dict": five})
    return {
        "other_classes": inputs / "other_classes.pt",
        "base": run / "base.pt",
        "pruned": run / "pruned.pt",
        "missing": inputs / "missing.pt",
        "truncated": inputs / "truncated.pt",
        "notes": inputs / "notes.txt",
        "bad_clusters": inputs / "bad_clusters.pt",
        "relabelled": inputs / "relabelled.pt",
        "newer": inputs / "newer.pt",
        "older": inputs / "older.pt",
    }


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("bad_inputs")
    real, fake, inputs = tmp / "earlier", tmp / "fake_earlier", tmp / "inputs"
    (inputs / "no_data").mkdir(parents=True)
    for split in ("train", "val"):
        (inputs / "empty_imagenet" / split).mkdir(parents=True)
    paths: dict[str, Any] = {
        "fake_ckpt": make_fake_run(fake),
        "no_data": inputs / "no_data",
        "empty_imagenet": inputs / "empty_imagenet",
    }
    holder = subprocess.Popen(  # a live csgd process holding the fake run's directory
        [sys.executable, "-c", HOLD, str(fake)],
        env=ENV,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    paths["holder_pid"] = holder.pid
    earlier = subprocess.Popen(
        [sys.executable, "-m", "csgd_cli", "run", *EARLIER, f"hydra.run.dir={real}"],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )

    def go(name: str, run_dir: Path) -> subprocess.CompletedProcess:
        c = CASES[name]
        args = [a.format(**{k: str(v) for k, v in paths.items()}) for a in c.args]
        base = TINY if c.needs_run else ["model=resnet20", "dataset=digits", "device=cpu"]
        return csgd(c.stage, *base, *args, f"hydra.run.dir={run_dir}")

    results: dict[str, Any] = {}
    try:
        with ThreadPoolExecutor(3) as pool:
            before = snapshot(fake)
            first = {n: pool.submit(go, n, fake) for n, c in CASES.items() if not c.needs_run}
            results.update({n: (f.result(), fake, before) for n, f in first.items()})
            _, err = earlier.communicate(timeout=TIMEOUT)
            assert earlier.returncode == 0, err
            paths.update(make_inputs(real, inputs))
            before = snapshot(real)
            rest = {n: pool.submit(go, n, real) for n, c in CASES.items() if c.needs_run}
            results.update({n: (f.result(), real, before) for n, f in rest.items()})
    finally:
        holder.kill()
        holder.wait()
    return {n: (*r, paths) for n, r in results.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(
    name: str, outcomes: dict[str, Any]
) -> None:
    proc, run_dir, before, paths = outcomes[name]
    case = CASES[name]
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not WARNING.match(ln)]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr}"
    line = lines[0]
    print(f"{name}: {line}")  # the matrix, with `pytest -s`
    assert proc.returncode == 2, line
    assert line.startswith(f"csgd {case.stage}: error: "), line
    for part in case.expect:
        part = part.format(**paths) if "{" in part else part
        assert part in line, f"{part!r} not in {line!r}"
    assert snapshot(run_dir) == before, "a file of the earlier run changed"
