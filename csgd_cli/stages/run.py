"""csgd run: pretrain -> cluster -> train -> check -> prune -> finetune -> eval, one dir.

With ``resume=true`` in the same ``hydra.run.dir`` it skips every phase whose output file
exists and resumes the interrupted phase from its ``last.pt``.

``prune.method=l1`` (the L1-norm baseline) skips C-SGD training and keeps the
largest-norm filters at the same widths. To give it the same total epoch budget, its
fine-tune runs ``finetune.epochs + rounds * schedule.epochs`` epochs (``rounds`` =
``len(ratios)`` or 1): the epochs C-SGD would have trained are added to the fine-tune,
with the ``finetune`` learning rate; multistep milestones stay put, a cosine schedule
stretches over the longer run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..checkpoint import save_checkpoint
from .check import chi_report
from .common import load, make_clusters, new_model, payload, setup, train_phase, write_json
from .eval import measure
from .prune import merge_checked, save_pruned

log = logging.getLogger("csgd")


def _done(cfg: DictConfig, path: Path) -> bool:
    return bool(cfg.resume) and path.is_file()


def main(cfg: DictConfig, out: Path) -> dict[str, Any]:
    ctx = setup(cfg, out)
    rows: dict[str, dict[str, Any]] = {}
    base = out / "base.pt"
    if _done(cfg, base):
        model, ck = load(str(base), "base", ctx.data)
    elif cfg.init is not None:
        model, ck = load(cfg.init, "init", ctx.data)
        save_checkpoint(base, {**payload(cfg, model, ck), "state_dict": model.state_dict()})
    else:
        model, ck = new_model(cfg, ctx.data), {}
        model, ck = train_phase(
            ctx, model, cfg.pretrain, "pretrain", out / "pretrain", payload(cfg, model, ck)
        )
        save_checkpoint(base, ck)
    rows["base"] = measure(ctx, model)
    l1 = cfg.prune.method == "l1"
    ratios = list(cfg.ratios) or [cfg.ratio]
    for r, ratio in enumerate(ratios):
        tag = f"_r{r + 1}" if len(ratios) > 1 else ""
        pruned = out / f"pruned{tag}.pt"
        if _done(cfg, pruned):
            model, ck = load(str(pruned), "pruned", ctx.data)
            continue
        clusters = None
        if not l1:
            csgd = out / f"csgd{tag}.pt"
            if _done(cfg, csgd):
                model, ck = load(str(csgd), "csgd", ctx.data)
                clusters = ck["clusters"]
            else:
                clusters = make_clusters(cfg, model, ck, ratio)
                info = payload(cfg, model, ck, ratio=ratio, epsilon=cfg.epsilon)
                model, ck = train_phase(
                    ctx, model, cfg.schedule, f"train{tag}", out / f"train{tag}", info, clusters
                )
                clusters = ck["clusters"]  # on resume: the ones stored in last.pt
                save_checkpoint(csgd, ck)
            chi = chi_report(model, clusters)
            log.info(
                "chi %.3e (relative %.3e) after C-SGD round %d", chi["chi"], chi["relative"], r + 1
            )
            rows[f"csgd{tag}"] = {
                **measure(ctx, model),
                "chi": chi["chi"],
                "chi_relative": chi["relative"],
            }
        thin, rep = merge_checked(ctx, model, ck, clusters)
        save_pruned(ctx, thin, ck, rep, str(out / f"csgd{tag}.pt") if not l1 else str(base), pruned)
        model, ck = load(str(pruned), "pruned", ctx.data)
        rows[f"pruned{tag}"] = {**measure(ctx, model), "merge_check": rep}
    fine = out / "finetuned.pt"
    if _done(cfg, fine):
        model, ck = load(str(fine), "finetuned", ctx.data)
    else:
        info = payload(cfg, model, ck, pruned_from=ck.get("pruned_from"))
        sched = l1_finetune(cfg, len(ratios)) if l1 else cfg.finetune
        model, ck = train_phase(ctx, model, sched, "finetune", out / "finetune", info)
        save_checkpoint(fine, ck)
    rows["finetuned"] = measure(ctx, model)
    summary = {
        "model": cfg.model.name,
        "dataset": cfg.dataset.name,
        "method": cfg.prune.method,
        "ratio": ratios[-1],
        "ratios": ratios,
        "epsilon": cfg.epsilon,
        "seed": cfg.seed,
        "rows": rows,
    }
    write_json(out / "summary.json", summary)
    print(table(rows))
    return summary


def l1_finetune(cfg: DictConfig, rounds: int) -> DictConfig:
    """The L1 baseline's fine-tune: ``finetune`` plus the epochs C-SGD would train."""
    extra = rounds * cfg.schedule.epochs
    log.info("L1 baseline: fine-tune %d + %d epochs (C-SGD's budget)", cfg.finetune.epochs, extra)
    return OmegaConf.merge(cfg.finetune, {"epochs": cfg.finetune.epochs + extra})


def table(rows: dict[str, dict[str, Any]]) -> str:
    head = f"{'model':<12}{'top-1 %':>9}{'params':>12}{'MACs (M)':>11}{'latency ms':>12}{'speed-up':>10}"
    base_lat = rows["base"]["latency_ms"]
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        lines.append(
            f"{name:<12}{r['acc']:>9.2f}{r['params']:>12,}{r['macs'] / 1e6:>11.2f}"
            f"{r['latency_ms']:>12.2f}{base_lat / r['latency_ms']:>9.2f}x"
        )
    return "\n".join(lines)
