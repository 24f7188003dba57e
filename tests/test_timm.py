"""timm networks as first-class citizens: each layer kind timm brings merges exactly on a
tiny network (or excludes its group at trace time, with its reason), the tracer's exact
index maps (splits, ties, partial residuals), ``model=timm`` through the CLI with
``init=`` a timm state dict, and a missing timm refused in preflight in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from csgd_cli.api.pruner import load_model
from csgd_cli.models import get_model
from csgd_cli.rules.groups import prunable
from csgd_cli.runner import cli
from csgd_cli.tracing import trace as tracing
from csgd_cli.tracing.trace import channel_groups, trace_seconds
from tests.test_any_cnn import exact_merge

timm = pytest.importorskip("timm")
from timm.layers import (  # noqa: E402
    BatchNormAct2d,
    FrozenBatchNormAct2d,
    GroupNormAct,
    MixedConv2d,
    ScaledStdConv2d,
    SyncBatchNormAct,
)
from timm.layers.linear import Linear as TimmLinear  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def tiny(norm: type, conv: type = nn.Conv2d) -> nn.Module:
    """conv -> norm -> depthwise conv -> norm -> 1x1 conv -> norm -> linear."""
    return nn.Sequential(
        conv(3, 8, 3, padding=1), norm(8),
        conv(8, 8, 3, padding=1, groups=8), norm(8),
        conv(8, 12, 1), norm(12),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), TimmLinear(12, 10),
    )  # fmt: skip


def _frozen_bn(c: int) -> nn.Module:
    from torchvision.ops.misc import FrozenBatchNorm2d

    return FrozenBatchNorm2d(c)


@pytest.mark.parametrize(
    "norm",
    [
        lambda c: BatchNormAct2d(c, act_layer=nn.SiLU),
        SyncBatchNormAct,
        FrozenBatchNormAct2d,
        _frozen_bn,  # torchvision's: TP did not know it, so it was no member of its group
        lambda c: GroupNormAct(c, c),  # groups == channels: per channel
    ],
    ids=["BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d", "FrozenBatchNorm2d", "GroupNormAct"],
)  # fmt: skip
def test_norm_act_layers_are_channel_members_and_merge_exactly(norm: type) -> None:
    model = tiny(norm)
    groups = channel_groups(model)
    assert [g.width for g in groups] == [8, 12] == [g.width for g in prunable(groups)]
    kinds = {(m.module, m.kind) for m in groups[0].members}
    assert {("1", "channel"), ("3", "channel"), ("2", "channel")} <= kinds  # norms and dw
    thin = exact_merge(model, (3, 16, 16))
    assert thin[1].weight.shape == (4,) and thin[3].weight.shape == (4,)


def test_group_norm_over_several_channels_excludes_its_group() -> None:
    groups = channel_groups(tiny(lambda c: GroupNormAct(c, num_groups=2)))
    assert all(g.excluded for g in groups)
    assert groups[0].excluded == "GroupNorm '1' has no per-channel merge rule"


def test_weight_standardised_convs_merge_outputs_and_refuse_inputs() -> None:
    """A weight-standardised conv's outputs slice exactly (with their gain); summing its
    input columns would change every filter's statistics: those groups are excluded."""
    model = tiny(nn.BatchNorm2d, conv=ScaledStdConv2d)
    first, last = channel_groups(model)
    assert first.excluded == (
        "input of weight-standardised conv '4' (summing inputs changes the standardisation)"
    )
    assert last.excluded is None and last.name == "4"
    thin = exact_merge(model, (3, 16, 16))
    assert thin[4].gain.shape == (6, 1, 1, 1) and thin[4].out_channels == 6


