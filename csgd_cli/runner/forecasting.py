"""The chi forecast in the CLI (``core.forecast``): the preflight's verdict on a C-SGD
schedule, the forecast logged beside the measured chi each epoch, and what ``csgd
check`` prints."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig

from ..common.errors import CsgdError
from ..core.forecast import (
    Forecast,
    epoch_curve,
    round_up,
    scaled_milestones,
    schedule_forecast,
    sufficient,
)

log = logging.getLogger("csgd")


def _milestones(sched: Any, epochs: int) -> str:
    """The milestones to pass with ``schedule.epochs=epochs``: the forecast stretched
    them along (``scaled_milestones``); said when those within the schedule differ from
    the given ones there (one shell word)."""
    if sched.kind != "multistep":
        return ""
    want = [m for m in scaled_milestones(sched, epochs) if m < epochs]
    if want == [m for m in sched.milestones if m < epochs]:
        return ""
    return f" schedule.milestones=[{','.join(map(str, want))}]"


def _schedule_text(f: Forecast, sched: Any, steps: int) -> str:
    return (
        f"over its {f.steps} steps ({sched.epochs} epochs x {steps}) within-cluster "
        f"differences fall to {f.kernel:.1e} (kernels) and {f.affine:.1e} (norm gamma/beta) "
        "of their start"
    )


def check_forecast(cfg: DictConfig, steps_per_epoch: int) -> Forecast | None:
    """``csgd run`` and ``csgd train``: refuse a C-SGD schedule whose forecast cannot
    reach the merge's tolerance (``prune.tolerance``), naming the epsilon or the epochs
    that would. ``prune.force=true`` is the override (the merge will be forced anyway,
    or a later ``csgd train`` continues the checkpoint): one warning line, and it goes
    on. Returns the forecast (None for a baseline)."""
    if cfg.prune.method != "csgd":
        return None
    tol = cfg.prune.tolerance
    f = schedule_forecast(cfg.schedule, steps_per_epoch, cfg.epsilon, cfg.norm_epsilon)
    if f.worst <= tol:
        return f
    what = (
        f"the C-SGD schedule cannot reach the merge tolerance: "
        f"{_schedule_text(f, cfg.schedule, steps_per_epoch)}, the merge needs about {tol:g} "
        "(prune.tolerance)"
    )
    ok = sufficient(cfg.schedule, steps_per_epoch, cfg.epsilon, cfg.norm_epsilon, tol)
    fixes = []
    if (eps := ok["epsilon"]) is not None:
        ne = ok["norm_epsilon"]
        if ne is None and cfg.norm_epsilon is not None:  # a given one keeps its share, said
            ne = cfg.norm_epsilon / max(cfg.epsilon, 1e-30) * eps
        fixes.append(f"epsilon={round_up(eps)}" + (f" norm_epsilon={round_up(ne)}" if ne else ""))
    if (n := ok["epochs"]) is not None:
        fixes.append(f"schedule.epochs={n}{_milestones(cfg.schedule, n)}")
    fix = " or ".join(fixes) if fixes else "a longer schedule or a larger schedule.lr"
    if cfg.prune.force:  # the user's override: said once, then trained as asked
        print(f"csgd {cfg.stage}: warning: {what}; {fix} would reach it", file=sys.stderr)
        return f
    raise CsgdError(what, f"pass {fix} (or prune.force=true to train anyway and force the merge)")


def chi_logging(
    chi_fn: Callable[[], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    sched: Any,
    hyper: dict[str, Any],
    steps_per_epoch: int,
    resumed: dict[str, Any] | None,
) -> dict[str, Any]:
    """Give ``chi_fn`` the forecast the trainer logs beside each epoch's chi
    (``chi_fn.forecast(epoch)`` -> {"chi_forecast": chi_start x d^2}); returns what the
    checkpoint keeps of it (``chi_start``: the chi the phase began with)."""
    chi0 = (resumed or {}).get("chi_start")
    if chi0 is None and resumed is None:
        chi0 = float(chi_fn()[0])
    if chi0 is None:  # resumed from an older checkpoint: no forecast
        return {}
    curve = epoch_curve(sched, steps_per_epoch, sched.weight_decay + hyper["epsilon"])

    def at(epoch: int) -> dict[str, float]:
        return {"chi_forecast": chi0 * curve[epoch - 1]} if 0 < epoch <= len(curve) else {}

    chi_fn.forecast = at  # type: ignore[attr-defined]
    return {"chi_start": chi0}


def check_lines(ck: dict[str, Any], chi: float) -> tuple[str, dict[str, Any]]:
    """``csgd check``: the forecast beside the measured ``chi`` (at the checkpoint's
    epoch and at its schedule's end), from what the checkpoint recorded."""
    hyper, hist, chi0 = ck.get("hyper") or {}, ck.get("history") or [], ck.get("chi_start")
    if chi0 is None or not hist or "schedule" not in hyper or not hist[-1].get("epoch"):
        return "no forecast (the checkpoint does not record its schedule's start)", {}
    from omegaconf import OmegaConf

    sched = OmegaConf.create(hyper["schedule"])
    steps = int(hist[-1]["step"]) // int(hist[-1]["epoch"])
    curve = epoch_curve(sched, steps, sched.weight_decay + hyper["epsilon"])
    epoch = min(int(hist[-1]["epoch"]), len(curve))
    now, end = chi0 * curve[epoch - 1], chi0 * curve[-1]
    text = (
        f"forecast chi {now:.3e} at epoch {epoch}/{len(curve)} (measured {chi:.3e}), "
        f"{end:.3e} at the schedule's end"
    )
    return text, {"chi_forecast": now, "chi_forecast_end": end, "chi_start": chi0}
