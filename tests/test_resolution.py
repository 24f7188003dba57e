"""Targets at the deployment resolution (issue 22.7): the API and the CLI accept it
(``plan_widths(..., resolution=)``, ``prune.resolution``), a FLOPs target is exact at
it, and every report of a target states the per-image resolution it counted at."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import csgd_cli as csgd
from csgd_cli.common.errors import CsgdError
from csgd_cli.common.nets import count_macs
from csgd_cli.runner import cli


class HeadNet(nn.Module):
    """A wide head after global pooling: its multiply-adds do not grow with the image,
    the convs' do, so the same widths keep another share of FLOPs at each resolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 64, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(64)
        self.fc1 = nn.Linear(64, 2048)
        self.fc2 = nn.Linear(2048, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc2(torch.relu(self.fc1(x.mean((2, 3)))))


def _share(model: nn.Module, thin: nn.Module, side: int) -> float:
    x = torch.randn(1, 3, side, side)
    return count_macs(thin, x) / count_macs(model, x)


@pytest.mark.parametrize("side", [8, 64])
def test_a_flops_target_is_exact_at_the_resolution_asked_and_says_so(side: int) -> None:
    torch.manual_seed(0)
    model, x = HeadNet().eval(), torch.randn(2, 3, 16, 16)
    plan = csgd.plan_widths(model, x, target="flops:0.5", resolution=side)
    assert plan.report is not None and plan.report["resolution"] == [side, side]
    thin = csgd.CSGD(model, x, widths=plan).merge(force=True)
    assert 0.4 < _share(model, thin, side) <= 0.5  # never above, at the resolution asked


def test_widths_chosen_at_one_resolution_miss_the_target_at_another() -> None:
    """Why the resolution must be stated: widths chosen at 64x64 for flops:0.5 keep more
    than half the multiply-adds at 8x8 (the head, which pooling keeps the same size,
    weighs more on small images)."""
    torch.manual_seed(0)
    model, x = HeadNet().eval(), torch.randn(2, 3, 64, 64)
    plan = csgd.plan_widths(model, x, target="flops:0.5")
    assert plan.report is not None and plan.report["resolution"] == [64, 64]
    thin = csgd.CSGD(model, x, widths=plan).merge(force=True)
    assert _share(model, thin, 64) <= 0.5 < _share(model, thin, 8)


@pytest.mark.parametrize("bad", [0, (3, 0), (1, 2, 3)])
def test_a_resolution_that_is_no_image_size_is_one_line(bad: object) -> None:
    model, x = HeadNet().eval(), torch.randn(1, 3, 8, 8)
    with pytest.raises(CsgdError, match="is not an image size") as e:
        csgd.plan_widths(model, x, target="flops:0.5", resolution=bad)  # type: ignore[arg-type]
    assert len(str(e.value).splitlines()) == 1


def test_the_cli_takes_prune_resolution_and_its_tables_state_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["model=resnet20", "+model.kwargs.widths=[4,8,8,4,4,4,8,8,8,8,8,8]", "dataset=digits",
            "device=cpu", "prune.target=flops:0.7"]  # fmt: skip
    base = {}
    for side in (8, 24):
        cli.main(
            ["groups", *args, f"prune.resolution={side}", f"hydra.run.dir={tmp_path / str(side)}"]
        )
        stdout = capsys.readouterr().out
        row = next(ln for ln in stdout.splitlines() if ln.startswith("| flops"))
        base[side] = int(row.split("|")[2].replace(",", ""))
        assert f"target flops:0.7 at {side}x{side} per image" in stdout
    # the convs' multiply-adds grow with the image's area (24x24 is 9x 8x8; the linear
    # head's stay the same): counted at the resolution asked
    assert 8 < base[24] / base[8] < 9


def test_the_cli_refuses_a_resolution_below_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["groups", "model=resnet20", "dataset=digits", "device=cpu",
                  "prune.target=flops:0.5", "prune.resolution=0",
                  f"hydra.run.dir={tmp_path / 'r'}"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "prune.resolution=0" in err[0], err


def test_eval_states_the_resolution_its_flops_count_at(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from csgd_cli.runner.evaluate import measure

    info = SimpleNamespace(in_channels=3, image_size=16)
    data = SimpleNamespace(
        info=info,
        test_batches=lambda: [(torch.randn(4, 3, 16, 16), torch.zeros(4, dtype=torch.long))],
    )
    cfg = SimpleNamespace(latency_batch=2, latency_iters=1)
    res = measure(HeadNet().eval(), data, torch.device("cpu"), cfg)
    assert res["resolution"] == [16, 16]
    assert json.loads(json.dumps(res))["macs"] == count_macs(HeadNet(), torch.randn(1, 3, 16, 16))