class ChannelsLastMlp(nn.Module):
    """A ConvNeXt-like block: timm Linear layers over an NHWC map."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1, self.fc2 = TimmLinear(8, 16), TimmLinear(16, 8)
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.stem(x), 4)
        y = self.fc2(F.gelu(self.fc1(x.permute(0, 2, 3, 1)))).permute(0, 3, 1, 2)
        return self.head((x + y).flatten(1))


def test_timm_linear_in_a_channels_last_block() -> None:
    stem, hidden = channel_groups(ChannelsLastMlp())
    assert stem.excluded is None  # the permutes move the channels, the flatten is NCHW
    assert hidden.name == "fc1" and hidden.excluded is None
    thin = exact_merge(ChannelsLastMlp(), (3, 16, 16))
    assert thin.fc1.out_features == thin.fc2.in_features == 8
    assert thin.stem.out_channels == thin.fc2.out_features == thin.fc1.in_features == 4


def test_split_rules_refit_mixed_convs_and_res2net_blocks() -> None:
    from timm.models.res2net import Bottle2neck

    mixed = nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12),
        MixedConv2d(12, 12, [3, 5], padding="", depthwise=True), nn.BatchNorm2d(12),
        MixedConv2d(12, 16, [1, 1]), nn.BatchNorm2d(16),  # its input split in two
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip
    assert all(g.excluded is None for g in channel_groups(mixed))
    thin = exact_merge(mixed, (3, 16, 16))
    assert thin[2].splits == [3, 3] and thin[4].splits == [3, 3]
    res2 = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        Bottle2neck(64, 16, norm_layer=nn.BatchNorm2d),  # scale 4: three 3x3 convs on hierarchical splits
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip
    assert all(g.excluded is None for g in channel_groups(res2))
    thin = exact_merge(res2, (3, 8, 8))
    assert thin[3].width == [3, 3, 3, 3]


class Ghost(nn.Module):
    """GhostNet's module: ``cat([x1, dw(x1)])`` sliced to its width, added in place to an
    8-channel shortcut (stem channels i and i + 4 are both x1's channel i)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.primary, self.bn1 = nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)
        self.cheap, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.bn(self.stem(x)))
        x1 = self.bn1(self.primary(s))
        out = torch.cat([x1, self.bn2(self.cheap(x1))], 1)[:, :8]
        out += s
        return self.head(out.mean((2, 3)))


def test_ghost_module_ties_channels_held_twice() -> None:
    (stem,) = [g for g in channel_groups(Ghost()) if g.name == "stem"]
    assert stem.width == 4 and stem.excluded is None  # 8 stem channels, 4 of them distinct
    assert {m.offset for m in stem.members if m.module == "stem"} == {0, 4}
    thin = exact_merge(Ghost(), (3, 8, 8))
    assert thin.stem.out_channels == 4 and thin.primary.out_channels == 2


