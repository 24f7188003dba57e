"""The design pass: one library that stages call, one place per check, and the defects a
review found (each test here failed before its fix)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from importlib.metadata import requires
from pathlib import Path

import pytest
import torch
from conftest import TINY_DIGITS
from omegaconf import OmegaConf
from torch import nn

from csgd_cli.common.config import STAGES
from csgd_cli.core.chi import chi_report
from csgd_cli.core.clustering import cluster_groups, num_clusters, target_widths
from csgd_cli.core.optim import CentripetalSGD
from csgd_cli.models import get_model
from csgd_cli.rules.groups import ChannelGroup, producer, reader
from csgd_cli.rules.layers import segment_rows
from csgd_cli.tracing.trace import channel_groups

PKG = Path(__file__).resolve().parents[1] / "csgd_cli"
ENV = {**os.environ, "CSGD_NO_BAR": "1", "OMP_NUM_THREADS": "1"}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "csgd_cli", *args], capture_output=True, text=True, env=ENV
    )


def collapse(model: nn.Module, clusters: dict[str, list[list[int]]], roles=("kernel",)) -> None:
    """Make every cluster's members identical in the given roles' rows (copy the first)."""
    with torch.no_grad():
        for g in channel_groups(model):
            for a, b, blocks in segment_rows(model, g, roles):
                for c in clusters.get(g.name, []):
                    if not a <= c[0] < b:
                        continue
                    for r in blocks:
                        rows = r.tensor.narrow(0, r.row, b - a)
                        for i in c[1:]:
                            rows[i - a].copy_(rows[c[0] - a])


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


# -- defects ------------------------------------------------------------------------------
def test_check_counts_the_norms_over_a_concatenation() -> None:
    """Defect 1: a DenseNet BN over the concatenation is pulled by the optimizer, so chi
    (with gamma/beta) must see its slices differ even when every kernel matches."""
    torch.manual_seed(0)
    model = get_model("densenet40", depth=10, growth=4, in_channels=3)
    groups = channel_groups(model)
    clusters = cluster_groups(model, groups, target_widths(groups, 0.5), "even", 0)
    collapse(model, clusters, ("kernel", "affine"))
    assert chi_report(model, groups, clusters, affine=True)["chi"] == pytest.approx(0, abs=1e-20)
    g = next(g for g in groups if g.name == "dense1.0.conv")
    norm = next(m for m in g.members if m.kind == "channel")  # a later BN, at an offset
    assert norm.offset > 0
    with torch.no_grad():  # second member of the first cluster, in that BN only
        dict(model.named_modules())[norm.module].weight[norm.offset + 1] += 0.5
    assert chi_report(model, groups, clusters)["chi"] == pytest.approx(0, abs=1e-20)
    rep = chi_report(model, groups, clusters, affine=True)
    assert rep["groups"][g.name]["chi"] == pytest.approx(0.5**2 / 2)


def test_init_of_another_architecture_than_an_explicit_model(tmp_path: Path) -> None:
    """Defect 3: model= on the command line must agree with init=; without model= the
    checkpoint's architecture is used."""
    base = tmp_path / "base"
    assert (
        cli("pretrain", *TINY_DIGITS, "pretrain.epochs=0", f"hydra.run.dir={base}").returncode == 0
    )
    out = cli(
        "train", *TINY_DIGITS[1:], "model=resnet56", f"init={base / 'last.pt'}",
        f"hydra.run.dir={tmp_path / 'x'}",
    )  # fmt: skip
    assert out.returncode == 2 and not (tmp_path / "x").exists()
    (line,) = out.stderr.strip().splitlines()
    assert "holds a resnet20 but model=resnet56" in line and "drop model=" in line
    out = cli(
        "train", *[a for a in TINY_DIGITS if not a.startswith(("model=", "+model"))],
        f"init={base / 'last.pt'}", "schedule.epochs=0", f"hydra.run.dir={tmp_path / 'y'}",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    ck = torch.load(tmp_path / "y" / "last.pt", weights_only=True)
    assert ck["arch"]["name"] == "resnet20"


def test_matplotlib_is_a_required_dependency() -> None:
    """Defect 4: `csgd report` plots after a plain `pip install .`."""
    core = [r for r in requires("csgd") or [] if "extra ==" not in r]
    assert any(r.startswith("matplotlib") for r in core), core


def test_dataset_defaults_have_one_source() -> None:
    """Defect 5: a data set built from a bare config equals the composed one."""
    from hydra import compose, initialize_config_dir

    from csgd_cli.common.config import register_schema
    from csgd_cli.runner.cli import config_dir
    from csgd_cli.runner.datasets import build_data

    register_schema()
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        full = compose("train", ["dataset=synthetic"]).dataset
    bare = OmegaConf.create({"name": "synthetic"})
    a, b = (build_data(c, seed=0, device=torch.device("cpu")) for c in (full, bare))
    assert a.info == b.info
    for key in ("augment", "batch_size", "eval_batch_size"):
        assert getattr(a, key) == getattr(b, key), key


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
