"""Unit tests of ``csgd_cli.runner.forecasting`` (the chi forecast in the CLI)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from csgd_cli.common.config import register_schema
from csgd_cli.common.errors import CsgdError
from csgd_cli.core.forecast import schedule_forecast
from csgd_cli.runner.forecasting import check_forecast, check_lines, chi_logging

CONF = str(Path(__file__).resolve().parents[1] / "conf")
register_schema()

# Plain SGD (no momentum) at a constant rate: a cluster's differences shrink by exactly
# (1 - lr * (weight_decay + epsilon)) per step, so chi by (that)^2: expected values by hand.
PLAIN = {
    "epochs": 4,
    "lr": 0.1,
    "momentum": 0.0,
    "nesterov": False,
    "weight_decay": 0.0,
    "kind": "multistep",
    "milestones": [],
    "gamma": 0.1,
    "warmup_epochs": 0,
}


def composed(stage: str, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3", job_name=stage):
        return compose(config_name=stage, overrides=list(overrides))


def by_hand(chi0: float, lr: float, coef: float, steps: int) -> float:
    return chi0 * (1 - lr * coef) ** (2 * steps)


# -- check_forecast: the preflight's verdict -------------------------------------------
def test_a_baseline_has_no_forecast() -> None:
    cfg = composed("run", "prune.method=l1", "schedule.epochs=1")  # would be refused as csgd
    assert check_forecast(cfg, 10) is None


def test_a_schedule_that_reaches_the_tolerance_passes_with_its_forecast() -> None:
    cfg = composed(
        "train",
        "schedule.epochs=60",
        "schedule.milestones=[]",
        "schedule.lr=0.1",
        "epsilon=0.1",
        "norm_epsilon=0.1",
    )
    f = check_forecast(cfg, 10)
    assert f is not None and f.steps == 600
    assert f == schedule_forecast(cfg.schedule, 10, 0.1, 0.1)
    assert f.worst <= cfg.prune.tolerance


@pytest.mark.parametrize(
    ("overrides", "steps", "milestones"),
    [
        # the user's norm share cannot do it; the default milestones (200, 400) would cut
        # the longer schedule's rate where the forecast's stretched ones do not
        (("schedule.epochs=2",), 10, "schedule.milestones=[]"),
        (("schedule.epochs=4", "schedule.milestones=[]", "schedule.lr=0.1"), 20, None),
        (("schedule.epochs=5", "schedule.milestones=[3]"), 7, "schedule.milestones=["),
        (("schedule.epochs=3", "schedule.milestones=[]", "norm_epsilon=0.003"), 30, None),
        (("schedule.epochs=2", "schedule.kind=cosine"), 10, None),  # cosine: no milestones
    ],
)
def test_the_refusal_names_values_that_pass_the_check(
    overrides: tuple, steps: int, milestones: str | None
) -> None:
    """One line naming the shortfall, the epsilon and the epochs that would reach the
    tolerance, and the override; each advice, applied as written, passes the check."""
    cfg = composed("train", *overrides)
    with pytest.raises(CsgdError) as e:
        check_forecast(cfg, steps)
    msg = str(e.value)
    assert milestones in msg if milestones else "milestones" not in msg
    assert "\n" not in msg and msg.startswith("the C-SGD schedule cannot reach the merge tol")
    assert f"({cfg.schedule.epochs} epochs x {steps})" in msg and "prune.force=true" in msg
    advice = msg.split("; pass ", 1)[1].split(" (or prune.force")[0].split(" or ")
    assert advice[-1].startswith("schedule.epochs=")  # and before it an epsilon, if one does
    assert all(a.startswith("epsilon=") for a in advice[:-1]) and len(advice) <= 2
    for fix in advice:
        check_forecast(composed("train", *overrides, *fix.split()), steps)  # no refusal


def test_with_no_fix_in_reach_the_refusal_says_what_to_change() -> None:
    """Norms never decay (norm_epsilon=0, no norm weight decay) and the rate is unstable:
    no epsilon up to the bound and no epoch count helps."""
    cfg = composed(
        "train", "schedule.epochs=3", "schedule.milestones=[]", "schedule.lr=0.5", "norm_epsilon=0"
    )
    with pytest.raises(CsgdError) as e:
        check_forecast(cfg, 1)
    assert "; pass a longer schedule or a larger schedule.lr (or prune.force" in str(e.value)


def test_force_warns_once_and_returns_the_forecast(capsys: pytest.CaptureFixture) -> None:
    cfg = composed("run", "schedule.epochs=2", "schedule.milestones=[]", "prune.force=true")
    f = check_forecast(cfg, 10)
    assert f is not None and f.worst > cfg.prune.tolerance
    err = capsys.readouterr().err
    (line,) = err.splitlines()
    assert line.startswith("csgd run: warning: the C-SGD schedule cannot reach")
    assert line.endswith("would reach it") and "schedule.epochs=" in line


# -- chi_logging: the forecast beside each epoch's chi -----------------------------------
def test_chi_logging_forecasts_each_epoch_from_the_measured_start() -> None:
    calls = []

    def chi_fn() -> tuple[float, dict]:
        calls.append(1)
        return 2.0, {}

    sched = OmegaConf.create({**PLAIN, "weight_decay": 0.5})
    kept = chi_logging(chi_fn, sched, {"epsilon": 1.5}, 3, None)
    assert kept == {"chi_start": 2.0} and len(calls) == 1
    for epoch in range(1, 5):  # coef 0.5 + 1.5: each step keeps 1 - 0.1 * 2 = 0.8 of d
        got = chi_fn.forecast(epoch)["chi_forecast"]
        assert got == pytest.approx(by_hand(2.0, 0.1, 2.0, 3 * epoch), rel=1e-12)
    assert chi_fn.forecast(0) == {} and chi_fn.forecast(5) == {}  # outside the schedule


def test_chi_logging_on_resume_keeps_the_phase_start() -> None:
    def chi_fn() -> tuple[float, dict]:
        raise AssertionError("a resumed phase does not measure its start again")

    sched = OmegaConf.create(PLAIN)
    assert chi_logging(chi_fn, sched, {"epsilon": 1.0}, 2, {"chi_start": 8.0}) == {"chi_start": 8.0}
    assert chi_fn.forecast(1)["chi_forecast"] == pytest.approx(by_hand(8.0, 0.1, 1.0, 2))


@pytest.mark.parametrize("resumed", [{}, {"epoch": 3}])
def test_chi_logging_of_an_older_checkpoint_gives_no_forecast(resumed: dict) -> None:
    def chi_fn() -> tuple[float, dict]:
        raise AssertionError("not measured")

    assert chi_logging(chi_fn, OmegaConf.create(PLAIN), {"epsilon": 1.0}, 2, resumed) == {}
    assert not hasattr(chi_fn, "forecast")


# -- check_lines: what ``csgd check`` prints ----------------------------------------------
def _ck(epoch: int, steps: int = 5, chi0: float = 3.0) -> dict:
    return {
        "hyper": {"schedule": PLAIN, "epsilon": 0.5},
        "history": [{"epoch": e, "step": e * steps} for e in range(1, epoch + 1)],
        "chi_start": chi0,
    }


def test_check_lines_forecasts_at_the_checkpoint_epoch_and_at_the_end() -> None:
    text, numbers = check_lines(_ck(epoch=2), chi=0.25)
    now, end = by_hand(3.0, 0.1, 0.5, 2 * 5), by_hand(3.0, 0.1, 0.5, 4 * 5)
    assert numbers["chi_forecast"] == pytest.approx(now, rel=1e-12)
    assert numbers["chi_forecast_end"] == pytest.approx(end, rel=1e-12)
    assert numbers["chi_start"] == 3.0
    assert f"forecast chi {now:.3e} at epoch 2/4 (measured 2.500e-01)" in text
    assert f"{end:.3e} at the schedule's end" in text


def test_check_lines_past_the_schedule_uses_its_last_epoch() -> None:
    text, numbers = check_lines(_ck(epoch=6), chi=0.0)
    assert "at epoch 4/4" in text
    assert numbers["chi_forecast"] == pytest.approx(numbers["chi_forecast_end"], rel=1e-12)
    assert math.isfinite(numbers["chi_forecast"])


@pytest.mark.parametrize(
    "ck",
    [
        {},
        {k: v for k, v in _ck(2).items() if k != "chi_start"},  # an older checkpoint
        {**_ck(2), "history": []},
        {**_ck(2), "hyper": {"epsilon": 0.5}},  # no schedule recorded
        {**_ck(2), "history": [{"epoch": 0, "step": 0}]},  # epochs=0: nothing trained
    ],
)
def test_check_lines_without_what_it_needs_says_so(ck: dict) -> None:
    text, numbers = check_lines(ck, chi=1.0)
    assert numbers == {} and re.match(r"no forecast \(", text)
