"""Pruning to a target (``prune.target=flops|params|latency:<fraction>``): counts reached
within 1% below and never above, round_to / min_width / include / exclude respected, a
coupled group (a residual stage) one width, iterative rounds stepping towards the target,
a latency target timed and cached, bad inputs refused through the CLI, and a whole
``csgd run prune.target=latency:...`` on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_DIGITS
from torch import nn

import csgd_cli as csgd_api
from csgd_cli.common.errors import CsgdError
from csgd_cli.common.nets import count_macs, count_params
from csgd_cli.deploy import latency
from csgd_cli.deploy.latency import Runtime
from csgd_cli.models import get_model
from csgd_cli.runner import cli
from csgd_cli.targets import widths

X = torch.randn(2, 3, 16, 16)  # 16x16: counts as exact as at 32x32, four times faster


@pytest.fixture
def quick_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shorter timings (the tests check what is timed and kept, not how precisely)."""
    monkeypatch.setattr(latency, "LAYER_S", 0.002)
    monkeypatch.setattr(latency, "NETWORK_S", 0.01)
    monkeypatch.setattr(latency, "ROUNDS", 3)
    monkeypatch.setattr(widths, "CONFIRMS", 2)
    monkeypatch.setattr(latency, "_MEMO", {})


def _resnet20() -> nn.Module:
    torch.manual_seed(0)
    return get_model("resnet20")


def _count(kind: str, net: nn.Module) -> int:
    return count_macs(net, X) if kind == "flops" else count_params(net)


def _stage_widths(thin: nn.Module, stage: str) -> set[int]:
    """Output channels of every producer of a residual stage (they must agree)."""
    names = next(g for g in thin.channel_groups() if g.name == stage).of_kind("out")
    mods = dict(thin.named_modules())
    return {mods[m.module].out_channels for m in names}


@pytest.mark.parametrize(
    ("kind", "value", "round_to", "min_width", "rule"),
    [
        ("flops", 0.45, 1, None, "distortion"),
        ("params", 0.3, 1, None, "uniform"),
        ("flops", 0.5, 4, 8, "distortion"),
        ("params", 0.4, 8, None, "uniform"),
    ],
)
def test_count_targets_are_reached_within_1pct_and_never_exceeded(
    kind: str, value: float, round_to: int, min_width: int | None, rule: str
) -> None:
    model = _resnet20()
    plan = csgd_api.plan_widths(
        model, X, target=f"{kind}:{value}", round_to=round_to, min_width=min_width, rule=rule
    )
    pruner = csgd_api.CSGD(model, X, widths=plan)
    thin = pruner.merge(force=True)  # not trained: the shapes are what is checked
    reached = _count(kind, thin) / _count(kind, model)
    assert reached <= value, reached  # never above
    if round_to == 1:
        assert reached >= 0.99 * value, reached  # within 1% below
    rep = pruner.target_report
    assert rep["met"] and rep["ratio"] == pytest.approx(reached) and rep["rule"] == rule
    floor = min_width or max(round_to, 4)
    base = {g.name: g.width for g in model.channel_groups()}
    for name, w in pruner.widths.items():
        assert w == base[name] or (w % round_to == 0 and w >= floor), (name, w)
    for stage in ("layer1", "layer2", "layer3"):  # a coupled group is one width
        assert _stage_widths(thin, stage) == {pruner.widths[stage]}


def test_include_exclude_and_coupled_groups_of_a_traced_network() -> None:
    torch.manual_seed(0)
    net = get_model("resnet18", num_classes=10, image_size=32)
    x = torch.randn(1, 3, 32, 32)
    pruner = csgd_api.CSGD(
        net, x, target="flops:0.6", include=["layer*.conv1"], exclude=["layer4.*"]
    )
    allowed = {n for n in pruner.widths if n.startswith("layer") and not n.startswith("layer4")}
    assert set(pruner.widths) == allowed  # only the included groups are pruned
    thin = pruner.merge(force=True)
    ratio = count_macs(thin, x) / count_macs(net, x)
    assert 0.594 <= ratio <= 0.6
    before, after = dict(net.named_modules()), dict(thin.named_modules())
    for name, m in before.items():
        if isinstance(m, nn.Conv2d) and not name.endswith("conv1"):
            assert after[name].out_channels == m.out_channels, name  # stage outputs kept


