"""csgd run: pretrain -> cluster -> train -> check -> prune -> finetune -> eval, one dir.

``resume=true`` (same ``hydra.run.dir``) skips the phases done and resumes the one cut
short from its ``last.pt``; ``prune.target`` replaces ``ratio`` (``prune.rounds`` rounds).
A baseline (``prune.method=l1|l2|fpgm|taylor|random``) skips C-SGD training, keeps its
criterion's best channels at the same widths and fine-tunes for the epochs C-SGD would
have trained too; ``slimming`` trains them as its sparsity phase instead (``baselines``).
"""

from __future__ import annotations

import copy
import logging
from functools import partial
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ...api.record import PruneRecord
from ...common.files import write_json
from ...core.chi import chi_report
from ...tracing.trace import channel_groups
from ..baselines import finetune_schedule, prune_step, sparsity_phase
from ..distributed import barrier, is_main
from ..evaluate import latencies, measure
from ..pipeline import (
    base_phase,
    csgd_phase,
    once,
    payload,
    save_pruned,
    train_phase,
)
from ..runtimes import int8_row
from ..session import load, setup
from ..tables import summary_table
from ..widthconf import widths_reached

log = logging.getLogger("csgd")


def main(cfg: DictConfig, out: Path) -> dict[str, Any]:
    ctx = setup(cfg, out)
    info, method, rows = ctx.data.info, cfg.prune.method, {}
    nets: dict[str, Any] = {}  # every row's network, timed side by side at the end

    def measure_(m: Any, name: str) -> dict[str, Any]:
        nets[name] = copy.deepcopy(m)  # fine-tuning goes on to change ``m`` in place
        return measure(m, ctx.data, ctx.device, cfg.eval, cfg.amp, cfg.backend, timed=False)

    model, ck = once(ctx, out / "base.pt", lambda: base_phase(ctx, out / "pretrain"))
    rows["base"], base = measure_(model, "base"), model
    x, _ = ctx.data.sample_batch(256)  # a target's rounds step towards it, with no ratio
    ratios = [None] * cfg.prune.rounds if cfg.prune.target else list(cfg.ratios) or [cfg.ratio]
    for r, ratio in enumerate(ratios):
        tag, step = f"_r{r + 1}" if len(ratios) > 1 else "", (r + 1, len(ratios))
        pruned, csgd = out / f"pruned{tag}.pt", out / f"csgd{tag}.pt"
        if cfg.resume and pruned.is_file():
            model, ck = load(str(pruned), "run", info)
            continue
        src, widths = out / (f"pruned_r{r}.pt" if r else "base.pt"), None  # ``model``'s file
        if method == "csgd":
            phase, src = f"train{tag}", csgd
            train = partial(csgd_phase, ctx, model, ck, phase, out / phase, ratio, step)
            model, ck = once(ctx, csgd, train)
            chi = chi_report(model, channel_groups(model), PruneRecord.from_checkpoint(ck).clusters)
            log.info("chi %.3e (relative %.3e) after round %d", chi["chi"], chi["relative"], r + 1)
            rows[f"csgd{tag}"] = dict(
                measure_(model, f"csgd{tag}"), chi=chi["chi"], chi_relative=chi["relative"]
            )
        elif method == "slimming":  # widths chosen before it, as C-SGD's clusters are
            phase, src = f"sparsity{tag}", out / f"sparse{tag}.pt"
            train = partial(sparsity_phase, ctx, model, ck, phase, out / phase, ratio, step)
            model, ck = once(ctx, src, train)
            rows[f"sparse{tag}"] = measure_(model, f"sparse{tag}")
            widths = PruneRecord.from_checkpoint(ck).group_widths
        thin, rep = prune_step(ctx, model.to(ctx.device), ck, x, ratio, str(src), step, out, widths)
        save_pruned(cfg, thin, ck, rep, str(src), pruned, x)
        barrier()  # rank 0 wrote pruned.pt: every rank reads it
        model, ck = load(str(pruned), "run", info)
        rows[f"pruned{tag}"] = {**measure_(model, f"pruned{tag}"), "merge_check": rep}
    fine = partial(train_phase, ctx, model, finetune_schedule(cfg, len(ratios)), "finetune")
    kw = payload(cfg, model, ck, pruned_from=ck.get("pruned_from"))
    model, ck = once(ctx, out / "finetuned.pt", lambda: fine(out / "finetune", kw))
    rows["finetuned"] = measure_(model, "finetuned")
    shape = (info.in_channels, info.image_size, info.image_size)
    for name, lat in latencies(nets, shape, ctx.device, cfg.eval, cfg.backend).items():
        rows[name].update(lat)  # one timer, every network side by side
    if cfg.deploy.int8:  # the fine-tuned network in INT8: top-1 against float32's
        rows["finetuned-int8"] = r8 = int8_row(model, ctx.data, ctx.device, cfg, rows["finetuned"])
        log.info("INT8 (onnxruntime, %d calibration batches): top-1 %.2f%%, float32 %.2f%%",
                 cfg.deploy.calib_batches, r8["acc"], r8["acc_float32"])  # fmt: skip
    summary = {"model": cfg.model.name, "dataset": cfg.dataset.name, "method": cfg.prune.method}
    summary.update(ratio=ratios[-1], ratios=ratios, epsilon=cfg.epsilon, seed=cfg.seed, rows=rows)
    if is_main():  # widths before and after; a target against what was reached
        summary.update(widths_reached(cfg, base, model, info))
        print(summary_table(rows, summary["widths"], summary.get("target")))
    write_json(out / "summary.json", summary)
    return summary
