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

from ...common.files import write_json
from ..baselines import finetune_schedule, retrain_schedule
from ..distributed import is_main
from ..evaluate import latencies, measure
from ..pipeline import base_phase, once, payload, train_phase
from ..rounds import prune_round
from ..runtimes import int8_row
from ..session import load, setup
from ..tables import summary_table
from ..widthconf import widths_reached

log = logging.getLogger("csgd")


def main(cfg: DictConfig, out: Path) -> dict[str, Any]:
    ctx = setup(cfg, out)
    info, rows = ctx.data.info, {}
    nets: dict[str, Any] = {}  # every row's network, timed side by side at the end

    def measure_(m: Any, name: str) -> dict[str, Any]:
        nets[name] = copy.deepcopy(m)  # fine-tuning goes on to change ``m`` in place
        return measure(m, ctx.data, ctx.device, cfg.eval, cfg.amp, cfg.backend, timed=False)

    model, ck = once(ctx, out / "base.pt", lambda: base_phase(ctx, out / "pretrain"))
    rows["base"], base = measure_(model, "base"), model
    x, _ = ctx.data.sample_batch(256)  # a target's rounds step towards it, with no ratio
    ratios = [None] * cfg.prune.rounds if cfg.prune.target else list(cfg.ratios) or [cfg.ratio]
    for r, ratio in enumerate(ratios):
        pruned = out / (f"pruned_r{r + 1}.pt" if len(ratios) > 1 else "pruned.pt")
        if cfg.resume and pruned.is_file():
            model, ck = load(str(pruned), "run", info)
            continue
        model, ck = prune_round(ctx, model, ck, x, ratio, (r + 1, len(ratios)), measure_, rows)
    retrain = retrain_schedule(cfg, len(ratios))
    if retrain is not None:  # a criterion on C-SGD's learning rates, then the fine-tune
        kw = payload(cfg, model, ck, pruned_from=ck.get("pruned_from"))
        again = partial(train_phase, ctx, model, retrain, "retrain", out / "retrain", kw)
        model, ck = once(ctx, out / "retrained.pt", again)
    fine = partial(train_phase, ctx, model, finetune_schedule(cfg, len(ratios)), "finetune")
    kw = payload(cfg, model, ck, pruned_from=ck.get("pruned_from"))
    model, ck = once(ctx, out / "finetuned.pt", lambda: fine(out / "finetune", kw))
    rows["finetuned"] = measure_(model, "finetuned")
    shape = (info.in_channels, info.image_size, info.image_size)
    for name, lat in latencies(nets, shape, ctx.device, cfg.eval, cfg.backend).items():
        rows[name].update(lat)  # one timer, every network side by side
    if cfg.deploy.int8:  # the fine-tuned network in INT8: top-1 against float32's
        rows["finetuned-int8"] = r8 = int8_row(model, ctx.data, ctx.device, cfg, rows["finetuned"])
        log.info(
            "INT8 (onnxruntime, %d calibration batches): top-1 %.2f%%, float32 %.2f%%",
            cfg.deploy.calib_batches,
            r8["acc"],
            r8["acc_float32"],
        )
    summary = {"model": cfg.model.name, "dataset": cfg.dataset.name, "method": cfg.prune.method}
    summary.update(ratio=ratios[-1], ratios=ratios, epsilon=cfg.epsilon, seed=cfg.seed, rows=rows)
    if is_main():  # widths before and after; a target against what was reached
        summary.update(widths_reached(cfg, base, model, info))
        print(summary_table(rows, summary["widths"], summary.get("target")))
    write_json(out / "summary.json", summary)
    return summary