def test_iterative_rounds_step_towards_the_target_of_the_base() -> None:
    """Round r of n keeps target^(r/n) of the *base's* cost (``original_cost``)."""
    model = _resnet20()
    base_macs = count_macs(model, X)
    r1 = csgd_api.CSGD(model, X, target=f"flops:{0.36**0.5}")
    thin = r1.merge(force=True)
    assert count_macs(thin, X) / base_macs <= 0.6
    plan = csgd_api.plan_widths(
        thin, X, target="flops:0.36", original_cost=base_macs, original=r1.plan.original
    )
    r2 = csgd_api.CSGD(thin, X, widths=plan)
    ratio = count_macs(r2.merge(force=True), X) / base_macs
    assert 0.99 * 0.36 <= ratio <= 0.36
    assert all(r2.widths[g] <= r1.widths[g] for g in r2.widths)


def test_latency_target_is_timed_confirmed_and_cached(tmp_path: Path, quick_timing: None) -> None:
    torch.manual_seed(0)
    model = get_model("resnet20", widths=[16] * 12)
    x = torch.randn(1, 3, 16, 16)
    kw = {"runtime": Runtime("eager", 32), "cache_dir": tmp_path, "round_to": 4}
    pruner = csgd_api.CSGD(
        model, x, widths=csgd_api.plan_widths(model, x, target="latency:0.8", **kw)
    )
    rep = pruner.target_report
    # timed on a shared CPU, so whether 0.8 was met is the report's to say (no timing is
    # asserted): it claims it only when its own timings show it, and the widths shrank
    assert not rep["met"] or rep["ratio"] <= 0.8
    assert min(pruner.widths.values()) < 16
    assert rep["backend"] == "eager" and rep["batch"] == 32 and rep["layers_timed"] > 0
    assert all(w % 4 == 0 for w in pruner.widths.values())
    cache = json.loads(Path(rep["cache"]).read_text())
    assert Path(rep["cache"]).parent == tmp_path / "latency"
    assert cache["layers"] and cache["ratios"]  # per-layer and per-network timings
    # the state records the target; from it, the same clusters come back
    state = pruner.state_dict()
    assert state["plan"]["settings"]["target"] == "latency:0.8"
    assert state["plan"]["settings"]["ratio"] is None
    again = csgd_api.CSGD.from_state_dict(model, state, x)
    assert again.clusters == pruner.clusters


def test_api_refuses_a_ratio_with_a_target_and_an_unreachable_target() -> None:
    model = _resnet20()
    with pytest.raises(CsgdError, match="both given"):
        csgd_api.CSGD(model, X, ratio=0.5, target="flops:0.5")
    with pytest.raises(CsgdError, match=r"smallest reachable is flops:0\.0"):
        csgd_api.CSGD(model, X, target="flops:0.01")
    with pytest.raises(CsgdError, match="unknown target kind 'speed'"):
        csgd_api.CSGD(model, X, target="speed:0.5")


