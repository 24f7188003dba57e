"""Top-1 and loss as a deployment runtime computes them (``csgd_cli.runner.runtimes``)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from csgd_cli.common.errors import CsgdError
from csgd_cli.deploy.export import Runner
from csgd_cli.runner import evaluate, runtimes
from csgd_cli.runner.runtimes import (
    calibration,
    file_runner,
    file_top1,
    int8_row,
    runner_metrics,
    runner_top1,
    runtime_accuracy,
    runtime_runner,
)

CPU = torch.device("cpu")


class FakeData:
    """A data set as the runtimes read it: seeded batches of 1 x 8 x 8 images, 4 classes;
    records which training epochs were asked for and how many batches were drawn."""

    def __init__(self, n_train: int = 4, n_test: int = 3, batch: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.train = [torch.randn(batch, 1, 8, 8, generator=g) for _ in range(n_train)]
        self.test = [
            (torch.randn(batch, 1, 8, 8, generator=g), torch.randint(0, 4, (batch,), generator=g))
            for _ in range(n_test)
        ]
        self.info = SimpleNamespace(in_channels=1, image_size=8, num_classes=4)
        self.epochs: list[int] = []
        self.drawn = 0

    def train_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.epochs.append(epoch)
        for x in self.train:
            self.drawn += 1
            yield x, torch.zeros(len(x), dtype=torch.long)

    def test_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield from self.test

    def sample_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.train[0][:n], torch.zeros(n, dtype=torch.long)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip


def _torch_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _fixed(logits: torch.Tensor) -> Runner:
    """A runtime whose logits are ``logits``, batch after batch (as NumPy arrays)."""
    it = iter(logits.split(2))
    return Runner(lambda a: next(it).numpy(), lambda x: x.numpy())


# -- calibration ----------------------------------------------------------------------------
def test_calibration_takes_the_first_training_batches_of_epoch_0() -> None:
    data = FakeData()
    data.train = [t.double().requires_grad_() for t in data.train]
    got = calibration(data, 2)
    assert data.epochs == [0] and data.drawn == 2  # no more batches drawn than asked
    assert len(got) == 2
    assert all(torch.equal(a, b.float()) for a, b in zip(got, data.train[:2], strict=True))
    assert all(t.dtype == torch.float32 and not t.requires_grad for t in got)
    assert len(calibration(FakeData(n_train=3), 10)) == 3  # fewer there: all of them


# -- metrics of a runtime's logits ----------------------------------------------------------
def test_runner_metrics_from_the_runtimes_own_logits() -> None:
    # two batches of two: rows 0 and 3 right, rows 1 and 2 wrong
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    labels = torch.tensor([0, 1, 0, 1])
    data = SimpleNamespace(test_batches=lambda: iter([(torch.zeros(2, 1), labels[:2]),
                                                       (torch.zeros(2, 1), labels[2:])]))  # fmt: skip
    got = runner_metrics(_fixed(logits), data, CPU)
    # by hand: -log softmax of the true class per row, then the mean
    ce = [math.log(1 + math.exp(-2)), math.log(2), math.log(1 + math.e), math.log(1 + math.exp(-3))]
    assert got["acc"] == 50.0
    assert got["loss"] == pytest.approx(sum(ce) / 4, rel=1e-6)
    assert runner_top1(_fixed(logits), data, CPU) == 50.0


def test_runner_metrics_of_an_empty_test_split() -> None:
    data = SimpleNamespace(test_batches=lambda: iter([]))
    assert runner_metrics(_fixed(torch.zeros(0, 2)), data, CPU) == {"acc": 0.0, "loss": 0.0}


def test_runtime_accuracy_puts_float32_beside(monkeypatch: pytest.MonkeyPatch) -> None:
    logits = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    data = SimpleNamespace(test_batches=lambda: iter([(torch.zeros(2, 1), torch.tensor([0, 1]))]))
    asked: list[tuple] = []

    def fake_runner(model: nn.Module, backend: str, d: Any, calib: int) -> Runner:
        asked.append((backend, calib))
        return _fixed(logits)

    monkeypatch.setattr(runtimes, "runtime_runner", fake_runner)
    got = runtime_accuracy(nn.Identity(), "openvino", data, CPU, 3, float32_acc=80.0)
    assert asked == [("openvino", 3)]
    assert got == {"acc": 50.0, "loss": pytest.approx(F.cross_entropy(logits, torch.tensor([0, 1])).item()),
                   "acc_float32": 80.0, "acc_drop": 30.0}  # fmt: skip
    with_loss = runtime_accuracy(nn.Identity(), "openvino", data, CPU, 3, 80.0, float32_loss=0.25)
    assert with_loss["loss_float32"] == 0.25


# -- real runtimes --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from csgd_cli.deploy.export import export_onnx

    model = _net().eval()
    path = export_onnx(model, torch.zeros(1, 1, 8, 8), tmp_path_factory.mktemp("rt") / "m.onnx")
    return path, model


def test_file_runner_runs_the_onnx_file(onnx_file: tuple[Path, nn.Module]) -> None:
    path, model = onnx_file
    x = FakeData().train[0]
    r = file_runner(path)
    a = r.prepare(x)
    assert isinstance(a, np.ndarray) and a.dtype == np.float32
    got = torch.from_numpy(np.asarray(r.run(a)))
    assert torch.allclose(got, _torch_logits(model, x), rtol=1e-4, atol=1e-5)


def test_file_top1_is_the_networks_top1(onnx_file: tuple[Path, nn.Module]) -> None:
    path, model = onnx_file
    data = FakeData()
    for i, (x, _) in enumerate(data.test):  # the network's own answer on every other sample
        pred = _torch_logits(model, x).argmax(1)
        y = pred.clone()
        y[1::2] = (pred[1::2] + 1) % 4
        data.test[i] = (x, y)
    assert file_top1(path, data, CPU) == 50.0


def test_runtime_runner_leaves_the_callers_model_alone() -> None:
    model = _net().train()
    data = FakeData()
    r = runtime_runner(model, "eager", data, calib_batches=2)
    assert r.run is not model and not r.run.training  # a copy, in eval mode
    assert model.training and data.drawn == 0  # no calibration outside INT8
    x = data.train[1]
    with torch.no_grad():
        assert torch.equal(r.run(r.prepare(x)), _torch_logits(_net(), x))


@pytest.mark.parametrize("backend", ["eager", "channels_last"])
def test_runner_metrics_of_a_torch_runtime(backend: str) -> None:
    """A torch runtime returns tensors that would require grad outside no_grad."""
    data = FakeData()
    r = runtime_runner(_net(), backend, data, calib_batches=2)
    got = runner_metrics(r, data, CPU)
    with torch.no_grad():
        outs = [(_torch_logits(_net(), x), y) for x, y in data.test]
    right = sum(int((o.argmax(1) == y).sum()) for o, y in outs)
    loss = sum(float(F.cross_entropy(o, y, reduction="sum")) for o, y in outs)
    n = sum(len(y) for _, y in outs)
    assert got["acc"] == pytest.approx(100 * right / n)
    assert got["loss"] == pytest.approx(loss / n, rel=1e-5)


def test_runtime_runner_int8_calibrates_on_training_batches() -> None:
    pytest.importorskip("onnxruntime")
    model, data = _net(), FakeData()
    r = runtime_runner(model, "onnxruntime-int8", data, calib_batches=3)
    assert data.epochs == [0] and data.drawn == 3
    x = data.test[0][0]
    got = torch.from_numpy(np.asarray(r.run(r.prepare(x))))
    want = _torch_logits(_net(), x)
    assert got.shape == want.shape and not torch.equal(got, want)  # rounded to 8 bits
    assert (got - want).abs().max() <= 0.1 * want.abs().max()  # but near float32's


def test_runtime_runner_int8_needs_a_calibration_batch() -> None:
    pytest.importorskip("onnxruntime")
    with pytest.raises(CsgdError, match=r"pass deploy\.calib_batches >= 1"):
        runtime_runner(_net(), "onnxruntime-int8", FakeData(), calib_batches=0)


def test_runtime_runner_openvino_gives_float32_logits() -> None:
    pytest.importorskip("openvino")
    data = FakeData()
    r = runtime_runner(_net(), "openvino", data, calib_batches=3)
    assert data.drawn == 0  # float32: nothing to calibrate
    x = data.test[0][0]
    got = torch.from_numpy(np.asarray(r.run(r.prepare(x))))
    assert torch.allclose(got, _torch_logits(_net(), x), rtol=1e-4, atol=1e-5)


def test_int8_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """``csgd run``'s INT8 row: the float32 row's counts, the runtime's top-1 beside
    float32's, and the INT8 latency (stubbed here: timings are not tested)."""
    pytest.importorskip("onnxruntime")
    timed: list[tuple] = []

    def fake_latencies(models: dict, shape: tuple, device: Any, eval_cfg: Any, backend: str):
        timed.append((list(models), shape, backend, eval_cfg.latency_batch))
        return {"int8": {"latency_ms": 0.5, "latency_spread": 0.01, "backend": backend}}

    monkeypatch.setattr(evaluate, "latencies", fake_latencies)
    cfg = OmegaConf.create(
        {"deploy": {"calib_batches": 2}, "eval": {"latency_batch": 4, "latency_iters": 1}}
    )
    float32 = {"acc": 60.0, "loss": 1.5, "params": 123, "macs": 456, "resolution": [8, 8],
               "latency_ms": 9.0}  # fmt: skip
    data = FakeData()
    row = int8_row(_net(), data, CPU, cfg, float32)
    assert timed == [(["int8"], (1, 8, 8), "onnxruntime-int8", 4)]
    assert data.drawn == 2
    assert {k: row[k] for k in ("params", "macs", "resolution")} == {
        "params": 123, "macs": 456, "resolution": [8, 8]}  # fmt: skip
    assert row["latency_ms"] == 0.5 and row["backend"] == "onnxruntime-int8"
    assert "latency_spread" not in row  # timed alone: no spread beside a base
    assert row["acc_float32"] == 60.0 and row["loss_float32"] == 1.5
    assert row["acc_drop"] == pytest.approx(60.0 - row["acc"])
    # the loss of the INT8 logits on the test split: near the float32 network's there
    x, y = torch.cat([x for x, _ in data.test]), torch.cat([y for _, y in data.test])
    want = F.cross_entropy(_torch_logits(_net(), x), y).item()
    assert row["loss"] == pytest.approx(want, abs=0.05) and row["loss"] != want
