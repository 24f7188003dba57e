"""csgd run: pretrain -> cluster -> train -> check -> prune -> finetune -> eval, one dir.

With ``resume=true`` in the same ``hydra.run.dir`` it skips every phase whose output file
exists and resumes the interrupted phase from its ``last.pt``.
``prune.target`` replaces ``ratio`` (``prune.rounds`` rounds, ``pipeline.round_target``);
the summary then shows each group's width before and after and the target reached.
``prune.method=l1`` (the L1-norm baseline) skips C-SGD training, keeps the largest-norm
filters at the same widths and fine-tunes for the epochs C-SGD would have trained too
(``pipeline.budget_schedule``).
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ..distributed import barrier, is_main
from ..files import write_json
from ..metrics import chi_report, measure, summary_table
from ..pipeline import (
    base_phase,
    budget_schedule,
    csgd_phase,
    once,
    payload,
    prune_for_config,
    save_pruned,
    train_phase,
    widths_reached,
)
from ..session import load, setup
from ..tracing import channel_groups

log = logging.getLogger("csgd")


def main(cfg: DictConfig, out: Path) -> dict[str, Any]:
    ctx = setup(cfg, out)
    info, l1, rows = ctx.data.info, cfg.prune.method == "l1", {}
    measure_ = lambda m: measure(m, ctx.data, ctx.device, cfg.eval, cfg.amp, cfg.backend)  # noqa: E731
    model, ck = once(ctx, out / "base.pt", lambda: base_phase(ctx, out / "pretrain"))
    rows["base"], base = measure_(model), model
    x, _ = ctx.data.sample_batch(256)  # a target's rounds step towards it, with no ratio
    ratios = [None] * cfg.prune.rounds if cfg.prune.target else list(cfg.ratios) or [cfg.ratio]
    for r, ratio in enumerate(ratios):
        tag, step = f"_r{r + 1}" if len(ratios) > 1 else "", (r + 1, len(ratios))
        pruned, csgd = out / f"pruned{tag}.pt", out / f"csgd{tag}.pt"
        if cfg.resume and pruned.is_file():
            model, ck = load(str(pruned), "run", info)
            continue
        if not l1:
            phase = f"train{tag}"
            train = partial(csgd_phase, ctx, model, ck, phase, out / phase, ratio, step)
            model, ck = once(ctx, csgd, train)
            chi = chi_report(model, channel_groups(model), ck["clusters"])
            log.info("chi %.3e (relative %.3e) after round %d", chi["chi"], chi["relative"], r + 1)
            rows[f"csgd{tag}"] = dict(measure_(model), chi=chi["chi"], chi_relative=chi["relative"])
        src = str(out / ("base.pt" if l1 else csgd.name))
        thin, rep = prune_for_config(cfg, model.to(ctx.device), ck, x, ratio, src, step, out)
        save_pruned(cfg, thin, ck, rep, src, pruned, x)
        barrier()  # rank 0 wrote pruned.pt: every rank reads it
        model, ck = load(str(pruned), "run", info)
        rows[f"pruned{tag}"] = {**measure_(model), "merge_check": rep}
    sched = budget_schedule(cfg, len(ratios)) if l1 else cfg.finetune
    kw = payload(cfg, model, ck, pruned_from=ck.get("pruned_from"))
    fine = lambda: train_phase(ctx, model, sched, "finetune", out / "finetune", kw)  # noqa: E731
    model, ck = once(ctx, out / "finetuned.pt", fine)
    rows["finetuned"] = measure_(model)
    keys = ("epsilon", "seed")
    summary = {"model": cfg.model.name, "dataset": cfg.dataset.name, "method": cfg.prune.method}
    summary.update(ratio=ratios[-1], ratios=ratios, **{k: cfg[k] for k in keys}, rows=rows)
    if is_main():  # widths before and after; a target against what was reached
        summary.update(widths_reached(cfg, base, model, info))
        print(summary_table(rows, summary["widths"], summary.get("target")))
    write_json(out / "summary.json", summary)
    return summary