# -- the CLI ---------------------------------------------------------------------------------
DIGITS = [a for a in TINY_DIGITS if not a.startswith("+model.kwargs.widths")]


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["run", "prune.target=speed:0.5"], "unknown target kind 'speed'"),
        (["run", "prune.target=flops:1.5"], "1.5 is outside (0, 1)"),
        (["run", "prune.target=flops"], "'' is not a number"),
        (["run", "prune.target=flops:0.5", "ratios=[0.8,0.6]"], "prune.rounds=2"),
        (["run", "prune.target=flops:0.5", "ratio=0.5"], "both given"),
        (["run", "prune.target=flops:0.001"], "smallest reachable is flops:0.0"),
        (["run", "prune.target=params:0.1", "prune.min_width=16"], "prune.min_width=16"),
        (["groups", "prune.target=latency:0.5", "backend=onnxruntime"], "onnxruntime"),
    ],
    ids=["kind", "range", "no_value", "with_ratios", "with_ratio", "unreachable", "min_width",
         "no_runtime"],
)  # fmt: skip
def test_bad_targets_exit_2_with_one_line_and_write_nothing(
    args: list[str],
    expect: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)  # not installed
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        cli.main([*args, *DIGITS[:3], "device=cpu", f"hydra.run.dir={run_dir}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert expect in err[0] and "Traceback" not in err[0], err
    assert list(tmp_path.iterdir()) == []  # no run directory, no timings


# ``csgd run`` in a process of its own (Hydra configures logging for the whole process),
# with the quick timings of ``quick_timing``
QUICK_RUN = """
import sys
from csgd_cli.deploy import latency
from csgd_cli.runner import cli
from csgd_cli.targets import widths
latency.LAYER_S, latency.NETWORK_S, latency.ROUNDS, widths.CONFIRMS = 0.002, 0.01, 3, 2
cli.main(sys.argv[1:])
"""


def test_csgd_run_to_a_latency_target_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [
        "run", *[a for a in DIGITS if not a.startswith("dataset.limit")], "dataset.limit=64",
        "+model.kwargs.widths=[32,32,32,32,32,32,32,32,32,32,32,32]", "pretrain.epochs=0", "schedule.epochs=1", "finetune.epochs=0",
        "prune.force=true", "prune.export=false", "prune.target=latency:0.8",
        "prune.round_to=4", "prune.latency_batch=64", "backend=eager", f"hydra.run.dir={out}",
    ]  # fmt: skip
    env = {**os.environ, "CSGD_NO_BAR": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", QUICK_RUN, *args], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    stdout = proc.stdout
    widths = json.loads((out / "train" / "widths.json").read_text())
    rep = widths["target_report"]
    assert widths["target"] == "latency:0.8" and (not rep["met"] or rep["ratio"] <= 0.8)
    assert list((out / "latency").glob("resnet20-eager-b64-t*.json"))  # cached in the run
    summary = json.loads((out / "summary.json").read_text())
    target = summary["target"]
    assert target["kind"] == "latency" and set(target["rows"]) == {"flops", "params", "latency"}
    assert target["rows"]["flops"]["ratio"] < 1 and target["rows"]["params"]["ratio"] < 1
    after = summary["widths"]["after"]
    assert after == {**summary["widths"]["before"], **rep["widths"]}
    assert "target latency:0.8" in stdout and "width before" in stdout


def test_latency_search_stops_when_noisy_timings_allow_no_narrower_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Timings where a narrower layer is measured slower can leave the rule unable to go
    below a timed candidate; the search then keeps the best candidate instead of asking
    for ever-smaller budgets (it once spun for minutes in a run)."""
    import signal
    from types import SimpleNamespace

    group = SimpleNamespace(name="g", width=8)
    problem = SimpleNamespace(
        groups=[group], runtime=Runtime(), timings=SimpleNamespace(save=lambda: None)
    )
    cost = SimpleNamespace(cost=lambda ks: float(ks.get("g", 8)))
    monkeypatch.setattr(widths, "measured_ratio", lambda p, ks, again=False: 0.9)
    stuck = lambda *a: {"g": 8}  # noqa: E731 - a rule that cannot reach the budget

    def hang(*_: object) -> None:
        raise TimeoutError("the latency search did not stop")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(20)
    try:
        search = widths.Search(problem, cost, {"g": [2, 4, 8]}, 0, {})  # type: ignore[arg-type]
        got = widths._choose_timed(search, 0.5, 0.3, stuck)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    # not the floor (timed 0.3, but noise is no reason to take the thinnest network): the
    # modelled choice, reported as not confirmed with its timed ratio
    assert (got.widths, got.ratio, got.confirmed) == ({"g": 8}, 0.9, False)