class FixedSplit(nn.Module):
    """CSPNet's cross stage: a split at a size written in the forward code."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xa, xb = self.conv(x).split(4, dim=1)
        return self.head(torch.cat([self.a(xa), self.b(xb)], 1).mean((2, 3)))


class PartialResidual(nn.Module):
    """ReXNet's blocks: a residual added to the first channels only, widening."""

    def __init__(self, depth: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.convs = nn.ModuleList(nn.Conv2d(4 + i, 5 + i, 1) for i in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for conv in self.convs:
            y = conv(x)
            x = torch.cat([y[:, : x.shape[1]] + x, y[:, x.shape[1] :]], 1)
        return x.mean((2, 3))


def test_fixed_splits_are_excluded_and_partial_residuals_trace_in_seconds() -> None:
    (conv, *_) = channel_groups(FixedSplit())
    assert (
        conv.excluded == "channels split at sizes fixed in the forward code in FixedSplit.forward"
    )
    # returns: the walk finished before the tracer's deadline, which raises a CsgdError
    # (TP's walk re-visited nodes per index list for minutes); scripts/timm_table.py
    # prints the seconds
    groups = channel_groups(PartialResidual(), torch.randn(1, 3, 4, 4))
    assert any("split at sizes fixed" in (g.excluded or "") for g in groups)


def test_timm_families_trace_in_seconds_and_merge_exactly() -> None:
    """ReXNet (minutes before its first step) and DPN (TP's recursive shape inference
    failed on it) trace in seconds; timm's test EfficientNet (BatchNormAct2d, timm's
    Linear) merges exactly. Every family: scripts/timm_table.py."""
    for name in ("rexnet_100", "dpn68"):
        model = get_model("timm." + name, num_classes=10, image_size=32)
        trace_seconds(model)  # uncached; a walk past the tracer's deadline raises CsgdError
        assert any("split at sizes fixed" in (g.excluded or "") for g in channel_groups(model))
    exact_merge(get_model("timm.test_efficientnet", num_classes=10, image_size=32), (3, 32, 32))


def test_a_run_traces_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The preflight's fresh model, the run's model, its pruner and optimizer: one trace
    (groups are cached on the model and on its spec until a layer changes shape)."""
    from csgd_cli.api.pruner import CSGD

    calls = []
    trace = tracing._trace
    monkeypatch.setattr(tracing, "_trace", lambda m, x: calls.append(1) or trace(m, x))
    monkeypatch.setattr(tracing, "_BY_ARCH", {})
    spec = {"num_classes": 10, "image_size": 32}
    channel_groups(get_model("timm.test_efficientnet", **spec))  # the preflight's
    model = get_model("timm.test_efficientnet", **spec)
    pruner = CSGD(model, ratio=0.5, clustering="even")
    pruner.optimizer(lr=0.01)
    CSGD(model.double(), clusters=pruner.clusters)  # training, then the prune step
    assert len(calls) == 1


# -- model=timm through the CLI ------------------------------------------------------------
TINY = ["dataset=synthetic", "dataset.num_train=64", "dataset.num_test=32",
        "dataset.batch_size=16", "device=cpu", "eval.latency_iters=1", "eval.latency_batch=8"]  # fmt: skip


def test_csgd_groups_lists_a_timm_network(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every group with its members; init= a timm .pth of the named model, or one line."""
    from csgd_cli.models import timm_models

    monkeypatch.setattr(timm_models, "_PLAIN", {})  # what the config names: this test's
    cli.main(["groups", "model=timm", "model.name=resnet18", f"hydra.run.dir={tmp_path}"])
    out = capsys.readouterr().out
    assert "layer1.0.conv1  width 64  prunable" in out
    assert "producers    layer1.0.conv1" in out and "readers      layer1.0.conv2" in out
    assert out.strip().endswith("12 groups, 12 prunable, 0 excluded")
    weights = tmp_path / "w.pth"  # a timm .pth (torch.load, weights_only=True)
    torch.save(timm.create_model("test_resnet", num_classes=7).state_dict(), weights)
    cli.main(["groups", "model=timm", "model.name=test_resnet", f"init={weights}",
              f"hydra.run.dir={tmp_path / 'b'}"])  # fmt: skip
    assert "11 groups, 11 prunable" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["groups", "model=timm", "model.name=test_byobnet", f"init={weights}",
                  f"hydra.run.dir={tmp_path / 'c'}"])  # fmt: skip
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "is not a state dict of timm model test_byobnet" in line


def test_csgd_run_a_timm_network_from_a_timm_state_dict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """init= a timm .safetensors file: the run trains, merges and evaluates, tracing the
    network once (preflight and every phase share it); the pruned file reloads as the
    same timm class, thinner."""
    from safetensors.torch import save_file

    from csgd_cli.models import timm_models

    base = timm.create_model("test_efficientnet", num_classes=10)
    weights = tmp_path / "test_efficientnet.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(weights))
    traced = []
    trace = tracing._trace
    monkeypatch.setattr(tracing, "_trace", lambda m, x: traced.append(m.arch) or trace(m, x))
    monkeypatch.setattr(tracing, "_BY_ARCH", {})
    monkeypatch.setattr(timm_models, "_PLAIN", {})
    run = tmp_path / "run"
    cli.main([
        "run", "model=timm", "model.name=test_efficientnet", f"init={weights}", *TINY,
        "schedule.epochs=1", "finetune.epochs=0", "prune.force=true", "prune.export=false",
        "clustering=even", "ratio=0.5", f"hydra.run.dir={run}",
    ])  # fmt: skip
    assert [a for a in traced if "group_widths" not in a] == [traced[0]]  # the base: once
    thin = load_model(run / "pruned.pt")
    assert type(thin).__name__ == "EfficientNet"
    assert thin.conv_stem.out_channels == base.conv_stem.out_channels // 2


def test_no_prunable_group_and_missing_timm_are_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "nf"
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "model=timm", "model.name=nf_resnet26", *TINY, f"hydra.run.dir={run}"])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "the model has no prunable channel group (21 found" in line
    assert "weight-standardised" in line and not run.exists()
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "timm.py").write_text("raise ImportError('not installed here')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow), str(ROOT)])}
    run = tmp_path / "none"
    cmd = [sys.executable, "-m", "csgd_cli", "groups", "model=timm", f"hydra.run.dir={run}"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert "model=timm needs the timm package" in line and 'pip install "csgd[timm]"' in line
    assert not run.exists()
