"""One round of ``csgd run``: train the widths' way (C-SGD, or a baseline's sparsity
phase), prune to those widths, verify, write ``pruned<tag>.pt`` and read it back."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..api.record import PruneRecord
from ..core.chi import chi_report
from ..tracing.trace import channel_groups
from .baselines import prune_step, sparsity_phase
from .distributed import barrier
from .pipeline import csgd_phase, once, save_pruned
from .session import Ctx, load

log = logging.getLogger("csgd")
Measure = Callable[[Any, str], dict[str, Any]]


def prune_round(
    ctx: Ctx,
    model: Any,
    ck: dict[str, Any],
    x: torch.Tensor,
    ratio: float | None,
    step: tuple[int, int],
    measure: Measure,
    rows: dict[str, Any],
) -> tuple[Any, dict[str, Any]]:
    """Round ``step`` of ``csgd run`` (``ratio``: its ratio, None under a target): the
    measured rows go into ``rows``; returns the pruned network and its checkpoint."""
    cfg, out, info = ctx.cfg, ctx.out, ctx.data.info
    r, n = step
    tag = f"_r{r}" if n > 1 else ""
    src, widths = out / (f"pruned_r{r - 1}.pt" if r > 1 else "base.pt"), None
    if cfg.prune.method == "csgd":
        phase, src = f"train{tag}", out / f"csgd{tag}.pt"
        train = partial(csgd_phase, ctx, model, ck, phase, out / phase, ratio, step)
        model, ck = once(ctx, src, train)
        chi = chi_report(model, channel_groups(model), PruneRecord.from_checkpoint(ck).clusters)
        log.info("chi %.3e (relative %.3e) after round %d", chi["chi"], chi["relative"], r)
        rows[f"csgd{tag}"] = dict(
            measure(model, f"csgd{tag}"), chi=chi["chi"], chi_relative=chi["relative"]
        )
    elif cfg.prune.method == "slimming":  # widths chosen before it, as C-SGD's clusters are
        phase, src = f"sparsity{tag}", out / f"sparse{tag}.pt"
        train = partial(sparsity_phase, ctx, model, ck, phase, out / phase, ratio, step)
        model, ck = once(ctx, src, train)
        rows[f"sparse{tag}"] = measure(model, f"sparse{tag}")
        widths = PruneRecord.from_checkpoint(ck).group_widths
    thin, rep = prune_step(ctx, model.to(ctx.device), ck, x, ratio, str(src), step, out, widths)
    pruned = Path(out / f"pruned{tag}.pt")
    save_pruned(cfg, thin, ck, rep, str(src), pruned, x)
    barrier()  # rank 0 wrote pruned.pt: every rank reads it
    model, ck = load(str(pruned), "run", info)
    rows[f"pruned{tag}"] = {**measure(model, f"pruned{tag}"), "merge_check": rep}
    return model, ck
