"""End to end: stages that start from another stage's checkpoint (``init=``) through the
CLI, and what the command line may change about it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FORCE, TINY_DIGITS

from csgd_cli.api.checkpoint import load_checkpoint
from csgd_cli.api.record import PruneRecord
from csgd_cli.runner import cli as cli_main

ENV = {**os.environ, "CSGD_NO_BAR": "1", "OMP_NUM_THREADS": "1"}
FAST = [*TINY_DIGITS, "schedule.epochs=1", "pretrain.epochs=1", "schedule.log_every=0", FORCE]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "csgd_cli", *args], capture_output=True, text=True, env=ENV
    )


def run(*args: str) -> None:
    """One csgd command in this process (a subprocess would import torch again)."""
    cli_main.main(list(args))


def test_clusters_from_init_record_their_own_ratio_and_refuse_other_widths(
    tiny_base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``train init=clustered.pt`` records the ratio its clusters were made with (not
    cfg.ratio), and a command line asking for other widths is refused, not ignored."""
    ck = tiny_base / "base/last.pt"
    run("cluster", *FAST, f"ckpt={ck}", "ratio=0.5", f"hydra.run.dir={tiny_base / 'cl'}")
    clustered = tiny_base / "cl/clustered.pt"
    capsys.readouterr()
    for bad in ("ratio=0.25", "prune.round_to=4", "prune.exclude=[layer1]"):
        with pytest.raises(SystemExit) as e:
            run("train", *FAST, f"init={clustered}", bad, f"hydra.run.dir={tiny_base / 'bad'}")
        err = capsys.readouterr().err
        key = bad.split("=")[0]
        assert e.value.code == 2 and "Traceback" not in err, err[-2000:]
        assert f"carries its own clusters (made with {key}=" in err
        assert f"drop {key}=" in err
        assert not (tiny_base / "bad").exists()
    run("train", *FAST, f"init={clustered}", "ratio=0.5", f"hydra.run.dir={tiny_base / 'tr'}")
    last = load_checkpoint(tiny_base / "tr/last.pt")
    rec = PruneRecord.from_checkpoint(last)
    assert rec.ratio == 0.5 and rec.settings["ratio"] == 0.5
    assert rec.group_widths == {k: len(v) for k, v in rec.clusters.items()}
    assert json.loads((tiny_base / "tr/widths.json").read_text())["ratio"] == 0.5
    run("train", *FAST, f"init={clustered}", f"hydra.run.dir={tiny_base / 'tr2'}")
    from csgd_cli.runner.runs import read_run

    assert read_run(tiny_base / "tr2", tiny_base).ratio == 0.5  # cfg.ratio is 0.625


def test_init_of_another_architecture_than_an_explicit_model(tmp_path: Path) -> None:
    """model= on the command line must agree with init=; without model= the
    checkpoint's architecture is used."""
    base = tmp_path / "base"
    assert (
        cli("pretrain", *TINY_DIGITS, "pretrain.epochs=0", f"hydra.run.dir={base}").returncode == 0
    )
    out = cli(
        "train",
        *TINY_DIGITS[1:],
        "model=resnet56",
        f"init={base / 'last.pt'}",
        f"hydra.run.dir={tmp_path / 'x'}",
    )
    assert out.returncode == 2 and not (tmp_path / "x").exists()
    (line,) = out.stderr.strip().splitlines()
    assert "holds a resnet20 but model=resnet56" in line and "drop model=" in line
    out = cli(
        "train",
        *[a for a in TINY_DIGITS if not a.startswith(("model=", "+model"))],
        f"init={base / 'last.pt'}",
        "schedule.epochs=0",
        FORCE,
        f"hydra.run.dir={tmp_path / 'y'}",
    )
    assert out.returncode == 0, out.stderr
    ck = torch.load(tmp_path / "y" / "last.pt", weights_only=True)
    assert ck["arch"]["name"] == "resnet20"
