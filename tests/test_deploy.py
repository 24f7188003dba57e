"""Deployment: ONNX export (BN folded, dynamic batch) checked in onnxruntime, the latency
backends, the missing-extra error, and compiled training against eager."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from csgd_cli.common.errors import CsgdError
from csgd_cli.core.chi import chi_report
from csgd_cli.deploy.export import (
    BACKENDS,
    check_onnx,
    export_onnx,
    fold_batchnorm,
    measure_latency,
    onnx_node_types,
)
from csgd_cli.models import get_model

pytest.importorskip("onnxruntime")

TINY_R20 = [4, 8, 8, 4, 4, 4, 8, 8, 8, 8, 8, 8]
R8 = {"depth": 8, "widths": [4, 8, 8, 4, 8, 8]}  # ResNet-8: compiles in seconds
MODELS = {
    "resnet20-pruned": ("resnet20", {"widths": [3, 5, 6, 2, 3, 4, 5, 6, 7, 3, 4, 5]}),
    "resnet20-base": ("resnet20", {"widths": TINY_R20}),
    "vgg11": ("vgg11", {"widths": [4, 6, 8, 8, 8, 8, 8, 6], "hidden": 16, "image_size": 16}),
    "densenet": ("densenet40", {"depth": 10, "growth": 4, "image_size": 16}),
}


def randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial running stats and affine terms, so a wrong fold shows in the logits."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


def build(key: str) -> nn.Module:
    torch.manual_seed(0)
    name, kw = MODELS[key]
    return randomize_bn(get_model(name, **kw))


def bn_after_conv(model: nn.Module) -> int:
    """How many BatchNorms are the only reader of a conv's output (foldable)."""
    gm = torch.fx.symbolic_trace(model)
    mods = dict(gm.named_modules())
    return sum(
        1
        for n in gm.graph.nodes
        if n.op == "call_module"
        and isinstance(mods[n.target], nn.BatchNorm2d)
        and n.args[0].op == "call_module"
        and isinstance(mods[n.args[0].target], nn.Conv2d)
        and len(n.args[0].users) == 1
    )


@pytest.mark.parametrize("key", list(MODELS))
def test_onnx_matches_pytorch_with_bn_folded_and_dynamic_batch(key: str, tmp_path: Path) -> None:
    model = build(key)
    path = export_onnx(model, torch.randn(2, 3, 16, 16), tmp_path / "m.onnx")
    assert path == tmp_path / "m.onnx" and path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary left behind
    ops = onnx_node_types(path)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    # every BN after a conv is gone. DenseNet's are pre-activation: they read a
    # concatenation (or conv0's output, which the concatenation needs unnormalised)
    assert ops.count("BatchNormalization") == n_bn - bn_after_conv(model)
    if key == "densenet":
        assert bn_after_conv(model) == 0 and ops.count("BatchNormalization") == n_bn
    else:
        assert bn_after_conv(model) == n_bn and "BatchNormalization" not in ops
    for batch in (1, 3):  # dynamic batch axis
        x = torch.randn(batch, 3, 16, 16)
        assert check_onnx(path, model, x) < 1e-4
    assert model.training is False  # the model itself was not modified


def test_fold_batchnorm_is_exact_and_leaves_model_alone() -> None:
    model = build("resnet20-base")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ref, out = model(x), folded(x)
    assert (out - ref).abs().max() / ref.abs().max() < 1e-5
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, the exporter can."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 1:  # a Python branch on a size: fine for the exporter
            x = torch.relu(self.bn(self.conv(x)))
        if bool(x.sum() > -1e9):  # fails under torch.fx
            x = x * 1.0
        return self.fc(x.mean((2, 3)))


def test_untraceable_model_is_still_exported_with_bn_folded(tmp_path: Path) -> None:
    model = randomize_bn(_Untraceable())
    with pytest.raises(Exception):  # noqa: B017 (whatever torch.fx raises)
        torch.fx.symbolic_trace(model)
    path = export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
    assert "BatchNormalization" not in onnx_node_types(path)
    assert check_onnx(path, model, torch.randn(3, 3, 8, 8)) < 1e-4


