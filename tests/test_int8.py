"""INT8 and OpenVINO: `csgd export format=onnx-int8` (static QDQ, per-channel weights,
calibrated on the run's data) keeps top-1 within a point of float32 on a digits-trained
ResNet-20; `csgd eval backend=onnxruntime-int8|openvino` reports top-1 in the runtime
beside float32's, and the loss of the runtime's own logits; OpenVINO's logits are onnxruntime's; a missing openvino is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import csgd_cli as csgd
from csgd_cli.runner.datasets import build_data

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")
from csgd_cli.deploy.export import export_onnx, onnx_node_types, onnx_session
from csgd_cli.runner.runtimes import file_runner, runtime_runner

ENV = {**os.environ, "CSGD_NO_BAR": "1", "OMP_NUM_THREADS": "1"}
R20 = ["model=resnet20", "dataset=digits", "dataset.batch_size=32", "device=cpu",
       "eval.latency_iters=1", "eval.latency_batch=8"]  # fmt: skip


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "csgd_cli", *args], capture_output=True, text=True, env=env or ENV
    )


def _digits():
    return build_data(
        OmegaConf.create({"name": "digits", "batch_size": 32}), seed=0, device=torch.device("cpu")
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """ResNet-20 trained 3 epochs on digits (about 90 % top-1), saved as a csgd file."""
    torch.manual_seed(0)
    data = _digits()
    model = csgd.get_model("resnet20", num_classes=10, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    for epoch in range(3):
        model.train()
        for x, y in data.train_batches(epoch):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    path = tmp_path_factory.mktemp("int8") / "base.pt"
    csgd.save(model.eval(), path)
    return path, model


def test_int8_export_keeps_top1_within_a_point(trained, tmp_path: Path) -> None:
    path, _ = trained
    out = cli("export", *R20, f"ckpt={path}", "format=onnx-int8", "deploy.calib_batches=4",
              f"hydra.run.dir={tmp_path}")  # fmt: skip
    assert out.returncode == 0, out.stderr
    res = json.loads((tmp_path / "export.json").read_text())
    assert res["acc_float32"] > 80, res  # a trained network, not chance
    assert abs(res["acc"] - res["acc_float32"]) <= 1.0, res
    assert res["calib_batches"] == 4 and "INT8" in out.stdout
    f = tmp_path / "base.int8.onnx"
    types = onnx_node_types(f)
    assert "QuantizeLinear" in types and "DequantizeLinear" in types  # QDQ format
    import onnx

    g = onnx.load(str(f)).graph
    inits = {t.name: t for t in g.initializer}
    weight_dq = [n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                 and len(inits[n.input[0]].dims) == 4]  # fmt: skip
    assert weight_dq and all(len(inits[n.input[1]].dims) == 1 for n in weight_dq)  # per channel


@pytest.mark.parametrize("backend", ["onnxruntime-int8", "openvino"])
def test_eval_in_a_runtime_reports_float32_beside(trained, tmp_path: Path, backend: str) -> None:
    path, model = trained
    out = cli("eval", *R20, f"ckpt={path}", f"backend={backend}", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["backend"] == backend and res["latency_ms"] > 0
    assert abs(res["acc"] - res["acc_float32"]) <= (1.0 if backend != "openvino" else 0.3)
    assert "float32 top-1" in out.stdout
    # the loss is the runtime's: the cross-entropy of its own logits, float32's beside
    data = _digits()
    runner = runtime_runner(model, backend, data, calib_batches=8)  # the default
    logits, labels = [], []
    for x, y in data.test_batches():
        logits.append(torch.from_numpy(runner.run(runner.prepare(x))).float())
        labels.append(y)
    want = F.cross_entropy(torch.cat(logits), torch.cat(labels)).item()
    assert res["loss"] == pytest.approx(want, rel=1e-4), (res["loss"], want)
    assert res["loss_float32"] == pytest.approx(_float32_loss(model, data), rel=1e-5)
    if backend == "onnxruntime-int8":  # rounding to 8 bits moves every logit a little
        assert abs(res["loss"] - res["loss_float32"]) > 1e-4 * res["loss_float32"], res


def _float32_loss(model: torch.nn.Module, data) -> float:
    with torch.no_grad():
        pairs = [(model.eval()(x), y) for x, y in data.test_batches()]
    return F.cross_entropy(
        torch.cat([p for p, _ in pairs]), torch.cat([y for _, y in pairs])
    ).item()


def test_openvino_logits_equal_onnxruntime_float32(trained, tmp_path: Path) -> None:
    _, model = trained
    x = _digits().sample_batch(64)[0]
    f = export_onnx(model, x[:1], tmp_path / "m.onnx")
    sess = onnx_session(f)
    ref = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    ov = file_runner(f, "openvino")
    got = ov.run(ov.prepare(x))
    rel = abs(got - ref).max() / abs(ref).max()
    assert rel <= 1e-4, rel


def test_missing_openvino_is_refused_in_one_line(trained, tmp_path: Path) -> None:
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "openvino.py").write_text("raise ImportError('not installed here')\n")
    env = {**ENV, "PYTHONPATH": f"{shadow}{os.pathsep}{ENV.get('PYTHONPATH', '')}"}
    path, _ = trained
    out = cli("eval", *R20, f"ckpt={path}", "backend=openvino",
              f"hydra.run.dir={tmp_path / 'ev'}", env=env)  # fmt: skip
    assert out.returncode != 0
    err = out.stderr.strip()
    assert len(err.splitlines()) == 1 and "openvino is not installed" in err, err
    assert "pip install" in err and not (tmp_path / "ev" / "eval.json").exists()


def test_run_adds_an_int8_row_with_float32_beside(tmp_path: Path) -> None:
    from conftest import TINY_DIGITS

    out = cli("run", *TINY_DIGITS, "pretrain.epochs=1", "schedule.epochs=1", "finetune.epochs=1",
              "prune.force=true", "deploy.int8=true", "deploy.calib_batches=2",
              f"hydra.run.dir={tmp_path}")  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "summary.json").read_text())["rows"]
    r8, fp = rows["finetuned-int8"], rows["finetuned"]
    assert r8["backend"] == "onnxruntime-int8" and r8["latency_ms"] > 0
    assert r8["acc_float32"] == fp["acc"] and r8["params"] == fp["params"]
    assert "finetuned-int8" in out.stdout
