"""What stops a training phase (``csgd_cli.runner.guards``): divergence and bad inputs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from csgd_cli.common.errors import CsgdError
from csgd_cli.runner.guards import Guard


class Data:
    """Batches of 4 samples; ``bad`` are the indices whose pixels are not finite."""

    def __init__(self, bad: list[int]) -> None:
        self.bad, self.info, self.asked = bad, SimpleNamespace(name="digits"), []

    def nonfinite_samples(self, epoch: int, step: int, x: torch.Tensor | None) -> list[int]:
        self.asked.append((epoch, step, x is None))
        return self.bad


def _guard(tmp_path: Path, csgd: bool = True, sync_free: bool = False, bad=()) -> Guard:
    return Guard("train", tmp_path, Data(list(bad)), 10, csgd, sync_free)


def test_a_finite_loss_passes_and_a_nan_stops_naming_the_rate(tmp_path: Path) -> None:
    g = _guard(tmp_path)
    g.loss(0.5, 1e-3, 0, 3)
    with pytest.raises(CsgdError) as e:
        g.loss(float("nan"), 1e-3, 2, 7)
    msg = str(e.value)
    assert "loss became non-finite (inf/NaN) in phase train at epoch 2 step 7" in msg
    assert "no checkpoint was written" in msg and "lower epsilon or schedule.lr" in msg
    with pytest.raises(CsgdError, match="chi became non-finite"):
        g.loss(0.5, float("inf"), 0, 1)


def test_a_plain_phase_names_its_own_rate_and_the_kept_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "last.pt").write_bytes(b"x")
    g = Guard("finetune", tmp_path, Data([]), 10, False, False)
    with pytest.raises(CsgdError) as e:
        g.loss(float("inf"), None, 1, 1)
    assert f"the last good checkpoint {tmp_path / 'last.pt'} is kept" in str(e.value)
    assert "lower finetune.lr" in str(e.value) and "epsilon" not in str(e.value)


def test_non_finite_weights_or_statistics_stop(tmp_path: Path) -> None:
    g = _guard(tmp_path)
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    g.weights(net, 0, 0)
    net[1].running_var[0] = float("nan")  # a buffer counts too
    with pytest.raises(CsgdError, match="the weights became non-finite"):
        g.weights(net, 0, 0)


def test_a_bad_input_stops_at_its_batch_on_the_cpu(tmp_path: Path) -> None:
    g = _guard(tmp_path, bad=[5, 9])
    g.check_input(torch.ones(4, 3), 12)
    x = torch.ones(4, 3)
    x[1, 2] = float("nan")
    with pytest.raises(CsgdError) as e:
        g.check_input(x, 12)  # global step 12, 10 steps an epoch: epoch 1, step 2
    assert "at epoch 1 step 2 (global step 12)" in str(e.value)
    assert "training samples [5, 9] of data set digits" in str(e.value)
    assert g.data.asked == [(1, 1, False)]


def test_on_a_gpu_the_first_bad_step_is_read_at_the_next_guard(tmp_path: Path) -> None:
    g = _guard(tmp_path, sync_free=True, bad=[3])
    x = torch.ones(4, 3)
    g.check_input(x, 1)
    g.check_input(x * float("inf"), 2)  # noted, no stop yet
    g.check_input(x * float("nan"), 3)  # the first bad step stays noted
    with pytest.raises(CsgdError, match=r"global step 2\)"):
        g.loss(0.1, None, 0, 3)
    assert g.data.asked == [(0, 1, True)]  # the batch is made again from its step


def test_a_sum_that_overflows_on_finite_values_is_no_error(tmp_path: Path) -> None:
    g = _guard(tmp_path, bad=[])  # the data set finds no non-finite sample
    g.check_input(torch.full((4, 3), 3e38), 4)
    g2 = _guard(tmp_path, sync_free=True, bad=[])
    g2.check_input(torch.full((4, 3), 3e38), 4)
    g2.inputs_ok()
    g2.inputs_ok()  # the note was cleared: asked once
    assert g2.data.asked == [(0, 3, True)]