def test_failed_export_leaves_no_file(tmp_path: Path) -> None:
    model = build("resnet20-base")
    with pytest.raises(RuntimeError):  # wrong channel count: the trace fails
        export_onnx(model, torch.randn(1, 5, 16, 16), tmp_path / "bad.onnx")
    assert list(tmp_path.iterdir()) == []


def test_every_backend_measures_a_positive_latency() -> None:
    torch._dynamo.reset()
    model = randomize_bn(get_model("resnet20", **R8))
    for backend in BACKENDS:
        r = measure_latency(model, backend, (3, 8, 8), batch=2, iters=2, warmup=1)
        assert r["backend"] == backend and r["batch_size"] == 2
        assert r["latency_ms"] > 0 and r["throughput"] == pytest.approx(2e3 / r["latency_ms"])
    with pytest.raises(CsgdError, match="unknown backend"):
        measure_latency(model, "tensorrt", (3, 8, 8))


@pytest.mark.parametrize("module", ["onnxruntime", "onnx"])
def test_missing_extra_is_one_line_naming_it(
    module: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build("resnet20-base")
    monkeypatch.setitem(sys.modules, module, None)
    calls = (
        [lambda: measure_latency(model, "onnxruntime", (3, 8, 8), iters=1, warmup=0)]
        if module == "onnxruntime"
        else [lambda: export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")]
    )
    for call in calls:
        with pytest.raises(CsgdError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and 'pip install "csgd[deploy]"' in msg and module in msg
    assert list(tmp_path.iterdir()) == []


class _Batches:
    def __init__(self, n: int) -> None:
        self.n = n

    def steps_per_epoch(self) -> int:
        return self.n


def _train(compile: bool, tmp_path: Path, steps: int = 3) -> dict[str, list[float]]:
    from omegaconf import OmegaConf

    from csgd_cli.common.config import ScheduleConf
    from csgd_cli.runner.engine import Trainer

    torch.manual_seed(0)
    model = get_model("resnet20", **R8)
    sched = OmegaConf.structured(ScheduleConf(epochs=1, lr=0.05, milestones=[], log_every=0))
    # C-SGD: its flat-buffer parameter views must survive compilation (the harder case)
    from csgd_cli.core.clustering import cluster_groups, target_widths
    from csgd_cli.core.optim import CentripetalSGD
    from csgd_cli.tracing.trace import channel_groups

    groups = channel_groups(model)
    clusters = cluster_groups(model, groups, target_widths(groups, 0.5), "even", 0)
    opt = CentripetalSGD(model, groups, clusters, lr=0.05, epsilon=0.1, weight_decay=1e-4)
    trainer = Trainer(
        model,
        _Batches(steps),
        sched,
        opt,
        device=torch.device("cpu"),
        out=tmp_path,
        phase="t",
        payload={},
        compile=compile,
    )
    trainer.log.enabled = False
    g = torch.Generator().manual_seed(0)
    model.train()
    losses, chi0 = [], chi_report(model, groups, clusters)["chi"]
    for _ in range(steps):
        x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
        losses.append(trainer.train_step(x, y)[0].item())
    with torch.no_grad():  # the weights went the same way too
        fc = F.mse_loss(model.fc.weight, torch.zeros_like(model.fc.weight)).item()
    return {"loss": losses, "fc": [fc], "chi": [chi0, chi_report(model, groups, clusters)["chi"]]}


def test_compiled_training_matches_eager(tmp_path: Path) -> None:
    torch._dynamo.reset()
    eager = _train(False, tmp_path / "e")
    compiled = _train(True, tmp_path / "c")
    assert eager["loss"][0] != eager["loss"][-1]  # it did train
    assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-4)
    assert compiled["fc"] == pytest.approx(eager["fc"], rel=1e-4)
    # the centripetal step moved the compiled model's parameters: chi fell alike
    assert compiled["chi"][1] < compiled["chi"][0]
    assert compiled["chi"] == pytest.approx(eager["chi"], rel=1e-3)
