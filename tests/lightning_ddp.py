"""Lightning's DDP strategy on two CPU processes (gloo) with ``CSGDCallback``; run by
tests/test_lightning.py as a script (Lightning starts rank 1 by running it again).
Each rank writes its clusters and weights to ``<out>/rank<r>.pt``."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from csgd_cli.lightning import CSGDCallback
from test_lightning import KW, Tiny, loader

if __name__ == "__main__":
    out = Path(sys.argv[1])
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    cb = CSGDCallback(x, **{**KW, "epsilon": 6.0, "norm_epsilon": 6.0})  # half the steps each
    module = Tiny()
    trainer = L.Trainer(
        max_epochs=30, accelerator="cpu", devices=2, strategy="ddp", callbacks=[cb],
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=True,
    )  # fmt: skip
    trainer.fit(module, loader())
    thin = cb.merge(tolerance=1e-4)
    rep = cb.pruner.merge_report
    torch.save({"clusters": cb.pruner.clusters, "state": {k: v.detach() for k, v in module.named_parameters()},
                "top1_agreement": rep["top1_agreement"]},
               out / f"rank{trainer.global_rank}.pt")  # fmt: skip
