"""The chi forecast (``core.forecast``): within a cluster only decay moves the members'
difference, so chi over a schedule is known before training. Checked against the real
optimizer step by step, the CLI's preflight refusal, and the per-epoch log."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FORCE, TINY_DIGITS
from omegaconf import OmegaConf

from csgd_cli.api.pruner import CSGD
from csgd_cli.core.forecast import decay, forecast, schedule_forecast, schedule_lrs, sufficient
from csgd_cli.core.optim import lr_lambda
from csgd_cli.models import get_model

ENV = {**os.environ, "CSGD_NO_BAR": "1", "OMP_NUM_THREADS": "1"}


def _sched(**kw: object) -> object:
    base = dict(epochs=6, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4,
                kind="multistep", milestones=[2, 4], gamma=0.1, warmup_epochs=1)  # fmt: skip
    return OmegaConf.create({**base, **kw})


@pytest.mark.parametrize("nesterov", [True, False])
def test_forecast_is_what_the_optimizer_does_step_by_step(nesterov: bool) -> None:
    """Real task gradients, a changing learning rate: chi_t = d_t^2 chi_0 for kernels
    (decay eps + wd) and for norm gamma/beta (norm_epsilon alone)."""
    torch.manual_seed(0)
    model = get_model("resnet20", num_classes=10).double()
    x, y = torch.randn(8, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (8,))
    with torch.no_grad():  # a fresh net's gamma/beta are all 1/0: give them spread
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(0.5 if name.endswith("weight") else 0.0, 0.2)
    pruner = CSGD(model, x, ratio=0.5)
    eps, neps, wd = 0.05, 0.02, 1e-3
    opt = pruner.optimizer(0.1, epsilon=eps, norm_epsilon=neps, momentum=0.9,
                           nesterov=nesterov, weight_decay=wd)  # fmt: skip
    lrs = [0.1] * 6 + [0.03] * 6 + [0.2] * 3

    def chis() -> tuple[float, float]:
        k, both = pruner.chi_report(), pruner.chi_report(affine=True)
        return k["chi"], both["chi"] - k["chi"]

    k0, a0 = chis()
    measured = []
    for lr in lrs:
        opt.param_groups[0]["lr"] = lr
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        measured.append(chis())
    steps = range(1, len(lrs) + 1)
    dk = decay(lrs, 0.9, nesterov, eps + wd, at=steps).values
    da = decay(lrs, 0.9, nesterov, neps, at=steps).values
    for (k, a), fk, fa in zip(measured, dk, da, strict=True):
        assert k / k0 == pytest.approx(fk * fk, rel=1e-7)
        assert a / a0 == pytest.approx(fa * fa, rel=1e-7)
    assert measured[-1][0] < 0.5 * k0  # it did fall: the check is not vacuous


@pytest.mark.parametrize(
    "kw", [{}, {"kind": "cosine", "milestones": []}, {"warmup_epochs": 0, "milestones": []}]
)
def test_schedule_lrs_are_the_trainers(kw: dict) -> None:
    s = _sched(**kw)
    f = lr_lambda(s, 7)
    want = [s.lr * f(t) for t in range(s.epochs * 7)]
    assert schedule_lrs(s, 7).tolist() == pytest.approx(want, rel=1e-12)


def test_envelope_is_not_fooled_by_a_zero_crossing() -> None:
    """An underdamped pull crosses zero; the verdict uses the envelope, which bounds
    every later |d| at that rate."""
    lrs = [0.5] * 40
    res = decay(lrs, 0.9, False, 1.0, at=range(1, 200))
    f = forecast(lrs, 0.9, False, 0.0, 1.0, norm_epsilon=1.0)
    later = decay([0.5] * 200, 0.9, False, 1.0, at=range(40, 201)).values
    assert min(abs(v) for v in res.values[:40]) < f.kernel  # a crossing below it
    assert max(abs(v) for v in later) <= f.kernel * (1 + 1e-9)


def test_sufficient_values_do_reach_the_tolerance() -> None:
    s = _sched(epochs=2, lr=0.03, milestones=[], warmup_epochs=0)
    assert schedule_forecast(s, 22, 3e-3, None).worst > 1e-4
    ok = sufficient(s, 22, 3e-3, None, 1e-4)
    assert schedule_forecast(s, 22, 3e-3, None, epochs=ok["epochs"]).worst <= 1e-4
    assert schedule_forecast(s, 22, 3e-3, None, epochs=int(ok["epochs"] * 0.95)).worst > 1e-4
    e, ne = ok["epsilon"], ok["norm_epsilon"]
    assert schedule_forecast(s, 22, e, ne).worst <= 1e-4


def test_quickstart_schedule_is_forecast_to_converge() -> None:
    from hydra import compose, initialize_config_dir

    from csgd_cli.common.config import register_schema
    from csgd_cli.runner.datasets import build_data

    register_schema()
    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base=None):
        cfg = compose("run", ["experiment=quickstart"])
    steps = build_data(cfg.dataset, seed=0, device=torch.device("cpu")).steps_per_epoch()
    f = schedule_forecast(cfg.schedule, steps, cfg.epsilon, cfg.norm_epsilon)
    assert f.worst <= cfg.prune.tolerance * 1e-3


@pytest.mark.parametrize("stage", ["run", "train"])
def test_a_schedule_that_cannot_converge_is_refused_before_writing(
    tmp_path: Path, stage: str
) -> None:
    """The issue's command (and ``csgd train`` alike): refused in one line naming the
    epsilon and the epochs that would do, and the override, before any file is written;
    with the override (prune.force=true) it says so in one warning line and goes on."""
    d = tmp_path / stage
    args = ["model=resnet20", "dataset=digits", "pretrain.epochs=2", "schedule.epochs=2",
            "finetune.epochs=1", "device=cpu", f"hydra.run.dir={d}"]  # fmt: skip
    r = subprocess.run([sys.executable, "-m", "csgd_cli", stage, *args], capture_output=True,
                       text=True, env=ENV, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert err.startswith(f"csgd {stage}: error: ") and "cannot reach the merge tolerance" in err
    assert "epsilon=" in err and "schedule.epochs=" in err and FORCE in err
    assert not d.exists()
    if stage == "train":  # the override: zero epochs, so only the preflight's verdict runs
        args = [a.replace("schedule.epochs=2", "schedule.epochs=0") for a in args]
        r = subprocess.run([sys.executable, "-m", "csgd_cli", stage, *args, FORCE],
                           capture_output=True, text=True, env=ENV, cwd=tmp_path)  # fmt: skip
        assert r.returncode == 0, r.stderr
        (line,) = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert line.startswith("csgd train: warning: the C-SGD schedule cannot reach")


def test_train_logs_the_forecast_beside_chi_and_check_prints_both(tmp_path: Path) -> None:
    from csgd_cli.runner import cli

    d = tmp_path / "tr"
    cli.main(["train", *TINY_DIGITS, "schedule.epochs=3", "schedule.log_every=0",
              "schedule.lr=0.05", "epsilon=0.05", "norm_epsilon=0.05", "pretrain.epochs=0",
              FORCE, f"hydra.run.dir={d}"])  # fmt: skip
    recs = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in recs if "train_loss" in r]
    assert len(epochs) == 3 and all("chi_forecast" in r for r in epochs)
    for r in epochs:  # float32 weights: the same up to rounding
        assert math.isclose(r["chi"], r["chi_forecast"], rel_tol=1e-2)
    assert epochs[-1]["chi"] < 0.5 * epochs[0]["chi"]
    r = subprocess.run([sys.executable, "-m", "csgd_cli", "check", f"ckpt={d / 'last.pt'}",
                        f"hydra.run.dir={tmp_path / 'chk'}"], capture_output=True, text=True,
                       env=ENV, cwd=tmp_path)  # fmt: skip
    out = r.stdout + r.stderr
    assert "forecast chi" in out and "measured" in out
    rep = json.loads((tmp_path / "chk" / "check.json").read_text())
    assert math.isclose(rep["chi_forecast"], rep["chi"], rel_tol=1e-2)


def test_trainer_callbacks_warn_of_a_schedule_that_cannot_converge() -> None:
    """The callbacks know the steps and the optimizer: even its first rate on every step
    (the best a schedule can do) must reach the tolerance, else one warning names the
    epsilon that would; with that epsilon as printed, or enough steps, no warning."""
    import warnings

    from csgd_cli.api.callbacks import check_schedule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.05)
    with pytest.warns(UserWarning, match="cannot reach the merge tolerance") as rec:
        line = check_schedule([opt], 10, 3.0, 3.0)
    assert line is not None and len(rec) == 1 and "epsilon=" in line
    need = float(line.split("epsilon=")[1].split()[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_schedule([opt], 10, need, need) is None  # as printed: rounded up
        assert check_schedule([opt], 200, 3.0, 3.0) is None
        assert check_schedule([opt], float("inf"), 3.0, 3.0) is None  # no known end
