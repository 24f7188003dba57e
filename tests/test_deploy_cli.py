"""Deployment through the CLI: prune writes pruned.onnx, `csgd export` of any checkpoint,
`csgd eval backend=...`, a missing onnxruntime refused before any file is written, and
`prune.round_to` wherever clusters or L1 widths are made."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FORCE, TINY_DIGITS
from omegaconf import OmegaConf

from csgd_cli import load_model
from csgd_cli.api.record import PruneRecord
from csgd_cli.runner.datasets import build_data

pytest.importorskip("onnxruntime")
from csgd_cli.deploy.export import check_onnx, onnx_node_types

ENV = {**os.environ, "CSGD_NO_BAR": "1", "OMP_NUM_THREADS": "1"}
# the stock ResNet-20 widths (16/32/64): what rounding to 8 or 16 is about
R20 = [a for a in TINY_DIGITS if not a.startswith("+model")]


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "csgd_cli", *args], capture_output=True, text=True, env=env or ENV
    )


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("deploy")
    out = cli("pretrain", *R20, "pretrain.epochs=0", f"hydra.run.dir={root / 'base'}")
    assert out.returncode == 0, out.stderr
    return root / "base" / "last.pt"


def digits_batch(n: int = 64) -> torch.Tensor:
    data = build_data(OmegaConf.create({"name": "digits"}), seed=0, device=torch.device("cpu"))
    return data.sample_batch(n)[0]


def test_export_any_checkpoint_and_eval_in_onnxruntime(base: Path, tmp_path: Path) -> None:
    out = cli("export", *R20, f"ckpt={base}", "format=onnx", f"hydra.run.dir={tmp_path / 'ex'}")
    assert out.returncode == 0, out.stderr
    onnx = tmp_path / "ex" / "last.onnx"
    assert "BatchNormalization" not in onnx_node_types(onnx)
    assert check_onnx(onnx, load_model(base), digits_batch()) < 1e-4
    out = cli(
        "eval", *R20, f"ckpt={base}", "backend=onnxruntime", f"hydra.run.dir={tmp_path / 'ev'}"
    )
    assert out.returncode == 0, out.stderr
    res = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert res["backend"] == "onnxruntime" and res["latency_ms"] > 0 and res["device"] == "cpu"


def test_prune_writes_a_checked_onnx_file(base: Path, tmp_path: Path) -> None:
    tr = tmp_path / "tr"
    out = cli("train", *R20, f"init={base}", "schedule.epochs=1", FORCE, f"hydra.run.dir={tr}")
    assert out.returncode == 0, out.stderr
    pr = tmp_path / "pr"
    out = cli("prune", *R20, f"ckpt={tr / 'last.pt'}", "prune.force=true", f"hydra.run.dir={pr}")
    assert out.returncode == 0, out.stderr
    assert {"pruned.pt", "pruned.pt2", "pruned.onnx"} <= {p.name for p in pr.iterdir()}
    thin = load_model(pr / "pruned.pt")
    assert thin.widths[:3] == [10, 20, 40]
    assert check_onnx(pr / "pruned.onnx", thin, digits_batch()) < 1e-4


def test_missing_onnxruntime_is_refused_before_anything_is_written(
    base: Path, tmp_path: Path
) -> None:
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "onnxruntime.py").write_text("raise ImportError('not installed here')\n")
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(shadow), *sys.path])}
    for stage, extra in (("eval", "backend=onnxruntime"), ("export", "format=onnx")):
        run = tmp_path / stage
        out = cli(stage, *R20, f"ckpt={base}", extra, f"hydra.run.dir={run}", env=env)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        (line,) = out.stderr.strip().splitlines()
        assert "onnxruntime is not installed" in line and 'pip install "csgd[deploy]"' in line
        assert not run.exists()


def test_round_to_reaches_cluster_and_the_l1_widths(base: Path, tmp_path: Path) -> None:
    cl = tmp_path / "cl"
    args = ("ratio=0.625", "prune.round_to=16")
    out = cli("cluster", *R20, f"ckpt={base}", *args, f"hydra.run.dir={cl}")
    assert out.returncode == 0, out.stderr
    clustered = torch.load(cl / "clustered.pt", weights_only=True)
    clusters = PruneRecord.from_checkpoint(clustered).clusters
    # 10 -> 16, 20 -> 16, 40 (a tie between 32 and 48) -> 32
    assert [len(clusters[f"layer{s}"]) for s in (1, 2, 3)] == [16, 16, 32]
    assert all(len(c) % 16 == 0 for c in clusters.values())
    l1 = tmp_path / "l1"
    out = cli("prune", *R20, f"ckpt={base}", "prune.method=l1", *args, f"hydra.run.dir={l1}")
    assert out.returncode == 0, out.stderr
    rep = json.loads((l1 / "prune.json").read_text())
    assert rep["widths"] == [16, 16, 32] + [16] * 3 + [16] * 3 + [32] * 3
