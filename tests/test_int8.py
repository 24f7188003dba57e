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


# -- a latency target in INT8: judged on whole networks ----------------------------------------
def _tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).eval()  # fmt: skip


@pytest.fixture
def spied(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple[int, ...], float]]:
    """Short timings, and every whole network the search times recorded as (its backend,
    its conv widths, the ratio the one timer gave it beside the base)."""
    from csgd_cli.deploy import latency
    from csgd_cli.targets import widths

    monkeypatch.setattr(latency, "LAYER_S", 0.002)
    monkeypatch.setattr(latency, "NETWORK_S", 0.01)
    monkeypatch.setattr(latency, "ROUNDS", 3)
    monkeypatch.setattr(latency, "_MEMO", {})
    monkeypatch.setattr(widths, "CONFIRMS", 2)
    seen: list[tuple[str, tuple[int, ...], float]] = []
    shapes: dict[int, tuple[int, ...]] = {}
    prepare, timed = latency.prepare, latency.timed

    def spy_prepare(model, rt, shape):
        out = prepare(model, rt, shape)
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        shapes[id(out)] = (rt.backend, *(c.out_channels for c in convs))
        return out

    def spy_timed(runners, rt, rounds=None):
        t = timed(runners, rt, rounds)
        backend, *w = shapes[id(runners[1])]
        seen.append((backend, tuple(w), t.ratios[1]))
        return t

    monkeypatch.setattr(latency, "prepare", spy_prepare)
    monkeypatch.setattr(latency, "timed", spy_timed)
    return seen


def test_int8_latency_target_reports_the_chosen_networks_int8_ratio(spied, tmp_path) -> None:
    """The ratio reported is the one the one timer measured for the chosen widths' whole
    network, exported and quantised (re-checked: the slower of its timings); the
    per-layer model was first calibrated on whole INT8 networks."""
    from csgd_cli.deploy.latency import Runtime

    model, x = _tiny(), torch.randn(1, 3, 32, 32)
    rt = Runtime("onnxruntime-int8", 8, 1)
    plan = csgd.plan_widths(model, x, target="latency:0.97", runtime=rt, cache_dir=tmp_path)
    rep = plan.report
    assert {b for b, _, _ in spied} == {"onnxruntime-int8"}  # every network timed in INT8
    chosen = (plan.widths["0"], plan.widths["3"])
    mine = [r for _, w, r in spied if w == chosen]
    assert mine and rep["ratio"] == pytest.approx(max(mine), rel=1e-12)
    assert rep["calibrated"] >= 1 and len(rep["networks_timed"]) >= 2 + rep["calibrated"]
    assert rep["backend"] == "onnxruntime-int8" and "modelled_ratio" in rep
    if rep["met"]:  # confirmed: timed again beside the base, within the target both times
        assert len(mine) >= 2 and max(mine) <= 0.97
    thin = csgd.CSGD(model, x, widths=plan).merge(force=True)
    assert [m.out_channels for m in thin.modules() if isinstance(m, torch.nn.Conv2d)] == list(
        chosen
    )


def test_int8_latency_target_below_the_floor_names_the_int8_floor(spied) -> None:
    from csgd_cli.common.errors import CsgdError
    from csgd_cli.deploy.latency import Runtime

    with pytest.raises(CsgdError, match=r"smallest reachable is latency:") as e:
        csgd.plan_widths(_tiny(), torch.randn(1, 3, 32, 32), target="latency:0.01",
                         runtime=Runtime("onnxruntime-int8", 8, 1))  # fmt: skip
    (backend, widths, floor), *_ = spied  # the floor: every group at its narrowest, in INT8
    assert backend == "onnxruntime-int8" and widths == (8, 8)
    assert f"latency:{floor:.4g} " in str(e.value)


class _Stairs:
    """A fake runtime whose time climbs in blocks of 16 channels (as INT8 kernels take
    them), which a per-layer model that is smooth in the width does not see."""

    def __init__(self, recheck: float = 1.0) -> None:
        self.cands = {"a": [8, 16, 24, 32, 40, 48], "b": [8, 16, 24, 32, 40, 48]}
        self.recheck = recheck  # a re-check times this much slower (load that came)

    def cost(self, ks: dict[str, int]) -> float:  # the model: smooth in the widths
        return sum(ks.get(g, 48) ** 2 for g in self.cands)

    def true(self, ks: dict[str, int]) -> float:
        return sum((-(-ks.get(g, 48) // 16) * 16) ** 2 + 500 for g in self.cands)

    def pick(self, budget: float) -> dict[str, int]:  # uniform widths within the budget
        ok = [k for k in self.cands["a"] if self.cost({"a": k, "b": k}) <= budget]
        k = max(ok, default=8)
        return {"a": k, "b": k}

    def measure(self, ks: dict[str, int], again: bool) -> float:
        return self.true(ks) / self.true({}) * (self.recheck if again else 1.0)


def test_choice_is_calibrated_on_whole_networks_and_reports_what_was_timed() -> None:
    from csgd_cli.targets.timed import choose_timed

    s = _Stairs()
    key = lambda ks: str(sorted(ks.items()))  # noqa: E731
    floor = s.measure({"a": 8, "b": 8}, False)
    out = choose_timed(s, s.cands, 0.7, floor, s.pick, s.measure, key, 4, calibrate=3)
    assert out.confirmed and out.calibrated == 3
    assert out.ratio == s.measure(out.widths, True) <= 0.7  # what was timed, not modelled
    # widest that holds: one step wider times above the target
    wider = min(k for k in s.cands["a"] if k > out.widths["a"])
    assert s.measure({"a": wider, "b": wider}, False) > 0.7
    # a calibration network within the target's last 5%: no more networks timed
    cal = out.timed[2 : 2 + out.calibrated]
    _, r = max((p for p in cal if p[1] < 1), key=lambda p: p[1])
    again = choose_timed(s, s.cands, r, floor, s.pick, s.measure, key, 4, calibrate=3)
    assert again.confirmed and again.ratio == r and len(again.timed) == 2 + again.calibrated
    # no re-check holds: not met, with the modelled and the timed ratio of the choice
    s = _Stairs(recheck=3.0)
    out = choose_timed(s, s.cands, 0.7, floor, s.pick, s.measure, key, 4, calibrate=3)
    assert not out.confirmed and out.ratio == s.measure(out.widths, False)
    assert out.modelled != out.ratio and out.widths != {"a": 8, "b": 8}  # not the floor
