"""The design pass: one library that stages call, one place per check, and the defects a
review found (each test here failed before its fix)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_DIGITS
from omegaconf import OmegaConf
from torch import nn

from csgd_cli.common.config import STAGES
from csgd_cli.core.clustering import num_clusters, target_widths
from csgd_cli.core.optim import CentripetalSGD
from csgd_cli.models import get_model
from csgd_cli.rules.groups import ChannelGroup, producer, reader
from csgd_cli.tracing.trace import channel_groups

PKG = Path(__file__).resolve().parents[1] / "csgd_cli"
ENV = {**os.environ, "CSGD_NO_BAR": "1", "OMP_NUM_THREADS": "1"}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "csgd_cli", *args], capture_output=True, text=True, env=ENV
    )


# -- structure ----------------------------------------------------------------------------
def test_no_stage_imports_another_stage_and_stages_are_short() -> None:
    for path in sorted((PKG / "runner" / "stages").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:  # from .x import ...
                raise AssertionError(f"{path.name} imports a sibling stage: .{node.module}")
            if isinstance(node, ast.ImportFrom) and "stages" in (node.module or ""):
                raise AssertionError(f"{path.name} imports {node.module}")
        assert len(path.read_text().splitlines()) <= 80, f"{path.name} is not a short script"


def test_help_and_a_bad_override_do_not_import_torch() -> None:
    code = (
        "import sys, csgd_cli.runner.cli as c\n"
        "for argv in (['--help'], ['train', 'epsilon=-1']):\n"
        "    try:\n"
        "        c.main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout + out.stderr
    assert "epsilon=-1.0 is out of range" in out.stderr


@pytest.mark.parametrize("stage", [s for s, d in STAGES.items() if d.weights])
def test_every_stage_declaring_weights_refuses_to_start_without(stage: str, tmp_path) -> None:
    out = cli(stage, *TINY_DIGITS, f"hydra.run.dir={tmp_path / 'r'}")
    assert out.returncode == 2, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert STAGES[stage].hint in line and "Traceback" not in out.stderr
    assert not (tmp_path / "r").exists()


def test_groups_stage_lists_names_widths_and_members() -> None:
    out = cli("groups", "model=resnet20")
    assert out.returncode == 0, out.stderr
    assert "layer2  width 32  prunable" in out.stdout
    assert "layer2.0.shortcut.0" in out.stdout and "layer1.0.conv1  width 16" in out.stdout
    assert "12 groups, 12 prunable, 0 excluded" in out.stdout


def test_sweep_expansion_is_pinned() -> None:
    """The one private Hydra call csgd makes: if an upgrade changes it, this fails."""
    from csgd_cli.runner.cli import expand_sweep

    points = expand_sweep(["epsilon=0.001,0.01", "seed=0,1", "model=resnet20"])
    assert points == [
        ["epsilon=0.001", "seed=0", "model=resnet20"],
        ["epsilon=0.001", "seed=1", "model=resnet20"],
        ["epsilon=0.01", "seed=0", "model=resnet20"],
        ["epsilon=0.01", "seed=1", "model=resnet20"],
    ]


# -- paths nothing exercised before -------------------------------------------------------
def test_conv_bias_gets_the_centripetal_rule_with_norm_epsilon() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, bias=True), nn.ReLU(), nn.Conv2d(6, 2, 1)).double()
    group = ChannelGroup("g", 6, producer("0") + reader("2"))
    clusters = {"g": [[0, 3, 5], [1, 2], [4]]}
    net(torch.randn(2, 3, 8, 8, dtype=torch.float64)).square().sum().backward()
    g0 = net[0].bias.grad.clone()
    b0 = net[0].bias.detach().clone()
    lam, eps, neps, nwd = 1e-4, 0.3, 0.07, 0.01
    opt = CentripetalSGD(
        net, [group], clusters, lr=0.1, epsilon=eps, weight_decay=lam, norm_epsilon=neps,
        norm_weight_decay=nwd,
    )  # fmt: skip
    opt.transform_()
    m = torch.zeros(6, 6, dtype=torch.float64)
    for c in clusters["g"]:
        for i in c:
            m[i, c] = 1 / len(c)
    want = m @ g0 + (nwd + neps) * b0 - neps * m @ b0
    torch.testing.assert_close(net[0].bias.grad, want, atol=1e-12, rtol=0)
    assert not torch.allclose(m @ g0, g0)  # the gradients differ: the mean is visible


def test_round_to_widths() -> None:
    assert [num_clusters(w, 0.625, 16) for w in (16, 32, 64)] == [16, 16, 32]  # 40: a tie
    assert [num_clusters(w, 0.625, 8) for w in (16, 32, 64)] == [8, 16, 40]  # 20: a tie
    assert num_clusters(64, 0.7, 16) == 48 and num_clusters(256, 0.7, 16) == 176
    assert num_clusters(8, 0.5, 16) == 8  # narrower than the block: stays whole
    assert num_clusters(20, 0.9, 16) == 16  # never above the width, a multiple when it can
    assert num_clusters(64, 0.05, 16) == 16  # at least one block
    model = get_model("resnet56")
    groups = channel_groups(model)
    thin = target_widths(groups, 0.5, {g.name: g.width for g in groups}, round_to=16)
    assert all(w % 16 == 0 for w in thin.values())
    # an iterative round on a thinned model keeps the multiple and never grows a group
    shrunk = [ChannelGroup(g.name, thin[g.name], g.members) for g in groups]
    again = target_widths(shrunk, 0.25, {g.name: g.width for g in groups}, round_to=16)
    assert all(w % 16 == 0 and w <= thin[k] for k, w in again.items())


def test_default_norm_epsilon_reaches_an_exact_merge_in_every_iterative_round(
    tmp_path: Path,
) -> None:
    """Default norm_epsilon (0.1 eps), two C-SGD rounds, and no prune.force: each merge
    passes the 1e-4 logit check by itself."""
    out = tmp_path / "run"
    res = cli(
        "run", *TINY_DIGITS, "pretrain.epochs=1", "schedule.epochs=14", "finetune.epochs=0",
        "epsilon=3", "schedule.lr=0.1", "schedule.weight_decay=0", "ratios=[0.75,0.5]",
        "prune.export=false", f"hydra.run.dir={out}",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    cfg = OmegaConf.load(out / ".hydra" / "config.yaml")
    assert cfg.norm_epsilon is None
    summary = json.loads((out / "summary.json").read_text())
    for tag in ("_r1", "_r2"):
        rep = summary["rows"][f"pruned{tag}"]["merge_check"]
        assert rep["relative_logit_diff"] < 1e-4 and rep["top1_agreement"] == 1.0, (tag, rep)
        assert summary["rows"][f"pruned{tag}"]["acc"] == summary["rows"][f"csgd{tag}"]["acc"]
