"""Defects a review of the library found (issue 14), each test failing before its fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_DIGITS
from omegaconf import OmegaConf

from csgd_cli.api import checkpoint
from csgd_cli.api.checkpoint import load_checkpoint
from csgd_cli.common.device import use_channels_last
from csgd_cli.common.errors import CsgdError
from csgd_cli.runner import cli, datasets

ENV = {**os.environ, "CSGD_NO_BAR": "1", "OMP_NUM_THREADS": "1"}
FAST = [*TINY_DIGITS, "schedule.epochs=1", "pretrain.epochs=1", "schedule.log_every=0"]


def sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "csgd_cli", *args], capture_output=True, text=True, env=ENV
    )


def run(*args: str) -> None:
    """One csgd command in this process (a subprocess would import torch again)."""
    cli.main(list(args))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("review")
    run("pretrain", *FAST, f"hydra.run.dir={d / 'base'}")
    return d


def test_clusters_from_init_record_their_own_ratio_and_refuse_other_widths(
    base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """1: ``train init=clustered.pt`` records the ratio its clusters were made with (not
    cfg.ratio), and a command line asking for other widths is refused, not ignored."""
    ck = base / "base/last.pt"
    run("cluster", *FAST, f"ckpt={ck}", "ratio=0.5", f"hydra.run.dir={base / 'cl'}")
    clustered = base / "cl/clustered.pt"
    capsys.readouterr()
    for bad in ("ratio=0.25", "prune.round_to=4", "prune.exclude=[layer1]"):
        with pytest.raises(SystemExit) as e:
            run("train", *FAST, f"init={clustered}", bad, f"hydra.run.dir={base / 'bad'}")
        err = capsys.readouterr().err
        key = bad.split("=")[0]
        assert e.value.code == 2 and "Traceback" not in err, err[-2000:]
        assert f"carries its own clusters (made with {key}=" in err
        assert f"drop {key}=" in err
        assert not (base / "bad").exists()
    run("train", *FAST, f"init={clustered}", "ratio=0.5", f"hydra.run.dir={base / 'tr'}")
    last = load_checkpoint(base / "tr/last.pt")
    assert last["ratio"] == 0.5 and last["width_settings"]["ratio"] == 0.5
    assert last["group_widths"] == {k: len(v) for k, v in last["clusters"].items()}
    assert json.loads((base / "tr/widths.json").read_text())["ratio"] == 0.5
    run("train", *FAST, f"init={clustered}", f"hydra.run.dir={base / 'tr2'}")
    from csgd_cli.runner.runs import read_run

    assert read_run(base / "tr2", base).ratio == 0.5  # cfg.ratio is 0.625


def test_channels_last_follows_the_config() -> None:
    """2: channels_last inputs only when the config asks, even on CUDA."""
    cuda = torch.device("cuda", 0)
    assert use_channels_last(True, cuda) and not use_channels_last(False, cuda)
    assert not use_channels_last(True, torch.device("cpu"))


def test_messages_name_real_keys_and_paths(tmp_path: Path) -> None:
    """4: a file the run wrote is named by its path (never "pruned=..."), a file given to
    the API by its path, a config key as key=path."""
    bad = tmp_path / "base.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CsgdError) as e:
        load_checkpoint(bad, "run")
    assert str(e.value).startswith(f"{bad} is truncated") and "delete it" in str(e.value)
    with pytest.raises(CsgdError) as e:
        load_checkpoint(bad, None)
    assert "=" not in str(e.value).split(" is ")[0]
    with pytest.raises(CsgdError, match=f"init={bad} is truncated"):
        load_checkpoint(bad, "init")
    d = tmp_path / "run"
    d.mkdir()
    (d / "base.pt").write_bytes(b"garbage")
    r = sh("run", *FAST, "resume=true", f"hydra.run.dir={d}")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"{d / 'base.pt'} is truncated" in r.stderr and "base=" not in r.stderr


def test_need_clusters_names_the_file(base: Path) -> None:
    from csgd_cli.runner.pipeline import prune_for_config

    cfg = OmegaConf.create({"prune": {"method": "csgd", "tolerance": 1e-4, "force": False}})
    path = base / "base/last.pt"
    model = checkpoint.model_from_checkpoint(load_checkpoint(path))
    with pytest.raises(CsgdError, match=f"ckpt={path} has no clusters"):
        prune_for_config(cfg, model, {}, torch.zeros(2, 1, 8, 8), str(path))


def test_preflight_hands_its_data_and_checkpoint_on(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """5: one CLI call validates once, reads the data set once and the checkpoint once
    (preflight's reads are what the stage uses)."""
    calls = {"digits": 0, "load": 0, "validate": 0}
    real_digits, real_read, real_validate = datasets._load_digits, checkpoint._read, cli.validate

    def count(key, fn):
        def wrapped(*a, **k):
            calls[key] += 1
            return fn(*a, **k)

        return wrapped

    monkeypatch.setattr(datasets, "_load_digits", count("digits", real_digits))
    monkeypatch.setattr(checkpoint, "_read", count("load", real_read))
    monkeypatch.setattr(cli, "validate", count("validate", real_validate))
    monkeypatch.setattr(datasets, "_LOADED", {})
    monkeypatch.setattr(checkpoint, "_CACHE", {})
    ck = base / "base/last.pt"
    cli.main(["eval", *TINY_DIGITS, f"ckpt={ck}", f"hydra.run.dir={tmp_path / 'ev'}"])
    assert (tmp_path / "ev/eval.json").is_file()
    assert calls == {"digits": 1, "load": 1, "validate": 1}


def test_the_loop_calls_step_hooks_instead_of_a_test_switch() -> None:
    """6: the step loop has no test code: callers pass hooks."""
    import inspect

    from csgd_cli.runner import engine

    assert "CSGD_TEST" not in inspect.getsource(engine)
    seen: list[int] = []
    from csgd_cli.common.config import ScheduleConf
    from csgd_cli.core.optim import plain_sgd
    from csgd_cli.models import get_model

    data = datasets.build_data(
        OmegaConf.create({"name": "synthetic", "num_train": 32, "num_test": 8, "batch_size": 8}),
        seed=0,
        device=torch.device("cpu"),
    )
    model = get_model("resnet20", widths=[2] * 12)
    sched = OmegaConf.structured(ScheduleConf(epochs=1, milestones=[], log_every=0))
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        t = engine.Trainer(
            model, data, sched, plain_sgd(model, sched), device=torch.device("cpu"),
            out=Path(out), phase="pretrain", payload={"arch": model.arch},
            hooks=[lambda trainer, step: seen.append(step)],
        )  # fmt: skip
        t.fit()
    assert seen == [1, 2, 3, 4]
